"""Score one SAE feature against a planted (or otherwise known) mechanism, on pairs it was not chosen on.

A feature is chosen blind on a *selection* split (e.g. ``top_features(feature_attribution(...))`` on
validation flip pairs) and scored here on a separate *scoring* split:

- ``rank`` / ``share``: its place among all features by aligned attribution to the scoring pairs'
  margin shift (:func:`interp.sae_attr.top_features`);
- ``cosine``: decoder direction vs a reference direction (the planted direction at the SAE's site);
- ``recovery``: feature patching (``x_para - (f_para - f_orig) W_dec``), pooled share of the margin
  shift undone, with a bootstrap interval over pairs;
- ``undo``: share of the scoring pairs whose predictions differ (flips) that agree again when the
  feature is clamped. Two clamps: ``original`` sets it, in each paraphrase run, to its value on the
  pair's original question (:func:`clamp_to_original`; the original run is untouched); ``zero`` sets it
  to 0 on every input (both runs), the natural ablation of a feature the paraphrase switches *on*;
- ``collateral``: share of predictions that change under the same clamp on *other* pairs (other
  paraphrase families), the price of the intervention.

Intervals: percentile bootstrap over pairs (:mod:`interp.stats`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hooks.batch import Batch
from interp.sae import LoadedSAE, Position
from interp.sae_attr import (
    FeatureAttribution,
    _read,
    clamping,
    feature_attribution,
    feature_patch,
    position_index,
    top_features,
)
from interp.stats import mean_bootstrap, ratio_bootstrap

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

CLAMP_MODES: tuple[str, ...] = ("original", "zero")

Interval = tuple[float, float, float]
"""(value, low, high): a statistic and its bootstrap percentile interval."""


def clamp_to_original(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    features: list[int],
    batch_orig: Batch,
    batch_para: Batch,
    position: Position = "final",
) -> Float[Tensor, " pairs"]:
    """Margins of the paraphrase runs with ``features`` clamped, row by row, to their values on the
    paired original questions (row ``i`` of ``batch_orig`` pairs with row ``i`` of ``batch_para``)."""
    if len(batch_orig) != len(batch_para):
        raise ValueError(
            f"{len(batch_orig)} original rows vs {len(batch_para)} paraphrase rows; pair them 1:1"
        )
    x_o, _ = _read(adapter, sae, batch_orig, position_index(position))
    idx = sae.indices(features)
    with torch.no_grad():
        values = sae.encode(x_o)[:, idx]
        with clamping(adapter, sae, idx, values, position):
            return adapter.margins(batch_para).float().cpu()


def decoder_cosine(sae: LoadedSAE, feature: int, direction: Float[Tensor, " d_in"]) -> float:
    """Cosine between the feature's decoder row and ``direction`` (sign kept)."""
    w = sae.W_dec[feature].detach().float().cpu()
    d = direction.detach().float().cpu()
    if d.shape != w.shape:
        raise ValueError(f"direction has shape {tuple(d.shape)}, the SAE's decoder rows {tuple(w.shape)}")
    return float(torch.nn.functional.cosine_similarity(w, d, 0))


def _interval(values: np.ndarray, n_boot: int, seed: int) -> Interval:
    if values.size == 0:
        return (float("nan"),) * 3
    v, lo, hi = mean_bootstrap(values.astype(float)[None], n_boot=n_boot, seed=seed)
    return float(v[0]), float(lo[0]), float(hi[0])


@dataclass(frozen=True)
class FeatureScore:
    """How one feature scores on the scoring pairs (see the module doc); intervals are (value, low, high)."""

    feature: int
    """Feature index."""
    rank: int
    """1-based rank among all features by mean aligned attribution on the scoring pairs."""
    share: float
    """Share of the scoring pairs' total margin shift attributed to the feature."""
    cosine: float
    """Decoder cosine with the reference direction (sign kept; NaN without one)."""
    switches_on: bool
    """Mean activation higher on the paraphrases than on the originals (scoring pairs)."""
    act_orig: float
    """Mean activation on the original questions."""
    act_para: float
    """Mean activation on the paraphrases."""
    recovery: Interval
    """Pooled feature-patching recovery of the margin shift."""
    undo_original: Interval
    """Share of flips undone, feature clamped to its value on the original question."""
    undo_zero: Interval
    """Share of flips undone, feature clamped to 0 on every input."""
    collateral_original: Interval
    """Share of other pairs' paraphrase predictions changed by the ``original`` clamp."""
    collateral_zero: Interval
    """Share of other pairs' paraphrase predictions changed by the ``zero`` clamp."""
    n_pairs: int
    """Scoring pairs."""
    n_flips: int
    """Scoring pairs whose two predictions differ (the denominator of ``undo``)."""
    n_other: int
    """Other pairs (the denominator of ``collateral``)."""

    def as_dict(self) -> dict[str, object]:
        """Plain dict (for tables and JSON)."""
        return asdict(self)


def score_feature(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    feature: int,
    scoring: tuple[Batch, Batch],
    others: tuple[Batch, Batch] | None = None,
    direction: Float[Tensor, " d_in"] | None = None,
    attribution: FeatureAttribution | None = None,
    steps: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> FeatureScore:
    """Score ``feature`` on the ``scoring`` (original, paraphrase) batches; ``others`` = (original,
    paraphrase) batches of the families the intervention should leave alone (collateral);
    ``attribution``: a precomputed :func:`feature_attribution` on ``scoring`` (else computed with
    ``steps`` integrated-gradients points)."""
    b_o, b_p = scoring
    attr = attribution or feature_attribution(adapter, sae, b_o, b_p, steps=steps)
    if len(attr.m_orig) != len(b_o):
        raise ValueError(f"attribution covers {len(attr.m_orig)} pairs, scoring has {len(b_o)}")
    table = top_features(attr, k=sae.width)
    order = table["index"].tolist()
    rank = order.index(feature) + 1
    patch = feature_patch(adapter, sae, b_o, b_p, [feature])
    shift = patch.m_para - patch.m_orig
    ok = shift.abs() >= patch.min_gap
    hits = (torch.sign(shift) * (patch.m_para - patch.m_patched))[ok].numpy()
    rv, rlo, rhi = ratio_bootstrap(hits[None], shift[ok].abs().numpy()[None], n_boot=n_boot, seed=seed)
    m_o, m_p = patch.m_orig, patch.m_para
    flips = ((m_o > 0) != (m_p > 0)).numpy()
    m_p_orig = clamp_to_original(adapter, sae, [feature], b_o, b_p)
    with torch.no_grad(), clamping(adapter, sae, [feature], 0.0):
        m_o0, m_p0 = adapter.margins(b_o).float().cpu(), adapter.margins(b_p).float().cpu()
    undo_orig = ((m_p_orig > 0) == (m_o > 0)).numpy()[flips]
    undo_zero = ((m_p0 > 0) == (m_o0 > 0)).numpy()[flips]
    coll_orig = coll_zero = np.zeros(0)
    n_other = 0
    if others is not None:
        o_o, o_p = others
        with torch.no_grad():
            m_other = adapter.margins(o_p).float().cpu()
            with clamping(adapter, sae, [feature], 0.0):
                m_other0 = adapter.margins(o_p).float().cpu()
        m_other_orig = clamp_to_original(adapter, sae, [feature], o_o, o_p)
        coll_orig = ((m_other_orig > 0) != (m_other > 0)).numpy()
        coll_zero = ((m_other0 > 0) != (m_other > 0)).numpy()
        n_other = len(m_other)
    cos = decoder_cosine(sae, feature, direction) if direction is not None else float("nan")
    return FeatureScore(
        feature=int(feature),
        rank=rank,
        share=float(table.set_index("index").loc[feature, "share"]),
        cosine=cos,
        switches_on=bool(attr.f_para[:, feature].mean() > attr.f_orig[:, feature].mean()),
        act_orig=float(attr.f_orig[:, feature].mean()),
        act_para=float(attr.f_para[:, feature].mean()),
        recovery=(float(rv[0]), float(rlo[0]), float(rhi[0])),
        undo_original=_interval(undo_orig, n_boot, seed),
        undo_zero=_interval(undo_zero, n_boot, seed),
        collateral_original=_interval(coll_orig, n_boot, seed),
        collateral_zero=_interval(coll_zero, n_boot, seed),
        n_pairs=len(b_o),
        n_flips=int(flips.sum()),
        n_other=n_other,
    )


def choose_and_score(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    selection: tuple[Batch, Batch],
    scoring: tuple[Batch, Batch],
    others: tuple[Batch, Batch] | None = None,
    direction: Float[Tensor, " d_in"] | None = None,
    steps: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[int, pd.DataFrame, FeatureScore]:
    """Choose a feature blind on ``selection`` pairs (top by mean aligned integrated-gradients
    attribution to the margin shift, :func:`top_features`) and score it on ``scoring`` pairs
    (:func:`score_feature`). Returns (feature, the selection split's top-10 table, its score)."""
    attr_sel = feature_attribution(adapter, sae, *selection, steps=steps)
    table = top_features(attr_sel, k=10)
    feature = int(table["index"].iloc[0])
    score = score_feature(
        adapter, sae, feature, scoring, others, direction, steps=steps, n_boot=n_boot, seed=seed
    )
    return feature, table, score
