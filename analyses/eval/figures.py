"""Plotly figures of an evaluation summary, each with a fixed height (pixels) so a page stays readable.

- :func:`flip_by_family_figure`: flip rate and text-only agreement per paraphrase family, 95% CIs.
- :func:`margin_figure`: per sample, the margin with the image against the margin without it, coloured
  by quadrant: points on the diagonal answer the same without the image ("consistent but dangerous"
  when they also agree across paraphrases).
- :func:`quadrant_shares_figure`: share of samples per quadrant with CIs, reliance read both ways.
- :func:`quadrant_figure`: quadrant counts with accuracy and entropy per quadrant.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.data.schema import OPERATOR, ORIGINAL, PARAPHRASE_FAMILIES
from analyses.eval.page import QUADRANT_COLORS
from analyses.eval.quadrants import QUADRANTS, QuadrantRule, least_reliant

#: Heights (pixels) of the report's figures.
HEIGHTS = {"family": 380, "margin": 470, "shares": 340, "quadrant": 380}
FAMILY_ORDER = (ORIGINAL, *PARAPHRASE_FAMILIES, OPERATOR)


def _error_bars(t: pd.DataFrame) -> dict[str, Any]:
    return dict(
        type="data",
        symmetric=False,
        array=(t["high"] - t["value"]).clip(lower=0),
        arrayminus=(t["value"] - t["low"]).clip(lower=0),
    )


def _layout(fig: go.Figure, height: int, title: str, **kw: Any) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=15)),
        template="plotly_white",
        height=height,
        margin=dict(l=60, r=20, t=60, b=50),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        **kw,
    )
    return fig


def flip_by_family_figure(
    summary: dict[str, Any], title: str = "Flip rate and text-only agreement by paraphrase family"
) -> go.Figure:
    """Bars: flip rate per family with 95% bootstrap CIs; text-only agreement per family beside it."""
    fam = summary["by_family"]
    present = set(fam.index.get_level_values("group"))
    order = [g for g in FAMILY_ORDER if g in present] + sorted(present - set(FAMILY_ORDER))
    fig = go.Figure()
    for metric, color in (("flip_rate", "#d62728"), ("text_only_agreement", "#1f77b4")):
        if metric not in fam.index.get_level_values("metric"):
            continue
        t = fam.xs(metric, level="metric").reindex(order).dropna(subset=["value"])
        fig.add_bar(
            x=list(t.index),
            y=t["value"],
            name=metric.replace("_", " "),
            marker_color=color,
            error_y=_error_bars(t),
            customdata=np.stack([t["low"], t["high"], t["n"]], axis=-1),
            hovertemplate="%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}], n=%{customdata[2]}",
        )
    return _layout(
        fig,
        HEIGHTS["family"],
        title,
        barmode="group",
        yaxis=dict(title="rate", range=[0, 1.05]),
        xaxis=dict(title="question family", categoryorder="array", categoryarray=order),
    )


def margin_figure(df: pd.DataFrame, q: pd.DataFrame, rule: QuadrantRule | None = None) -> go.Figure:
    """One point per sample: margin with the image (x) vs with the image removed (y) of the question
    that decides its reliance (:func:`~analyses.eval.quadrants.least_reliant`), coloured by quadrant.

    The shaded region is where a question counts as *not* image-reliant under ``rule``: the band
    ``|x - y| < min_margin_shift`` (``margin_shift``) or the same sign on both axes (``pred_change``).
    """
    rule = rule or QuadrantRule()
    dec = least_reliant(df, rule).rename(columns={"qid": "decisive_qid", "family": "decisive_family"})
    pts = q[["qid", "image_id", "finding", "quadrant"]].merge(
        dec[["root", "decisive_qid", "decisive_family", "margin", "margin_removed"]],
        left_on="qid",
        right_on="root",
    )
    lim = float(np.nanmax(np.abs(pts[["margin", "margin_removed"]].to_numpy()), initial=1.0)) * 1.08
    fig = go.Figure()
    _shade_not_reliant(fig, rule, lim)
    for name in ("Ideal", "Fragile", "Worst", "Dangerous"):  # Dangerous drawn last: on top where they overlap
        t = pts[pts["quadrant"] == name]
        fig.add_scatter(
            x=t["margin"],
            y=t["margin_removed"],
            mode="markers",
            name=f"{name} ({len(t)})",
            legendrank=QUADRANTS.index(name),
            marker=dict(
                color=QUADRANT_COLORS[name], size=7, opacity=0.75, line=dict(width=0.5, color="#fff")
            ),
            customdata=np.stack([t["image_id"], t["finding"], t["decisive_family"]], axis=-1)
            if len(t)
            else None,
            hovertemplate="image %{customdata[0]} (%{customdata[1]})<br>question: %{customdata[2]}"
            "<br>with image %{x:.2f}, without %{y:.2f}<extra>" + name + "</extra>",
        )
    fig.add_scatter(
        x=[-lim, lim], y=[-lim, lim], mode="lines", line=dict(color="#868e96", dash="dot", width=1),
        name="same margin", hoverinfo="skip", showlegend=False,
    )  # fmt: skip
    scope = "its least image-reliant question" if rule.scope == "cluster" else "the original question"
    return _layout(
        fig,
        HEIGHTS["margin"],
        f"With vs without the image: one point per sample ({scope})",
        xaxis=dict(title="margin with the image (logit yes − no)", range=[-lim, lim], zeroline=True),
        yaxis=dict(title="margin, image removed", range=[-lim, lim], zeroline=True),
    )


def _shade_not_reliant(fig: go.Figure, rule: QuadrantRule, lim: float) -> None:
    style = dict(fillcolor="rgba(134,142,150,0.16)", line=dict(width=0), layer="below")
    if rule.reliance == "margin_shift":
        t = rule.min_margin_shift
        path = f"M {-lim},{-lim + t} L {lim - t},{lim} L {lim},{lim} L {lim},{lim - t} L {-lim + t},{-lim} L {-lim},{-lim} Z"
        fig.add_shape(type="path", path=path, **style)
        label = f"gray: margin moves < {t:g} without the image (not image-reliant)"
    else:
        fig.add_shape(type="rect", x0=0, y0=0, x1=lim, y1=lim, **style)
        fig.add_shape(type="rect", x0=-lim, y0=-lim, x1=0, y1=0, **style)
        label = "gray: same answer without the image (not image-reliant)"
    fig.add_annotation(
        x=0.01, y=0.99, xref="paper", yref="paper", text=label, showarrow=False, xanchor="left",
        yanchor="top", font=dict(size=11, color="#495057"), bgcolor="rgba(255,255,255,0.7)",
    )  # fmt: skip


def quadrant_shares_figure(
    summary: dict[str, Any], title: str = "Share of samples per quadrant"
) -> go.Figure:
    """Bars: share per quadrant with 95% CIs, reliance read as the rule says (solid) and the other way
    (pale), so the effect of the scope is visible."""
    by_scope = summary.get("quadrant_shares_by_scope")
    if not by_scope:
        raise ValueError("no 'removed' condition in this run: quadrants need image-removed predictions")
    rule_scope = summary["choices"]["rule"]["scope"]
    scopes = sorted(by_scope, key=lambda s: s != rule_scope)
    fig = go.Figure()
    for scope in scopes:
        t = by_scope[scope]
        main = scope == rule_scope
        fig.add_bar(
            x=list(t.index),
            y=t["value"],
            name=f"reliance read over the {scope}",
            showlegend=False,
            marker=dict(color=[QUADRANT_COLORS[k] for k in t.index], opacity=1.0 if main else 0.3),
            error_y=_error_bars(t),
            customdata=np.stack([t["low"], t["high"]], axis=-1),
            hovertemplate="%{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra>"
            + scope
            + "</extra>",
        )
    key = f"solid: reliance read over the {rule_scope} (the rule)"
    if len(scopes) > 1:
        key += f"; pale: over the {scopes[1]}"
    fig.add_annotation(
        x=1, y=1.02, xref="paper", yref="paper", text=key, showarrow=False, xanchor="right", yanchor="bottom",
        font=dict(size=11, color="#495057"),
    )  # fmt: skip
    return _layout(
        fig, HEIGHTS["shares"], title, barmode="group", yaxis=dict(title="share of samples", range=[0, 1])
    )


def quadrant_figure(summary: dict[str, Any], title: str = "Four-quadrant safety taxonomy") -> go.Figure:
    """Quadrant counts (bars) with accuracy and mean entropy per quadrant (markers, right axis)."""
    qs = summary["quadrant_summary"]
    if qs is None:
        raise ValueError("no 'removed' condition in this run: quadrants need image-removed predictions")
    fig = go.Figure()
    fig.add_bar(
        x=list(QUADRANTS),
        y=qs["count"],
        marker_color=[QUADRANT_COLORS[q] for q in QUADRANTS],
        name="samples",
        text=[f"{s:.1%}" for s in qs["share"].fillna(0)],
        textposition="outside",
    )
    fig.add_scatter(x=list(QUADRANTS), y=qs["accuracy"], yaxis="y2", mode="markers+lines", name="accuracy")
    fig.add_scatter(
        x=list(QUADRANTS), y=qs["mean_entropy"], yaxis="y2", mode="markers+lines", name="mean entropy (nats)"
    )
    return _layout(
        fig,
        HEIGHTS["quadrant"],
        title,
        yaxis=dict(title="samples"),
        yaxis2=dict(title="accuracy / entropy", overlaying="y", side="right", range=[0, 1.05]),
        xaxis_title=f"quadrant (rule: {summary['choices']['rule']})",
    )
