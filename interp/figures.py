"""Plotly figures of patching results and attention maps.

Patching figures mark what the result's noise floor cannot tell from rounding
(:meth:`interp.patching.PatchingResult.within_floor`, :mod:`interp.floor`): greyed cells in the heatmap,
a shaded band of +/- the recovery floor around 0 in the recovery profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from hooks.inputs import Box
from interp.attention import upsample
from interp.patching import PatchingResult
from interp.stats import mean_bootstrap


def patching_heatmap(
    result: PatchingResult | Float[Tensor, "layer position"],
    layers: Sequence[int] | None = None,
    positions: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer x position heatmap of mean recovery (diverging colours centred on 0).

    For a :class:`PatchingResult` with a measured floor, the cells within it are greyed by a second
    trace (``name="within noise floor"``, ``z`` = 1 on those cells, NaN elsewhere) and the title says so.
    """
    marked = None
    if isinstance(result, PatchingResult):
        z = result.recovery
        layers = layers if layers is not None else result.layers
        positions = positions if positions is not None else result.positions
        title = title or f"{result.method}: margin recovered, {result.site_kind}"
        if not math.isnan(result.recovery_floor):
            marked = floor_cells(result)
            title += f"<br><sup>grey: within the noise floor, |recovery| <= {floor_words(result)}</sup>"
    else:
        z = result
    z_np = torch.as_tensor(z).float().numpy()
    layers = list(layers) if layers is not None else list(range(z_np.shape[0]))
    positions = list(positions) if positions is not None else [str(i) for i in range(z_np.shape[1])]
    if z_np.shape != (len(layers), len(positions)):
        raise ValueError(
            f"values {z_np.shape} do not match {len(layers)} layers x {len(positions)} positions"
        )
    fig = go.Figure(
        go.Heatmap(
            z=z_np,
            x=positions,
            y=layers,
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": "recovery"},
            hovertemplate="layer %{y}<br>position %{x}<br>recovery %{z:.3f}<extra></extra>",
        )
    )
    if marked is not None and marked.any():
        fig.add_trace(
            go.Heatmap(
                z=np.where(marked, 1.0, np.nan),
                x=positions,
                y=layers,
                colorscale=[[0, FLOOR_GREY], [1, FLOOR_GREY]],
                showscale=False,
                name="within noise floor",
                hovertemplate="layer %{y}<br>position %{x}<br>within the noise floor<extra></extra>",
            )
        )
    fig.update_layout(title=title or "margin recovered", xaxis_title="position", yaxis_title="layer")
    return fig


#: Colour of the cells and the band within a result's noise floor.
FLOOR_GREY = "rgba(120, 120, 120, 0.8)"


def floor_cells(result: PatchingResult) -> np.ndarray:
    """``(layer, position)`` cells the figures mark: |mean recovery| within the result's recovery floor
    (:meth:`PatchingResult.within_floor`; none when no floor was measured, never a NaN cell)."""
    return result.within_floor().numpy()


def floor_words(result: PatchingResult) -> str:
    """The floor as the figures and the report state it: recovery floor, margin floor and dtype."""
    dtype = result.dtype or "dtype not recorded"
    return f"{result.recovery_floor:.3g} (margin {result.noise_floor:.2g}, {dtype})"


def recovery_line(
    result: PatchingResult,
    positions: str | Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    title: str | None = None,
) -> go.Figure:
    """Per-layer mean recovery with a bootstrap band (pairs resampled, :func:`interp.stats.mean_bootstrap`),
    one line per position class; with a measured floor, a grey band of +/- the recovery floor around 0
    (``fig.layout.shapes[0]``)."""
    chosen = [positions] if isinstance(positions, str) else list(positions or result.positions)
    missing = [p for p in chosen if p not in result.positions]
    if missing:
        raise ValueError(f"positions {missing} not in this result; it has {result.positions[:10]}")
    fig = go.Figure()
    for p in chosen:
        j = result.positions.index(p)
        values = torch.as_tensor(result.recovery_per_pair[:, j]).float().numpy()
        mean, lo, hi = mean_bootstrap(values, n_boot, seed, ci)
        fig.add_trace(
            go.Scatter(
                x=result.layers,
                y=hi,
                mode="lines",
                line={"width": 0},
                showlegend=False,
                name=f"{p} upper",
                legendgroup=p,
                hoverinfo="skip",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=result.layers,
                y=lo,
                mode="lines",
                line={"width": 0},
                fill="tonexty",
                showlegend=False,
                name=f"{p} lower",
                legendgroup=p,
                hoverinfo="skip",
                opacity=0.3,
            )
        )
        fig.add_trace(go.Scatter(x=result.layers, y=mean, mode="lines+markers", name=p, legendgroup=p))
    _floor_band(fig, result.recovery_floor)
    fig.update_layout(
        title=title or f"margin recovered per layer ({result.site_kind}, {int(ci * 100)}% bootstrap CI)",
        xaxis_title="layer",
        yaxis_title="margin recovered",
    )
    return fig


def _floor_band(fig: go.Figure, floor: float) -> None:
    """A grey band of +/- ``floor`` around 0 (a layout shape, so the traces keep their order)."""
    if math.isnan(floor):
        return
    fig.add_hrect(
        y0=-floor,
        y1=floor,
        fillcolor=FLOOR_GREY,
        opacity=0.35,
        line_width=0,
        annotation_text=f"noise floor ±{floor:.2g}",
        annotation_position="top left",
    )


def _gray(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=float)
    arr = np.asarray(image, dtype=float)
    return arr.mean(-1) if arr.ndim == 3 else arr


def attention_overlay(
    image: Image.Image | np.ndarray,
    attn_map: Float[Tensor, "h w"],
    box: Box | None = None,
    opacity: float = 0.5,
    title: str | None = None,
) -> go.Figure:
    """The attention map (upsampled, nearest, to the image size if needed) over the grayscale image,
    with the box outlined. Traces: ``image``, ``attention`` and (with a box) ``box``."""
    gray = _gray(image)
    h, w = gray.shape
    attn = torch.as_tensor(attn_map).float()
    if tuple(attn.shape) != (h, w):
        attn = upsample(attn, (h, w), "nearest")
    fig = go.Figure()
    fig.add_trace(go.Heatmap(z=gray, colorscale="gray", showscale=False, name="image", hoverinfo="skip"))
    fig.add_trace(
        go.Heatmap(
            z=attn.numpy(),
            colorscale="Hot",
            opacity=opacity,
            name="attention",
            colorbar={"title": "attention"},
        )
    )
    if box is not None:
        x0, y0, x1, y1 = box.coords
        fig.add_trace(
            go.Scatter(
                x=[x0, x1, x1, x0, x0],
                y=[y0, y0, y1, y1, y0],
                mode="lines",
                name="box",
                line={"color": "cyan", "width": 2},
            )
        )
    fig.update_layout(
        title=title or "attention from the answer position", xaxis_title="x (px)", yaxis_title="y (px)"
    )
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    return fig
