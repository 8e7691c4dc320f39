"""The report's localization section: where inside the model the flip happens.

From an activation-patching result (:class:`interp.patching.PatchingResult`): the layer x position
heatmap of mean recovery, the per-layer recovery profile at the position that carries the flip with
an attribution estimate overlaid (an attribution-patching result or :class:`interp.scores.LayerScores`),
and the SAE features that account for the margin shift (:func:`interp.sae_attr.top_features`). The
result's noise floor (:mod:`interp.floor`) is greyed in the heatmap, shaded in the profile and stated in
words (:func:`floor_note`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.eval.page import esc, figure_div, fmt_num, table

if TYPE_CHECKING:
    from interp.patching import PatchingResult
    from interp.scores import LayerScores

#: Columns of the SAE feature table, in order, with their headers.
SAE_COLUMNS = {
    "feature": "feature",
    "mean_aligned": "mean attribution (aligned with the shift)",
    "share": "share of the margin shift",
    "mean_abs": "mean |attribution|",
    "act_orig": "activation, original",
    "act_para": "activation, paraphrase",
}


def flip_position(patching: PatchingResult) -> str:
    """The position class that carries the flip: largest mean |recovery| over layers
    (:meth:`interp.scores.LayerScores.from_result`)."""
    from interp.scores import LayerScores

    return str(LayerScores.from_result(patching).position)


def heatmap_height(n_layers: int) -> int:
    """Height in pixels of the layer x position heatmap (grows with the layers, bounded)."""
    return int(min(640, max(300, 140 + 26 * n_layers)))


def recovery_profile_figure(
    patching: PatchingResult,
    attribution: PatchingResult | LayerScores | None = None,
    position: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> go.Figure:
    """Mean recovery per layer at ``position`` (default :func:`flip_position`) with its bootstrap band
    (:func:`interp.figures.recovery_line`), and the attribution estimate per layer overlaid (dashed)."""
    from interp.figures import recovery_line
    from interp.patching import PatchingResult

    position = position or flip_position(patching)
    fig = recovery_line(patching, positions=position, n_boot=n_boot, seed=seed)
    fig.data[-1].name = f"{patching.method} ({position})"
    if isinstance(attribution, PatchingResult):
        if position not in attribution.positions:
            raise ValueError(
                f"the attribution result has no position {position!r} (it has {attribution.positions[:10]}); "
                "run it with the same positions as the patching result"
            )
        rec = attribution.recovery[:, attribution.positions.index(position)].float().numpy()
        x, y, name = list(attribution.layers), rec, f"{attribution.method} ({position})"
    elif attribution is not None:
        x, y, name = list(attribution.layers), np.asarray(attribution.scores), f"{attribution.method} scores"
    if attribution is not None:
        fig.add_scatter(x=x, y=y, mode="lines+markers", name=name, line=dict(dash="dash", color="#e8590c"))
    fig.update_layout(
        title=dict(text=f"Margin recovered per layer at position {position!r}", x=0.01, font=dict(size=15)),
        template="plotly_white",
        margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        xaxis=dict(dtick=1),
    )
    return fig


def sae_table(features: pd.DataFrame, k: int = 15) -> str:
    """The first ``k`` rows of a :func:`interp.sae_attr.top_features` table, with its error share."""
    missing = [c for c in SAE_COLUMNS if c not in features.columns]
    if missing:
        raise ValueError(f"SAE feature table lacks columns {missing}: pass interp.sae_attr.top_features(...)")
    rows = [
        [esc(r["feature"]), *(fmt_num(float(r[c]), 3, signed=c != "mean_abs") for c in list(SAE_COLUMNS)[1:])]
        for _, r in features.head(k).iterrows()
    ]
    attrs = features.attrs
    note = ", ".join(
        f"{label} {fmt_num(float(attrs[key]), 3)}"
        for key, label in (("error_share", "SAE error share"), ("other_share", "other positions' share"))
        if key in attrs and math.isfinite(float(attrs[key]))
    )
    extra = (
        f" ({esc(attrs.get('method', ''))}, {attrs.get('n_pairs', '?')} pairs{'; ' + note if note else ''})"
    )
    return table(list(SAE_COLUMNS.values()), rows) + f"<p class='note'>Top {len(rows)} features{extra}.</p>"


#: Effects within this many floors call for a float32 rerun (``docs/metrics.md``, "Noise floor").
FEW_FLOORS = 3.0


def floor_note(patching: PatchingResult) -> str:
    """The result's noise floor in words (``docs/metrics.md``, "Noise floor"), or that none was recorded;
    with the advice to rerun in float32 when the largest effect is within :data:`FEW_FLOORS` floors."""
    floor, rec_floor = patching.noise_floor, patching.recovery_floor
    dtype = patching.dtype or "an unrecorded dtype"
    if math.isnan(floor):
        return (
            "<p class='note'>No noise floor was recorded with this result (made before floors were "
            "measured, or with <code>floor_layers=0</code>): differences of rounding size cannot be told "
            "from effects.</p>"
        )
    n_in = int(patching.within_floor().sum())
    n_cells = int((~patching.recovery.isnan()).sum())
    text = (
        f"Noise floor, measured in the same run in {esc(dtype)}: null patches (each run patched into "
        f"itself through the same machinery) moved margins by up to {floor:.2g}, i.e. "
        f"{rec_floor:.2g} in recovery. {n_in} of {n_cells} cells are within it (grey in the "
        "heatmap, the shaded band in the profile): those are not told apart from no effect."
    )
    top = float(np.nanmax(np.abs(patching.recovery.numpy()))) if n_cells else float("nan")
    if dtype != "float32" and math.isfinite(top) and top <= FEW_FLOORS * rec_floor:
        text += (
            f" The largest effect ({fmt_num(top, 3)}) is within {FEW_FLOORS:g} floors: rerun with "
            "<code>--dtype float32</code> before reading this map."
        )
    return f"<p class='note'>{text}</p>"


def localization_section(
    patching: PatchingResult,
    attribution: PatchingResult | LayerScores | None = None,
    sae_features: pd.DataFrame | None = None,
    position: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> str:
    """The HTML section: heatmap, recovery profile with attribution, SAE feature table (if given)."""
    from interp.figures import patching_heatmap

    heat = patching_heatmap(patching)
    heat.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=60), yaxis=dict(dtick=1))
    n_pairs = int(patching.clean_margins.shape[0])
    parts = [
        "<h2 id='localization'>Localization: where the flip happens</h2>",
        f"<p class='lead'>Activation patching on {n_pairs} pairs, site <b>{esc(patching.site_kind)}</b>: recovery = "
        "(patched − corrupt) / (clean − corrupt) margin, 1 = the patch restores the clean answer. "
        f"{patching.n_forwards:,} forward passes.</p>",
        figure_div(heat, heatmap_height(len(patching.layers))),
        figure_div(recovery_profile_figure(patching, attribution, position, n_boot, seed), 400),
        floor_note(patching),
    ]
    if sae_features is not None:
        parts += ["<h3>SAE features behind the margin shift</h3>", sae_table(sae_features)]
    return "\n".join(parts)
