"""SAE feature attribution, patching and clamping at one site (the SAE is a :class:`LoadedSAE`).

Definitions (``docs/metrics.md``, "SAE features"): feature patching ``x_patched = x_para - sum_i (f_para[i] - f_orig[i]) W_dec[i]``,
margin recovery = share of the margin shift undone; clamping ``x - f[i] W_dec[i]`` on every input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooks.batch import Batch
from hooks.batch_features import batch_features
from hooks.grad import frozen_parameters
from hooks.progress import tqdm
from hooks.sites import Site
from interp.sae import FeatureRef, LoadedSAE, Position

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter


# ---------------------------------------------------------------------- hooks
def position_index(position: Position) -> int:
    """``"final"`` -> -1; a negative int is an offset from the end of the (left-padded) prompt."""
    if position == "final":
        return -1
    if isinstance(position, int) and not isinstance(position, bool) and position < 0:
        return position
    raise ValueError(
        f"position must be 'final' or a negative offset from the end (-1 = final), got {position!r}"
    )


def feature_delta(
    sae: LoadedSAE, f_from: Float[Tensor, "rows width"], f_to: Float[Tensor, "rows width"], idx: Tensor
) -> Float[Tensor, "rows d_in"]:
    """``sum_i (f_to[i] - f_from[i]) * W_dec[i]`` over the features ``idx``."""
    return (f_to[:, idx] - f_from[:, idx]) @ sae.W_dec[idx]


@contextmanager
def clamping(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    features: Sequence[int | FeatureRef] | Tensor,
    value: float | Sequence[float] | Float[Tensor, "rows n_features"] = 0.0,
    position: Position | Literal["all"] = "final",
) -> Iterator[None]:
    """Within the block, every forward clamps ``features`` to ``value`` at the SAE's site.

    ``x -> x - f[i] * W_dec[i] + value * W_dec[i]`` (``f = encode(x)``) on every row, at ``position``
    (``"final"``, a negative offset, or ``"all"`` positions). ``value=0`` ablates the features; a feature
    that is inactive (``f[i] = 0``) with ``value=0`` leaves ``x`` bit-identical. ``value`` is one number,
    one per feature, or a ``(rows, n_features)`` tensor of per-row values (e.g. each pair's value on
    its original question, :func:`clamp_to_original`); then every forward must have exactly ``rows`` rows.
    """
    site = sae.require_site(adapter)
    idx = sae.indices(features)
    target = torch.as_tensor(value, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    per_row = target.ndim == 2
    if per_row and target.shape[1] != len(idx):
        raise ValueError(
            f"per-row value has shape {tuple(target.shape)}; need (rows, {len(idx)}), one column per feature"
        )
    if not per_row:
        target = target.expand(len(idx))
    pos = None if position == "all" else position_index(position)

    def fn(x: Tensor) -> Tensor:
        sel = x if pos is None else x[:, pos]
        if per_row and x.shape[0] != target.shape[0]:
            raise ValueError(
                f"clamping holds values for {target.shape[0]} rows but the forward has {x.shape[0]}; "
                "run the batch the values were read from"
            )
        with torch.no_grad():
            f = sae.encode(sel)[..., idx]
            t = target[:, None] if per_row and pos is None else target
            delta = (t - f) @ sae.W_dec[idx]
        out = x.clone()
        if pos is None:
            out += delta.to(x.device, x.dtype)
        else:
            out[:, pos] += delta.to(x.device, x.dtype)
        return out

    with adapter.hooks({site: fn}):
        yield


def clamp_features(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    batch: Batch,
    features: Sequence[int | FeatureRef] | Tensor,
    value: float | Sequence[float] | Float[Tensor, "rows n_features"] = 0.0,
    position: Position | Literal["all"] = "final",
) -> Float[Tensor, " batch"]:
    """Margins of ``batch`` with ``features`` clamped to ``value`` (see :func:`clamping`)."""
    with clamping(adapter, sae, features, value, position):
        return adapter.margins(batch).float().cpu()


@dataclass(frozen=True)
class FlipRateChange:
    """Flip rates of paraphrase clusters before and after an intervention (prediction = margin > 0)."""

    pairwise_before: float
    """Fraction of (original, paraphrase) pairs whose predictions disagree, before."""
    pairwise_after: float
    """The same after the intervention."""
    cluster_before: float
    """Fraction of clusters where any paraphrase disagrees with the original, before."""
    cluster_after: float
    """The same after the intervention."""
    n_pairs: int
    """Number of (original, paraphrase) pairs."""

    @property
    def change(self) -> float:
        """``pairwise_after - pairwise_before`` (negative = the intervention removes flips)."""
        return self.pairwise_after - self.pairwise_before


def flip_rate_change(
    margins_before: Float[Tensor, " n"], margins_after: Float[Tensor, " n"], clusters: Sequence[Sequence[int]]
) -> FlipRateChange:
    """Change in flip rate; ``clusters[c]`` = row indices, the original question first, then its paraphrases."""
    if margins_before.shape != margins_after.shape:
        raise ValueError(
            f"margin shapes differ: {tuple(margins_before.shape)} vs {tuple(margins_after.shape)}"
        )
    if not clusters or any(len(c) < 2 for c in clusters):
        raise ValueError(
            "every cluster needs the original row and at least one paraphrase row, e.g. [[0, 1, 2]]"
        )

    def rates(m: Tensor) -> tuple[float, float]:
        pred = (m > 0).cpu()
        flips = [[bool(pred[c[0]] != pred[j]) for j in c[1:]] for c in clusters]
        return sum(map(sum, flips)) / sum(map(len, flips)), sum(map(any, flips)) / len(flips)

    (pb, cb), (pa, ca) = rates(margins_before), rates(margins_after)
    return FlipRateChange(pb, pa, cb, ca, sum(len(c) - 1 for c in clusters))


# ---------------------------------------------------------------------- attribution and patching
def _read(
    adapter: VLMAdapter, sae: LoadedSAE, batch: Batch, pos: int, feats: list[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Site activation at ``pos`` (on the SAE's device and dtype) and the margins, one no-grad forward."""
    from interp.sweep import capture

    site = sae.require_site(adapter)
    acts, m = capture(adapter, batch, [site], image_features=feats)
    return acts[site][:, pos].to(sae.sae.device, sae.W_dec.dtype), m


def _replace(pos: int, value: Tensor):
    def fn(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, pos] = value.to(x.device, x.dtype)
        return out

    return fn


def _pair_runs(adapter: VLMAdapter, sae: LoadedSAE, batch_orig: Batch, batch_para: Batch, pos: int):
    if len(batch_orig) != len(batch_para):
        raise ValueError(
            f"{len(batch_orig)} original rows vs {len(batch_para)} paraphrase rows; pair them 1:1"
        )
    x_o, m_o = _read(adapter, sae, batch_orig, pos, batch_features(adapter, batch_orig))
    feats_p = batch_features(adapter, batch_para)  # SAE sites are text sites: the tower runs once
    x_p, m_p = _read(adapter, sae, batch_para, pos, feats_p)
    with torch.no_grad():
        f_o, f_p = sae.encode(x_o), sae.encode(x_p)
        e_o, e_p = x_o - sae.decode(f_o), x_p - sae.decode(f_p)
    return x_o, x_p, f_o, f_p, e_o, e_p, m_o, m_p, feats_p


def _margins_with(
    adapter: VLMAdapter, site: Site, batch: Batch, pos: int, value: Tensor, feats: list[Tensor] | None
) -> Tensor:
    with torch.no_grad(), adapter.hooks({site: _replace(pos, value)}):
        return adapter.margins(batch, image_features=feats).float().cpu()


@dataclass
class FeatureAttribution:
    """Per pair and feature, the contribution to the margin shift ``m_para - m_orig`` through the SAE's site.

    The paraphrase run is kept and its site activation at ``position`` is moved along
    ``x(a) = decode(f_orig + a (f_para - f_orig)) + err_orig + a (err_para - err_orig)``, ``a`` in [0, 1]
    (each run keeps its own SAE error; the error is interpolated too, so ``x(0) = x_orig``, ``x(1) =
    x_para``). Completeness: ``features.sum(-1) + error == site_shift`` (exact for integrated gradients up
    to the quadrature, first order for grad x delta). ``site_shift`` is the part of ``shift`` that goes
    through this site and position; ``other = shift - site_shift`` goes through other positions (the rest
    of the prompt differs). At the last layer's ``resid_post`` and the final position, ``other == 0``.
    """

    sae: LoadedSAE
    """The SAE whose features are attributed."""
    features: Float[Tensor, "pairs width"]
    """Attribution of each feature to the margin shift."""
    error: Float[Tensor, " pairs"]
    """Attribution of the SAE error term."""
    f_orig: Float[Tensor, "pairs width"]
    """Feature activations under the original question."""
    f_para: Float[Tensor, "pairs width"]
    """Feature activations under the paraphrase."""
    m_orig: Float[Tensor, " pairs"]
    """Margins of the original runs."""
    m_para: Float[Tensor, " pairs"]
    """Margins of the paraphrase runs."""
    m_base: Float[Tensor, " pairs"]
    """Margins of the paraphrase runs with the site activation at ``position`` set to the original's."""
    method: str
    """``integrated_gradients`` or ``grad_x_delta``."""
    steps: int
    """Quadrature points (midpoint rule); 1 for grad x delta (gradient at the paraphrase run)."""
    position: int
    """Offset from the end of the prompt (-1 = final)."""

    @property
    def shift(self) -> Tensor:
        return self.m_para - self.m_orig

    @property
    def site_shift(self) -> Tensor:
        return self.m_para - self.m_base

    @property
    def other(self) -> Tensor:
        return self.m_base - self.m_orig

    @property
    def completeness_gap(self) -> Tensor:
        """``features.sum(-1) + error - site_shift`` per pair (0 for exact integrated gradients)."""
        return self.features.sum(-1) + self.error - self.site_shift


ATTRIBUTION_METHODS = ("integrated_gradients", "grad_x_delta")


def feature_attribution(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    batch_orig: Batch,
    batch_para: Batch,
    position: Position = "final",
    method: Literal["integrated_gradients", "grad_x_delta"] = "integrated_gradients",
    steps: int = 32,
    progress: bool = False,
) -> FeatureAttribution:
    """Attribute each pair's margin shift ``m(para) - m(orig)`` to SAE features (and the SAE error).

    Row ``i`` of ``batch_orig`` and of ``batch_para`` form pair ``i``. The site activation at ``position``
    of the paraphrase run is replaced by ``decode(f(a)) + err(a)`` and the margin is differentiated
    w.r.t. ``f(a)`` and ``err(a)``: ``integrated_gradients`` averages the gradient over ``steps``
    midpoints ``a`` in (0, 1) (``steps`` forward + backward passes of ``batch_para``); ``grad_x_delta``
    takes it once at ``a = 1`` (the unmodified paraphrase run). Attribution = gradient x (para - orig).
    The paraphrases' images are encoded once for every step, and no parameter of the model or the SAE
    requires grad during the backward passes (:func:`hooks.grad.frozen_parameters`, restored after).
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method must be one of {ATTRIBUTION_METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    site, pos = sae.require_site(adapter), position_index(position)
    x_o, _, f_o, f_p, e_o, e_p, m_o, m_p, feats = _pair_runs(adapter, sae, batch_orig, batch_para, pos)
    df, de = f_p - f_o, e_p - e_o
    alphas = [1.0] if method == "grad_x_delta" else [(k + 0.5) / steps for k in range(steps)]
    attr_f, attr_e = torch.zeros_like(f_o), torch.zeros(len(f_o), dtype=f_o.dtype, device=f_o.device)
    for a in tqdm(alphas, disable=not progress, desc="feature attribution"):
        f = (f_o + a * df).requires_grad_(True)
        e = (e_o + a * de).requires_grad_(True)
        with torch.enable_grad(), frozen_parameters(adapter.model, sae.sae):
            value = sae.decode(f) + e
            with adapter.hooks({site: _replace(pos, value)}):
                m = adapter.margins(batch_para, grad=True, image_features=feats)
            g_f, g_e = torch.autograd.grad(m.sum(), (f, e))
        attr_f += g_f * df
        attr_e += (g_e * de).sum(-1)
    n = len(alphas)
    return FeatureAttribution(
        sae=sae,
        features=(attr_f / n).detach().float().cpu(),
        error=(attr_e / n).detach().float().cpu(),
        f_orig=f_o.float().cpu(),
        f_para=f_p.float().cpu(),
        m_orig=m_o,
        m_para=m_p,
        m_base=_margins_with(adapter, site, batch_para, pos, x_o, feats),
        method=method,
        steps=n,
        position=pos,
    )


def top_features(
    attr: FeatureAttribution, k: int = 20, by: Literal["aligned", "abs"] = "aligned"
) -> pd.DataFrame:
    """The ``k`` features that move the margin most, one row each.

    Attributions are sign-aligned with each pair's shift (positive = pushes the margin the way the
    paraphrase moved it). ``share`` = sum over pairs of aligned attribution / sum of ``|shift|``: the
    fraction of the total margin shift the feature accounts for. ``by="aligned"`` ranks by mean aligned
    attribution, ``by="abs"`` by mean absolute attribution. ``df.attrs`` holds the error term's share.
    """
    if by not in ("aligned", "abs"):
        raise ValueError(f"by must be 'aligned' or 'abs', got {by!r}")
    sign = torch.sign(attr.shift)
    aligned = attr.features * sign[:, None]
    total = float(attr.shift.abs().sum()) or float("nan")
    score = aligned.mean(0) if by == "aligned" else attr.features.abs().mean(0)
    order = score.argsort(descending=True)[: max(k, 0)].tolist()
    rows = [
        {
            "feature": attr.sae.ref(i),
            "index": i,
            "mean_attribution": float(attr.features[:, i].mean()),
            "mean_aligned": float(aligned[:, i].mean()),
            "mean_abs": float(attr.features[:, i].abs().mean()),
            "share": float(aligned[:, i].sum()) / total,
            "act_orig": float(attr.f_orig[:, i].mean()),
            "act_para": float(attr.f_para[:, i].mean()),
        }
        for i in order
    ]
    df = pd.DataFrame(rows)
    df.attrs.update(
        error_share=float((attr.error * sign).sum()) / total,
        other_share=float((attr.other * sign).sum()) / total,
        method=attr.method,
        n_pairs=len(sign),
    )
    return df


def feature_contrast(
    acts: Float[Tensor, "rows width"], in_group: Bool[Tensor, " rows"], eps: float = 1e-6
) -> pd.DataFrame:
    """How each feature separates a group of rows (e.g. register questions) from the rest, one row per
    feature sorted by ``|d|``: mean activation in and out of the group, firing rates, the difference, the
    ratio ``mean_in / mean_out`` (selectivity) and Cohen's ``d`` (difference over the pooled standard
    deviation; ``d > 0``: more active in the group, so a feature the group switches *off* is kept with its
    sign). Choose features on one split and score them on another."""
    if acts.ndim != 2 or in_group.shape != acts.shape[:1]:
        raise ValueError(f"acts {tuple(acts.shape)} must be (rows, width) and in_group (rows,)")
    a, g = acts.detach().float().cpu(), in_group.bool().cpu()
    if g.all() or not g.any():
        raise ValueError("in_group must mark some rows and leave some out")
    x, y = a[g], a[~g]
    diff = x.mean(0) - y.mean(0)
    pooled = ((x.var(0, unbiased=False) + y.var(0, unbiased=False)) / 2).sqrt()
    d = diff / pooled.clamp_min(eps)
    table = pd.DataFrame(
        {
            "index": range(a.shape[1]),
            "mean_in": x.mean(0).numpy(),
            "mean_out": y.mean(0).numpy(),
            "fire_in": (x > 0).float().mean(0).numpy(),
            "fire_out": (y > 0).float().mean(0).numpy(),
            "difference": diff.numpy(),
            "selectivity": (x.mean(0) / y.mean(0).clamp_min(eps)).numpy(),
            "cohens_d": d.numpy(),
        }
    )
    order = sorted(range(len(table)), key=lambda i: (-abs(float(d[i])), i))
    return table.iloc[order].reset_index(drop=True)


@dataclass
class FeaturePatch:
    """Margins of paraphrase runs with some features' change undone at the SAE's site."""

    features: tuple[int, ...]
    """Patched feature indices."""
    include_error: bool
    """Whether the SAE error's change was undone too."""
    m_orig: Float[Tensor, " pairs"]
    """Margins of the original runs."""
    m_para: Float[Tensor, " pairs"]
    """Margins of the paraphrase runs."""
    m_patched: Float[Tensor, " pairs"]
    """Margins of the patched paraphrase runs."""
    min_gap: float = 1e-4
    """Pairs with ``|m_para - m_orig| < min_gap`` get a NaN recovery."""

    @property
    def recovery(self) -> Float[Tensor, " pairs"]:
        """``(m_para - m_patched) / (m_para - m_orig)``: share of the shift undone (1 = back to original)."""
        shift = self.m_para - self.m_orig
        rec = (self.m_para - self.m_patched) / shift
        return torch.where(shift.abs() < self.min_gap, torch.full_like(rec, float("nan")), rec)

    @property
    def mean_recovery(self) -> float:
        """Pooled recovery: ``sum sign(shift) (m_para - m_patched) / sum |shift|`` over valid pairs."""
        shift = self.m_para - self.m_orig
        ok = shift.abs() >= self.min_gap
        undone = (torch.sign(shift) * (self.m_para - self.m_patched))[ok].sum()
        return float(undone / shift[ok].abs().sum()) if ok.any() else float("nan")


def feature_patch(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    batch_orig: Batch,
    batch_para: Batch,
    features: Sequence[int | FeatureRef] | Tensor,
    position: Position = "final",
    include_error: bool = False,
    min_gap: float = 1e-4,
) -> FeaturePatch:
    """Undo the change of ``features`` in each paraphrase run (``docs/metrics.md``):

    ``x_patched = x_para - sum_i (f_para[i] - f_orig[i]) * W_dec[i]`` at the SAE's site and ``position``
    (``- (err_para - err_orig)`` as well with ``include_error``; all features + error gives ``x_orig``).
    """
    site, pos, idx = sae.require_site(adapter), position_index(position), sae.indices(features)
    _, x_p, f_o, f_p, e_o, e_p, m_o, m_p, feats = _pair_runs(adapter, sae, batch_orig, batch_para, pos)
    with torch.no_grad():
        delta = feature_delta(sae, f_o, f_p, idx)
        if include_error:
            delta = delta + (e_p - e_o)
    m_patched = _margins_with(adapter, site, batch_para, pos, x_p - delta, feats)
    return FeaturePatch(tuple(idx.tolist()), include_error, m_o, m_p, m_patched, min_gap)
