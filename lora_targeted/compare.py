"""Before/after comparison of adapters (base, targeted LoRA, all-layers LoRA) on the same rows.

Each adapter is run through the evaluator (:func:`analyses.eval.evaluate.evaluate`, one sub-folder per
adapter, resumable) and summarised in one row: flip rate, flip rate on one paraphrase family,
text-only agreement, label-controlled swap sensitivity, accuracy, the four quadrant counts, and how
many samples moved *into* Dangerous relative to the base (a fix that makes the model consistent by
ignoring the image shows up there).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.data.schema import PARAPHRASE_FAMILIES, ImageSource, QuestionRow
from analyses.eval.compare import RunComparison, compare_runs
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.eval.quadrants import QUADRANTS, QuadrantRule, into_dangerous
from hooks.adapter import VLMAdapter

__all__ = ["COLUMNS", "Comparison", "compare", "comparison_table", "into_dangerous"]

#: Rate columns (fractions in [0, 1]) of :attr:`Comparison.table`, in order.
RATE_COLUMNS: tuple[str, ...] = (
    "flip_rate",
    "family_flip_rate",
    "pairwise_flip_rate",
    "text_only_agreement",
    "swap_sensitivity_label",
    "accuracy",
)
#: Count columns: samples per quadrant, and samples that moved into Dangerous vs the base.
COUNT_COLUMNS: tuple[str, ...] = (*QUADRANTS, "n_samples", "into_dangerous")
COLUMNS: tuple[str, ...] = (*RATE_COLUMNS, *COUNT_COLUMNS)


@dataclass
class Comparison:
    """Per-adapter metrics side by side, with everything they were computed from."""

    table: pd.DataFrame
    """One row per adapter (index ``adapter``), columns :data:`COLUMNS`."""
    family: str
    """Paraphrase family of ``family_flip_rate``."""
    base: str
    """Name of the reference adapter for ``into_dangerous``."""
    rule: QuadrantRule
    """Quadrant rule used."""
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)
    """Predictions table of each adapter."""
    quadrants: dict[str, pd.DataFrame | None] = field(default_factory=dict)
    """Per-sample quadrants of each adapter (``None`` without a 'removed' condition)."""
    migrations: dict[str, pd.DataFrame] = field(default_factory=dict)
    """4x4 quadrant migration base -> adapter (rows before, columns after)."""
    runs: RunComparison | None = None
    """The same runs as :func:`analyses.eval.compare.compare_runs` tabulates them: every metric and
    quadrant share with its bootstrap CI (``runs.table``, ``runs.long``, ``runs.to_html()``)."""

    def figure(self) -> Any:
        """Plotly figure: grouped bars of the rates (left) and the quadrant counts (right)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], subplot_titles=("rates", "quadrants"))
        labels = [c if c != "family_flip_rate" else f"flip_rate ({self.family})" for c in RATE_COLUMNS]
        for i, (name, row) in enumerate(self.table.iterrows()):
            color = _PALETTE[i % len(_PALETTE)]
            fig.add_trace(
                go.Bar(name=str(name), x=labels, y=[row[c] for c in RATE_COLUMNS], marker_color=color,
                       legendgroup=str(name)),
                row=1, col=1,
            )  # fmt: skip
            fig.add_trace(
                go.Bar(name=str(name), x=list(QUADRANTS), y=[row[q] for q in QUADRANTS], marker_color=color,
                       legendgroup=str(name), showlegend=False),
                row=1, col=2,
            )  # fmt: skip
        fig.update_layout(barmode="group", title="LoRA comparison", template="plotly_white", height=420)
        fig.update_yaxes(range=[0, 1], row=1, col=1)
        return fig

    def to_markdown(self, digits: int = 3) -> str:
        """The table as a GitHub markdown table (rates rounded to ``digits``)."""
        cols = ["adapter", *[c if c != "family_flip_rate" else f"flip_rate[{self.family}]" for c in COLUMNS]]
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
        for name, row in self.table.iterrows():
            cells = [str(name), *[_fmt(row[c], digits, count=c in COUNT_COLUMNS) for c in COLUMNS]]
            lines.append("| " + " | ".join(cells) + " |")
        note = (
            f"\n\nfamily flip rate: `{self.family}`; into_dangerous: samples moving into Dangerous vs "
            f"`{self.base}`; quadrant rule: {self.rule.in_words()}"
        )
        return "\n".join(lines) + note

    def save(self, out_dir: str | Path) -> Path:
        """Write ``comparison.csv``, ``comparison.md`` and ``migrations.json`` under ``out_dir``, and the
        table with CIs (:meth:`RunComparison.save`, files ``comparison_ci.*``) when there is one."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.runs is not None:
            self.runs.save(out, name="comparison_ci")
        self.table.to_csv(out / "comparison.csv")
        (out / "comparison.md").write_text(self.to_markdown() + "\n")
        mig = {k: v.to_dict(orient="index") for k, v in self.migrations.items()}
        (out / "migrations.json").write_text(json.dumps({"base": self.base, "migrations": mig}, indent=1))
        return out


_PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3")


def _fmt(v: Any, digits: int, count: bool = False) -> str:
    if count and isinstance(v, float) and v.is_integer():
        return str(int(v))  # counts are floats only so they can be NaN; 0 and 1 are counts too
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else (str(int(v)) if v.is_integer() and abs(v) > 1 else f"{v:.{digits}f}")
        )
    return str(v)


def _folder(name: str) -> str:
    safe = re.sub(r"[^\w.+-]+", "_", name).strip("._")
    if not safe:
        raise ValueError(f"adapter name {name!r} gives an empty folder name; use letters or digits")
    return safe


def comparison_table(runs: RunComparison, family: str) -> pd.DataFrame:
    """The :data:`COLUMNS` table (values only) of a run comparison; ``family_flip_rate`` is the flip rate
    of ``family`` (NaN where no cluster has it)."""
    t = runs.table
    fam = {
        n: float(s["by_family"]["value"].get(("flip_rate", family), float("nan")))
        for n, s in runs.summaries.items()
    }
    out = t[[c for c in COLUMNS if c in t.columns]].copy()
    out.insert(1, "family_flip_rate", pd.Series(fam))
    out.index.name = "adapter"
    return out[list(COLUMNS)]


def compare(
    adapters: Mapping[str, VLMAdapter],
    rows: Sequence[QuestionRow],
    images: ImageSource,
    out_dir: str | Path,
    eval_config: EvalConfig | None = None,
    rule: QuadrantRule | None = None,
    family: str = "register",
    base: str | None = None,
    progress: bool = False,
    n_boot: int = 1000,
) -> Comparison:
    """Evaluate every adapter on ``rows`` (sub-folder ``out_dir/<name>`` each) and tabulate them.

    ``base`` (default: the first adapter) is the reference for ``into_dangerous``. The runs are tabulated
    by :func:`analyses.eval.compare.compare_runs` (``n_boot`` resamples for the CIs of
    :attr:`Comparison.runs`; the table keeps the point values). The evaluator needs
    the 'removed' condition for quadrants and 'swap_label' for swap sensitivity; without them those
    columns are NaN. Results are also saved (:meth:`Comparison.save`) under ``out_dir``.
    """
    if not adapters:
        raise ValueError("adapters is empty: pass e.g. {'base': base_adapter, 'targeted': lora_adapter}")
    if family not in PARAPHRASE_FAMILIES:
        raise ValueError(f"family {family!r} is not a paraphrase family; choose one of {PARAPHRASE_FAMILIES}")
    names = list(adapters)
    base = names[0] if base is None else base
    if base not in adapters:
        raise ValueError(f"base {base!r} is not one of the adapters {names}")
    folders = [_folder(n) for n in names]
    if len(set(folders)) != len(folders):
        raise ValueError(f"adapter names {names} map to clashing folder names {folders}; rename them")
    cfg = eval_config or EvalConfig()
    rule = rule or QuadrantRule()
    out = Path(out_dir)
    preds = {
        n: evaluate(adapters[n], rows, images, out / f, cfg, progress=progress)
        for n, f in zip(names, folders, strict=True)
    }
    runs = compare_runs([out / f for f in folders], names, rule, base, n_boot=n_boot, seed=cfg.seed)
    qs = {n: runs.summaries[n]["quadrants"] for n in names}
    comp = Comparison(comparison_table(runs, family), family, base, rule, preds, qs, runs.migrations, runs)
    comp.save(out)
    return comp
