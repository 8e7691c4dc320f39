"""Per-layer scores: the hand-off from an interpretability result to the LoRA layer selector.

A :class:`LayerScores` says how much each text layer matters (mean margin recovery of the position
class that carries the flip, an attribution estimate, ...), which method produced it and from what.
It round-trips through JSON so ``lora_targeted`` can read it without importing torch results.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from interp.patching import PatchingResult


@dataclass
class LayerScores:
    """One score per text layer, with its provenance."""

    layers: list[int]
    """Text layer indices (non-negative, distinct)."""
    scores: list[float]
    """Score of each layer (higher = more involved); NaN = not measured, never selected."""
    method: str
    """What computed the scores, e.g. ``activation_patching``, ``attribution_patching``, ``logit_lens``."""
    source: str = ""
    """What they were computed on (model, data set, pair type), free text."""
    site_kind: str | None = None
    """Site the scores refer to (``resid_post``, ``attn_out``, ...), if any."""
    position: str | None = None
    """Position class the scores refer to (e.g. ``final``), if any."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else worth recording (JSON-serialisable)."""

    def __post_init__(self) -> None:
        self.layers = [int(x) for x in self.layers]
        self.scores = [float(s) for s in self.scores]
        if len(self.layers) != len(self.scores):
            raise ValueError(
                f"{len(self.layers)} layers but {len(self.scores)} scores: give exactly one score per layer"
            )
        if len(set(self.layers)) != len(self.layers) or any(x < 0 for x in self.layers):
            raise ValueError(
                f"layers {self.layers} must be distinct non-negative indices (resolve negative ones first)"
            )
        if not self.method:
            raise ValueError("method is empty: say what computed the scores, e.g. 'activation_patching'")

    @classmethod
    def from_result(
        cls, result: PatchingResult, position: str | None = None, source: str = ""
    ) -> LayerScores:
        """Mean recovery per layer at ``position`` (default: the position whose recovery is largest
        in absolute value averaged over layers: the one that carries the flip)."""
        rec = result.recovery
        if position is None:
            strength = [
                float(col[~col.isnan()].abs().mean()) if (~col.isnan()).any() else -1.0 for col in rec.T
            ]
            idx = max(range(len(strength)), key=strength.__getitem__)
        elif position in result.positions:
            idx = result.positions.index(position)
        else:
            raise ValueError(f"position {position!r} not in this result; it has {result.positions[:10]}")
        return cls(
            layers=list(result.layers),
            scores=rec[:, idx].tolist(),
            method=result.method,
            source=source or str(result.meta.get("model", "")),
            site_kind=result.site_kind,
            position=result.positions[idx],
        )

    def top_k(self, k: int, by: Literal["score", "abs"] = "score") -> list[int]:
        """The ``k`` best layers, best first (NaN scores never chosen; ties: lower layer first)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if by not in ("score", "abs"):
            raise ValueError(f"by must be 'score' or 'abs', got {by!r}")
        scored = [
            (abs(s) if by == "abs" else s, layer) for layer, s in zip(self.layers, self.scores, strict=True)
        ]
        scored = [x for x in scored if not math.isnan(x[0])]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [layer for _, layer in scored[:k]]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = [None if math.isnan(s) else s for s in self.scores]  # JSON has no NaN
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; also written to ``path`` if given."""
        text = json.dumps(self.as_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> LayerScores:
        """From JSON text or from a file written by :meth:`to_json`."""
        is_text = isinstance(text_or_path, str) and text_or_path.lstrip().startswith("{")
        text = text_or_path if is_text else Path(text_or_path).read_text()
        d = json.loads(str(text))
        d["scores"] = [float("nan") if s is None else s for s in d["scores"]]
        return cls(**d)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": self.layers, "score": self.scores, "method": self.method})
