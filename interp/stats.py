"""The one bootstrap: percentile intervals from resampling independent units (clusters) with replacement.

A statistic that is a ratio of sums over units, ``sum(hits) / sum(counts)`` (a rate over rows, pairs or
clusters; a mean over pairs with missing values), is recomputed on a resample by weighting each unit
with the number of times it was drawn: ``(w @ hits) / (w @ counts)``. Every resample draws as many
units as there are, with replacement (:func:`draw_clusters`); the interval is the ``(1-level)/2`` and
``(1+level)/2`` percentiles of the resampled values, resamples where the statistic is undefined left
out. Used for the evaluation metrics (units = clusters: an original question with all its variants and
conditions, ``analyses.eval.metrics``) and the per-layer patching bands (units = pairs, ``interp.figures``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float

#: Resamples weighted at once (bounds the ``(chunk x units)`` weight matrix).
CHUNK = 256


def check_bootstrap(n_boot: int, level: float) -> None:
    """Refuse ``n_boot < 1`` or a level outside (0, 1)."""
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and level in (0, 1), got n_boot={n_boot}, level={level}")


def draw_clusters(rng: np.random.Generator, n_units: int) -> np.ndarray:
    """Indices of the units of one resample: ``n_units`` draws with replacement."""
    return rng.integers(0, n_units, size=n_units)


def percentile_interval(
    values: Float[np.ndarray, "n_boot ..."], level: float
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentiles of resampled values along the first axis, ignoring NaN resamples."""
    alpha = (1.0 - level) / 2.0
    with warnings.catch_warnings():  # a key undefined in every resample stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(values, [alpha, 1.0 - alpha], axis=0)
    return low, high


def ratio_bootstrap(
    hits: Float[np.ndarray, "key unit"],
    counts: Float[np.ndarray, "key unit"],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per key: ``sum(hits) / sum(counts)`` over all units and its percentile bootstrap interval.

    Returns ``(value, low, high)``, each of shape ``(key,)``; a key without any count is NaN.
    """
    check_bootstrap(n_boot, level)
    hits, counts = np.asarray(hits, dtype=float), np.asarray(counts, dtype=float)
    if hits.shape != counts.shape or hits.ndim != 2:
        raise ValueError(f"hits {hits.shape} and counts {counts.shape} must be the same (key, unit) shape")
    n_units = hits.shape[1]
    rng = np.random.default_rng(seed)
    boots = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, n_boot, CHUNK):
            draws = np.stack([draw_clusters(rng, n_units) for _ in range(min(CHUNK, n_boot - start))])
            w = np.stack([np.bincount(k, minlength=n_units) for k in draws]).astype(float)
            boots.append((w @ hits.T) / (w @ counts.T))
        value = hits.sum(axis=1) / counts.sum(axis=1)
    low, high = percentile_interval(np.concatenate(boots), level)
    return value, low, high


def mean_bootstrap(
    values: Float[np.ndarray, "key unit"], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per key: the mean over units (NaN units ignored) and its bootstrap interval (units resampled)."""
    v = np.asarray(values, dtype=float)
    ok = ~np.isnan(v)
    return ratio_bootstrap(np.where(ok, v, 0.0), ok.astype(float), n_boot, seed, level)


def mean_ci_by(
    frame: pd.DataFrame,
    columns: Sequence[str],
    by: str | Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Mean of each of ``columns`` per group of ``by`` (a column or several) with its bootstrap interval.

    Rows are the units: every resample draws as many rows as ``frame`` has, with replacement, and each
    group's mean is taken over the drawn rows of that group (NaN values left out). Index (group levels...,
    column); columns value, low, high, n (rows of the group with a value).
    """
    keys_by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*columns, *keys_by] if c not in frame.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the frame (it has {list(frame.columns)})")
    if not columns or not keys_by:
        raise ValueError("pass at least one value column and one grouping column")
    keys, rows = [], []
    for g, part in frame.groupby(keys_by, sort=True):
        inside = frame.index.isin(part.index)
        for c in columns:
            rows.append(np.where(inside, frame[c].to_numpy(dtype=float), np.nan))
            keys.append((*g, c))
    values = np.stack(rows) if rows else np.zeros((0, len(frame)))
    value, low, high = mean_bootstrap(values, n_boot, seed, level)
    index = pd.MultiIndex.from_tuples(keys, names=[*keys_by, "column"])
    n = (~np.isnan(values)).sum(1)
    return pd.DataFrame({"value": value, "low": low, "high": high, "n": n}, index=index)


def interval_relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """``above`` if interval ``a = (low, high)`` lies entirely above ``b``, ``below`` if entirely below,
    else ``overlap`` (also when a bound is NaN): the "CIs separate" test of the notebooks."""
    (a_lo, a_hi), (b_lo, b_hi) = a, b
    if a_lo > b_hi:
        return "above"
    if a_hi < b_lo:
        return "below"
    return "overlap"


def compare_intervals(table: pd.DataFrame, level: str, a: object, b: object) -> pd.Series:
    """:func:`interval_relation` of group ``a`` vs group ``b`` of index level ``level`` of a table with
    ``low`` / ``high`` columns (e.g. :func:`mean_ci_by`), for every combination of the other index levels."""
    if level not in (table.index.names or []):
        raise ValueError(f"index level {level!r} not in the table (levels {list(table.index.names)})")
    ta, tb = table.xs(a, level=level), table.xs(b, level=level)
    keys = ta.index.intersection(tb.index)
    out = [
        interval_relation((ta.loc[k, "low"], ta.loc[k, "high"]), (tb.loc[k, "low"], tb.loc[k, "high"]))
        for k in keys
    ]
    return pd.Series(out, index=keys, name=f"{a} vs {b}", dtype=object)
