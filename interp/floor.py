"""The noise floor of a localization result: null patches through the same machinery, at the same dtype.

A *null patch* writes a run's own activation back into that run: clean into clean, corrupt into corrupt
(in cross-model patching, each model into itself). Mathematically it changes nothing, so every margin
change it produces is rounding of the computation that made the result (the resumed or stacked sweep,
its batch shapes and kernels, the compute dtype):

    null_i  = max over null variants v of pair i  | m_null(v) - m_ref_i |
    floor_i = max(null_i, resolution_i)                                         (margin units)
    floor   = max_i floor_i,        recovery floor = mean over pairs i of  floor / |m_clean_i - m_corrupt_i|

``m_ref`` is the margin the result itself uses for that run (``clean_margins`` / ``corrupt_margins``);
``resolution_i`` (:func:`margin_resolution`) is how finely the dtype represents the yes/no logits the
margin is the difference of. It keeps the floor honest where the null patches are bit-exact: on CPU a
bf16 tiny model's null patches change nothing at all (every kernel is row-independent there), yet bf16
stores a logit of 4 only to within 0.016.
The null variants are the sweep's own position classes at ``PatchingConfig.floor_layers`` of its layers
(evenly spaced, first and last included), so the floor costs a fraction of the sweep. A cell whose
|mean recovery| is at most the recovery floor cannot be told from "no effect" at this dtype
(:meth:`interp.patching.PatchingResult.within_floor`). In fp32 on the tiny models the floor is ~1e-7;
in bf16 it is not: at MedGemma-4B shape bf16 and fp32 moved the same sweep's patched margins by up to
0.078 (recovery 0.097), see ``docs/metrics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.batch import Batch
from hooks.batch_features import batch_features
from hooks.sites import Site, resid_post
from interp.align import plan_positions
from interp.stack import StackState, capture_stack
from interp.sweep import capture, sweep_resumed, sweep_stacked

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter
    from interp.patching import PatchingConfig


def floor_layer_subset(layers: list[int], k: int | None) -> list[int]:
    """``k`` of ``layers``, evenly spaced with the first and the last (``None``: all; 0: none)."""
    if k is None or k >= len(layers):
        return list(layers)
    if k <= 0:
        return []
    if k == 1:
        return [layers[len(layers) // 2]]
    idx = sorted({round(i * (len(layers) - 1) / (k - 1)) for i in range(k)})
    return [layers[i] for i in idx]


def largest_change(patched: Float[Tensor, "layer position pair"], m_ref: Float[Tensor, " pair"]) -> Tensor:
    """Per pair, the largest ``|patched - m_ref|`` over the (layer, position) cells that ran (NaN: did not)."""
    delta = (patched - m_ref).abs()
    return torch.nan_to_num(delta, nan=0.0).amax(dim=(0, 1)) if delta.numel() else torch.zeros(len(m_ref))


def margin_resolution(
    adapter: VLMAdapter, final_resid: Float[Tensor, "batch d_model"]
) -> Float[Tensor, " batch"]:
    """Per row, how finely the model's dtype resolves its margin: ``(ulp(l_yes) + ulp(l_no)) / 2``, the
    most storing the yes and no logits (read from ``final_resid``, the last layer's output at the final
    position, through :meth:`~hooks.adapter.VLMAdapter.unembed`) in that dtype can move the margin.
    ``ulp(x) = eps(dtype) * 2^floor(log2 |x|)``; for ``sum`` / ``logsumexp`` answer reductions it is read
    at the largest |logit| of each side (an approximation)."""
    with torch.no_grad():
        logits = adapter.unembed(final_resid)
    eps = torch.finfo(logits.dtype).eps
    ids = adapter.answer_ids

    def ulp(side: tuple[int, ...]) -> Tensor:
        big = logits[..., list(side)].float().abs().amax(-1)
        _, exp = torch.frexp(big)  # big = m * 2^exp, m in [0.5, 1)
        return eps * torch.pow(2.0, (exp - 1).float())

    return ((ulp(ids.yes_ids) + ulp(ids.no_ids)) / 2).cpu()


@dataclass
class NullFloor:
    """One run's noise floor (:func:`null_floor`)."""

    per_pair: Float[Tensor, " pair"]
    """``max(null, resolution)`` per row: what the result records (NaN: no layer chosen)."""
    null: float
    """Largest |margin change| of the null patches over all rows (NaN: none run)."""
    resolution: float
    """Largest :func:`margin_resolution` over all rows."""
    n_passes: int
    """Forward passes the null patches and their records took."""


def null_floor(
    adapter: VLMAdapter,
    batch: Batch,
    layers: list[int],
    config: PatchingConfig,
    m_ref: Float[Tensor, " pair"],
    method: str,
    acts: dict[Site, Tensor] | None = None,
    state: StackState | None = None,
) -> NullFloor:
    """Per row of ``batch``, the largest margin change of its null patches (at least the margin's
    resolution at the model's dtype, :func:`margin_resolution`), and the passes they took.

    ``batch``'s own activation at ``<kind>(L)`` (``acts`` if it holds them, else read by one
    :func:`~interp.sweep.capture`) is patched into ``batch``'s run on every position class of
    ``config.positions``, at :func:`floor_layer_subset` of ``layers``, by ``method`` (``"resume"``:
    from ``state``, recorded here if not given; ``"stack"``: stacked full forwards). Variants that write
    the value already there are run, not skipped. NaN for every row when no layer is chosen.
    """
    chosen = floor_layer_subset(layers, config.floor_layers)
    if not chosen:
        return NullFloor(torch.full((len(batch),), float("nan")), float("nan"), float("nan"), 0)
    sites = [Site(config.site_kind, layer) for layer in chosen]
    last = resid_post(adapter.n_layers - 1)
    plan = plan_positions(batch, batch, config.positions)
    resuming = method == "resume"
    need_acts = acts is None or any(s not in acts for s in sites) or (not resuming and last not in acts)
    feats = (
        batch_features(adapter, batch) if (resuming and state is None) or need_acts or not resuming else None
    )
    n_passes = 0
    if need_acts:
        acts, _ = capture(adapter, batch, [*sites, last], image_features=feats)
        n_passes += 1
    assert acts is not None
    if resuming:
        if state is None:
            state, n_passes = capture_stack(adapter, batch, image_features=feats), n_passes + 2
        patched, n, _ = sweep_resumed(adapter, state, plan, chosen, acts, config, skip_noop=False)
        n -= 2  # the records are counted above (or belong to the sweep)
        final = state.hidden[-1][:, -1]
    else:
        patched, _, n = sweep_stacked(adapter, batch, plan, chosen, sites, acts, config, feats)
        final = acts[last][:, -1]
    null, res = largest_change(patched, m_ref), margin_resolution(adapter, final)
    return NullFloor(torch.fmax(null, res), float(null.max()), float(res.max()), n_passes + n)
