"""Per-layer scores and site rankings: the hand-off from an interpretability result to what comes next.

A :class:`LayerScores` says how much each text layer matters (mean margin recovery of the position
class that carries the flip, an attribution estimate, ...), which method produced it and from what.
It round-trips through JSON so ``lora_targeted`` can read it without importing torch results.

Component sweeps (``attn_out`` and ``mlp_out`` of every layer, :func:`component_sweep`) are ranked site
by site with :func:`site_ranking`; :func:`flagged_site` is the top site of a ranking, the site an SAE
is trained at (notebook 02 flags it, notebook 03 reads it or recomputes it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from hooks.sites import Site
from interp.patching import PatchingConfig, PatchingResult, patching_sweep
from interp.stats import mean_bootstrap

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter
    from hooks.batch import Batch

#: The components a component sweep patches: what each layer's attention and MLP add to the residual.
COMPONENT_KINDS: tuple[str, ...] = ("attn_out", "mlp_out")


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

    @classmethod
    def from_results(
        cls,
        results: Sequence[PatchingResult],
        position: str = "final",
        absolute: bool = True,
        source: str = "",
    ) -> LayerScores:
        """One score per layer summed over several sweeps (e.g. ``attn_out`` and ``mlp_out``) at ``position``:
        ``sum_kind |recovery(kind, L)|`` (``absolute=False``: the signed sum). The layers must agree."""
        if not results:
            raise ValueError("no results: pass the sweeps to combine, e.g. one per component kind")
        layers = results[0].layers
        bad = [r.site_kind for r in results if r.layers != layers]
        if bad:
            raise ValueError(f"sweeps {bad} cover other layers than {layers}; run them with the same layers")
        cols = [_position_column(r, position) for r in results]
        stacked = np.stack([np.abs(c) if absolute else c for c in cols])
        return cls(
            layers=list(layers),
            scores=stacked.sum(0).tolist(),
            method=results[0].method,
            source=source or str(results[0].meta.get("model", results[0].meta.get("target", ""))),
            site_kind="+".join(r.site_kind for r in results),
            position=position,
            meta={"reduce": "sum of |recovery|" if absolute else "sum of recovery"},
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


def _position_column(result: PatchingResult, position: str) -> np.ndarray:
    if position not in result.positions:
        raise ValueError(
            f"position {position!r} not in this {result.site_kind} result; it has {result.positions[:10]}"
        )
    return result.recovery[:, result.positions.index(position)].numpy().astype(float)


def component_sweep(
    adapter: VLMAdapter,
    clean: Batch,
    corrupt: Batch,
    positions: tuple[str, ...] = ("image", "final"),
    kinds: Sequence[str] = COMPONENT_KINDS,
    **config: Any,
) -> dict[str, PatchingResult]:
    """One :func:`~interp.patching.patching_sweep` per component kind (every layer, ``positions``), keyed
    by kind; ``config`` goes to :class:`~interp.patching.PatchingConfig` (``max_rows_per_forward``, ...)."""
    return {
        kind: patching_sweep(
            adapter, clean, corrupt, PatchingConfig(site_kind=kind, positions=positions, **config)
        )
        for kind in kinds
    }


def site_ranking(
    results: Mapping[str, PatchingResult] | Sequence[PatchingResult],
    position: str = "final",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Every (kind, layer) site of the sweeps ranked by mean recovery at ``position``, best first.

    Columns: site (``attn_out(3)``), kind, layer, recovery (mean over pairs, NaN pairs left out), low /
    high (bootstrap interval over pairs, :func:`interp.stats.mean_bootstrap`), n (pairs with a value),
    rank (1 = best; ties: lower layer first, then the order of ``results``). Works for paraphrase
    patching and cross-model patching alike (same result type).
    """
    parts = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not parts:
        raise ValueError("no results to rank: pass one patching result per component kind")
    rows = []
    for order, r in enumerate(parts):
        if position not in r.positions:
            raise ValueError(
                f"position {position!r} not in the {r.site_kind} result; it has {r.positions[:10]}"
            )
        per_pair = r.recovery_per_pair[:, r.positions.index(position)].numpy().astype(float)
        value, low, high = mean_bootstrap(per_pair, n_boot, seed, level)
        n = (~np.isnan(per_pair)).sum(1)
        for i, layer in enumerate(r.layers):
            site = Site(r.site_kind, layer)
            rows.append(
                {
                    "site": str(site), "kind": r.site_kind, "layer": layer, "recovery": value[i],
                    "low": low[i], "high": high[i], "n": int(n[i]), "_order": order,
                }
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["_key"] = frame["recovery"].fillna(-np.inf)
    frame = frame.sort_values(["_key", "layer", "_order"], ascending=[False, True, True], kind="mergesort")
    frame = frame.drop(columns=["_key", "_order"]).reset_index(drop=True)
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame


def flagged_site(
    results: Mapping[str, PatchingResult] | Sequence[PatchingResult], position: str = "final"
) -> Site:
    """The site a component sweep flags: the top of :func:`site_ranking` at ``position`` (highest mean
    recovery of the flip). Notebook 02 writes it out; notebook 03 trains its SAE there."""
    top = site_ranking(results, position, n_boot=1).iloc[0]
    if not np.isfinite(top["recovery"]):
        raise ValueError(
            f"no site has a recovery at position {position!r}: are there pairs with a margin gap?"
        )
    return Site(str(top["kind"]), int(top["layer"]))


def ranked_above(ranking: pd.DataFrame, sites: Sequence[Site]) -> pd.DataFrame:
    """The rows of a :func:`site_ranking` placed above the best of ``sites`` (e.g. the planted sites):
    empty when one of ``sites`` is first. Add ``upstream`` = layer below every one of ``sites``."""
    names = {str(s) for s in sites}
    hit = ranking.index[ranking["site"].isin(names)]
    if not len(hit):
        raise ValueError(f"none of {sorted(names)} is in the ranking (sites {list(ranking['site'][:5])}...)")
    above = ranking.loc[: hit[0] - 1].copy() if hit[0] > 0 else ranking.iloc[:0].copy()
    lowest = min(s.layer for s in sites if s.layer is not None)
    above["upstream"] = above["layer"] < lowest
    return above


def save_flagged(
    path: str | Path,
    results: Mapping[str, PatchingResult] | Sequence[PatchingResult],
    position: str = "final",
    source: str = "",
) -> dict[str, Any]:
    """Write the flagged site (:func:`flagged_site`) and the top of its ranking to ``path`` (JSON, folders
    created); returns what was written. Read it back with :func:`load_flagged`."""
    ranking = site_ranking(results, position)
    site = flagged_site(results, position)
    top = ranking.iloc[0]
    record = {
        "site": str(site),
        "position": position,
        "recovery": float(top["recovery"]),
        "low": float(top["low"]),
        "high": float(top["high"]),
        "n_pairs": int(top["n"]),
        "method": "activation_patching: component sweep, ranked by mean recovery (interp.scores.flagged_site)",
        "source": source,
        "ranking": ranking.head(8)[["site", "recovery", "low", "high"]].to_dict("records"),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)  # never a half-written file
    return record


def load_flagged(path: str | Path) -> Site:
    """The site a :func:`save_flagged` file names."""
    from hooks.sites import parse_site

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no flagged-site file at {p}: run notebook 02 first, or compute it with "
            "interp.flagged_site(component_sweep(...))"
        )
    return parse_site(json.loads(p.read_text())["site"])
