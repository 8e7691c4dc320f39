"""Paraphrase-sensitivity metrics on a predictions table: pure functions, no model.

``preds`` (written by the evaluator) has one row per (question row, condition): the
:class:`~analyses.schema.QuestionRow` columns plus ``condition`` (:data:`CONDITIONS`), ``margin``
(logit(yes) - logit(no)), ``pred`` (``margin > 0``) and ``swap_image_id`` on swap rows. Metrics follow
"Metric definitions" in DESIGN.md; the open choices are stated where made and in :data:`DEFINITIONS`.
A metric is the mean of a boolean per *unit* (row, (original, paraphrase) pair, or cluster):
``by=None`` gives a float (NaN without units), ``by="col"`` (or a list) a ``pd.Series`` per group.
Flips, polarity and quadrants use ``condition="image"``; a variant whose original has no row under the
condition is left out (:func:`validate_predictions` rejects variants without an original at all).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, overload

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_integer_dtype, is_numeric_dtype

from analyses.schema import FAMILIES, OPERATOR, ORIGINAL, PARAPHRASE_FAMILIES

#: Conditions a prediction can be made under.
CONDITIONS: tuple[str, ...] = ("image", "removed", "swap_random", "swap_label")
#: ``swap_sensitivity(kind=...)`` -> condition.
SWAP_CONDITIONS: dict[str, str] = {"random": "swap_random", "label": "swap_label"}
#: The four quadrants, in reporting order.
QUADRANTS: tuple[str, ...] = ("Ideal", "Fragile", "Dangerous", "Worst")
#: Columns every predictions table must have.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "qid", "image_id", "question", "family", "paraphrase_of", "polarity", "ground_truth", "finding",
    "split", "condition", "margin", "pred",
)  # fmt: skip
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
    "quadrants": "Per sample (cluster): consistent x image-reliant under QuadrantRule; reliance is read "
    "on the original question only; samples without a 'removed' original row are left out. Ideal = "
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
    problems: list[str] = []

    def check(bad: pd.Series | bool, message: str, cols: tuple[str, str] = ("qid", "condition")) -> None:
        if isinstance(bad, pd.Series) and bad.any():
            rows = df.loc[bad, list(cols)].head(3).to_dict("records")
            problems.append(message.replace("{ex}", f"{int(bad.sum())} rows, e.g. {rows}"))
        elif bad is True:
            problems.append(message)

    margin, pred, gt, is_orig = df["margin"], df["pred"], df["ground_truth"], df["family"] == ORIGINAL
    margin_ok = is_numeric_dtype(margin) and not is_bool_dtype(margin)
    bools_ok = all(is_bool_dtype(c) and not c.isna().any() for c in (pred, gt))
    check(not margin_ok, f"margin must be a float column (logit(yes) - logit(no)), got {margin.dtype}")
    if margin_ok:
        check(~np.isfinite(margin.astype(float)), "margin must be finite on every row: {ex}; re-score them")
    check(
        not bools_ok, f"pred and ground_truth must be bool columns without missing values, got {pred.dtype}"
    )
    if margin_ok and bools_ok:
        check(pred != (margin > 0), "pred must equal margin > 0: {ex}; set df['pred'] = df['margin'] > 0")
    polarity_ok = is_integer_dtype(df["polarity"]) and df["polarity"].isin([1, -1]).all()
    check(not polarity_ok, "polarity must be an integer column of +1 / -1")
    for col, allowed in (("condition", CONDITIONS), ("family", FAMILIES)):
        check(
            ~df[col].isin(allowed), f"unknown {col} values: {{ex}}; expected one of {allowed}", ("qid", col)
        )
    check(
        df.duplicated(["qid", "condition"], keep=False),
        "duplicate (qid, condition) rows: {ex}; keep one prediction per question and condition "
        "(e.g. df.drop_duplicates(['qid', 'condition'], keep='last'))",
    )
    has_swap_id = df["swap_image_id"].notna() if "swap_image_id" in df.columns else False
    swap = df["condition"].isin(list(SWAP_CONDITIONS.values()))
    check(swap & ~has_swap_id, "swap rows need swap_image_id (the image swapped in): {ex}")
    check(is_orig & df["paraphrase_of"].notna(), "originals must have paraphrase_of = None: {ex}")
    check(
        ~is_orig & ~df["paraphrase_of"].isin(set(df.loc[is_orig, "qid"])),
        "variants whose paraphrase_of is not an original's qid in the table: {ex}; keep originals with "
        "their variants",
        ("qid", "paraphrase_of"),
    )
    static = ["image_id", "family", "finding", "ground_truth", "paraphrase_of"]
    varying = [c for c in static if (df.groupby("qid")[c].nunique(dropna=False) > 1).any()]
    check(
        bool(varying), f"columns {varying} differ between conditions of one qid; they describe the question"
    )
    if not problems:
        gt0 = df[is_orig].drop_duplicates("qid").set_index("qid")["ground_truth"]
        expect = df["paraphrase_of"].map(gt0).eq(True) == (df["polarity"] == 1)
        check(
            ~is_orig & (gt != expect),
            "ground_truth of a variant must equal its original's (polarity +1) or its negation (-1): {ex}",
        )
    if problems:
        raise ValueError("invalid predictions table:\n- " + "\n- ".join(problems))
    return df


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


def _rows(df: pd.DataFrame, condition: str) -> pd.DataFrame:
    return df[df["condition"] == condition]


def _with_original(df: pd.DataFrame, condition: str, families: Sequence[str]) -> pd.DataFrame:
    """Variant rows of ``families`` joined with their original's pred/margin under the same condition."""
    r = _rows(df, condition)
    orig = r.loc[r["family"] == ORIGINAL, ["qid", "pred", "margin"]]
    orig = orig.rename(columns={"qid": "paraphrase_of", "pred": "pred_orig", "margin": "margin_orig"})
    var = r[r["family"].isin(list(families))]
    return var.merge(orig, on="paraphrase_of", how="inner")


def _pair_units(df: pd.DataFrame, condition: str = "image") -> pd.DataFrame:
    pairs = _with_original(df, condition, PARAPHRASE_FAMILIES)
    return pairs.assign(hit=pairs["pred"].to_numpy() != pairs["pred_orig"].to_numpy())


def _cluster_units(df: pd.DataFrame, condition: str = "image", per_family: bool = False) -> pd.DataFrame:
    """One unit per cluster (columns of the original's row), or per (cluster, paraphrase family)."""
    pairs = _pair_units(df, condition)
    r = _rows(df, condition)
    orig = r[r["family"] == ORIGINAL]
    if not per_family:
        flips = pairs.groupby("paraphrase_of")["hit"].any()
        return orig.merge(flips, left_on="qid", right_index=True, how="inner")
    flips = pairs.groupby(["paraphrase_of", "family"], as_index=False)["hit"].any()
    flips = flips.rename(columns={"paraphrase_of": "qid"})
    return orig.drop(columns="family").merge(flips, on="qid", how="inner")


def _polarity_units(df: pd.DataFrame, condition: str = "image") -> pd.DataFrame:
    ops = _with_original(df, condition, (OPERATOR,))
    return ops.assign(hit=ops["pred"].to_numpy() != ops["pred_orig"].to_numpy())


def _compare_units(df: pd.DataFrame, other: str, agree: bool) -> pd.DataFrame:
    """Rows having both 'image' and ``other`` (columns of the image row); hit = same pred (agree) or not."""
    other_rows = _rows(df, other)[["qid", "pred", "margin"]]
    both = _rows(df, "image").merge(other_rows, on="qid", how="inner", suffixes=("", "_other"))
    same = both["pred"].to_numpy() == both["pred_other"].to_numpy()
    return both.assign(hit=same if agree else ~same)


def _accuracy_units(df: pd.DataFrame, condition: str = "image") -> pd.DataFrame:
    r = _rows(df, condition)
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
    return _aggregate(_accuracy_units(df, condition), by, "accuracy")


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
    return _aggregate(_cluster_units(df, condition, per_family), by, "flip_rate")


@overload
def pairwise_flip_rate(df: pd.DataFrame, by: None = None, condition: str = ...) -> float: ...
@overload
def pairwise_flip_rate(df: pd.DataFrame, by: str | Sequence[str], condition: str = ...) -> pd.Series: ...
def pairwise_flip_rate(df: pd.DataFrame, by: By = None, condition: str = "image") -> float | pd.Series:
    """Fraction of (original, paraphrase) pairs whose preds disagree; ``by`` uses the paraphrase's row."""
    return _aggregate(_pair_units(df, condition), by, "pairwise_flip_rate")


@overload
def polarity_consistency(df: pd.DataFrame, by: None = None, condition: str = ...) -> float: ...
@overload
def polarity_consistency(df: pd.DataFrame, by: str | Sequence[str], condition: str = ...) -> pd.Series: ...
def polarity_consistency(df: pd.DataFrame, by: By = None, condition: str = "image") -> float | pd.Series:
    """Over operator variants with their original present: fraction with pred(variant) != pred(original)."""
    return _aggregate(_polarity_units(df, condition), by, "polarity_consistency")


@overload
def text_only_agreement(df: pd.DataFrame, by: None = None) -> float: ...
@overload
def text_only_agreement(df: pd.DataFrame, by: str | Sequence[str]) -> pd.Series: ...
def text_only_agreement(df: pd.DataFrame, by: By = None) -> float | pd.Series:
    """Over rows having both 'image' and 'removed' (any family): fraction with the same pred."""
    return _aggregate(_compare_units(df, "removed", agree=True), by, "text_only_agreement")


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
    return _aggregate(_compare_units(df, SWAP_CONDITIONS[kind], agree=False), by, f"swap_sensitivity_{kind}")


@dataclass(frozen=True)
class QuadrantRule:
    """Explicit rule placing a sample (one cluster) in a quadrant; the papers define them only in words."""

    reliance: Literal["pred_change", "margin_shift"] = "pred_change"
    """How image reliance is read on the *original* question, 'image' vs 'removed': ``pred_change``:
    reliant iff its prediction changes; ``margin_shift``: reliant iff
    ``|margin(image) - margin(removed)| >= min_margin_shift`` (the shift need not cross zero)."""
    min_margin_shift: float = 1.0
    """Threshold in logits for ``reliance="margin_shift"`` (ignored otherwise); finite and >= 0."""
    consistency: Literal["pred", "margin_band"] = "pred"
    """``pred``: consistent iff no paraphrase's prediction differs from the original's (no flip).
    ``margin_band``: additionally every margin in the cluster (original and paraphrases) has
    ``|margin| >= min_abs_margin``: all on the same side of zero and outside the band
    (-min_abs_margin, min_abs_margin), so that agreeing near-ties do not count as consistent."""
    min_abs_margin: float = 0.5
    """Band half-width in logits for ``consistency="margin_band"`` (ignored otherwise); finite and >= 0."""

    def __post_init__(self) -> None:
        if self.reliance not in ("pred_change", "margin_shift"):
            raise ValueError(f"reliance must be 'pred_change' or 'margin_shift', got {self.reliance!r}")
        if self.consistency not in ("pred", "margin_band"):
            raise ValueError(f"consistency must be 'pred' or 'margin_band', got {self.consistency!r}")
        for name in ("min_margin_shift", "min_abs_margin"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (logits), got {value}")


def quadrants(df: pd.DataFrame, rule: QuadrantRule | None = None) -> pd.DataFrame:
    """One row per sample (original + its paraphrases on one image) with its quadrant under ``rule``.

    Columns: qid (the original's), image_id, finding, split, n_paraphrases, margin and margin_removed
    (the original's), consistent, reliant, quadrant, correct (original's pred == ground_truth), entropy
    (see :data:`DEFINITIONS`). Samples without a paraphrase under 'image' or without a 'removed' row
    for the original are left out; operator variants play no part.
    """
    rule = rule or QuadrantRule()
    removed = _rows(df, "removed")
    if removed.empty:
        raise ValueError("quadrants need predictions under condition 'removed' for the original questions")
    pairs = _pair_units(df, "image")
    pairs = pairs.assign(abs_m=pairs["margin"].abs(), ent=predictive_entropy(pairs["margin"]))
    per = pairs.groupby("paraphrase_of").agg(
        n_paraphrases=("hit", "size"),
        flipped=("hit", "any"),
        min_abs=("abs_m", "min"),
        ent_sum=("ent", "sum"),
    )
    im = _rows(df, "image")
    s = im[im["family"] == ORIGINAL].merge(per, left_on="qid", right_index=True, how="inner")
    rem = removed[["qid", "pred", "margin"]].rename(columns={"pred": "pred_rm", "margin": "margin_removed"})
    s = s.merge(rem, on="qid", how="inner")
    consistent = ~s["flipped"].to_numpy(dtype=bool)
    if rule.consistency == "margin_band":
        min_abs = np.minimum(s["margin"].abs().to_numpy(), s["min_abs"].to_numpy())
        consistent &= min_abs >= rule.min_abs_margin
    if rule.reliance == "pred_change":
        reliant = s["pred"].to_numpy() != s["pred_rm"].to_numpy()
    else:
        reliant = np.abs(s["margin"].to_numpy() - s["margin_removed"].to_numpy()) >= rule.min_margin_shift
    quadrant = np.select(
        [consistent & reliant, ~consistent & reliant, consistent & ~reliant], QUADRANTS[:3], QUADRANTS[3]
    )
    n_rows = 1 + s["n_paraphrases"].to_numpy()
    entropy = (predictive_entropy(s["margin"]) + s["ent_sum"].to_numpy()) / n_rows
    correct = s["pred"].to_numpy() == s["ground_truth"].to_numpy()
    out = s[["qid", "image_id", "finding", "split", "n_paraphrases", "margin", "margin_removed"]]
    out = out.assign(consistent=consistent, reliant=reliant, quadrant=quadrant, correct=correct)
    out = out.assign(entropy=entropy)
    return out.reset_index(drop=True)


def quadrant_summary(q: pd.DataFrame) -> pd.DataFrame:
    """Per quadrant (all four, in :data:`QUADRANTS` order): count, share, accuracy, mean_entropy.

    ``share`` is count / number of samples; an empty quadrant has accuracy and mean_entropy NaN.
    """
    g = q.assign(correct=q["correct"].astype(float)).groupby("quadrant")
    count = g.size().reindex(list(QUADRANTS), fill_value=0).astype(int)
    total = int(count.sum())
    share = count / total if total else np.nan
    acc, ent = (g[c].mean().reindex(list(QUADRANTS)) for c in ("correct", "entropy"))
    out = pd.DataFrame({"count": count, "share": share, "accuracy": acc, "mean_entropy": ent})
    out.index.name = "quadrant"
    return out


def migration(before_q: pd.DataFrame, after_q: pd.DataFrame) -> pd.DataFrame:
    """4x4 counts of samples by quadrant before (rows) and after (columns), matched on (qid, image_id).

    Samples present in only one table are left out. ``migration(...)["Dangerous"].sum() -
    migration(...).loc["Dangerous", "Dangerous"]`` counts samples moving into Dangerous.
    """
    keys = ["qid", "image_id"]
    before, after = before_q[[*keys, "quadrant"]], after_q[[*keys, "quadrant"]]
    m = before.merge(after, on=keys, suffixes=("_before", "_after"))
    ct = m.groupby(["quadrant_before", "quadrant_after"]).size().unstack(fill_value=0)
    ct = ct.reindex(index=list(QUADRANTS), columns=list(QUADRANTS), fill_value=0).astype(int)
    ct.index.name, ct.columns.name = "before", "after"
    return ct


class _ClusterResampler:
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

    def draw_clusters(self, rng: np.random.Generator) -> np.ndarray:
        """Indices of the clusters of one resample (as many draws as clusters, with replacement)."""
        return rng.integers(0, len(self.sizes), size=len(self.sizes))

    def draw(self, rng: np.random.Generator) -> pd.DataFrame:
        k = self.draw_clusters(rng)
        lens = self.sizes[k]
        copy = np.repeat(np.arange(len(k)), lens)
        within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        pos = self.order[self.starts[k][copy] + within]
        p = self.p[pos]
        qid, para = self.q[pos] + copy * self.n_q, np.where(p >= 0, p + copy * self.n_q, -1)
        out = self.base.take(pos).reset_index(drop=True)
        return out.assign(qid=qid, paraphrase_of=para, **{self.cluster_col: copy})


def _check_boot(n_boot: int, level: float) -> None:
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and level in (0, 1), got n_boot={n_boot}, level={level}")


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
    dependence within a cluster is respected. Resamples where the statistic is NaN are skipped.
    """
    _check_boot(n_boot, level)
    d = _with_root(df, cluster_col)
    resampler = _ClusterResampler(d, cluster_col)
    rng = np.random.default_rng(seed)
    values = np.array([float(statistic(resampler.draw(rng))) for _ in range(n_boot)])
    values = values[~np.isnan(values)]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha]) if len(values) else (np.nan, np.nan)
    return float(statistic(d)), float(low), float(high)


def _unit_sums(d: pd.DataFrame, clusters: pd.Index) -> tuple[pd.MultiIndex, np.ndarray, np.ndarray]:
    """Hit sums H and unit counts N per (metric, by, group) key (rows) and cluster (columns).

    Keys come in report order, with an overall key for every metric even without units. Every unit lies
    inside one cluster, so a resample's metric is (w @ H) / (w @ N) with w the number of times each
    cluster was drawn: the value a recomputation on the resampled table would give.
    """
    units = {
        "accuracy": _accuracy_units(d, "image"),
        "flip_rate": _cluster_units(d, "image"),
        "pairwise_flip_rate": _pair_units(d, "image"),
        "polarity_consistency": _polarity_units(d, "image"),
        "text_only_agreement": _compare_units(d, "removed", agree=True),
        "swap_sensitivity_random": _compare_units(d, "swap_random", agree=False),
        "swap_sensitivity_label": _compare_units(d, "swap_label", agree=False),
    }
    by_family = {**units, "flip_rate": _cluster_units(d, "image", per_family=True)}
    keys: list[tuple[str, str, str]] = []
    parts = []
    for name, u in units.items():
        for by, src in (("all", u), ("family", by_family[name]), ("finding", u)):
            group = np.full(len(src), "all", dtype=object) if by == "all" else src[by].astype(str).to_numpy()
            keys += [(name, by, "all")] if by == "all" else [(name, by, g) for g in sorted(set(group))]
            cols = {"metric": name, "by": by, "group": group, "root": src[ROOT_COL].to_numpy()}
            parts.append(pd.DataFrame({**cols, "hit": src["hit"].to_numpy(dtype=float)}))
    long = pd.concat(parts, ignore_index=True)
    index = pd.MultiIndex.from_tuples(keys, names=["metric", "by", "group"])
    j = index.get_indexer(pd.MultiIndex.from_frame(long[["metric", "by", "group"]]))
    c = clusters.get_indexer(long["root"])
    hits, counts = np.zeros((len(index), len(clusters))), np.zeros((len(index), len(clusters)))
    np.add.at(hits, (j, c), long["hit"].to_numpy())
    np.add.at(counts, (j, c), 1.0)
    return index, hits, counts


def summarize(
    df: pd.DataFrame, rule: QuadrantRule | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Every metric with its cluster-bootstrap CI, the by-family / by-finding tables, quadrants, choices.

    Returns a dict with ``metrics`` (index metric; columns value, low, high, n = number of units),
    ``by_family`` and ``by_finding`` (index (metric, group); same columns, CIs from the same resamples),
    ``quadrants`` / ``quadrant_summary`` (None without a 'removed' condition) and ``choices`` (rule,
    n_boot, seed, level, conditions present, row and cluster counts, :data:`DEFINITIONS`). A metric
    with no unit (e.g. no swap rows) has value NaN and n = 0. The resamples are those of
    :func:`bootstrap_ci` with the same seed, so its interval for one metric is the same.
    """
    _check_boot(n_boot, level)
    validate_predictions(df)
    rule = rule or QuadrantRule()
    d = add_cluster_root(df)
    resampler = _ClusterResampler(d, ROOT_COL)
    index, hits, counts = _unit_sums(d, resampler.clusters)
    rng = np.random.default_rng(seed)
    boots = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, n_boot, 256):  # chunks bound the (n_boot x clusters) weight matrix
            draws = np.stack([resampler.draw_clusters(rng) for _ in range(min(256, n_boot - start))])
            w = np.stack([np.bincount(k, minlength=len(resampler.clusters)) for k in draws]).astype(float)
            boots.append((w @ hits.T) / (w @ counts.T))
        alpha = (1.0 - level) / 2.0
        with warnings.catch_warnings():  # a key with no unit in any resample stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanquantile(np.concatenate(boots), [alpha, 1.0 - alpha], axis=0)
        n = counts.sum(axis=1)
        table = pd.DataFrame(
            {"value": hits.sum(axis=1) / n, "low": low, "high": high, "n": n.astype(int)}, index=index
        )
    has_removed = bool((d["condition"] == "removed").any())
    q = quadrants(d, rule) if has_removed else None
    return {
        "metrics": table.xs("all", level="by").droplevel("group"),
        "by_family": table.xs("family", level="by"),
        "by_finding": table.xs("finding", level="by"),
        "quadrants": q,
        "quadrant_summary": quadrant_summary(q) if q is not None else None,
        "choices": {
            **{"rule": asdict(rule), "n_boot": n_boot, "seed": seed, "level": level},
            "ci": "percentile bootstrap over clusters",
            "conditions": [c for c in CONDITIONS if (d["condition"] == c).any()],
            **{"n_rows": len(d), "n_clusters": len(resampler.clusters), "definitions": dict(DEFINITIONS)},
        },
    }
