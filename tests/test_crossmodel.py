"""Cross-model patching on tiny Gemma3 and LLaVA models: a change confined to one component is found
there with recovery 1, components the change cannot reach recover 0, and both sweep methods agree."""

from __future__ import annotations

import copy

import pytest
import torch

from hooks.adapter import VLMAdapter
from hooks.sites import attn_out, mlp_out, resid_post
from interp import PatchingConfig, cross_model_patching, patch_components
from interp.crossmodel import recovery
from tests.conftest import random_images

pytestmark = pytest.mark.usefixtures("one_thread")
CHANGED = 1  # the layer whose attention output projection the "fine-tune" changes


def changed_copy(adapter: VLMAdapter) -> VLMAdapter:
    """The adapter's model with layer CHANGED's o_proj perturbed: the change lives in attn_out(CHANGED)."""
    model = copy.deepcopy(adapter.model)
    o_proj = model.get_submodule(f"{adapter.spec.text_layers}.{CHANGED}.{adapter.spec.self_attn}.o_proj")
    with torch.no_grad():
        o_proj.weight.add_(torch.randn(o_proj.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    return VLMAdapter(model, adapter.processor, adapter.config, name=f"{adapter.name}+changed")


def batch_of(adapter: VLMAdapter, n: int = 4):
    size = adapter.config.expected_image_size or 64
    qs = [
        "Is there cardiomegaly?",
        "Is there an enlarged heart?",
        "Is there effusion?",
        "Can it be ruled out?",
    ]
    return adapter.prepare(random_images(n, size, seed=5), qs[:n])


@pytest.mark.parametrize("method", ["resume", "stack"])
def test_a_change_in_one_component_is_found_there(adapter: VLMAdapter, method: str) -> None:
    target = changed_copy(adapter)
    batch = batch_of(adapter)
    cfg = PatchingConfig(site_kind="attn_out", positions=("all", "final"), method=method, min_gap=1e-4)
    res = cross_model_patching(adapter, target, batch, cfg)
    assert res.method == "cross_model_patching" and res.meta["target"] == target.name
    torch.testing.assert_close(res.clean_margins, adapter.margins(batch).float())
    torch.testing.assert_close(res.corrupt_margins, target.margins(batch).float())
    assert (res.clean_margins - res.corrupt_margins).abs().min() > 1e-3  # the change moved every margin
    all_pos, final = res.positions.index("all"), res.positions.index("final")
    rec = res.recovery
    # below the change the two models compute the same thing: nothing to restore
    assert rec[:CHANGED].abs().max() < 1e-4
    # the changed component written as the source writes it, everywhere: the target becomes the source
    torch.testing.assert_close(rec[CHANGED, all_pos], torch.tensor(1.0), atol=1e-4, rtol=0)
    # at the final position alone it cannot undo what the change did to the other positions' keys
    assert abs(float(rec[CHANGED, final]) - 1) > 1e-3
    # and it is the top component at every position class
    assert int(rec[:, all_pos].argmax()) == CHANGED


def test_methods_agree_and_resid_post_at_all_positions_restores(adapter: VLMAdapter) -> None:
    target = changed_copy(adapter)
    batch = batch_of(adapter)
    runs = [
        cross_model_patching(adapter, target, batch, PatchingConfig(positions=("all", "final"), method=m))
        for m in ("resume", "stack")
    ]
    torch.testing.assert_close(runs[0].patched_margins, runs[1].patched_margins, atol=1e-4, rtol=1e-4)
    all_pos = runs[0].positions.index("all")
    # resid_post(L >= CHANGED) at every position carries all of the change
    torch.testing.assert_close(
        runs[0].recovery[CHANGED:, all_pos], torch.ones(adapter.n_layers - CHANGED), atol=1e-4, rtol=0
    )
    blocks = cross_model_patching(adapter, target, batch, PatchingConfig(positions=("final",), pair_block=3))
    whole = cross_model_patching(adapter, target, batch, PatchingConfig(positions=("final",)))
    torch.testing.assert_close(blocks.patched_margins, whole.patched_margins, atol=1e-5, rtol=1e-5)
    assert blocks.method == "cross_model_patching" and blocks.meta["pair_blocks"] == 2
    # both models' null patches, same method and dtype: rounding only in fp32
    for res in (*runs, blocks, whole):
        assert res.dtype == "float32" and res.meta["source_dtype"] == "float32"
        assert res.noise_floor_per_pair is not None and res.noise_floor_per_pair.shape == (len(batch),)
        assert 0 <= res.noise_floor <= 1e-5 and res.meta["floor_forwards"] > 0


def test_patch_components_jointly(adapter: VLMAdapter) -> None:
    target = changed_copy(adapter)
    batch = batch_of(adapter)
    m_source, m_target = adapter.margins(batch).float(), target.margins(batch).float()
    joint = patch_components(adapter, target, batch, [attn_out(CHANGED), mlp_out(CHANGED)], "all")
    torch.testing.assert_close(joint, m_source, atol=1e-4, rtol=1e-4)
    untouched = patch_components(adapter, target, batch, [attn_out(0)], "all")
    torch.testing.assert_close(untouched, m_target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recovery(joint, m_source, m_target), torch.ones(len(batch)), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="no sites"):
        patch_components(adapter, target, batch, [], "all")


def test_refuses_incompatible_or_identical_models(adapter: VLMAdapter, gemma3_adapter: VLMAdapter) -> None:
    batch = batch_of(adapter, 2)
    with pytest.raises(ValueError, match="same model object"):
        cross_model_patching(adapter, adapter, batch)
    if adapter.spec.name != gemma3_adapter.spec.name:
        with pytest.raises(ValueError, match="one architecture and size"):
            cross_model_patching(gemma3_adapter, adapter, batch)
    same = VLMAdapter(copy.deepcopy(adapter.model), adapter.processor, adapter.config)
    res = cross_model_patching(adapter, same, batch, PatchingConfig(site_kind="resid_post", layers=(0,)))
    assert res.recovery.isnan().all()  # identical models: every gap is 0, nothing to recover
    assert resid_post(0).kind == res.site_kind
