"""Paraphrase-sensitivity metrics on a predictions table: pure functions, no model.

``preds`` (written by the evaluator) has one row per (question row, condition): the
:class:`~analyses.data.schema.QuestionRow` columns plus ``condition`` (:data:`CONDITIONS`), ``margin``
(logit(yes) - logit(no)), ``pred`` (``margin > 0``) and ``swap_image_id`` on swap rows
(:mod:`analyses.eval.predictions`). Metrics follow
``docs/metrics.md``; the open choices are stated where made and in :data:`DEFINITIONS`.
A metric is the mean of a boolean per *unit* (row, (original, paraphrase) pair, or cluster):
``by=None`` gives a float (NaN without units), ``by="col"`` (or a list) a ``pd.Series`` per group.
Flips, polarity and quadrants use ``condition="image"``; a variant whose original has no row under the
condition is left out (:func:`validate_predictions` rejects variants without an original at all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_integer_dtype, is_numeric_dtype

from analyses.data.schema import FAMILIES, OPERATOR, ORIGINAL, PARAPHRASE_FAMILIES
from analyses.eval.predictions import CONDITIONS, REQUIRED_COLUMNS, SWAP_CONDITIONS
from interp.stats import check_bootstrap, draw_clusters, percentile_interval

#: Default name of the cluster-root column (see :func:`cluster_root`).
ROOT_COL = "paraphrase_root"
By = str | Sequence[str] | None

#: The definitions this module implements, worded for a report.
DEFINITIONS: dict[str, str] = {
    "prediction": "pred = margin > 0, margin = logit(yes) - logit(no) at the first answer token.",
    "accuracy": "Fraction of rows (all families; operator ground truth is already inverted) under the "
    "condition with pred == ground_truth.",
    "cluster": "An original question on one image plus its answer-preserving paraphrases (paraphrase_of "
    "== original qid, family in the paraphrase families). Operator variants never enter a cluster. "
    "Clusters with no paraphrase under the condition are left out of flip metrics and quadrants.",
    "flip_rate": "Mean over clusters of Flip(q) = 1 if any paraphrase's pred differs from the original's "
    "(condition 'image'). By family: over clusters having that family, the fraction where any "
    "paraphrase of that family disagrees with the original.",
    "pairwise_flip_rate": "Fraction of (original, paraphrase) pairs whose preds disagree.",
    "polarity_consistency": "Over operator variants with their original present: fraction with "
    "pred(variant) == not pred(original).",
    "text_only_agreement": "Over rows (any family) having both 'image' and 'removed': fraction with the "
    "same pred. The removal kind is recorded in the run metadata.",
    "swap_sensitivity": "Over rows having both 'image' and the swap condition: fraction whose pred "
    "changes. 'random' = another patient's image; 'label' = another patient's image with the opposite "
    "ground truth for this finding.",
    "quadrants": "Per sample (cluster): consistent x image-reliant under QuadrantRule; with scope "
    "'cluster' (default) the sample is reliant iff every answer-preserving question of it with a 'removed' "
    "prediction is, with scope 'original' iff the original is; samples without a 'removed' original row "
    "are left out. Ideal = "
    "consistent & reliant, Fragile = inconsistent & reliant, Dangerous = consistent & not reliant, "
    "Worst = inconsistent & not reliant.",
    "entropy": "Binary predictive entropy H(p) = -p ln p - (1-p) ln(1-p) in nats, p = sigmoid(margin), "
    "averaged over the cluster's rows (original + paraphrases) under 'image'; maximum ln 2 at margin 0.",
    "bootstrap": "Percentile bootstrap resampling clusters with replacement (an original moves with all "
    "its paraphrases, operator variants and conditions), n_boot resamples, fixed seed.",
}


def validate_predictions(df: pd.DataFrame) -> pd.DataFrame:
    """Check a predictions table; raise ``ValueError`` listing every problem and how to fix it.

    Checks: required columns; dtypes (``margin`` finite float, ``pred``/``ground_truth`` bool,
    ``polarity`` integer +1/-1); ``pred == (margin > 0)``; known ``condition`` and ``family`` values;
    no duplicate ``(qid, condition)``; ``swap_image_id`` present on swap rows; originals have no
    ``paraphrase_of`` and every variant points to an original in the table; per-qid columns
    (image_id, family, finding, ground_truth, paraphrase_of) constant across conditions; a variant's
    ground truth equals its original's (polarity +1) or its negation (polarity -1).
    Returns ``df`` unchanged so it can be chained.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"predictions must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"predictions table is missing columns {missing}: write one row per (question row, "
            "condition) with the QuestionRow fields plus condition, margin (logit(yes) - logit(no)) "
            "and pred (margin > 0)"
        )
    problems = _Problems(df)
    _check_values(df, problems)
    _check_structure(df, problems)
    if problems:
        raise ValueError("invalid predictions table:\n- " + "\n- ".join(problems))
    return df


class _Problems(list[str]):
    """Problems found in a predictions table, each with up to three example rows."""

    def __init__(self, df: pd.DataFrame) -> None:
        super().__init__()
        self.df = df

    def check(
        self, bad: pd.Series | bool, message: str, cols: tuple[str, str] = ("qid", "condition")
    ) -> None:
        if isinstance(bad, pd.Series) and bad.any():
            rows = self.df.loc[bad, list(cols)].head(3).to_dict("records")
            self.append(message.replace("{ex}", f"{int(bad.sum())} rows, e.g. {rows}"))
        elif bad is True:
            self.append(message)


def _check_values(df: pd.DataFrame, p: _Problems) -> None:
    """Column dtypes and values: margin finite float, bools, pred == margin > 0, polarity, known labels."""
    margin, pred, gt = df["margin"], df["pred"], df["ground_truth"]
    margin_ok = is_numeric_dtype(margin) and not is_bool_dtype(margin)
    bools_ok = all(is_bool_dtype(c) and not c.isna().any() for c in (pred, gt))
    p.check(not margin_ok, f"margin must be a float column (logit(yes) - logit(no)), got {margin.dtype}")
    if margin_ok:
        p.check(~np.isfinite(margin.astype(float)), "margin must be finite on every row: {ex}; re-score them")
    p.check(
        not bools_ok, f"pred and ground_truth must be bool columns without missing values, got {pred.dtype}"
    )
    if margin_ok and bools_ok:
        p.check(pred != (margin > 0), "pred must equal margin > 0: {ex}; set df['pred'] = df['margin'] > 0")
    polarity_ok = is_integer_dtype(df["polarity"]) and df["polarity"].isin([1, -1]).all()
    p.check(not polarity_ok, "polarity must be an integer column of +1 / -1")
    for col, allowed in (("condition", CONDITIONS), ("family", FAMILIES)):
        p.check(
            ~df[col].isin(allowed), f"unknown {col} values: {{ex}}; expected one of {allowed}", ("qid", col)
        )


def _check_structure(df: pd.DataFrame, p: _Problems) -> None:
    """Rows fit together: unique (qid, condition), swap ids, variants point to originals, labels agree."""
    gt, is_orig = df["ground_truth"], df["family"] == ORIGINAL
    p.check(
        df.duplicated(["qid", "condition"], keep=False),
        "duplicate (qid, condition) rows: {ex}; keep one prediction per question and condition "
        "(e.g. df.drop_duplicates(['qid', 'condition'], keep='last'))",
    )
    has_swap_id = df["swap_image_id"].notna() if "swap_image_id" in df.columns else False
    swap = df["condition"].isin(list(SWAP_CONDITIONS.values()))
    p.check(swap & ~has_swap_id, "swap rows need swap_image_id (the image swapped in): {ex}")
    p.check(is_orig & df["paraphrase_of"].notna(), "originals must have paraphrase_of = None: {ex}")
    p.check(
        ~is_orig & ~df["paraphrase_of"].isin(set(df.loc[is_orig, "qid"])),
        "variants whose paraphrase_of is not an original's qid in the table: {ex}; keep originals with "
        "their variants",
        ("qid", "paraphrase_of"),
    )
    static = ["image_id", "family", "finding", "ground_truth", "paraphrase_of"]
    varying = [c for c in static if (df.groupby("qid")[c].nunique(dropna=False) > 1).any()]
    p.check(
        bool(varying), f"columns {varying} differ between conditions of one qid; they describe the question"
    )
    if not p:
        gt0 = df[is_orig].drop_duplicates("qid").set_index("qid")["ground_truth"]
        expect = df["paraphrase_of"].map(gt0).eq(True) == (df["polarity"] == 1)
        p.check(
            ~is_orig & (gt != expect),
            "ground_truth of a variant must equal its original's (polarity +1) or its negation (-1): {ex}",
        )


def cluster_root(df: pd.DataFrame) -> pd.Series:
    """qid of the original each row belongs to: its own qid for originals, ``paraphrase_of`` otherwise.

    Operator variants get their original's root as well: they are not in the flip cluster, but they are
    asked about the same image as the original, so the bootstrap moves them together with it.
    """
    return df["qid"].where(df["family"] == ORIGINAL, df["paraphrase_of"]).rename(ROOT_COL)


def add_cluster_root(df: pd.DataFrame, col: str = ROOT_COL) -> pd.DataFrame:
    """Copy of ``df`` with the :func:`cluster_root` column added as ``col``."""
    return df.assign(**{col: cluster_root(df).to_numpy()})


def predictive_entropy(margin: Any) -> np.ndarray:
    """Binary entropy in nats of p = sigmoid(margin); ln 2 at margin 0 (numerically stable form)."""
    m = np.asarray(margin, dtype=float)
    p = 0.5 * (1.0 + np.tanh(m / 2.0))
    return p * np.logaddexp(0.0, -m) + (1.0 - p) * np.logaddexp(0.0, m)


def rows_under(df: pd.DataFrame, condition: str) -> pd.DataFrame:
    """The rows predicted under ``condition``."""
    return df[df["condition"] == condition]


def _with_original(df: pd.DataFrame, condition: str, families: Sequence[str]) -> pd.DataFrame:
    """Variant rows of ``families`` joined with their original's pred/margin under the same condition."""
    r = rows_under(df, condition)
    orig = r.loc[r["family"] == ORIGINAL, ["qid", "pred", "margin"]]
    orig = orig.rename(columns={"qid": "paraphrase_of", "pred": "pred_orig", "margin": "margin_orig"})
    var = r[r["family"].isin(list(families))]
    return var.merge(orig, on="paraphrase_of", how="inner")


def pair_units(df: pd.DataFrame, condition: str = "image") -> pd.DataFrame:
    """One unit per (original, paraphrase) pair (the paraphrase's row); hit = the preds disagree."""
    pairs = _with_original(df, condition, PARAPHRASE_FAMILIES)
    return pairs.assign(hit=pairs["pred"].to_numpy() != pairs["pred_orig"].to_numpy())


def cluster_units(df: pd.DataFrame, condition: str = "image", per_family: bool = False) -> pd.DataFrame:
    """One unit per cluster (columns of the original's row), or per (cluster, paraphrase family);
    hit = some paraphrase (of that family) disagrees with the original."""
    pairs = pair_units(df, condition)
    r = rows_under(df, condition)
    orig = r[r["family"] == ORIGINAL]
    if not per_family:
        flips = pairs.groupby("paraphrase_of")["hit"].any()
        return orig.merge(flips, left_on="qid", right_index=True, how="inner")
    flips = pairs.groupby(["paraphrase_of", "family"], as_index=False)["hit"].any()
    flips = flips.rename(columns={"paraphrase_of": "qid"})
    return orig.drop(columns="family").merge(flips, on="qid", how="inner")


def polarity_units(df: pd.DataFrame, condition: str = "image") -> pd.DataFrame:
    """One unit per operator variant with its original present; hit = its pred differs from the original's."""
    ops = _with_original(df, condition, (OPERATOR,))
    return ops.assign(hit=ops["pred"].to_numpy() != ops["pred_orig"].to_numpy())


def compare_units(df: pd.DataFrame, other: str, agree: bool) -> pd.DataFrame:
    """Rows having both 'image' and ``other`` (columns of the image row); hit = same pred (agree) or not."""
    other_rows = rows_under(df, other)[["qid", "pred", "margin"]]
    both = rows_under(df, "image").merge(other_rows, on="qid", how="inner", suffixes=("", "_other"))
    same = both["pred"].to_numpy() == both["pred_other"].to_numpy()
    return both.assign(hit=same if agree else ~same)


def accuracy_units(df: pd.DataFrame, condition: str = "image") -> pd.DataFrame:
    """One unit per row under ``condition``; hit = pred == ground truth."""
    r = rows_under(df, condition)
    return r.assign(hit=r["pred"].to_numpy() == r["ground_truth"].to_numpy())


def _keys(by: By) -> list[str]:
    return [] if by is None else [by] if isinstance(by, str) else list(by)


def _aggregate(units: pd.DataFrame, by: By, name: str) -> float | pd.Series:
    keys = _keys(by)
    if not keys:
        return float(units["hit"].mean()) if len(units) else float("nan")
    missing = [k for k in keys if k not in units.columns]
    if missing:
        raise ValueError(f"cannot group {name} by {missing}: not a column of its units {list(units.columns)}")
    return units.groupby(keys if len(keys) > 1 else keys[0])["hit"].mean().astype(float).rename(name)


@overload
def accuracy(df: pd.DataFrame, condition: str = ..., by: None = None) -> float: ...
@overload
def accuracy(df: pd.DataFrame, condition: str = ..., *, by: str | Sequence[str]) -> pd.Series: ...
@overload
def accuracy(df: pd.DataFrame, condition: str, by: str | Sequence[str]) -> pd.Series: ...
def accuracy(df: pd.DataFrame, condition: str = "image", by: By = None) -> float | pd.Series:
    """Fraction of rows under ``condition`` (every family, operators included) with pred == ground_truth."""
    return _aggregate(accuracy_units(df, condition), by, "accuracy")


@overload
def flip_rate(df: pd.DataFrame, by: None = None, condition: str = ...) -> float: ...
@overload
def flip_rate(df: pd.DataFrame, by: str | Sequence[str], condition: str = ...) -> pd.Series: ...
def flip_rate(df: pd.DataFrame, by: By = None, condition: str = "image") -> float | pd.Series:
    """Mean over clusters of Flip(q) = any paraphrase's pred differs from the original's.

    Clusters without a paraphrase under ``condition`` are left out; operator variants never count.
    ``by`` groups clusters by columns of the original's row (e.g. ``finding``); ``by="family"`` instead
    gives, per paraphrase family, the fraction of the clusters having that family where that family's
    paraphrase(s) disagree with the original.
    """
    per_family = "family" in _keys(by)
    return _aggregate(cluster_units(df, condition, per_family), by, "flip_rate")


@overload
def pairwise_flip_rate(df: pd.DataFrame, by: None = None, condition: str = ...) -> float: ...
@overload
def pairwise_flip_rate(df: pd.DataFrame, by: str | Sequence[str], condition: str = ...) -> pd.Series: ...
def pairwise_flip_rate(df: pd.DataFrame, by: By = None, condition: str = "image") -> float | pd.Series:
    """Fraction of (original, paraphrase) pairs whose preds disagree; ``by`` uses the paraphrase's row."""
    return _aggregate(pair_units(df, condition), by, "pairwise_flip_rate")


@overload
def polarity_consistency(df: pd.DataFrame, by: None = None, condition: str = ...) -> float: ...
@overload
def polarity_consistency(df: pd.DataFrame, by: str | Sequence[str], condition: str = ...) -> pd.Series: ...
def polarity_consistency(df: pd.DataFrame, by: By = None, condition: str = "image") -> float | pd.Series:
    """Over operator variants with their original present: fraction with pred(variant) != pred(original)."""
    return _aggregate(polarity_units(df, condition), by, "polarity_consistency")


@overload
def text_only_agreement(df: pd.DataFrame, by: None = None) -> float: ...
@overload
def text_only_agreement(df: pd.DataFrame, by: str | Sequence[str]) -> pd.Series: ...
def text_only_agreement(df: pd.DataFrame, by: By = None) -> float | pd.Series:
    """Over rows having both 'image' and 'removed' (any family): fraction with the same pred."""
    return _aggregate(compare_units(df, "removed", agree=True), by, "text_only_agreement")


Swap = Literal["random", "label"]


@overload
def swap_sensitivity(df: pd.DataFrame, kind: Swap = ..., by: None = None) -> float: ...
@overload
def swap_sensitivity(df: pd.DataFrame, kind: Swap = ..., *, by: str | Sequence[str]) -> pd.Series: ...
@overload
def swap_sensitivity(df: pd.DataFrame, kind: Swap, by: str | Sequence[str]) -> pd.Series: ...
def swap_sensitivity(df: pd.DataFrame, kind: Swap = "random", by: By = None) -> float | pd.Series:
    """Over rows having both 'image' and 'swap_<kind>': fraction whose pred changes with the swapped image."""
    if kind not in SWAP_CONDITIONS:
        raise ValueError(f"kind must be one of {tuple(SWAP_CONDITIONS)}, got {kind!r}")
    return _aggregate(compare_units(df, SWAP_CONDITIONS[kind], agree=False), by, f"swap_sensitivity_{kind}")


class ClusterResampler:
    """Draws cluster-bootstrap resamples of a table.

    A cluster drawn k times appears k times with distinct keys: in each resample ``qid``,
    ``paraphrase_of`` and the cluster column are replaced by integer codes unique per drawn copy
    (``paraphrase_of`` = -1 for originals), so joins on them never mix copies. Statistics must use these
    columns only as keys.
    """

    def __init__(self, df: pd.DataFrame, cluster_col: str) -> None:
        if df[cluster_col].isna().any():
            raise ValueError(f"{cluster_col} has missing values: every row needs a cluster")
        self.base = df.reset_index(drop=True)
        qcat = pd.Categorical(self.base["qid"])
        self.n_q = len(qcat.categories)
        self.q = qcat.codes.astype(np.int64)
        self.p = pd.Categorical(self.base["paraphrase_of"], categories=qcat.categories).codes.astype(np.int64)
        cl, uniques = pd.factorize(self.base[cluster_col])
        self.clusters = pd.Index(uniques)
        self.cluster_col = cluster_col
        self.order = np.argsort(cl, kind="stable")
        self.sizes = np.bincount(cl)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def draw(self, rng: np.random.Generator) -> pd.DataFrame:
        k = draw_clusters(rng, len(self.sizes))
        lens = self.sizes[k]
        copy = np.repeat(np.arange(len(k)), lens)
        within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        pos = self.order[self.starts[k][copy] + within]
        p = self.p[pos]
        qid, para = self.q[pos] + copy * self.n_q, np.where(p >= 0, p + copy * self.n_q, -1)
        out = self.base.take(pos).reset_index(drop=True)
        return out.assign(qid=qid, paraphrase_of=para, **{self.cluster_col: copy})


def _with_root(df: pd.DataFrame, cluster_col: str) -> pd.DataFrame:
    if cluster_col in df.columns:
        return df
    if cluster_col == ROOT_COL:
        return add_cluster_root(df)
    raise ValueError(f"cluster column {cluster_col!r} not in the table; add it or use {ROOT_COL!r}")


def bootstrap_ci(
    df: pd.DataFrame,
    statistic: Callable[[pd.DataFrame], float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    cluster_col: str = ROOT_COL,
) -> tuple[float, float, float]:
    """(point, low, high): ``statistic`` on ``df`` and its percentile bootstrap interval over clusters.

    Clusters (rows sharing ``cluster_col``; computed with :func:`cluster_root` if it is the default and
    missing) are drawn with replacement, so an original moves with all its variants and conditions and
    dependence within a cluster is respected. Resamples where the statistic is NaN are skipped. The
    draws and the interval are those of :mod:`interp.stats`, so :func:`~analyses.eval.summary.summarize`
    gives the same interval for one of its metrics with the same seed.
    """
    check_bootstrap(n_boot, level)
    d = _with_root(df, cluster_col)
    resampler = ClusterResampler(d, cluster_col)
    rng = np.random.default_rng(seed)
    values = np.array([float(statistic(resampler.draw(rng))) for _ in range(n_boot)])
    low, high = percentile_interval(values, level)
    return float(statistic(d)), float(low), float(high)
