"""The evaluation report: a text summary for the terminal and ``report.html`` for a reader.

``report.html`` (:func:`write_report`) is one offline page: a header saying what was run (model, data,
removal, quadrant rule, dataset hash; no absolute machine paths), the headline metrics with 95% CIs, one
flip and one Dangerous sample, the per-family and per-finding tables, the quadrant table with its rule
and definitions, figures of fixed height (:mod:`analyses.eval.figures`), a gallery of flips and Dangerous
samples with their images (:mod:`analyses.eval.gallery`), and, when a patching result is passed, the
localization section (:mod:`analyses.eval.localization`). plotly.js is embedded once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analyses.data.schema import ImageSource
from analyses.eval.figures import (
    FAMILY_ORDER,
    HEIGHTS,
    flip_by_family_figure,
    margin_figure,
    quadrant_figure,
    quadrant_shares_figure,
)
from analyses.eval.gallery import Thumbnails, dangerous_examples, example_card, flip_examples, gallery_section
from analyses.eval.page import (
    QUADRANT_COLORS,
    esc,
    figure_div,
    fmt_ci,
    fmt_num,
    page,
    redact,
    table,
    write_page,
)
from analyses.eval.quadrants import QUADRANTS, QuadrantRule
from analyses.eval.summary import summarize

if TYPE_CHECKING:
    from interp.patching import PatchingResult
    from interp.scores import LayerScores

__all__ = [
    "QUADRANT_COLORS",
    "flip_by_family_figure",
    "quadrant_figure",
    "quadrant_shares_figure",
    "summary_table",
    "write_report",
]

#: One-line definitions of the quadrants, as the report states them.
QUADRANT_MEANING = {
    "Ideal": "answers agree across paraphrases and depend on the image",
    "Fragile": "answers flip across paraphrases, but depend on the image",
    "Dangerous": "answers agree, yet a question is answered the same without the image: consistent "
    "because it reads the text",
    "Worst": "answers flip, and a question is answered the same without the image",
}
#: Headline metrics: name -> (label, one-line definition).
HEADLINE = {
    "flip_rate": ("flip rate", "clusters where some paraphrase gets another answer than the original"),
    "text_only_agreement": ("text-only agreement", "rows answered the same with the image removed"),
    "swap_sensitivity_label": ("swap sensitivity", "rows whose answer changes on another patient's image "
                               "with the opposite label"),
    "accuracy": ("accuracy", "rows (all questions, with the image) answered correctly"),
}  # fmt: skip
#: Columns of the per-family / per-finding tables.
TABLE_METRICS = {
    "flip_rate": "flip rate",
    "pairwise_flip_rate": "pairwise flip rate",
    "text_only_agreement": "text-only agreement",
    "swap_sensitivity_label": "swap sensitivity (label)",
    "swap_sensitivity_random": "swap sensitivity (random)",
    "accuracy": "accuracy",
}


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
        lines += [
            "",
            f"quadrants ({QuadrantRule(**s['choices']['rule']).brief()})",
            "quadrant    count  share [95% CI]         accuracy  entropy",
        ]
        for name, row in s["quadrant_summary"].iterrows():
            share = _fmt(s["quadrant_shares"].loc[name])
            cells = [_num(row[c]) for c in ("accuracy", "mean_entropy")]
            lines.append(f"{name:<11} {int(row['count']):>5}  {share:<22} {cells[0]:>8}  {cells[1]:>7}")
        counts = {k: v["count"].to_dict() for k, v in s["quadrant_summary_by_scope"].items()}
        lines.append(
            "counts with reliance read over " + "; ".join(f"the {k}: {v}" for k, v in counts.items())
        )
    return "\n".join(lines)


def rule_sentence(rule: QuadrantRule, removal: str = "") -> str:
    """The quadrant rule in words (:meth:`QuadrantRule.in_words`)."""
    return rule.in_words(removal)


def _header(title: str, meta: dict[str, Any], s: dict[str, Any], data: str | None) -> str:
    c, rule = s["choices"], s["choices"]["rule"]
    model = str(meta.get("model", "?"))
    info = {
        "model": f"{model} ({meta.get('architecture', '?')}, {meta.get('n_layers', '?')} layers)",
        "data": data or "not recorded",
        "dataset hash": meta.get("dataset_hash", "not recorded"),
        "rows / clusters": f"{c['n_rows']:,} predictions / {c['n_clusters']:,} clusters",
        "image removed as": str(meta.get("removal", "not recorded")).removeprefix("removed:"),
        "quadrant rule": QuadrantRule(**rule).brief(),
        "conditions": ", ".join(c["conditions"]),
        "intervals": f"{int(c['level'] * 100)}% {c['ci']}, {c['n_boot']} resamples, seed {c['seed']}",
        "started": meta.get("started", "not recorded"),
    }
    grid = "".join(f"<div><b>{esc(k)}</b>{esc(redact(str(v)))}</div>" for k, v in info.items())
    return (
        f"<h1>{esc(redact(title))}</h1><p class='lead'>Paraphrase sensitivity of a vision-language model: does "
        "it give the same answer to the same question asked differently, and does it answer from the image "
        "or from the text?</p>" + f"<div class='runinfo'>{grid}</div>"
    )


def _cards(s: dict[str, Any]) -> str:
    m, cards = s["metrics"], []
    for key, (label, what) in HEADLINE.items():
        r = m.loc[key]
        v = fmt_num(float(r["value"]))
        ci = (
            f"[{r['low']:.3f}, {r['high']:.3f}] · n={int(r['n']):,}"
            if np.isfinite(r["value"])
            else "no units"
        )
        cards.append(f"<div class='card'><div>{esc(label)}</div><div class='v'>{v}</div>"
                     f"<div class='ci'>{ci}</div><div class='d'>{esc(what)}</div></div>")  # fmt: skip
    shares = s.get("quadrant_shares")
    if shares is not None:
        r = shares.loc["Dangerous"]
        color = QUADRANT_COLORS["Dangerous"]
        cards.append(
            f"<div class='card'><div>Dangerous samples</div><div class='v' style='color:{color}'>"
            f"{fmt_num(float(r['value']))}</div><div class='ci'>[{r['low']:.3f}, {r['high']:.3f}] · n={int(r['n']):,}"
            "</div><div class='d'>answers agree across paraphrases, yet a question is answered the same "
            "without the image</div></div>"
        )
    return f"<div class='cards'>{''.join(cards)}</div>"


def _glance(df: pd.DataFrame, s: dict[str, Any], rule: QuadrantRule, thumbs: Thumbnails) -> str:
    """One flip (the largest margin gap in the family that flips most) and one Dangerous sample."""
    flips, _ = flip_examples(df, per_family=1)
    cards = []
    if not flips.empty:
        rates = s["by_family"].xs("flip_rate", level="metric")["value"]
        best = flips.assign(rate=flips["family"].map(rates)).sort_values(["rate", "gap"], ascending=False)
        cards.append(
            ("A flip: same image, same question in other words, another answer", best.iloc[0], "flip")
        )
    if s["quadrants"] is not None:
        dang = dangerous_examples(df, s["quadrants"], rule, n=1)
        if not dang.empty:
            cards.append(
                (
                    "Consistent but dangerous: the answers agree, one ignores the image",
                    dang.iloc[0],
                    "dangerous",
                )
            )
    if not cards:
        return ""
    cols = "".join(
        f"<div class='col'><h3>{esc(h)}</h3>{example_card(r, thumbs, k)}</div>" for h, r, k in cards
    )
    return f"<div class='row'>{cols}</div>"


def metric_table(
    t: pd.DataFrame, label: str, metrics: dict[str, str] = TABLE_METRICS, order: list[str] | None = None
) -> str:
    """Groups (rows) x metrics (columns) of a ``by_family`` / ``by_finding`` table, value [CI], sortable."""
    present = set(t.index.get_level_values("metric"))
    cols = [k for k in metrics if k in present]
    groups = list(dict.fromkeys(t.index.get_level_values("group")))
    groups = [g for g in (order or []) if g in groups] + [g for g in groups if g not in (order or [])]
    rows: list[list[str]] = []
    keys: list[list[float | None]] = []
    for g in groups:
        cells: list[str] = [esc(g)]
        vals: list[float | None] = [None]
        for k in cols:
            r = t.loc[(k, g)] if (k, g) in t.index else None
            if r is None or not r["n"] > 0:
                cells.append("—")
                vals.append(None)
            else:
                cells.append(fmt_ci(float(r["value"]), float(r["low"]), float(r["high"])))
                vals.append(float(r["value"]))
        rows.append(cells)
        keys.append(vals)
    return table([label, *(metrics[k] for k in cols)], rows, sortable=True, sort_values=keys)


def _family_section(s: dict[str, Any]) -> str:
    short = {k: TABLE_METRICS[k] for k in ("flip_rate", "text_only_agreement", "swap_sensitivity_label")}
    return (
        "<h2 id='families'>By paraphrase family</h2><div class='row'>"
        f"<div class='col'>{figure_div(flip_by_family_figure(s), HEIGHTS['family'])}</div>"
        f"<div class='col'>{metric_table(s['by_family'], 'family', short, list(FAMILY_ORDER))}"
        "<p class='note'>Flip rate by family: over clusters having that family, the share where a paraphrase of "
        "that family gets another answer than the original. Click a header to sort; every metric by family "
        "is in the tables below.</p></div></div>"
    )


def _quadrant_section(df: pd.DataFrame, s: dict[str, Any], rule: QuadrantRule, removal: str) -> str:
    qs, shares = s["quadrant_summary"], s["quadrant_shares"]
    rows = []
    for name in QUADRANTS:
        r, sh = qs.loc[name], shares.loc[name]
        badge = f"<span class='badge' style='background:{QUADRANT_COLORS[name]}'>{name}</span>"
        rows.append([badge, f"<span class='meaning'>{esc(QUADRANT_MEANING[name])}</span>",
                     fmt_num(int(r["count"])), fmt_ci(float(sh["value"]), float(sh["low"]), float(sh["high"]), stacked=True),
                     fmt_num(float(r["accuracy"])), fmt_num(float(r["mean_entropy"]))])  # fmt: skip
    other = {k: v for k, v in s["quadrant_summary_by_scope"].items() if k != rule.scope}
    note = "".join(
        f"<p class='note'>With reliance read over the {esc(k)} instead: "
        + ", ".join(f"{q} {int(n)}" for q, n in v["count"].items()) + ".</p>"
        for k, v in other.items()
    )  # fmt: skip
    quad_table = table(["quadrant", "meaning", "samples", "share [95% CI]", "accuracy", "entropy"], rows)
    return (
        "<h2 id='quadrants'>Four quadrants: consistent × image-reliant</h2>"
        f"<p class='lead'><b>Rule.</b> {esc(rule_sentence(rule, removal))}</p><div class='row'>"
        f"<div class='col'>{figure_div(margin_figure(df, s['quadrants'], rule), HEIGHTS['margin'])}</div>"
        f"<div class='col'>{quad_table}{note}{figure_div(quadrant_shares_figure(s), HEIGHTS['shares'])}</div></div>"
    )


def _tables_section(s: dict[str, Any]) -> str:
    m = s["metrics"]
    rows = [[esc(k), fmt_ci(float(r["value"]), float(r["low"]), float(r["high"])), fmt_num(int(r["n"]))]
            for k, r in m.iterrows()]  # fmt: skip
    return (
        "<h2 id='tables'>Tables</h2><h3>Every metric</h3>"
        + table(["metric", "value [95% CI]", "units"], rows)
        + "<h3>By finding</h3>"
        + metric_table(s["by_finding"], "finding")
        + "<h3>Every metric by question family</h3>"
        + metric_table(s["by_family"], "family", order=list(FAMILY_ORDER))
    )


def _definitions(s: dict[str, Any], meta: dict[str, Any]) -> str:
    defs = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in s["choices"]["definitions"].items())
    record = esc(json.dumps(redact(meta), indent=1, default=str))
    return (
        f"<h2 id='definitions'>Definitions</h2><dl class='defs'>{defs}</dl>"
        f"<details><summary>Run record (meta.json, paths shortened)</summary><pre>{record}</pre></details>"
    )


def _payload(s: dict[str, Any], meta: dict[str, Any], data: str | None) -> dict[str, Any]:
    def records(t: pd.DataFrame | None) -> Any:
        return None if t is None else _records(t)

    return {
        "metrics": records(s["metrics"]),
        "by_family": records(s["by_family"]),
        "by_finding": records(s["by_finding"]),
        "quadrant_summary": records(s["quadrant_summary"]),
        "quadrant_summary_by_scope": {
            k: records(v) for k, v in (s["quadrant_summary_by_scope"] or {}).items()
        },
        "quadrant_shares": records(s["quadrant_shares"]),
        "choices": s["choices"],
        "data": data,
        "run": meta,
    }


def write_report(
    df: pd.DataFrame,
    out_dir: Path | str,
    title: str = "flipscope evaluation",
    n_boot: int = 1000,
    seed: int = 0,
    rule: QuadrantRule | None = None,
    *,
    images: ImageSource | None = None,
    data: str | None = None,
    patching: PatchingResult | None = None,
    attribution: PatchingResult | LayerScores | None = None,
    sae_features: pd.DataFrame | None = None,
    per_family: int = 4,
    max_dangerous: int = 8,
    lead_sections: Sequence[str] = (),
    extra_sections: Sequence[str] = (),
    filename: str = "report.html",
) -> Path:
    """Write ``summary.json`` and ``report.html`` to ``out_dir`` (which may hold the run's meta.json).

    ``images`` (the run's image source, e.g. ``world.image_for`` or ``resolve_data(...).images``) gives the
    gallery its thumbnails; without it, rows whose ``image_path`` exists are read from disk. ``data``
    names the data set in the header. ``patching`` (an activation-patching result) adds the localization
    section, with ``attribution`` (an attribution-patching result or LayerScores) overlaid on the
    recovery profile and ``sae_features`` (:func:`interp.sae_attr.top_features`) as a table.
    ``lead_sections`` (HTML) come just before the localization section and ``extra_sections`` follow it (the audit's flagged sites, features and
    LoRA sections); the page is written to ``out_dir / filename``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rule = rule or QuadrantRule()
    s = summarize(df, rule, n_boot=n_boot, seed=seed)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    (out / "summary.json").write_text(json.dumps(_payload(s, meta, data), indent=1, default=float))
    paths = dict(zip(df["image_id"], df["image_path"], strict=True)) if "image_path" in df.columns else {}
    thumbs = Thumbnails(images, paths)
    removal = str(meta.get("removal", "")).removeprefix("removed:")
    sections = [_header(title, meta, s, data), _cards(s), _glance(df, s, rule, thumbs), _family_section(s)]
    if s["quadrants"] is not None:
        sections.append(_quadrant_section(df, s, rule, removal))
    sections.append(gallery_section(df, s["quadrants"], rule, thumbs, per_family, max_dangerous))
    sections.append(_tables_section(s))
    sections.extend(lead_sections)
    if patching is not None:
        from analyses.eval.localization import localization_section

        sections.append(localization_section(patching, attribution, sae_features, n_boot=n_boot, seed=seed))
    sections.extend(extra_sections)
    sections.append(_definitions(s, meta))
    return write_page(out / filename, page(redact(title), sections))
