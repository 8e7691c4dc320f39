"""Every metric with its cluster-bootstrap interval, by family and by finding, plus the quadrants: one call.

:func:`summarize` computes each metric as a ratio of per-cluster sums and resamples clusters with
:func:`interp.stats.ratio_bootstrap` (all metrics from the same resamples, vectorised), so its interval
for a metric equals :func:`analyses.eval.metrics.bootstrap_ci` of that metric with the same seed.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pandas as pd

from analyses.eval.metrics import (
    DEFINITIONS,
    ROOT_COL,
    ClusterResampler,
    accuracy_units,
    add_cluster_root,
    cluster_units,
    compare_units,
    pair_units,
    polarity_units,
    validate_predictions,
)
from analyses.eval.predictions import CONDITIONS
from analyses.eval.quadrants import QUADRANTS, QuadrantRule, quadrant_summary, quadrants
from interp.stats import check_bootstrap, ratio_bootstrap


def _unit_sums(d: pd.DataFrame, clusters: pd.Index) -> tuple[pd.MultiIndex, np.ndarray, np.ndarray]:
    """Hit sums H and unit counts N per (metric, by, group) key (rows) and cluster (columns).

    Keys come in report order, with an overall key for every metric even without units. Every unit lies
    inside one cluster, so a resample's metric is (w @ H) / (w @ N) with w the number of times each
    cluster was drawn: the value a recomputation on the resampled table would give.
    """
    units = {
        "accuracy": accuracy_units(d, "image"),
        "flip_rate": cluster_units(d, "image"),
        "pairwise_flip_rate": pair_units(d, "image"),
        "polarity_consistency": polarity_units(d, "image"),
        "text_only_agreement": compare_units(d, "removed", agree=True),
        "swap_sensitivity_random": compare_units(d, "swap_random", agree=False),
        "swap_sensitivity_label": compare_units(d, "swap_label", agree=False),
    }
    by_family = {**units, "flip_rate": cluster_units(d, "image", per_family=True)}
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


def quadrant_shares(q: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Share of samples per quadrant (all four, :data:`QUADRANTS` order) with its bootstrap interval.

    Units are the samples of ``q`` (one per cluster: :func:`~analyses.eval.quadrants.quadrants`), drawn
    with replacement by :func:`interp.stats.ratio_bootstrap`; columns value, low, high, n (samples).
    """
    hits = np.stack([(q["quadrant"] == name).to_numpy(dtype=float) for name in QUADRANTS])
    if len(q):
        value, low, high = ratio_bootstrap(hits, np.ones_like(hits), n_boot, seed, level)
    else:
        value = low = high = np.full(len(QUADRANTS), np.nan)
    out = pd.DataFrame({"value": value, "low": low, "high": high, "n": len(q)}, index=list(QUADRANTS))
    out.index.name = "quadrant"
    return out


def summarize(
    df: pd.DataFrame, rule: QuadrantRule | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Every metric with its cluster-bootstrap CI, the by-family / by-finding tables, quadrants, choices.

    Returns a dict with ``metrics`` (index metric; columns value, low, high, n = number of units),
    ``by_family`` and ``by_finding`` (index (metric, group); same columns, CIs from the same resamples),
    ``quadrants`` / ``quadrant_summary`` (None without a 'removed' condition), ``quadrant_summary_by_scope``
    (the summary with reliance read over the cluster and on the original alone, whichever the rule
    says, so both are always reported), ``quadrant_shares`` / ``quadrant_shares_by_scope`` (the same
    shares with bootstrap intervals over samples, :func:`quadrant_shares`) and ``choices`` (rule,
    n_boot, seed, level, conditions present, row and cluster counts, :data:`DEFINITIONS`). A metric
    with no unit (e.g. no swap rows) has value NaN and n = 0. The resamples are those of
    :func:`~analyses.eval.metrics.bootstrap_ci` with the same seed, so its interval for one metric is the same.
    """
    check_bootstrap(n_boot, level)
    validate_predictions(df)
    rule = rule or QuadrantRule()
    d = add_cluster_root(df)
    clusters = ClusterResampler(d, ROOT_COL).clusters
    index, hits, counts = _unit_sums(d, clusters)
    value, low, high = ratio_bootstrap(hits, counts, n_boot, seed, level)
    n = counts.sum(axis=1).astype(int)
    table = pd.DataFrame({"value": value, "low": low, "high": high, "n": n}, index=index)
    has_removed = bool((d["condition"] == "removed").any())
    q = quadrants(d, rule) if has_removed else None
    per_scope = {
        scope: q if scope == rule.scope else quadrants(d, replace(rule, scope=scope))
        for scope in ("cluster", "original")
        if q is not None
    }
    by_scope = {k: quadrant_summary(v) for k, v in per_scope.items()}
    shares = {k: quadrant_shares(v, n_boot, seed, level) for k, v in per_scope.items()}
    return {
        "metrics": table.xs("all", level="by").droplevel("group"),
        "by_family": table.xs("family", level="by"),
        "by_finding": table.xs("finding", level="by"),
        "quadrants": q,
        "quadrant_summary": by_scope.get(rule.scope),
        "quadrant_summary_by_scope": by_scope or None,
        "quadrant_shares": shares.get(rule.scope),
        "quadrant_shares_by_scope": shares or None,
        "choices": {
            **{"rule": asdict(rule), "n_boot": n_boot, "seed": seed, "level": level},
            "ci": "percentile bootstrap over clusters",
            "conditions": [c for c in CONDITIONS if (d["condition"] == c).any()],
            **{"n_rows": len(d), "n_clusters": len(clusters), "definitions": dict(DEFINITIONS)},
        },
    }
