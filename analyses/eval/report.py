"""Summary tables, plotly figures and the HTML report of an evaluation run."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.eval.quadrants import QUADRANTS, QuadrantRule
from analyses.eval.summary import summarize

QUADRANT_COLORS = {"Ideal": "#2ca02c", "Fragile": "#ff7f0e", "Dangerous": "#d62728", "Worst": "#7f0000"}


def _fmt(row: pd.Series) -> str:
    if not np.isfinite(row["value"]):
        return "n/a"
    return f"{row['value']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def _num(v: float) -> str:
    """``0.123``, or ``n/a`` for a missing (NaN) value."""
    return f"{v:.3f}" if np.isfinite(v) else "n/a"


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows for ``summary.json``, a missing (NaN) value as ``null``."""
    return [
        {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
        for r in df.reset_index().to_dict(orient="records")
    ]


def summary_table(
    df: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    rule: QuadrantRule | None = None,
    summary: dict[str, Any] | None = None,
) -> str:
    """A plain-text table: headline metrics with 95% CIs, flip rate by family, quadrants."""
    s = summary or summarize(df, rule, n_boot=n_boot, seed=seed)
    lines = ["metric                      value [95% CI]                n"]
    for name, row in s["metrics"].iterrows():
        lines.append(f"{name:<27} {_fmt(row):<29} {int(row['n'])}")
    by_family = s["by_family"]
    lines += ["", "flip rate by family         value [95% CI]                n"]
    if "flip_rate" in by_family.index.get_level_values("metric"):
        for name, row in by_family.xs("flip_rate", level="metric").iterrows():
            lines.append(f"{name:<27} {_fmt(row):<29} {int(row['n'])}")
    else:
        lines.append(f"{'(no paraphrases)':<27} {'n/a':<29} 0")
    if s["quadrant_summary"] is None:
        lines += ["", "quadrants: n/a (no 'removed' condition in this run)"]
    else:
        lines += ["", f"quadrants ({s['choices']['rule']})", "quadrant    count  share  accuracy  entropy"]
        for name, row in s["quadrant_summary"].iterrows():
            cells = [_num(row[c]) for c in ("share", "accuracy", "mean_entropy")]
            lines.append(f"{name:<11} {int(row['count']):>5}  {cells[0]:>5}  {cells[1]:>8}  {cells[2]:>7}")
        counts = {k: v["count"].to_dict() for k, v in s["quadrant_summary_by_scope"].items()}
        lines.append(
            "counts with reliance read over " + "; ".join(f"the {k}: {v}" for k, v in counts.items())
        )
    return "\n".join(lines)


def flip_by_family_figure(
    summary: dict[str, Any], title: str = "Flip rate by paraphrase family"
) -> go.Figure:
    """Bars: flip rate per family with 95% bootstrap CIs; text-only agreement per family beside it."""
    fam = summary["by_family"]
    fig = go.Figure()
    for metric, color in (("flip_rate", "#d62728"), ("text_only_agreement", "#1f77b4")):
        if metric not in fam.index.get_level_values("metric"):
            continue
        t = fam.xs(metric, level="metric")
        fig.add_bar(
            x=list(t.index),
            y=t["value"],
            name=metric.replace("_", " "),
            marker_color=color,
            error_y=dict(
                type="data", symmetric=False, array=t["high"] - t["value"], arrayminus=t["value"] - t["low"]
            ),
        )
    fig.update_layout(
        title=title,
        barmode="group",
        yaxis=dict(title="rate", range=[0, 1.05]),
        xaxis_title="family",
        template="plotly_white",
    )
    return fig


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
    fig.update_layout(
        title=title,
        template="plotly_white",
        yaxis=dict(title="samples"),
        yaxis2=dict(title="accuracy / entropy", overlaying="y", side="right", range=[0, 1.05]),
        xaxis_title=f"quadrant (rule: {summary['choices']['rule']})",
    )
    return fig


def write_report(
    df: pd.DataFrame,
    out_dir: Path | str,
    title: str = "flipscope evaluation",
    n_boot: int = 1000,
    seed: int = 0,
    rule: QuadrantRule | None = None,
) -> Path:
    """Write ``summary.json``, ``report.html`` (figures + tables + every definition) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(df, rule, n_boot=n_boot, seed=seed)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    payload = {
        "metrics": _records(s["metrics"]),
        "by_family": _records(s["by_family"]),
        "by_finding": _records(s["by_finding"]),
        "quadrant_summary": None if s["quadrant_summary"] is None else _records(s["quadrant_summary"]),
        "quadrant_summary_by_scope": {
            k: _records(v) for k, v in (s["quadrant_summary_by_scope"] or {}).items()
        },
        "choices": s["choices"],
        "run": meta,
    }
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=float))
    figs = [flip_by_family_figure(s)]
    if s["quadrant_summary"] is not None:
        figs.append(quadrant_figure(s))
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append("<h2>Run</h2><pre>" + html.escape(json.dumps(meta, indent=1, default=str)) + "</pre>")
    parts.append("<h2>Summary</h2><pre>" + html.escape(summary_table(df, summary=s)) + "</pre>")
    for i, f in enumerate(figs):
        parts.append(f.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append(
        "<h2>Definitions</h2><ul>"
        + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
            for k, v in s["choices"]["definitions"].items()
        )
        + "</ul>"
    )
    path = out / "report.html"
    path.write_text("<html><head><meta charset='utf-8'></head><body>" + "\n".join(parts) + "</body></html>")
    return path
