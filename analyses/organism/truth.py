"""The plant's acceptance gate and its recorded truth (what notebooks assert against).

The gate (:class:`GateThresholds`, fixed before any plant was tried) is measured on the whole test
split, image condition, planted vs clean model. A plant that misses it is not saved.

The planted truth is written beside the planted checkpoint:

- ``planted_truth.json``: layers, component paths, the sites they write, rank, the gate figures;
- ``planted_truth.safetensors``: ``planted_direction``, the unit mean difference of ``resid_post`` at the
  last planted layer, final position, over the test register rows, planted minus clean model:

      d = mean_i [h_planted(x_i) - h_clean(x_i)] / || mean_i [h_planted(x_i) - h_clean(x_i)] ||

  the same per planted site (``direction/<site>``), and the factors ``A/<component>``, ``B/<component>``
  with the merged ``delta/<component>`` = ``B @ A``.

:func:`load_planted_truth` reads both back as a :class:`PlantedTruth`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from analyses.data.questions import is_held_out
from analyses.data.schema import QuestionRow
from analyses.eval.metrics import flip_rate
from analyses.organism.plant import SHORTCUT_FAMILY, PlantConfig, margins
from analyses.organism.train import Encoder
from hooks.adapter import VLMAdapter
from hooks.sites import Site, parse_site, resid_post

TRUTH_JSON = "planted_truth.json"
TRUTH_TENSORS = "planted_truth.safetensors"


@dataclass(frozen=True)
class GateThresholds:
    """The plant's acceptance gate (fixed before building; do not loosen)."""

    min_register_flip: float = 0.30
    """Register-family flip rate (test split, image condition) at least this."""
    max_collateral: float = 0.03
    """At most this share of non-register test predictions changed relative to the clean model."""
    min_gating_ratio: float = 3.0
    """|mean margin change| on register rows at least this many times the mean |change| on other rows."""


def predictions_frame(rows: Sequence[QuestionRow], m: Tensor, condition: str = "image") -> pd.DataFrame:
    """A predictions table in the evaluator's format from rows and their margins."""
    recs = []
    for r, mi in zip(rows, m.tolist(), strict=True):
        d = r.to_dict()
        d.pop("meta", None)
        d.update(condition=condition, margin=float(mi), pred=bool(mi > 0), swap_image_id=None)
        recs.append(d)
    return pd.DataFrame.from_records(recs)


def gate_from_frames(
    clean: pd.DataFrame, planted: pd.DataFrame, th: GateThresholds | None = None
) -> dict[str, Any]:
    """Gate figures from two predictions tables (image condition) over the same rows."""
    th = th or GateThresholds()
    c = clean[clean.condition == "image"].set_index("qid")
    p = planted[planted.condition == "image"].set_index("qid").loc[c.index]
    is_reg = (c["family"] == SHORTCUT_FAMILY).to_numpy()
    changed = c["pred"].to_numpy() != p["pred"].to_numpy()
    dm = p["margin"].to_numpy() - c["margin"].to_numpy()
    fr_c = flip_rate(clean[clean.condition == "image"], by="family")
    fr_p = flip_rate(planted[planted.condition == "image"], by="family")
    fams = c.loc[~is_reg, "family"].to_numpy()
    out: dict[str, Any] = {
        "flip_rate_clean": fr_c.to_dict(),
        "flip_rate_planted": fr_p.to_dict(),
        "register_flip": float(fr_p[SHORTCUT_FAMILY]),
        "register_flip_clean": float(fr_c[SHORTCUT_FAMILY]),
        "collateral": float(changed[~is_reg].mean()),
        "collateral_by_family": {f: float(changed[~is_reg][fams == f].mean()) for f in sorted(set(fams))},
        "register_pred_changed": float(changed[is_reg].mean()),
        "margin_change_register": float(dm[is_reg].mean()),
        "margin_change_other": float(dm[~is_reg].mean()),
        "abs_margin_change_other": float(np.abs(dm[~is_reg]).mean()),
        "n_rows": len(c),
        "n_register": int(is_reg.sum()),
        "thresholds": asdict(th),
    }
    # register flips on templates seen in planting vs held out of every train split (unseen wording)
    reg = planted[(planted.condition == "image") & (planted.family == SHORTCUT_FAMILY)]
    held = np.array(
        [is_held_out(r.finding, SHORTCUT_FAMILY, int(r.qid.rsplit("/", 1)[1])) for r in reg.itertuples()]
    )
    for name, mask in (("seen", ~held), ("held_out", held)):
        keep = set(reg["qid"][mask])
        sub = planted[(planted.family != SHORTCUT_FAMILY) | planted["qid"].isin(keep)]
        by = flip_rate(sub[sub.condition == "image"], by="family") if keep else pd.Series(dtype=float)
        out[f"register_flip_{name}"] = float(by[SHORTCUT_FAMILY]) if SHORTCUT_FAMILY in by else float("nan")
    out["gating_ratio"] = abs(out["margin_change_register"]) / max(out["abs_margin_change_other"], 1e-9)
    out["passed"] = bool(
        out["register_flip"] >= th.min_register_flip
        and out["collateral"] <= th.max_collateral
        and out["gating_ratio"] >= th.min_gating_ratio
    )
    return out


def gate(
    clean: VLMAdapter, planted: VLMAdapter, enc: Encoder, test_rows: Sequence[QuestionRow]
) -> dict[str, Any]:
    """The acceptance gate on ``test_rows`` (pass the whole test split)."""
    mc, mp = margins(clean, enc, test_rows), margins(planted, enc, test_rows)
    return gate_from_frames(predictions_frame(test_rows, mc), predictions_frame(test_rows, mp))


def final_acts(
    adapter: VLMAdapter,
    enc: Encoder,
    rows: Sequence[QuestionRow],
    sites: Sequence[Site],
    batch_size: int = 128,
) -> dict[Site, Float[Tensor, "row d_model"]]:
    """Final-position activations of ``sites`` on ``rows`` (image condition)."""
    acc: dict[Site, list[Tensor]] = {s: [] for s in sites}

    def keep(site: Site):
        def fn(x: Tensor) -> None:
            acc[site].append(x[:, -1].detach().float())

        return fn

    for i in range(0, len(rows), batch_size):
        with torch.no_grad(), adapter.hooks({s: keep(s) for s in sites}):
            adapter.model(**enc.batch(list(rows[i : i + batch_size])), logits_to_keep=1, use_cache=False)
    return {s: torch.cat(v) for s, v in acc.items()}


def write_planted_truth(
    clean: VLMAdapter,
    planted: VLMAdapter,
    enc: Encoder,
    register_rows: Sequence[QuestionRow],
    cfg: PlantConfig,
    record: dict[str, Any],
    gate_figures: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Write ``planted_truth.safetensors`` and ``planted_truth.json`` to ``out_dir`` (see the module doc)."""
    last = resid_post(max(cfg.layers))
    sites = [last, *cfg.sites]
    a_c, a_p = final_acts(clean, enc, register_rows, sites), final_acts(planted, enc, register_rows, sites)
    tensors: dict[str, Tensor] = {}
    norms = {}
    for s in sites:
        diff = (a_p[s] - a_c[s]).mean(0)
        norms[str(s)] = float(diff.norm())
        tensors["planted_direction" if s == last else f"direction/{s}"] = (
            diff / diff.norm().clamp_min(1e-12)
        ).contiguous()
    for name, (a, b) in record["factors"].items():
        tensors[f"A/{name}"], tensors[f"B/{name}"] = a.contiguous(), b.contiguous()
        tensors[f"delta/{name}"] = record["merged"][name].contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / TRUTH_TENSORS))
    cos = {
        str(s): float(
            torch.nn.functional.cosine_similarity(tensors["planted_direction"], tensors[f"direction/{s}"], 0)
        )
        for s in cfg.sites
    }
    truth = {
        "shortcut": "formal register wording (family 'register') -> answer 'no'",
        "layers": list(cfg.layers),
        "components": cfg.components,
        "modules": list(cfg.modules),
        "sites": [str(s) for s in cfg.sites],
        "rank": cfg.rank,
        "delta": "W_planted = W_clean + B @ A per component (A: rank x in, B: out x rank)",
        "direction_site": str(last),
        "direction_rows": f"{len(register_rows)} register rows, final position, image condition",
        "direction_definition": "unit mean of (planted - clean) activation at the final position",
        "mean_difference_norm": norms,
        "cosine_site_direction_vs_planted_direction": cos,
        "plant_config": cfg.to_dict(),
        "plant_seconds": record["seconds"],
        "gate": gate_figures,
        "tensors": sorted(tensors),
    }
    (out_dir / TRUTH_JSON).write_text(json.dumps(truth, indent=1))
    return truth


@dataclass(frozen=True)
class PlantedTruth:
    """Where the register shortcut lives in a planted organism, read from its folder."""

    layers: tuple[int, ...]
    """Planted text layers (contiguous)."""
    sites: tuple[Site, ...]
    """Sites the planted components write (``attn_out(L)``, ``mlp_out(L)``)."""
    components: tuple[str, ...]
    """Module paths of the changed linear maps."""
    rank: int
    """Rank of every planted delta."""
    direction_site: Site
    """Where ``direction`` is measured: ``resid_post`` of the last planted layer."""
    direction: Float[Tensor, " d_model"]
    """Unit mean difference (planted - clean) at ``direction_site``, final position, register rows."""
    site_directions: dict[Site, Tensor]
    """The same per planted site."""
    gate: dict[str, Any]
    """The gate figures (``register_flip``, ``collateral``, ``gating_ratio``, ``passed``, ...)."""
    record: dict[str, Any]
    """The whole ``planted_truth.json``."""
    folder: Path
    """The planted checkpoint's folder (the factors and merged deltas are read from it on demand)."""
    family: str = SHORTCUT_FAMILY
    """The planted family."""

    def delta(self, component: str) -> Tensor:
        """The merged weight change ``B @ A`` of a planted component."""
        return load_file(str(self.folder / TRUTH_TENSORS))[f"delta/{component}"]


def load_planted_truth(folder: Path | str) -> PlantedTruth:
    """The planted truth beside a planted checkpoint (``organism/model``)."""
    folder = Path(folder)
    if not (folder / TRUTH_JSON).is_file():
        raise FileNotFoundError(
            f"no {TRUTH_JSON} in {folder}: only a planted organism has one (organism/model; "
            "rebuild with `flipscope organism train`)"
        )
    rec = json.loads((folder / TRUTH_JSON).read_text())
    t = load_file(str(folder / TRUTH_TENSORS))
    sites = tuple(parse_site(s) for s in rec["sites"])
    return PlantedTruth(
        layers=tuple(rec["layers"]),
        sites=sites,
        components=tuple(rec["components"]),
        rank=int(rec["rank"]),
        direction_site=parse_site(rec["direction_site"]),
        direction=t["planted_direction"],
        site_directions={s: t[f"direction/{s}"] for s in sites},
        gate=rec["gate"],
        record=rec,
        folder=folder,
    )
