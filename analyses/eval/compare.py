"""The papers' comparison table from finished run folders: one row per run (model, data, arm).

:func:`compare_runs` reads run folders (``meta.json`` + ``predictions.jsonl``,
:class:`~analyses.eval.predictions.RunFolder`), summarises each with
:func:`~analyses.eval.summary.summarize` (every metric and quadrant share with its cluster-bootstrap CI)
and tabulates them, with the samples that moved *into* Dangerous relative to a base run
(:func:`~analyses.eval.quadrants.into_dangerous`). Runs must cover the same question rows (same dataset
hash and the same predicted rows) unless ``allow_different_rows=True``; the error says which differ.
``flipscope compare RUN [RUN ...]`` is the command line.

>>> comp = compare_runs(["runs/base", "runs/targeted", "runs/all_layers"])
>>> comp.table[["flip_rate", "flip_rate_low", "flip_rate_high", "share_Dangerous"]]
>>> comp.save("runs/compare")        # comparison.csv / .parquet / _long.csv / .html
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analyses.data.schema import PARAPHRASE_FAMILIES
from analyses.eval.page import PALETTE, display_path, esc, figure_div, fmt_ci, page, redact, table, write_page
from analyses.eval.predictions import META_FILE, PREDICTIONS_FILE, RunFolder
from analyses.eval.quadrants import QUADRANTS, QuadrantRule, into_dangerous, migration
from analyses.eval.summary import summarize

#: Metrics of the comparison table, in order (each with ``_low`` / ``_high`` columns).
METRICS: tuple[str, ...] = (
    "flip_rate",
    "pairwise_flip_rate",
    "text_only_agreement",
    "swap_sensitivity_label",
    "swap_sensitivity_random",
    "polarity_consistency",
    "accuracy",
)
#: Columns describing a run.
RUN_COLUMNS: tuple[str, ...] = ("model", "arm", "data", "removal", "dataset_hash", "n_rows", "path")
SUMMARY_FILE = "summary.json"
#: Paraphrase families whose flip rate gets its own column by default (``families="all"``: every one).
DEFAULT_FAMILIES: tuple[str, ...] = ("register",)
#: meta.json keys never shown as settings: per-run bookkeeping, or shown elsewhere in the table.
_NOT_SETTINGS = ("started", "resumes", "images", "dataset_hash", "n_rows", "weights.tensors")
#: File the compare page loads plotly.js from (written beside it once, instead of 4.6 MB inside the page).
PLOTLY_FILE = "plotly.min.js"
_LORA = re.compile(r"\+lora\[([^\]]*)\]$")


def run_label(meta: dict[str, Any]) -> tuple[str, str]:
    """(model, arm) of a run from its meta.json: ``base+lora[3,4]`` -> (``base``, ``lora[3,4]``);
    a model without a LoRA suffix is the ``base`` arm. Paths are shown by :func:`display_path`."""
    name = str(meta.get("model", "?"))
    m = _LORA.search(name)
    model = name[: m.start()] if m else name
    return str(redact(model)), f"lora[{m.group(1)}]" if m else "base"


def load_run(path: str | Path) -> tuple[dict[str, Any], pd.DataFrame, str]:
    """(meta, predictions, data label) of a run folder; the data label is ``summary.json``'s ``data``
    (written by the report) when there is one. Refuses a folder without meta.json or predictions."""
    run = RunFolder(path)
    missing = [f for f in (META_FILE, PREDICTIONS_FILE) if not (run.path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run.path} is not a finished run folder: {', '.join(missing)} missing (run `flipscope eval` there)"
        )
    meta = json.loads(run.meta_path.read_text())
    preds = run.predictions()
    if preds.empty:
        raise ValueError(f"{run.path}: predictions.jsonl holds no predictions; finish the run first")
    data = ""
    summary = run.path / SUMMARY_FILE
    if summary.is_file():
        data = str(json.loads(summary.read_text()).get("data") or "")
    return meta, preds, str(redact(data)) if data else ""


def check_same_rows(metas: dict[str, dict[str, Any]], preds: dict[str, pd.DataFrame]) -> None:
    """Refuse runs whose question rows differ (dataset hash or predicted qids), naming the groups."""
    keys = {name: (str(metas[name].get("dataset_hash", "")), frozenset(preds[name]["qid"])) for name in metas}
    groups: dict[tuple[str, frozenset[str]], list[str]] = {}
    for name, key in keys.items():
        groups.setdefault(key, []).append(name)
    if len(groups) == 1:
        return
    (_, ref_rows), *_ = groups
    lines = []
    for (h, rows), names in groups.items():
        only, lacking = len(rows - ref_rows), len(ref_rows - rows)
        lines.append(
            f"  {', '.join(names)}: dataset {h or '?'}, {len(rows)} questions"
            + (f" ({lacking} of the first group's missing, {only} it lacks)" if rows != ref_rows else "")
        )
    raise ValueError(
        "these runs cover different question rows, so their metrics are not comparable:\n"
        + "\n".join(lines)
        + "\nevaluate them on the same rows (same --data, --split, --n-images), or pass "
        "allow_different_rows=True (--allow-different-rows) to tabulate them anyway"
    )


def _flat(meta: Any, prefix: str = "") -> dict[str, str]:
    """``meta.json`` as dotted keys with short text values (lists and long values kept whole as JSON)."""
    if not isinstance(meta, dict):
        return {prefix: meta if isinstance(meta, str) else json.dumps(meta, default=str, sort_keys=True)}
    out: dict[str, str] = {}
    for k, v in meta.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if not any(key == n or key.startswith(n + ".") for n in _NOT_SETTINGS):
            out.update(_flat(v, key))
    return out


def differing_settings(metas: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The ``meta.json`` settings that differ between runs: one row per dotted key (e.g.
    ``eval_config.removal``, ``forward_path``, ``runtime.dtype``, ``model``, ``prompt.mode``), one column
    per run, a missing key as ``—``; empty when every run was made the same way."""
    flat = {n: _flat(m) for n, m in metas.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    rows = {k: [str(redact(flat[n].get(k, "—"))) for n in metas] for k in keys}
    differ = {k: v for k, v in rows.items() if len(set(v)) > 1}
    return pd.DataFrame.from_dict(differ, orient="index", columns=list(metas)).rename_axis("setting")


def family_columns(families: Sequence[str] | str) -> tuple[str, ...]:
    """Families given as names or ``"all"`` (every paraphrase family), checked."""
    if isinstance(families, str):
        families = (
            PARAPHRASE_FAMILIES
            if families == "all"
            else [f.strip() for f in families.split(",") if f.strip()]
        )
    bad = [f for f in families if f not in PARAPHRASE_FAMILIES]
    if bad:
        raise ValueError(f"unknown families {bad}: use 'all' or some of {', '.join(PARAPHRASE_FAMILIES)}")
    return tuple(families)


def _family_row(s: dict[str, Any], families: Sequence[str]) -> dict[str, float]:
    """``flip_rate_<family>`` with ``_low`` / ``_high`` (NaN where the run has no such paraphrase)."""
    by = s["by_family"]
    row: dict[str, float] = {}
    for f in families:
        key = ("flip_rate", f)
        r = by.loc[key] if key in by.index else None
        for suffix, col in (("", "value"), ("_low", "low"), ("_high", "high")):
            row[f"flip_rate_{f}{suffix}"] = float(r[col]) if r is not None else float("nan")
    return row


def _count(value: Any) -> str:
    """A count that may be NaN (no quadrants in that run) as text."""
    v = float(value)
    return "n/a" if v != v else f"{int(v):,}"


def _names(paths: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} runs: give one name per run")
        out = [str(n) for n in names]
    else:
        out = [p.name or str(p) for p in paths]
        if len(set(out)) != len(out):
            out = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(out)) != len(out) or not all(out):
        raise ValueError(f"run names {out} are empty or repeated; pass distinct names")
    return out


def _row(s: dict[str, Any]) -> dict[str, Any]:
    """Metric values with CIs and quadrant shares / counts of one summary."""
    row: dict[str, Any] = {}
    for m in METRICS:
        r = s["metrics"].loc[m]
        row.update({m: r["value"], f"{m}_low": r["low"], f"{m}_high": r["high"]})
    shares, qs = s["quadrant_shares"], s["quadrant_summary"]
    for q in QUADRANTS:
        for suffix, col in (("", "value"), ("_low", "low"), ("_high", "high")):
            row[f"share_{q}{suffix}"] = float(shares.loc[q, col]) if shares is not None else float("nan")
    for q in QUADRANTS:
        row[q] = int(qs.loc[q, "count"]) if qs is not None else float("nan")
    row["n_samples"] = len(s["quadrants"]) if s["quadrants"] is not None else float("nan")
    return row


def _long(summaries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per (run, table, metric, group): every number of every summary with its CI."""
    parts = []
    for name, s in summaries.items():
        parts += [
            s["metrics"].reset_index().assign(table="metrics", group="all", run=name),
            s["by_family"].reset_index().assign(table="family", run=name),
            s["by_finding"].reset_index().assign(table="finding", run=name),
        ]
        if s["quadrant_shares"] is not None:
            q = s["quadrant_shares"].reset_index().rename(columns={"quadrant": "group"})
            parts.append(q.assign(table="quadrant_share", metric="share", run=name))
    cols = ["run", "table", "metric", "group", "value", "low", "high", "n"]
    return pd.concat(parts, ignore_index=True)[cols]


@dataclass
class RunComparison:
    """Finished runs side by side, with everything the table was computed from."""

    table: pd.DataFrame
    """One row per run (index ``run``): :data:`RUN_COLUMNS`, each metric of :data:`METRICS` with
    ``_low`` / ``_high``, ``share_<quadrant>`` with ``_low`` / ``_high``, quadrant counts, ``n_samples``,
    ``into_dangerous`` (samples that moved into Dangerous vs ``base``)."""
    long: pd.DataFrame
    """Every metric by run, overall / by family / by finding / quadrant shares, with CIs."""
    rule: QuadrantRule
    """Quadrant rule used for every run."""
    base: str
    """Run the ``into_dangerous`` column and ``migrations`` are relative to."""
    level: float = 0.95
    """Level of the intervals."""
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    """:func:`summarize` output of each run."""
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)
    """Predictions table of each run."""
    migrations: dict[str, pd.DataFrame] = field(default_factory=dict)
    """4x4 quadrant migration base -> run (rows before, columns after)."""
    settings: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The ``meta.json`` settings that differ between runs (:func:`differing_settings`)."""
    families: tuple[str, ...] = DEFAULT_FAMILIES
    """Families with a ``flip_rate_<family>`` column (with ``_low`` / ``_high``) in :attr:`table`."""

    def _rate_keys(self) -> list[str]:
        return [*METRICS, *(f"flip_rate_{f}" for f in self.families), *(f"share_{q}" for q in QUADRANTS)]

    def to_text(self, digits: int = 3) -> str:
        """Metrics (rows) x runs (columns), ``value [low, high]``, for a terminal."""
        t = self.table
        rows: list[tuple[str, list[str]]] = [
            (c, [str(t.loc[n, c] or "—") for n in t.index]) for c in ("model", "arm", "data")
        ]
        for key in self._rate_keys():
            cells = []
            for n in t.index:
                v, lo, hi = (float(t.loc[n, key + s]) for s in ("", "_low", "_high"))
                cells.append("n/a" if v != v else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]")
            rows.append((key, cells))
        rows.append(("into_dangerous", [_count(t.loc[n, "into_dangerous"]) for n in t.index]))
        width = [max(len(str(n)), *(len(r[1][i]) for r in rows)) for i, n in enumerate(t.index)]
        head = " " * 24 + "  ".join(f"{n:<{w}}" for n, w in zip(t.index, width, strict=True))
        body = [
            f"{k:<24}" + "  ".join(f"{c:<{w}}" for c, w in zip(cells, width, strict=True))
            for k, cells in rows
        ]
        note = (
            f"{int(self.level * 100)}% cluster-bootstrap CIs; into_dangerous vs {self.base!r}.\n"
            f"Quadrant rule: {self.rule.in_words()}"
        )
        return "\n".join([head, *body, *self._settings_lines(), note])

    def _settings_lines(self) -> list[str]:
        if self.settings.empty:
            return ["settings: every run made the same way (meta.json)"]
        lines = ["settings that differ (meta.json):"]
        for key, row in self.settings.iterrows():
            lines.append(f"  {key}: " + "; ".join(f"{n} {v[:60]}" for n, v in row.items()))
        return lines

    def figure(self) -> go.Figure:
        """Grouped bars with CIs: the rates (left) and the quadrant shares (right), one colour per run."""
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1, cols=2, column_widths=[0.62, 0.38], subplot_titles=("metrics", "quadrant shares")
        )
        keys = (list(METRICS), [f"share_{q}" for q in QUADRANTS])
        labels = ([m.replace("_", " ") for m in METRICS], list(QUADRANTS))
        for i, (name, row) in enumerate(self.table.iterrows()):
            for col, (ks, xs) in enumerate(zip(keys, labels, strict=True), start=1):
                y = [row[k] for k in ks]
                err = dict(type="data", symmetric=False, array=[max(row[k + "_high"] - row[k], 0) for k in ks],
                           arrayminus=[max(row[k] - row[k + "_low"], 0) for k in ks])  # fmt: skip
                fig.add_bar(x=xs, y=y, name=str(name), legendgroup=str(name), showlegend=col == 1,
                            marker_color=PALETTE[i % len(PALETTE)], error_y=err, row=1, col=col)  # fmt: skip
        fig.update_layout(barmode="group", template="plotly_white", title="Runs compared (95% CIs)",
                          legend=dict(orientation="h", y=1.2, x=0.5, xanchor="center"), margin=dict(t=110))  # fmt: skip
        fig.update_yaxes(range=[0, 1.05])
        return fig

    def _html_rows(self) -> tuple[list[str], list[list[str]]]:
        t = self.table
        cols = {"flip_rate": "flip rate", "pairwise_flip_rate": "pairwise flip", "text_only_agreement":
                "text-only agreement", "swap_sensitivity_label": "swap (label)", "accuracy": "accuracy",
                **{f"flip_rate_{f}": f"flip rate: {f}" for f in self.families},
                **{f"share_{q}": q for q in QUADRANTS}}  # fmt: skip
        rows = [
            [esc(n), esc(t.loc[n, "model"]), esc(t.loc[n, "arm"]), f"<span class='meaning'>{esc(t.loc[n, 'data'] or '—')}</span>",
             *(fmt_ci(float(t.loc[n, c]), float(t.loc[n, c + "_low"]), float(t.loc[n, c + "_high"]), stacked=True)
               for c in cols),
             _count(t.loc[n, "into_dangerous"])]
            for n in t.index
        ]  # fmt: skip
        return ["run", "model", "arm", "data", *cols.values(), f"into Dangerous (vs {self.base})"], rows

    def _removal(self) -> str:
        """How the image was removed, when every run removed it the same way (else empty)."""
        kinds = set(self.table["removal"]) if "removal" in self.table else set()
        return str(next(iter(kinds))) if len(kinds) == 1 else ""

    def _settings_html(self) -> str:
        if self.settings.empty:
            return "<p>Settings: every run was made the same way (their <code>meta.json</code> agree).</p>"
        rows = [[f"<code>{esc(k)}</code>", *(esc(v) for v in r)] for k, r in self.settings.iterrows()]
        return "<h2>Settings that differ</h2>" + table(
            ["setting (meta.json)", *map(str, self.settings.columns)], rows
        )

    def to_html(self, title: str = "flipscope: runs compared", plotly_src: str | None = None) -> str:
        """An offline HTML page: one row per run (value and CI per cell), the settings that differ, the
        rule in words and the grouped figure. ``plotly_src``: load plotly.js from that file (written
        beside the page by :meth:`save`) instead of embedding it."""
        header, rows = self._html_rows()
        sections = [
            f"<h1>{esc(title)}</h1><p class='lead'>One row per run; {int(self.level * 100)}% cluster-bootstrap "
            "intervals under each value; quadrant shares are shares of samples. Every metric, by family and "
            "by finding, is in the CSV files written beside this page.</p>",
            f"<p><b>Quadrant rule.</b> {esc(self.rule.in_words(self._removal()))}</p>",
            f"<div style='overflow-x:auto'>{table(header, rows)}</div>",
            self._settings_html(),
            figure_div(self.figure(), 460),
        ]
        if plotly_src is None:
            return page(title, sections)
        return page(title, sections, with_plotly=False).replace(
            "</head>", f'<script src="{esc(plotly_src)}"></script>\n</head>', 1
        )

    def save(self, out_dir: str | Path, name: str = "comparison") -> dict[str, Path]:
        """Write ``<name>.csv``, ``<name>.parquet``, ``<name>_long.csv``, ``<name>.html`` and
        ``<name>_migrations.json`` under ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: out / f"{name}{s}" for k, s in (("csv", ".csv"), ("parquet", ".parquet"), ("long", "_long.csv"),
                                                     ("html", ".html"), ("migrations", "_migrations.json"))}  # fmt: skip
        self.table.to_csv(paths["csv"])
        self.table.to_parquet(paths["parquet"])
        self.long.to_csv(paths["long"], index=False)
        from plotly.offline import get_plotlyjs

        js = out / PLOTLY_FILE
        if not js.is_file():
            write_page(js, get_plotlyjs())
        paths["plotly"] = js
        write_page(paths["html"], self.to_html(plotly_src=PLOTLY_FILE))
        mig = {k: v.to_dict(orient="index") for k, v in self.migrations.items()}
        paths["migrations"].write_text(json.dumps({"base": self.base, "migrations": mig}, indent=1))
        return paths


def compare_runs(
    runs: Sequence[str | Path],
    names: Sequence[str] | None = None,
    rule: QuadrantRule | None = None,
    base: str | None = None,
    allow_different_rows: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    families: Sequence[str] | str = DEFAULT_FAMILIES,
) -> RunComparison:
    """Tabulate finished run folders (``names``: row labels, default the folder names; ``base``: the
    reference run for ``into_dangerous``, default the first). Every run is summarised with the same
    ``rule`` (default: :data:`~analyses.eval.quadrants.DEFAULT_RULE`), resamples and seed; ``families``:
    paraphrase families with their own flip-rate column (``"all"``: every one). Refuses runs over different
    question rows unless ``allow_different_rows``."""
    if not runs:
        raise ValueError("no runs given: pass run folders, e.g. compare_runs(['runs/base', 'runs/targeted'])")
    paths = [Path(r) for r in runs]
    labels = _names(paths, names)
    base = labels[0] if base is None else base
    if base not in labels:
        raise ValueError(f"base {base!r} is not one of the runs {labels}")
    rule = rule or QuadrantRule()
    fams = family_columns(families)
    loaded = {n: load_run(p) for n, p in zip(labels, paths, strict=True)}
    metas, preds = {n: v[0] for n, v in loaded.items()}, {n: v[1] for n, v in loaded.items()}
    if not allow_different_rows:
        check_same_rows(metas, preds)
    summaries = {n: summarize(preds[n], rule, n_boot=n_boot, seed=seed, level=level) for n in labels}
    base_q = summaries[base]["quadrants"]
    records, migrations = [], {}
    for n, p in zip(labels, paths, strict=True):
        model, arm = run_label(metas[n])
        q = summaries[n]["quadrants"]
        row = {"run": n, "model": model, "arm": arm, "data": loaded[n][2],
               "removal": str(metas[n].get("removal", "")).removeprefix("removed:"),
               "dataset_hash": metas[n].get("dataset_hash", ""), "n_rows": int(preds[n]["qid"].nunique()),
               "path": display_path(p.resolve()), **_row(summaries[n]), **_family_row(summaries[n], fams)}  # fmt: skip
        both = q is not None and base_q is not None
        row["into_dangerous"] = into_dangerous(base_q, q) if both else float("nan")
        if both:
            migrations[n] = migration(base_q, q)
        records.append(row)
    table_ = pd.DataFrame.from_records(records).set_index("run")
    settings = differing_settings(metas)
    return RunComparison(
        table_, _long(summaries), rule, base, level, summaries, preds, migrations, settings, fams
    )
