"""interp/ primitives on tiny Gemma3 and LLaVA models: cache, patching, attribution, lens, attention,
scores, figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hooks.adapter import VLMAdapter
from hooks.batch import Batch
from hooks.inputs import Box, Removal
from hooks.sites import Site, attn_out, final_norm, mlp_out, resid_post, resid_pre, vision_resid
from interp import (
    ActivationCache,
    LayerScores,
    PatchingConfig,
    agreement,
    align_pairs,
    attention_grid,
    attention_in_box,
    attention_maps,
    attention_overlay,
    attribution_patching,
    box_coverage_precision,
    cache_activations,
    final_attention_to_image,
    logit_lens,
    patch_one,
    patching_heatmap,
    patching_sweep,
    rankdata,
    recovery_line,
    spearman,
    sweep_reference,
    token_grids,
)
from interp.cache import _left_pad, merge_parts
from interp.patching import PatchingResult, capture
from interp.stats import mean_bootstrap
from tests.conftest import random_images

Q4 = "Is there cardiomegaly?"  # 4 tokens
Q4B = "Is there effusion?"  # 4 tokens: a same-length "paraphrase"
Q6 = "Is there an enlarged heart?"  # 6 tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def size(adapter: VLMAdapter) -> int:
    return adapter.config.expected_image_size or 64


def image_pairs(adapter: VLMAdapter, n: int = 3, removal: str = "gray") -> tuple[Batch, Batch]:
    """Clean = with the image; corrupt = the same question with the image removed."""
    imgs = random_images(n, size(adapter), seed=1)
    qs = [Q4] * n
    rem = Removal(removal)  # type: ignore[arg-type]
    return adapter.prepare(imgs, qs), adapter.prepare(adapter.removed(imgs, rem), qs, [rem.label] * n)


def question_pairs(adapter: VLMAdapter, n: int = 2, other: str = Q4B) -> tuple[Batch, Batch]:
    imgs = random_images(n, size(adapter), seed=2)
    return adapter.prepare(imgs, [Q4] * n), adapter.prepare(imgs, [other] * n)


def read(adapter: VLMAdapter, batch: Batch, site: Site) -> Tensor:
    return capture(adapter, batch, [site])[0][site]


# ---------------------------------------------------------------------- cache
def test_cache_final_position(adapter: VLMAdapter) -> None:
    clean, _ = image_pairs(adapter)
    sites = [resid_pre(0), resid_post(1), attn_out(1), mlp_out(0), final_norm()]
    cache = cache_activations(adapter, clean, sites, positions="final", device="cpu")
    assert len(cache) == 3 and cache.squeezed and cache.valid.shape == (3, 1)
    for s in sites:
        assert cache[s].shape == (3, adapter.d_model) and cache[s].device.type == "cpu"
        torch.testing.assert_close(cache[s], read(adapter, clean, s)[:, -1])
    torch.testing.assert_close(cache.margins, adapter.margins(clean))
    assert (cache.offsets == -1).all() and cache.mask("final").all()
    with pytest.raises(KeyError, match="not in this cache"):
        cache[resid_post(0)]


def test_cache_position_classes_across_batches(adapter: VLMAdapter) -> None:
    """Rows keep only their kept positions, right-aligned; batches of other lengths are left-padded."""
    imgs = random_images(3, size(adapter))
    b1 = adapter.prepare(imgs[:2], [Q4, Q6])
    b2 = adapter.prepare([imgs[2]], [Q4])
    site = resid_post(1)
    cache = cache_activations(
        adapter, [b1, b2], [site], positions=["image", "question", "final"], progress=False
    )
    n_img = int(b1.image_mask[0].sum())
    assert cache[site].shape == (3, n_img + 6 + 1, adapter.d_model)
    assert cache.valid.sum(-1).tolist() == [n_img + 4 + 1, n_img + 6 + 1, n_img + 4 + 1]
    assert cache.questions == [Q4, Q6, Q4]
    for batch, rows in ((b1, [0, 1]), (b2, [2])):
        full = read(adapter, batch, site)
        for j, i in enumerate(rows):
            for cls in ("image", "question", "final"):
                want = full[j][batch.position_mask(cls)[j]]  # type: ignore[arg-type]
                torch.testing.assert_close(cache[site][i][cache.mask(cls)[i]], want)
            offs = cache.offsets[i][cache.valid[i]]
            kept = (
                batch.position_mask("image") | batch.position_mask("question") | batch.position_mask("final")
            )
            assert offs.tolist() == (kept[j].nonzero()[:, 0] - batch.seq_len).tolist()
    assert not cache[site][0][~cache.valid[0]].any()  # padding is zeros


def test_cache_shards_on_disk(adapter: VLMAdapter, tmp_path: Path) -> None:
    imgs = random_images(5, size(adapter))
    batches = [adapter.prepare(imgs[:3], [Q4, Q6, Q4]), adapter.prepare(imgs[3:], [Q4, Q4])]
    sites = [resid_post(0), mlp_out(1)]
    mem = cache_activations(adapter, batches, sites, positions="all", device="cpu")
    disk = cache_activations(adapter, batches, sites, positions="all", out_dir=tmp_path, shard_rows=2)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [  # one file per shard and site
        f"shard_0000{i}.{what}.safetensors"
        for i in range(3)
        for what in ("index", "mlp_out_1", "resid_post_0")
    ]
    with safe_open(str(tmp_path / "shard_00001.mlp_out_1.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["mlp_out(1)"]
        torch.testing.assert_close(
            f.get_tensor("mlp_out(1)"), _left_pad(mem[sites[1]][2:4], f.get_tensor("mlp_out(1)").shape[1])
        )
    reopened = ActivationCache.load(tmp_path)
    for cache in (disk, reopened):
        assert cache.on_disk and len(cache) == 5 and cache.positions == ("all",)
        for s in sites:
            torch.testing.assert_close(cache[s], mem[s])
        assert torch.equal(cache.mask("image"), mem.mask("image")) and torch.equal(cache.offsets, mem.offsets)
        torch.testing.assert_close(cache.margins, mem.margins)
        assert cache.conditions == mem.conditions
    shards = list(reopened.iter_shards(sites[0]))
    assert [x.shape[0] for x in shards] == [2, 2, 1]
    # "all" keeps every real token: row 0 (Q4 in a batch padded for Q6) has 2 fewer
    assert mem.valid.sum(-1).tolist()[:3] == batches[0].attention_mask.sum(-1).tolist()
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        ActivationCache.load(tmp_path / "nothing")


def test_cache_parts_read_as_one_dataset(adapter: VLMAdapter, tmp_path: Path) -> None:
    """Parts written separately (as ranks do) and listed by merge_parts read as the cache of all rows."""
    imgs = random_images(5, size(adapter))
    batches = [adapter.prepare(imgs[:3], [Q4, Q6, Q4]), adapter.prepare(imgs[3:], [Q6, Q4])]
    sites = [resid_post(1)]
    whole = cache_activations(adapter, batches, sites, positions="all", device="cpu")
    keys = [f"row{i}" for i in range(5)]
    for k, (batch, part_keys) in enumerate(zip(batches, (keys[:3], keys[3:]), strict=True)):
        part = cache_activations(
            adapter, [batch], sites, "all", tmp_path, shard_rows=2, part=f"rank-{k}-of-2", keys=part_keys
        )
        assert len(part) == len(batch) and (tmp_path / f"rank-{k}-of-2" / "part.json").is_file()
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        ActivationCache.load(tmp_path)  # no manifest until the parts are merged
    with pytest.raises(FileNotFoundError, match="rank-2-of-2"):
        merge_parts(tmp_path, ["rank-0-of-2", "rank-2-of-2"])
    merge_parts(tmp_path, ["rank-0-of-2", "rank-1-of-2"])
    one = ActivationCache.load(tmp_path)
    assert len(one) == 5 and one.keys == keys and one.questions == whole.questions
    torch.testing.assert_close(one[sites[0]], whole[sites[0]])
    assert torch.equal(one.valid, whole.valid) and torch.equal(one.margins, whole.margins)
    assert [x.shape[0] for x in one.iter_shards(sites[0])] == [2, 1, 2]
    with pytest.raises(ValueError, match="one key per row"):
        cache_activations(adapter, batches, sites, "all", tmp_path / "k", keys=keys[:2])


def test_cache_written_before_manifests_still_loads(adapter: VLMAdapter, tmp_path: Path) -> None:
    """The former layout: every site of a shard in one file, listed in cache.json."""
    batch = adapter.prepare(random_images(2, size(adapter)), [Q4, Q6])
    mem = cache_activations(adapter, batch, [resid_post(0)], "final", device="cpu")
    tensors = {
        "resid_post(0)": mem._tensors["resid_post(0)"],
        **{k: v for k, v in mem._tensors.items() if k.startswith("__")},
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "shard_00000.safetensors"))
    index = {"sites": ["resid_post(0)"], "positions": ["final"], "meta": mem.meta,
             "shards": [{"file": "shard_00000.safetensors", "rows": 2, "width": 1}]}  # fmt: skip
    (tmp_path / "cache.json").write_text(json.dumps(index))
    old = ActivationCache.load(tmp_path)
    assert len(old) == 2 and torch.equal(old[resid_post(0)], mem[resid_post(0)])
    assert torch.equal(old.margins, mem.margins)


def test_cache_errors(adapter: VLMAdapter) -> None:
    clean, _ = image_pairs(adapter, 1)
    with pytest.raises(ValueError, match="not a text-sequence site"):
        cache_activations(adapter, clean, [vision_resid(0)])
    with pytest.raises(ValueError, match="unknown position class"):
        cache_activations(adapter, clean, [resid_post(0)], positions="answer")
    with pytest.raises(IndexError, match="out of range"):
        cache_activations(adapter, clean, [resid_post(99)])


# ---------------------------------------------------------------------- patching
def test_patching_clean_into_clean_changes_nothing(adapter: VLMAdapter) -> None:
    clean, _ = image_pairs(adapter)
    res = patching_sweep(
        adapter, clean, clean, PatchingConfig(positions=("image", "question", "final", "all"))
    )
    m = adapter.margins(clean)
    torch.testing.assert_close(res.patched_margins, m.expand_as(res.patched_margins), atol=1e-5, rtol=0)
    assert res.recovery.isnan().all()  # m_clean == m_corrupt: recovery undefined, not 0/0 noise


def test_patching_last_layer_restores_clean(adapter: VLMAdapter) -> None:
    clean, corrupt = image_pairs(adapter)
    res = patching_sweep(adapter, clean, corrupt, PatchingConfig(layers=(-1,), positions="all"))
    assert torch.equal(res.patched_margins[0, 0], res.clean_margins)
    torch.testing.assert_close(res.recovery, torch.ones(1, 1))
    # final position alone at the last layer also restores it, even between prompts of different lengths
    clean6, corrupt4 = question_pairs(adapter, other=Q6)[::-1]
    res = patching_sweep(adapter, clean6, corrupt4, PatchingConfig(layers=(-1,), positions="final"))
    torch.testing.assert_close(res.patched_margins[0, 0], adapter.margins(clean6).float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["stack", "resume"])
@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_batched_sweep_equals_reference(adapter: VLMAdapter, kind: str, method: str) -> None:
    clean, corrupt = image_pairs(adapter)
    cfg = PatchingConfig(
        site_kind=kind,
        positions=("image", "question", "final", "text"),
        max_rows_per_forward=7,
        method=method,
    )
    fast, ref = patching_sweep(adapter, clean, corrupt, cfg), sweep_reference(adapter, clean, corrupt, cfg)
    assert fast.meta["method"] == method
    assert fast.patched_margins.shape == (adapter.n_layers, 4, 3)
    torch.testing.assert_close(fast.patched_margins, ref.patched_margins, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.recovery, ref.recovery, atol=1e-4, rtol=1e-4)
    if method == "stack":
        n_stack = 2 + -(-adapter.n_layers * 4 * 3 // 7)
        assert fast.n_forwards == n_stack < ref.n_forwards == 2 + adapter.n_layers * 4
    assert not fast.recovery.isnan().any()
    assert not torch.allclose(fast.recovery[0 if kind != "resid_pre" else 1, 0], torch.zeros(()))


def test_each_position_sweep_equals_reference(adapter: VLMAdapter) -> None:
    clean, corrupt = question_pairs(adapter)  # same token layout, other question word
    cfg = PatchingConfig(site_kind="resid_pre", layers=(0, -1), positions="each", max_rows_per_forward=256)
    fast, ref = patching_sweep(adapter, clean, corrupt, cfg), sweep_reference(adapter, clean, corrupt, cfg)
    assert fast.positions == [str(j - clean.seq_len) for j in range(clean.seq_len)]
    torch.testing.assert_close(
        fast.patched_margins, ref.patched_margins, atol=1e-5, rtol=1e-5, equal_nan=True
    )
    assert fast.n_forwards < 10 < ref.n_forwards
    # only the question word differs: patching any other position at layer 0 does nothing
    q_word = int(clean.question_mask[0].nonzero()[2])
    other = [j for j in range(clean.seq_len) if j != q_word and clean.attention_mask[:, j].all()]
    pm = fast.patched_margins[0]  # (position, pair); batch-size GEMM noise ~1e-6, so compare margins
    torch.testing.assert_close(pm[other], fast.corrupt_margins.expand(len(other), 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(pm[q_word], fast.clean_margins, atol=1e-5, rtol=0)
    frame = fast.to_frame()
    assert len(frame) == 2 * clean.seq_len * 2 and {"layer", "position", "pair", "recovery"} <= set(
        frame.columns
    )


def test_alignment_for_prompts_of_different_lengths(adapter: VLMAdapter) -> None:
    clean, corrupt = question_pairs(adapter, other=Q6)  # 4 vs 6 question tokens
    for bad in ("question", "text", "all"):
        with pytest.raises(ValueError, match="same token layout"):
            patching_sweep(adapter, clean, corrupt, PatchingConfig(positions=bad))
    with pytest.raises(ValueError, match="same token length"):
        patching_sweep(adapter, clean, corrupt, PatchingConfig(positions="each"))
    al = align_pairs(clean, corrupt, "image")[0]
    assert len(al.clean) == len(al.corrupt) == int(clean.image_mask[0].sum())
    assert torch.equal(al.clean, clean.image_mask[0].nonzero()[:, 0])
    assert torch.equal(al.corrupt, corrupt.image_mask[0].nonzero()[:, 0])
    assert ((al.corrupt - corrupt.seq_len) != (al.clean - clean.seq_len)).all()  # not the same offsets
    res = patching_sweep(adapter, clean, corrupt, PatchingConfig(layers=(1,), positions=("image", "final")))
    # by hand, pair 0: copy the clean image-token activations into the corrupted run, one forward
    c_act = read(adapter, clean, resid_post(1))

    def fn(x: Tensor) -> Tensor:
        x = x.clone()
        x[0, al.corrupt] = c_act[0, al.clean]
        return x

    with torch.no_grad(), adapter.hooks({resid_post(1): fn}):
        want = adapter.margins(corrupt)[0]
    torch.testing.assert_close(res.patched_margins[0, 0, 0], want, atol=1e-5, rtol=1e-5)


def test_image_tokens_need_an_image_block_in_both_runs(adapter: VLMAdapter) -> None:
    clean, corrupt = image_pairs(adapter, 2, removal="none")
    with pytest.raises(ValueError, match="image tokens can only be patched"):
        patching_sweep(adapter, clean, corrupt, PatchingConfig(positions="image"))
    res = patching_sweep(adapter, clean, corrupt, PatchingConfig(layers=(-1,), positions="final"))
    torch.testing.assert_close(res.recovery, torch.ones(1, 1), atol=1e-5, rtol=0)


def test_patch_one_and_config_errors(adapter: VLMAdapter) -> None:
    clean, corrupt = image_pairs(adapter, 2)
    m = patch_one(adapter, clean, corrupt, resid_post(-1), corrupt.position_mask("final"))
    torch.testing.assert_close(m, adapter.margins(clean).float(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same layout"):
        patch_one(adapter, clean, question_pairs(adapter, other=Q6)[1], resid_post(0), corrupt.image_mask)
    with pytest.raises(ValueError, match="cannot be patched per position"):
        PatchingConfig(site_kind="vision_resid")
    with pytest.raises(ValueError, match="'answer'"):
        PatchingConfig(positions=("final", "answer"))
    with pytest.raises(ValueError, match="max_rows_per_forward must be >= 1, got 0"):
        PatchingConfig(max_rows_per_forward=0)
    with pytest.raises(IndexError, match="out of range"):
        patching_sweep(adapter, clean, corrupt, PatchingConfig(layers=(42,)))
    with pytest.raises(ValueError, match="pair them row by row"):
        patching_sweep(adapter, clean, corrupt.select([0]), PatchingConfig())
    assert PatchingConfig(positions="final").positions == ("final",)


# ---------------------------------------------------------------------- attribution
def test_attribution_is_the_directional_derivative(adapter: VLMAdapter) -> None:
    """estimate = d/de m(a_corrupt + e (a_clean - a_corrupt)) at e = 0, checked by central differences."""
    clean, corrupt = image_pairs(adapter)
    cfg = PatchingConfig(site_kind="resid_post", layers=(1,), positions=("image", "final"))
    est = attribution_patching(adapter, clean, corrupt, cfg)
    assert (est.n_forwards, est.n_backwards, est.method) == (2, 1, "attribution_patching")
    site = resid_post(1)
    a_clean, a_corrupt = read(adapter, clean, site), read(adapter, corrupt, site)
    for p, cls in enumerate(("image", "final")):
        mask = corrupt.position_mask(cls)[..., None]  # type: ignore[arg-type]
        delta = torch.where(mask, a_clean - a_corrupt, torch.zeros_like(a_clean))
        eps = 1e-2
        m = [
            patch_one(
                adapter, clean, corrupt, site, corrupt.attention_mask, clean_act=a_corrupt + s * eps * delta
            )
            for s in (1, -1)
        ]
        fd = (m[0] - m[1]) / (2 * eps)
        torch.testing.assert_close(est.patched_margins[0, p] - est.corrupt_margins, fd, atol=2e-4, rtol=2e-2)


def test_attribution_vs_exact_and_agreement(adapter: VLMAdapter) -> None:
    clean, corrupt = image_pairs(adapter)
    cfg = PatchingConfig(
        site_kind="mlp_out", positions=("image", "question", "final"), max_rows_per_forward=2
    )
    exact, approx = (
        patching_sweep(adapter, clean, corrupt, cfg),
        attribution_patching(adapter, clean, corrupt, cfg),
    )
    assert approx.n_forwards == 4 and approx.n_backwards == 2  # two chunks of pairs
    torch.testing.assert_close(approx.clean_margins, exact.clean_margins, atol=1e-5, rtol=0)
    table = agreement(exact, approx)
    assert list(table["scope"]) == ["layer"] * adapter.n_layers + ["overall", "layer_profile"]
    assert table["spearman"].between(-1, 1).all() and table.loc[adapter.n_layers, "n"] == adapter.n_layers * 3
    # the last layer's MLP feeds the final norm directly: near-linear, so rank agreement is good there
    assert table.loc[adapter.n_layers - 1, "spearman"] > 0.4
    same = agreement(exact, exact)
    assert (same["spearman"] == 1).all()
    with pytest.raises(ValueError, match="different cells"):
        agreement(exact, attribution_patching(adapter, clean, corrupt, PatchingConfig(positions="final")))
    zero = attribution_patching(adapter, clean, clean, cfg)
    assert (zero.patched_margins - zero.corrupt_margins).abs().max() == 0


def test_spearman_by_hand() -> None:
    assert rankdata(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, float("nan"), 4], [2, 4, 0, 9]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])) and np.isnan(spearman([1.0], [2.0]))


# ---------------------------------------------------------------------- lens
def test_logit_lens_last_layer_is_the_margin(adapter: VLMAdapter) -> None:
    clean, _ = image_pairs(adapter)
    lens = logit_lens(adapter, clean)
    assert lens.margins.shape == (adapter.n_layers, 3) and lens.layers == list(range(adapter.n_layers))
    torch.testing.assert_close(lens.margins[-1], lens.model_margins, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens.model_margins, adapter.margins(clean).float())
    assert not torch.allclose(lens.margins[0], lens.model_margins)
    assert len(lens.to_frame()) == adapter.n_layers * 3
    torch.testing.assert_close(logit_lens(adapter, clean, layers=[-1]).margins[0], lens.margins[-1])


# ---------------------------------------------------------------------- attention
def _box(x0: float, y0: float, x1: float, y1: float) -> Box:
    return Box("img", "finding", x0, y0, x1, y1)


def test_box_coverage_precision_by_hand() -> None:
    grid = torch.arange(16.0).reshape(4, 4)  # 90th percentile = 13.5: A = {14, 15} = row 3, cols 2-3
    assert box_coverage_precision(grid, _box(2, 2, 4, 4), 4) == pytest.approx(
        (0.5, 1.0)
    )  # |B| = 4, |A&B| = 2
    assert box_coverage_precision(grid, _box(0, 0, 2, 2), 4) == pytest.approx((0.0, 0.0))
    assert box_coverage_precision(grid, _box(0, 0, 4, 4), 4) == pytest.approx((2 / 16, 1.0))
    assert box_coverage_precision(grid, _box(0, 3, 3, 4), 4) == pytest.approx(
        (1 / 3, 0.5)
    )  # bottom row, cols 0-2
    # the same map upsampled (nearest) to 8x8 and the box in 8x8 pixels: same numbers
    assert box_coverage_precision(grid, _box(4, 4, 8, 8), 8) == pytest.approx((0.5, 1.0))
    assert box_coverage_precision(grid, _box(0, 6, 6, 8), 8) == pytest.approx((1 / 3, 0.5))
    # a non-square image: the map is stretched to (height 8, width 4)
    assert box_coverage_precision(grid, _box(0, 6, 4, 8), (8, 4)) == pytest.approx((0.5, 1.0))
    # a box of a pixel's width covers the one pixel whose centre it holds
    assert box_coverage_precision(grid, _box(2.4, 3.4, 2.6, 3.6), 4) == pytest.approx((1.0, 0.5))
    for empty_or_inverted in ((1, 1, 1, 1), (3, 0, 1, 2)):
        with pytest.raises(ValueError, match="x_min < x_max"):
            _box(*empty_or_inverted)


def test_attention_to_image(adapter: VLMAdapter) -> None:
    clean, _ = image_pairs(adapter)
    impl = adapter.model.config.get_text_config()._attn_implementation
    before = adapter.margins(clean)
    w = final_attention_to_image(adapter, clean)
    n_img = int(clean.image_mask[0].sum())
    assert w.shape == (3, n_img) and (w >= 0).all()
    assert ((w.sum(-1) <= 1 + 1e-5) & (w.sum(-1) > 0)).all()
    assert adapter.model.config.get_text_config()._attn_implementation == impl  # restored
    torch.testing.assert_close(adapter.margins(clean), before)
    # independent check: HF's own output_attentions on layer 0, head 1
    adapter.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = adapter.model(**clean.inputs, output_attentions=True).attentions[0][:, 1, -1]
    finally:
        adapter.model.set_attn_implementation(impl)
    torch.testing.assert_close(
        final_attention_to_image(adapter, clean, layers=[0], heads=[1]),
        att[clean.image_mask].reshape(3, n_img),
    )
    maps = attention_maps(adapter, clean, size(adapter))
    assert maps.shape == (3, size(adapter), size(adapter))
    grids = token_grids(adapter, clean, w)
    for i, grid in enumerate(grids):
        rows, cols = grid.shape
        torch.testing.assert_close(maps[i, :: size(adapter) // rows, :: size(adapter) // cols], grid)
    if adapter.spec.inputs.token_grid == "square":
        torch.testing.assert_close(torch.stack(grids), attention_grid(w))
    elif adapter.spec.inputs.token_grid == "base_tile":  # LLaVA-NeXT: 36 tokens, but the base tile is 4x4
        assert grids[0].shape == (4, 4) and n_img != 16
    table = attention_in_box(
        adapter, clean, [_box(0, 0, 16, 16), None, _box(0, 0, size(adapter), size(adapter))], size(adapter)
    )
    assert table["coverage"].isna().tolist() == [False, True, False] and table.loc[2, "precision"] == 1.0
    none_batch = image_pairs(adapter, 1, removal="none")[1]
    with pytest.raises(ValueError, match="same number of image tokens"):
        final_attention_to_image(adapter, none_batch)


# ---------------------------------------------------------------------- scores and figures
def fake_result(seed: int = 0) -> tuple:
    from interp.patching import PatchingResult

    g = torch.Generator().manual_seed(seed)
    patched = torch.rand(4, 3, 5, generator=g)
    patched[2, 1, 0] = float("nan")
    res = PatchingResult(
        "resid_post",
        [0, 1, 2, 3],
        ["image", "question", "final"],
        patched,
        torch.ones(5),
        torch.zeros(5),
        meta={"model": "tiny"},
    )
    return res, patched


def test_layer_scores(tmp_path: Path) -> None:
    res, patched = fake_result()
    torch.testing.assert_close(res.recovery_per_pair, patched, equal_nan=True)  # gap 1, corrupt 0
    scores = LayerScores.from_result(res, position="final")
    assert scores.scores == pytest.approx(patched[:, 2].mean(-1).tolist())
    auto = LayerScores.from_result(res)
    assert auto.position == res.positions[int(np.nanmean(patched.numpy(), -1).mean(0).argmax())]
    s = LayerScores([3, 5, 7, 9], [0.1, float("nan"), -0.9, 0.5], "activation_patching", source="test")
    assert s.top_k(2) == [9, 3] and s.top_k(2, by="abs") == [7, 9] and s.top_k(10) == [9, 3, 7]
    back = LayerScores.from_json(s.to_json(tmp_path / "s.json"))
    assert back.layers == s.layers and np.isnan(back.scores[1]) and back.top_k(3) == s.top_k(3)
    assert LayerScores.from_json(tmp_path / "s.json").method == "activation_patching"
    with pytest.raises(ValueError, match="3 layers but 2 scores"):
        LayerScores([0, 1, 2], [0.0, 1.0], "x")
    with pytest.raises(ValueError, match="distinct non-negative"):
        LayerScores([0, -1], [0.0, 1.0], "x")


def test_figures_structure() -> None:
    res, _ = fake_result()
    fig = patching_heatmap(res)
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap"
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), res.recovery.numpy())
    assert list(fig.data[0].x) == res.positions and list(fig.data[0].y) == res.layers
    assert fig.layout.xaxis.title.text == "position" and fig.layout.yaxis.title.text == "layer"
    with pytest.raises(ValueError, match="do not match"):
        patching_heatmap(torch.zeros(2, 2), layers=[0, 1, 2])

    fig = recovery_line(res, ["question", "final"], n_boot=200)
    assert len(fig.data) == 6 and [t.name for t in fig.data[2::3]] == ["question", "final"]
    np.testing.assert_allclose(np.asarray(fig.data[5].y), res.recovery[:, 2].numpy(), rtol=1e-6)
    mean, lo, hi = mean_bootstrap(res.recovery_per_pair[:, 1].numpy(), n_boot=200)
    assert (lo <= mean + 1e-9).all() and (mean <= hi + 1e-9).all()
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text == "margin recovered"

    img = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    grid = torch.arange(16.0).reshape(4, 4)
    fig = attention_overlay(img, grid, box=_box(8, 8, 40, 24))
    assert [t.name for t in fig.data] == ["image", "attention", "box"]
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), np.asarray(img, dtype=float))
    z = np.asarray(fig.data[1].z)
    assert z.shape == (64, 64) and z[0, 0] == 0 and z[63, 63] == 15 and z[0, 16] == 1
    assert list(fig.data[2].x) == [8, 40, 40, 8, 8] and list(fig.data[2].y) == [8, 8, 24, 24, 8]


# ---------------------------------------------------------------------- the bootstrap
def test_ratio_bootstrap_by_hand() -> None:
    from interp.stats import mean_bootstrap, ratio_bootstrap

    hits = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    counts = np.array([[1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])  # second key: no unit at all
    value, low, high = ratio_bootstrap(hits, counts, n_boot=300, seed=1)
    assert value[0] == pytest.approx(4 / 6) and np.isnan(value[1]) and np.isnan(low[1])
    assert low[0] <= value[0] <= high[0] and low[0] >= 0 and high[0] <= 1
    assert np.array_equal(ratio_bootstrap(hits, counts, 300, 1)[1], low, equal_nan=True)  # seeded
    v = np.array([[0.5, np.nan, 1.5, 1.0]])
    mean, lo, hi = mean_bootstrap(v, n_boot=200)
    assert mean[0] == pytest.approx(1.0) and lo[0] <= 1.0 <= hi[0]
    with pytest.raises(ValueError, match="same"):
        ratio_bootstrap(hits, counts[:, :3])
    with pytest.raises(ValueError, match="n_boot"):
        ratio_bootstrap(hits, counts, n_boot=0)


def test_image_feature_cache_equals_the_model_encoding(adapter: VLMAdapter) -> None:
    from hooks.features import ImageFeatureCache

    imgs = [Image.fromarray(np.full((size(adapter), size(adapter)), v, np.uint8)) for v in (10, 200, 90)]
    cache = ImageFeatureCache(adapter, max_items=2)
    calls = []
    first = cache.get("a", lambda: calls.append("a") or imgs[0])
    assert torch.equal(first, adapter.encode_images([imgs[0]])[0])
    assert torch.equal(cache.get("a", lambda: calls.append("again") or imgs[1]), first) and calls == ["a"]
    cache.get("b", imgs[1])
    cache.get("c", imgs[2])  # the oldest ("a") is dropped
    assert len(cache) == 2 and "a" not in cache and "c" in cache
    inputs = adapter.image_inputs([imgs[1]])
    assert set(inputs) == set(adapter.spec.inputs.image_keys)
    torch.testing.assert_close(cache.get("b", imgs[1]), adapter.image_features(inputs)[0])


# ---------------------------------------------------------------------- gradient paths and the noise floor
def _mixed_flags(model: torch.nn.Module) -> dict[str, bool]:
    """Every other parameter requires grad (as a partly fine-tuned model): the flags to restore."""
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_attribution_freezes_parameters_and_restores_them(
    gemma3_adapter: VLMAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = gemma3_adapter
    clean, corrupt = image_pairs(adapter, 2)
    cfg = PatchingConfig(site_kind="resid_post", layers=(1,), positions=("image", "final"))
    before = _mixed_flags(adapter.model)
    try:
        want = attribution_patching(adapter, clean, corrupt, cfg)
        assert _flags(adapter.model) == before
        seen: list[bool] = []
        plain_margins = adapter.margins

        def spy(batch: Batch, grad: bool = False, image_features=None) -> Tensor:  # type: ignore[no-untyped-def]
            if grad:  # inside the gradient pass: no parameter requires grad, no vision tower runs
                seen.append(any(p.requires_grad for p in adapter.model.parameters()))
                assert image_features is not None
                raise RuntimeError("planted failure in the gradient pass")
            return plain_margins(batch, grad, image_features)

        with monkeypatch.context() as mp, pytest.raises(RuntimeError, match="planted failure"):
            mp.setattr(adapter, "margins", spy)
            attribution_patching(adapter, clean, corrupt, cfg)
        assert seen == [False] and _flags(adapter.model) == before
    finally:
        for p in adapter.model.parameters():
            p.requires_grad_(True)
    # same numbers with every parameter requiring grad (the tiny models' default) and with half of them
    again = attribution_patching(adapter, clean, corrupt, cfg)
    torch.testing.assert_close(again.patched_margins, want.patched_margins, atol=0, rtol=0)


def test_frozen_parameters_restores_exactly() -> None:
    from hooks.grad import frozen_parameters

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    a.bias.requires_grad_(False)
    shared = torch.nn.Sequential(a, a, b)  # a parameter reached twice is handled once
    with pytest.raises(ValueError, match="inside"), frozen_parameters(shared, None, b):
        assert not any(p.requires_grad for p in shared.parameters())
        raise ValueError("inside")
    assert [p.requires_grad for p in (a.weight, a.bias, b.weight, b.bias)] == [True, False, True, True]


def test_noise_floor_is_recorded_with_the_dtype(adapter: VLMAdapter) -> None:
    clean, corrupt = image_pairs(adapter)
    cfg = PatchingConfig(site_kind="attn_out", positions=("image", "final"), floor_layers=2)
    res = patching_sweep(adapter, clean, corrupt, cfg)
    assert res.dtype == "float32" and res.noise_floor_per_pair is not None
    assert res.noise_floor_per_pair.shape == (3,) and 0 <= res.noise_floor <= 1e-5
    assert res.meta["floor_forwards"] > 0 and res.meta["floor_resolution"] <= res.noise_floor
    gap = (res.clean_margins - res.corrupt_margins).abs()
    assert res.recovery_floor == pytest.approx(float((res.noise_floor / gap).mean()))
    ref = sweep_reference(adapter, clean, corrupt, cfg)
    assert ref.dtype == "float32" and 0 <= ref.noise_floor <= 1e-5
    attr = attribution_patching(adapter, clean, corrupt, cfg)
    assert attr.dtype == "float32" and 0 <= attr.noise_floor <= 1e-5
    off = patching_sweep(adapter, clean, corrupt, PatchingConfig(positions="final", floor_layers=0))
    assert np.isnan(off.noise_floor) and not off.within_floor().any()
    blocks = patching_sweep(adapter, clean, corrupt, PatchingConfig(positions="final", pair_block=2))
    assert blocks.noise_floor_per_pair is not None and blocks.noise_floor_per_pair.shape == (3,)


def test_noise_floor_grows_in_bfloat16() -> None:
    from tests.conftest import make_adapter

    adapter = make_adapter("gemma3")
    clean, corrupt = image_pairs(adapter, 2)
    cfg = PatchingConfig(site_kind="resid_post", positions=("image", "final"))
    fp32 = patching_sweep(adapter, clean, corrupt, cfg)
    adapter.model.to(torch.bfloat16)
    for method in ("resume", "stack"):
        bf16 = patching_sweep(adapter, clean, corrupt, dataclasses.replace(cfg, method=method))
        assert bf16.dtype == "bfloat16" and bf16.meta["method"] == method
        # bf16 keeps ~3 significant digits of each logit: the floor is orders above fp32's
        assert bf16.noise_floor > 100 * max(fp32.noise_floor, 1e-8) and bf16.noise_floor > 1e-4
    attr = attribution_patching(adapter, clean, corrupt, cfg)
    assert attr.dtype == "bfloat16" and attr.noise_floor > 1e-4


def _floor_case() -> PatchingResult:
    """2 layers x 3 positions x 2 pairs; clean 2, corrupt 0 (gap 2); floor 0.1 margin = 0.05 recovery."""
    rec = torch.tensor([[0.0, 0.05, -0.04], [0.051, float("nan"), 0.9]])
    patched = (rec * 2.0)[:, :, None].expand(2, 3, 2).clone()
    return PatchingResult("resid_post", [0, 1], ["image", "question", "final"], patched, torch.full((2,), 2.0),
                          torch.zeros(2), dtype="bfloat16", noise_floor_per_pair=torch.tensor([0.1, 0.02]))  # fmt: skip


def test_cells_within_the_floor_by_hand() -> None:
    res = _floor_case()
    assert res.noise_floor == pytest.approx(0.1) and res.recovery_floor == pytest.approx(0.05)
    want = np.array([[True, True, True], [False, False, False]])  # 0.051 is out, NaN never in
    np.testing.assert_array_equal(res.within_floor().numpy(), want)
    np.testing.assert_array_equal(res.within_floor(0.0).numpy(), [[True, False, False], [False] * 3])
    fig = patching_heatmap(res)
    assert [t.name for t in fig.data][1] == "within noise floor" and "noise floor" in fig.layout.title.text
    np.testing.assert_array_equal(~np.isnan(np.asarray(fig.data[1].z, dtype=float)), want)
    line = recovery_line(res, "final", n_boot=50)
    band = line.layout.shapes[0]
    assert (band.y0, band.y1) == pytest.approx((-0.05, 0.05)) and len(line.data) == 3
    res.noise_floor_per_pair = None  # nothing measured: nothing marked, no band
    assert len(patching_heatmap(res).data) == 1 and not recovery_line(res, "final", n_boot=50).layout.shapes


def test_patching_result_save_and_load(tmp_path: Path) -> None:
    res = _floor_case()
    res.meta = {"model": "tiny", "positions": ["image", "final"]}
    back = PatchingResult.load(res.save(tmp_path / "r.safetensors"))
    assert (back.dtype, back.layers, back.positions) == (res.dtype, res.layers, res.positions)
    assert back.meta == res.meta and back.method == res.method
    torch.testing.assert_close(back.noise_floor_per_pair, res.noise_floor_per_pair)
    torch.testing.assert_close(back.patched_margins, res.patched_margins, equal_nan=True)
    np.testing.assert_array_equal(back.within_floor().numpy(), res.within_floor().numpy())
    # a file written before the dtype and the floor were recorded still loads
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["patching_result"])
        tensors = {k: f.get_tensor(k) for k in ("patched_margins", "clean_margins", "corrupt_margins")}
    record.pop("dtype")
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"patching_result": json.dumps(record)})
    old = PatchingResult.load(tmp_path / "old.safetensors")
    assert old.dtype == "" and old.noise_floor_per_pair is None and np.isnan(old.noise_floor)
    torch.testing.assert_close(old.recovery, res.recovery, equal_nan=True)
