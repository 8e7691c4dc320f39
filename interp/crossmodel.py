"""Cross-model patching: where did fine-tuning (or planting) change the behaviour?

Two models of the same architecture (a base and its LoRA fine-tune, the clean organism and the planted
one) read the same inputs. For every layer L and position class c, the *target* model's run gets the
*source* model's activation at ``<kind>(L)`` on the positions of c, and

    recovery = (m_patched - m_target) / (m_source - m_target)      per input,

1 = that component alone, written as the source writes it, makes the target decide like the source;
0 = the change lives elsewhere. Patching ``attn_out(L)`` / ``mlp_out(L)`` from the clean model into a
model whose change is confined to known layers must find it there: a sanity check of the tool, and
on a real fine-tune the map of where it acted. Same :class:`~interp.patching.PatchingConfig` and
:class:`~interp.patching.PatchingResult` as paraphrase patching (``method="cross_model_patching"``);
the batched sweep is the same code (:func:`interp.patching.sweep_from`). The noise floor holds both
models' null patches (the target's run patched into itself, the source's into itself), by the method
the sweep used; ``dtype`` is the target's (the source's is in ``meta["source_dtype"]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.batch import Batch
from hooks.batch_features import batch_features
from hooks.progress import tqdm
from hooks.sites import Site
from interp.align import plan_positions
from interp.floor import null_floor
from interp.patching import (
    PatchingConfig,
    PatchingResult,
    add_floor,
    capture,
    concat_pairs,
    dtype_name,
    pair_blocks,
    sweep_from,
)
from interp.sweep import sweep_attention

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

METHOD = "cross_model_patching"


def _check_compatible(source: VLMAdapter, target: VLMAdapter) -> None:
    a = (source.spec.name, source.n_layers, source.d_model, source.image_token_id)
    b = (target.spec.name, target.n_layers, target.d_model, target.image_token_id)
    if a != b:
        raise ValueError(
            f"cross-model patching needs two models of one architecture and size; source {source.name!r} "
            f"is (architecture, layers, d_model, image token) {a}, target {target.name!r} is {b}"
        )
    if source.model is target.model:
        raise ValueError("source and target are the same model object: every recovery would be 0/0")


def cross_model_patching(
    source: VLMAdapter, target: VLMAdapter, batch: Batch, config: PatchingConfig | None = None
) -> PatchingResult:
    """Patch ``source``'s activations into ``target`` on the same ``batch``, per layer and position class.

    The result's ``clean_margins`` are the source's, ``corrupt_margins`` the target's; ``recovery`` is the
    share of the source-target margin difference one component restores. Inputs where the two models
    agree to within ``config.min_gap`` get NaN.
    """
    _check_compatible(source, target)
    config = config or PatchingConfig()
    blocks = pair_blocks(len(batch), config)
    if len(blocks) > 1:
        one = dataclasses.replace(config, pair_block=None)
        parts = [
            cross_model_patching(source, target, batch.select(b), one)
            for b in tqdm(blocks, disable=not config.progress, desc="pair blocks")
        ]
        return concat_pairs(parts)
    layers = config.resolve_layers(target.n_layers)
    plan = plan_positions(batch, batch, config.positions)
    sites = [Site(config.site_kind, layer) for layer in layers]
    meta: dict[str, Any] = {"source": source.name, "target": target.name, "positions": config.positions}
    meta["source_dtype"] = dtype_name(source)
    with sweep_attention(source.model, config.method), sweep_attention(target.model, config.method):
        source_acts, m_source = capture(source, batch, sites, image_features=batch_features(source, batch))
        result = sweep_from(target, batch, plan, layers, source_acts, m_source, config, meta)
        floor = null_floor(source, batch, layers, config, m_source, result.meta["method"], source_acts)
    add_floor(result, floor)
    result.method = METHOD
    return result


def patch_components(
    source: VLMAdapter,
    target: VLMAdapter,
    batch: Batch,
    sites: Sequence[Site],
    position: str = "all",
) -> Float[Tensor, " batch"]:
    """Margins of ``target`` with every site in ``sites`` taken from ``source`` at once (on ``position``'s
    positions: ``all``, ``final``, ``image``, ``question`` or ``text``). Joint patching of a set of
    components, e.g. all the layers a fine-tune changed; one forward of each model."""
    _check_compatible(source, target)
    if not sites:
        raise ValueError("no sites: pass the components to patch, e.g. [attn_out(3), mlp_out(3)]")
    acts, _ = capture(source, batch, list(sites))
    mask = batch.position_mask(position)  # type: ignore[arg-type]

    def write(site: Site):
        def fn(x: Tensor) -> Tensor:
            m = mask.to(x.device)[..., None]
            return torch.where(m, acts[site].to(device=x.device, dtype=x.dtype), x)

        return fn

    with torch.no_grad(), target.hooks({s: write(s) for s in sites}):
        return target.margins(batch).float().cpu()


def recovery(
    m_patched: Float[Tensor, " batch"],
    m_source: Float[Tensor, " batch"],
    m_target: Float[Tensor, " batch"],
    min_gap: float = 1e-6,
) -> Float[Tensor, " batch"]:
    """``(m_patched - m_target) / (m_source - m_target)`` per input; NaN where the gap is below ``min_gap``."""
    gap = m_source - m_target
    ok = gap.abs() >= min_gap
    out = (m_patched - m_target) / torch.where(ok, gap, torch.ones_like(gap))
    return torch.where(ok, out, torch.full_like(out, float("nan")))
