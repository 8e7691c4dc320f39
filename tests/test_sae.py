"""interp.sae / interp.sae_train on a tiny Gemma3: loading (Gemma Scope 2 and sae-lens folders), training,
feature attribution, feature patching and clamping. Offline: SAEs are written to tmp folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from hooks.adapter import VLMAdapter
from hooks.batch import Batch
from hooks.sites import attn_out, mlp_out, resid_post, resid_pre
from interp import (
    FeatureRef,
    LoadedSAE,
    SAETrainConfig,
    clamp_features,
    feature_attribution,
    feature_patch,
    flip_rate_change,
    gemma_scope_2_disk_loader,
    load_sae,
    load_sae_from_hub,
    save_sae,
    site_from_hook_name,
    top_features,
    train_sae,
)
from interp.patching import capture
from interp.sae_fake import fake_gemma_scope_params, write_fake_gemma_scope
from interp.sae_train import evaluate_sae
from tests.conftest import random_images

WIDTH = 32
DEAD, ALIVE = 0, 1  # feature 0 never fires, feature 1 always does


pytestmark = pytest.mark.usefixtures("one_thread")


def gemma_scope_params(d: int, seed: int = 0) -> dict[str, Tensor]:
    """Random JumpReLU weights in the Gemma Scope 2 layout (w_enc [d, width], w_dec [width, d])."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "w_enc": torch.randn(d, WIDTH, generator=g) / d**0.5,
        "w_dec": torch.randn(WIDTH, d, generator=g) * 0.3,
        "b_enc": torch.randn(WIDTH, generator=g) * 0.1,
        "b_dec": torch.randn(d, generator=g) * 0.1,
        "threshold": torch.rand(WIDTH, generator=g) + 0.5,
    }
    params["threshold"][DEAD] = 1e6
    params["b_enc"][ALIVE] = 50.0
    return params


def write_gemma_scope(
    root: Path, layer: int, d: int, config: bool = True, kind: str = "resid_post", name: str = ""
) -> Path:
    folder = write_fake_gemma_scope(
        root, layer, gemma_scope_params(d, seed=layer), kind=kind, folder_name=name, config=config,
        model_name="google/tiny-it",
    )  # fmt: skip
    if config:  # a real Gemma Scope 2 config.json also records the L0 it was trained to
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "l0": 7}))
    return folder


@pytest.fixture(scope="module")
def pairs(gemma3_adapter: VLMAdapter) -> tuple[Batch, Batch]:
    imgs = random_images(3, 64, seed=3)
    a = gemma3_adapter
    return a.prepare(imgs, ["Is there cardiomegaly?"] * 3), a.prepare(
        imgs, ["Is there an enlarged heart?"] * 3
    )


@pytest.fixture(scope="module")
def last_sae(gemma3_adapter: VLMAdapter, tmp_path_factory: pytest.TempPathFactory) -> LoadedSAE:
    """SAE at the last layer's resid_post: the final position there mediates the whole margin."""
    root = tmp_path_factory.mktemp("gs")
    return load_sae(write_gemma_scope(root, gemma3_adapter.n_layers - 1, gemma3_adapter.d_model))


@pytest.fixture(scope="module")
def mid_sae(gemma3_adapter: VLMAdapter, tmp_path_factory: pytest.TempPathFactory) -> LoadedSAE:
    return load_sae(write_gemma_scope(tmp_path_factory.mktemp("gs"), 1, gemma3_adapter.d_model))


# ---------------------------------------------------------------------- loading
def test_gemma_scope_loader_matches_hand_written_jumprelu(tmp_path: Path) -> None:
    from sae_lens import JumpReLUSAE

    d = 48
    loaded = load_sae(write_gemma_scope(tmp_path, 17, d))
    assert isinstance(loaded.sae, JumpReLUSAE)
    assert loaded.site == resid_post(17) and loaded.layer == 17 and loaded.width == WIDTH
    assert loaded.release == "gemma-scope-2-tiny-it-res" and loaded.l0 == "medium"
    assert loaded.hook_name == "model.layers.17.output"
    p = gemma_scope_params(d, seed=17)
    x = torch.randn(50, d) * 3
    pre = x @ p["w_enc"] + p["b_enc"]
    f_ref = torch.relu(pre) * (pre > p["threshold"])
    f = loaded.encode(x)
    assert torch.equal(f, f_ref)
    assert (f[:, DEAD] == 0).all() and (f[:, ALIVE] > 0).all() and 0 < (f > 0).float().mean() < 1
    assert torch.equal(loaded.decode(f), f_ref @ p["w_dec"] + p["b_dec"])
    # without config.json: the folder name gives the layer; site= overrides; ref names the feature
    bare = load_sae(write_gemma_scope(tmp_path / "bare", 5, d, config=False))
    assert bare.site == resid_post(5) and torch.equal(bare.encode(x), load_sae(bare.path or "").encode(x))
    assert load_sae(bare.path or "", site=mlp_out(5)).site == mlp_out(5)
    assert bare.ref(3) == FeatureRef("gemma-scope-2-tiny-it-res", 5, WIDTH, "medium", 3)
    with pytest.raises(ValueError, match="out of range"):
        bare.ref(WIDTH)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_sae(tmp_path)


def test_load_sae_from_hub_wraps_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: SAE.from_pretrained is replaced by a disk load carrying only the hub's metadata."""
    from sae_lens import SAE

    folder = write_gemma_scope(tmp_path, 17, 48)

    def from_pretrained(release: str, sae_id: str, device: str = "cpu", dtype: str = "float32") -> SAE:
        sae = SAE.load_from_disk(folder, device=device, dtype=dtype, converter=gemma_scope_2_disk_loader)
        for key in ("flipscope_site", "flipscope_release", "flipscope_l0"):
            delattr(sae.cfg.metadata, key)
        return sae

    monkeypatch.setattr(SAE, "from_pretrained", staticmethod(from_pretrained))
    hub = load_sae_from_hub("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_medium")
    assert (hub.release, hub.site, hub.l0, hub.width) == (
        "gemma-scope-2-4b-it-res",
        resid_post(17),
        "medium",
        WIDTH,
    )
    assert hub.path == "hub:gemma-scope-2-4b-it-res/layer_17_width_16k_l0_medium"


def test_hook_names_map_to_sites() -> None:
    for name in (
        "blocks.17.hook_resid_post",
        "model.layers.17.output",
        "model.language_model.layers.17",
        "model.model.language_model.layers.17.output",
        "resid_post(17)",
    ):
        assert site_from_hook_name(name) == resid_post(17), name
    assert site_from_hook_name("blocks.4.hook_resid_pre") == resid_pre(4)
    assert site_from_hook_name("model.layers.4.post_feedforward_layernorm.output") == mlp_out(4)
    with pytest.raises(ValueError, match="site="):
        site_from_hook_name("blocks.4.attn.hook_z")


def test_gemma_scope_2_folders_as_released(tmp_path: Path) -> None:
    """Each hub layout without config.json: the parent folder gives the site (or the refusal)."""
    d = 48
    mlp = load_sae(write_gemma_scope(tmp_path / "a", 9, d, config=False, kind="mlp_out"))
    assert (mlp.site, mlp.release, mlp.hook_name) == (
        mlp_out(9),
        "gemma-scope-2-tiny-it-mlp",
        "model.layers.9.post_feedforward_layernorm.output",
    )
    res_all = load_sae(write_gemma_scope(tmp_path / "b", 3, d, config=False, kind="resid_post_all"))
    assert (res_all.site, res_all.release) == (resid_post(3), "gemma-scope-2-tiny-it-res-all")
    with pytest.raises(ValueError, match=r"self_attn\.o_proj\.input.*not flipscope's attn_out site"):
        load_sae(write_gemma_scope(tmp_path / "c", 9, d, config=False, kind="attn_out"))
    with pytest.raises(ValueError, match="transcoder"):
        load_sae(write_gemma_scope(tmp_path / "d", 9, d, config=False, kind="transcoder"))
    with pytest.raises(ValueError, match="transcoder"):
        load_sae(
            write_gemma_scope(
                tmp_path / "e",
                9,
                d,
                config=False,
                kind="transcoder_all",
                name="layer_9_width_32_l0_big_affine",
            )
        )
    with pytest.raises(ValueError, match="cannot tell which site"):  # no config.json, unknown parent folder
        load_sae(write_gemma_scope(tmp_path / "f", 9, d, config=False, kind="my_saes"))
    assert load_sae(
        tmp_path / "f" / "gemma-scope-2-tiny-it" / "my_saes" / f"layer_9_width_{WIDTH}_l0_medium",
        site=resid_post(9),
    ).site == resid_post(9)


def test_gemma_scope_2_config_json_decides_the_site(tmp_path: Path) -> None:
    d = 48
    folder = write_gemma_scope(tmp_path / "a", 9, d, config=False, kind="resid_post")
    # config.json wins over the parent folder
    (folder / "config.json").write_text(
        json.dumps({"hf_hook_point_in": "model.layers.9.post_feedforward_layernorm.output"})
    )
    assert load_sae(folder).site == mlp_out(9)
    attn = write_gemma_scope(tmp_path / "b", 9, d, config=False, kind="attn_out")
    (attn / "config.json").write_text(
        json.dumps({"hf_hook_point_in": "model.layers.9.self_attn.o_proj.input"})
    )
    with pytest.raises(ValueError, match="o_proj"):
        load_sae(attn, site=attn_out(9))  # refused even with an explicit site: it is not that site
    tc = write_gemma_scope(tmp_path / "c", 9, d, config=False, kind="resid_post")
    (tc / "config.json").write_text(
        json.dumps(
            {
                "hf_hook_point_in": "model.layers.9.pre_feedforward_layernorm.output",
                "hf_hook_point_out": "model.layers.9.post_feedforward_layernorm.output",
            }
        )
    )
    with pytest.raises(ValueError, match="transcoder"):
        load_sae(tc)


def test_gemma_scope_2_from_the_hf_cache_and_seed_variants(tmp_path: Path) -> None:
    """An HF cache snapshot (files are symlinks into blobs/) gives the release; _seed_1 stays apart."""
    d = 48
    snap = tmp_path / "hub" / "models--google--gemma-scope-2-4b-it" / "snapshots" / "0123abcd"
    blobs = tmp_path / "hub" / "models--google--gemma-scope-2-4b-it" / "blobs"
    blobs.mkdir(parents=True)
    refs = {}
    for name in ("layer_17_width_32_l0_medium", "layer_17_width_32_l0_medium_seed_1"):
        folder = snap / "resid_post" / name
        folder.mkdir(parents=True)
        blob = blobs / f"{name}.bin"
        save_file(gemma_scope_params(d, seed=len(refs)), str(blob))
        (folder / "params.safetensors").symlink_to(blob)
        sae = load_sae(folder)
        assert (sae.release, sae.site, sae.l0) == ("gemma-scope-2-4b-it-res", resid_post(17), "medium")
        refs[name] = sae
    seed0, seed1 = refs.values()
    assert (seed0.seed, seed1.seed) == (0, 1) and "seed" not in str(seed0.ref(3))
    assert seed0.ref(3) != seed1.ref(3) and str(seed1.ref(3)).endswith("/seed=1#3")
    with pytest.raises(ValueError, match="belongs to another SAE"):
        seed1.indices([seed0.ref(3)])
    back = load_sae(save_sae(seed1, tmp_path / "saved"))
    assert back.ref(3) == seed1.ref(3)


# ---------------------------------------------------------------------- training
def _sparse_codes(active: int, n: int = 4000, d: int = 32, atoms: int = 48) -> torch.Tensor:
    """``n`` points, each a sum of ``active`` of ``atoms`` unit dictionary atoms (weights 0.5-2), plus 0.3."""
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    codes = torch.zeros(n, atoms)
    which = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    codes.scatter_(1, which, torch.rand(n, active, generator=g) * 1.5 + 0.5)
    return codes @ dictionary + 0.3


def test_train_sae_on_sparse_codes_then_save_and_load(tmp_path: Path) -> None:
    from sae_lens import TopKSAE

    active = 3
    x = _sparse_codes(active)
    cfg = SAETrainConfig(
        width=96, k=active, steps=500, lr=3e-3, site=resid_post(2), release="synth", progress=False
    )
    sae, report = train_sae(x, cfg)
    assert isinstance(sae.sae, TopKSAE) and sae.site == resid_post(2) and sae.l0 == "k3"
    assert report.fvu < 0.1, report
    assert report.n_val == 400 and report.n_train == 3600
    # the reported L0 is the held-out L0 (the split is seeded; recompute it from the same rows)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    held_out = x[perm[: report.n_val]]
    with torch.no_grad():
        f = sae.encode(held_out)
    assert report.l0 == pytest.approx(float((f != 0).sum(-1).float().mean())) and report.l0 <= active
    assert train_sae(x, cfg)[1].fvu == report.fvu  # seeded
    save_sae(sae, tmp_path / "trained")
    back = load_sae(tmp_path / "trained")
    assert (back.release, back.site, back.layer, back.width, back.l0) == ("synth", resid_post(2), 2, 96, "k3")
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
        assert torch.equal(back.decode(back.encode(x)), sae.decode(sae.encode(x)))
    with pytest.raises(ValueError, match="k=200 exceeds width"):
        SAETrainConfig(width=96, k=200)


# ---------------------------------------------------------------------- patching
def test_feature_patch_identities(
    gemma3_adapter: VLMAdapter, pairs: tuple[Batch, Batch], last_sae: LoadedSAE
) -> None:
    orig, para = pairs
    all_features = list(range(WIDTH))
    same = feature_patch(gemma3_adapter, last_sae, orig, orig, all_features, include_error=True)
    assert torch.equal(same.m_patched, same.m_para) and same.recovery.isnan().all()
    full = feature_patch(gemma3_adapter, last_sae, orig, para, all_features, include_error=True)
    assert (full.m_para - full.m_orig).abs().min() > 1e-3
    torch.testing.assert_close(full.m_patched, full.m_orig, atol=1e-4, rtol=0)
    torch.testing.assert_close(full.recovery, torch.ones(3), atol=1e-2, rtol=0)
    assert full.mean_recovery == pytest.approx(1.0, abs=1e-2)
    none = feature_patch(gemma3_adapter, last_sae, orig, para, [DEAD])
    assert torch.equal(none.m_patched, none.m_para)  # a dead feature has no change to undo
    refs = [last_sae.ref(i) for i in all_features]
    by_ref = feature_patch(gemma3_adapter, last_sae, orig, para, refs, include_error=True)
    assert torch.equal(by_ref.m_patched, full.m_patched)
    with pytest.raises(ValueError, match="pair them"):
        feature_patch(gemma3_adapter, last_sae, orig.select([0, 1]), para, [1])


# ---------------------------------------------------------------------- attribution
def test_integrated_gradients_completeness(
    gemma3_adapter: VLMAdapter, pairs: tuple[Batch, Batch], last_sae: LoadedSAE, mid_sae: LoadedSAE
) -> None:
    orig, para = pairs
    attr = feature_attribution(gemma3_adapter, last_sae, orig, para, steps=32)
    assert attr.features.shape == (3, WIDTH) and attr.error.shape == (3,)
    torch.testing.assert_close(attr.m_base, attr.m_orig, atol=1e-4, rtol=0)  # last layer: other == 0
    tol = 1e-3 * float(attr.shift.abs().max())
    torch.testing.assert_close(attr.features.sum(-1) + attr.error, attr.shift, atol=tol, rtol=0)
    assert (attr.features[:, DEAD] == 0).all()
    table = top_features(attr, k=WIDTH)
    assert len(table) == WIDTH and isinstance(table["feature"][0], FeatureRef)
    assert table["feature"][0].release == last_sae.release and table["mean_aligned"].is_monotonic_decreasing
    total = table["share"].sum() + table.attrs["error_share"] + table.attrs["other_share"]
    assert total == pytest.approx(1.0, abs=1e-2)
    assert len(top_features(attr, k=5)) == 5
    # a middle layer: the site carries only part of the shift; completeness holds for that part
    mid = feature_attribution(gemma3_adapter, mid_sae, orig, para, steps=32)
    torch.testing.assert_close(
        mid.completeness_gap, torch.zeros(3), atol=1e-2 * float(mid.site_shift.abs().max()), rtol=0
    )
    torch.testing.assert_close(mid.site_shift + mid.other, mid.shift)
    with pytest.raises(ValueError, match="method must be"):
        feature_attribution(gemma3_adapter, last_sae, orig, para, method="saliency")  # type: ignore[arg-type]


def test_grad_x_delta_is_the_analytic_gradient(
    gemma3_adapter: VLMAdapter, pairs: tuple[Batch, Batch], last_sae: LoadedSAE
) -> None:
    """At the last layer the margin is unembed(x_final): compare with autograd through adapter.unembed."""
    orig, para = pairs
    site = last_sae.require_site()
    attr = feature_attribution(gemma3_adapter, last_sae, orig, para, method="grad_x_delta")
    x_o = capture(gemma3_adapter, orig, [site])[0][site][:, -1]
    x_p = capture(gemma3_adapter, para, [site])[0][site][:, -1].clone().requires_grad_(True)
    margin = gemma3_adapter.answer_ids.margin(gemma3_adapter.unembed(x_p))
    (g_x,) = torch.autograd.grad(margin.sum(), x_p)
    with torch.no_grad():
        f_o, f_p = last_sae.encode(x_o), last_sae.encode(x_p)
        e_o, e_p = x_o - last_sae.decode(f_o), x_p - last_sae.decode(f_p)
    torch.testing.assert_close(
        attr.features, (g_x @ last_sae.W_dec.T.detach()) * (f_p - f_o), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(attr.error, (g_x * (e_p - e_o)).sum(-1), atol=1e-5, rtol=1e-4)
    assert attr.steps == 1


# ---------------------------------------------------------------------- clamping
def test_clamping(gemma3_adapter: VLMAdapter, pairs: tuple[Batch, Batch], mid_sae: LoadedSAE) -> None:
    orig, _ = pairs
    base = gemma3_adapter.margins(orig)
    for position in ("final", "all"):
        same = clamp_features(gemma3_adapter, mid_sae, orig, [DEAD], position=position)  # type: ignore[arg-type]
        assert torch.equal(same, base)
        moved = clamp_features(gemma3_adapter, mid_sae, orig, [ALIVE], position=position)  # type: ignore[arg-type]
        assert (moved - base).abs().min() > 1e-4
    pinned = clamp_features(gemma3_adapter, mid_sae, orig, [DEAD], value=5.0)
    assert (pinned - base).abs().min() > 1e-4
    with pytest.raises(ValueError, match="feature indices"):
        clamp_features(gemma3_adapter, mid_sae, orig, [WIDTH])


def test_flip_rate_change() -> None:
    before = torch.tensor([1.0, -1.0, 2.0, 1.0, 0.5, -0.2])
    after = torch.tensor([1.0, 0.3, 2.0, 1.0, 0.5, -0.2])
    change = flip_rate_change(before, after, [[0, 1, 2], [3, 4, 5]])
    assert (change.pairwise_before, change.pairwise_after) == (0.5, 0.25) and change.n_pairs == 4
    assert (change.cluster_before, change.cluster_after) == (1.0, 0.5) and change.change == -0.25
    with pytest.raises(ValueError, match="at least one paraphrase"):
        flip_rate_change(before, after, [[0]])


def test_fake_gemma_scope_fitted_to_activations(tmp_path: Path) -> None:
    """The fitted fake fires about l0 features per input, reconstructs better than nothing, and loads as
    the released layout says."""
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(1)) * 2 + 3
    params = fake_gemma_scope_params(16, 256, seed=0, fit=x, l0=12)
    folder = write_fake_gemma_scope(tmp_path, 3, params, release="gemma-scope-2-4b-it")
    sae = load_sae(folder)
    assert (sae.release, sae.width, sae.site) == ("gemma-scope-2-4b-it-res", 256, resid_post(3))
    fvu, l0, _ = evaluate_sae(sae, x)
    assert 6 <= l0 <= 24 and fvu < 1.0
    with pytest.raises(ValueError, match="lacks"):
        write_fake_gemma_scope(tmp_path, 3, {"w_enc": params["w_enc"]})
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        fake_gemma_scope_params(16, 256, fit=x[:, :8])


def test_feature_contrast_by_hand() -> None:
    from interp.sae_attr import feature_contrast

    acts = torch.tensor([[2.0, 0.0, 1.0], [4.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 1.0, 1.0]])
    group = torch.tensor([True, True, False, False])
    t = feature_contrast(acts, group).set_index("index")
    assert list(feature_contrast(acts, group)["index"][:2]) == [0, 1]  # |d| = 3, then 2; feature 2: d = 0
    assert t.loc[0, "mean_in"] == 3.0 and t.loc[0, "mean_out"] == 0.0 and t.loc[0, "fire_in"] == 1.0
    assert t.loc[0, "cohens_d"] == pytest.approx(3.0 / ((1.0 + 0.0) / 2) ** 0.5)  # var_in = 1, var_out = 0
    assert t.loc[1, "cohens_d"] == pytest.approx(-2.0 / ((0.0 + 1.0) / 2) ** 0.5)  # switched off: negative
    assert t.loc[2, "cohens_d"] == 0.0 and t.loc[2, "selectivity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="some rows"):
        feature_contrast(acts, torch.ones(4, dtype=torch.bool))
    # straight from an SAE's encode (a tensor that requires grad): same table
    graded = feature_contrast(acts.clone().requires_grad_(True), group)
    assert graded.equals(feature_contrast(acts, group))


def test_train_jumprelu_sae_reaches_its_target_l0_and_round_trips(tmp_path: Path) -> None:
    from sae_lens import JumpReLUSAE

    active = 3
    x = _sparse_codes(active)
    cfg = SAETrainConfig(
        width=96, k=active, steps=500, lr=3e-3, site=resid_post(2), architecture="jumprelu", progress=False
    )
    sae, report = train_sae(x, cfg)
    assert isinstance(sae.sae, JumpReLUSAE) and sae.l0 == "target3"
    # measured, not bounded: the quadratic penalty pulls L0 toward 3 (untrained thresholds fire ~half)
    assert 1.5 <= report.l0 <= 8 and report.fvu < 0.15, report
    back = load_sae(save_sae(sae, tmp_path / "jr"))
    assert isinstance(back.sae, JumpReLUSAE) and back.site == resid_post(2)
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x))
    with pytest.raises(ValueError, match="architecture"):
        SAETrainConfig(architecture="relu")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- scoring a chosen feature
def test_per_row_clamp_equals_one_row_at_a_time(
    gemma3_adapter: VLMAdapter, pairs: tuple[Batch, Batch], mid_sae: LoadedSAE
) -> None:
    orig, _ = pairs
    values = torch.tensor([[0.0], [3.0], [7.5]])
    rows = clamp_features(gemma3_adapter, mid_sae, orig, [ALIVE], value=values)
    one_by_one = torch.cat(
        [
            clamp_features(gemma3_adapter, mid_sae, orig.select([i]), [ALIVE], value=float(values[i, 0]))
            for i in range(3)
        ]
    )
    torch.testing.assert_close(rows, one_by_one, atol=1e-5, rtol=0)
    assert (rows[1:] - rows[0]).abs().min() > 1e-4  # the values differ per row, so do the margins
    with pytest.raises(ValueError, match="one column per feature"):
        clamp_features(gemma3_adapter, mid_sae, orig, [ALIVE], value=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="values for 3 rows"):
        clamp_features(gemma3_adapter, mid_sae, orig.select([0, 1]), [ALIVE], value=values)


def test_clamp_to_original_and_score_feature(
    gemma3_adapter: VLMAdapter, pairs: tuple[Batch, Batch], last_sae: LoadedSAE
) -> None:
    from interp import FeatureScore, clamp_to_original, decoder_cosine, score_feature

    orig, para = pairs
    a = gemma3_adapter
    # clamping every row of a batch to its own value is the identity; to the original's, by hand
    torch.testing.assert_close(
        clamp_to_original(a, last_sae, [ALIVE], orig, orig), a.margins(orig), atol=1e-4, rtol=0
    )
    site = last_sae.require_site()
    f_o = last_sae.encode(capture(a, orig, [site])[0][site][:, -1])[:, [ALIVE]]
    by_hand = clamp_features(a, last_sae, para, [ALIVE], value=f_o)
    assert torch.equal(clamp_to_original(a, last_sae, [ALIVE], orig, para), by_hand)
    assert torch.equal(clamp_to_original(a, last_sae, [DEAD], orig, para), a.margins(para))
    # decoder cosine keeps its sign
    w = last_sae.W_dec[ALIVE].detach()
    assert decoder_cosine(last_sae, ALIVE, w) == pytest.approx(1.0)
    assert decoder_cosine(last_sae, ALIVE, -2 * w) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="decoder rows"):
        decoder_cosine(last_sae, ALIVE, torch.ones(3))

    attr = feature_attribution(a, last_sae, orig, para, steps=8)
    table = top_features(attr, k=WIDTH)
    alive = score_feature(a, last_sae, ALIVE, (orig, para), (para, orig), w, attribution=attr, n_boot=50)
    assert isinstance(alive, FeatureScore) and alive.n_pairs == 3 and alive.n_other == 3
    assert alive.rank == table["index"].tolist().index(ALIVE) + 1 and alive.cosine == pytest.approx(1.0)
    assert alive.recovery[0] == pytest.approx(
        feature_patch(a, last_sae, orig, para, [ALIVE]).mean_recovery, abs=1e-6
    )
    assert alive.recovery[1] <= alive.recovery[0] <= alive.recovery[2]
    # a feature that never fires: nothing to patch or clamp, no collateral; undo = share of flips that
    # were not flips to begin with = 0 (NaN when the pairs hold no flip)
    dead = score_feature(a, last_sae, DEAD, (orig, para), (para, orig), attribution=attr, n_boot=50)
    assert dead.recovery[0] == 0.0 and dead.collateral_original[0] == 0.0 and dead.collateral_zero[0] == 0.0
    assert (dead.undo_original[0] == 0.0) if dead.n_flips else np.isnan(dead.undo_original[0])
    assert np.isnan(dead.cosine) and not dead.switches_on
    with pytest.raises(ValueError, match="attribution covers"):
        score_feature(a, last_sae, ALIVE, (orig.select([0, 1]), para.select([0, 1])), attribution=attr)


def test_feature_attribution_freezes_and_restores_requires_grad(
    gemma3_adapter: VLMAdapter,
    pairs: tuple[Batch, Batch],
    last_sae: LoadedSAE,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Model and SAE parameters: off during the backward passes, each back to its own flag after (also
    when a pass raises); the attribution is the same whatever the flags were."""
    orig, para = pairs
    modules = (gemma3_adapter.model, last_sae.sae)
    params = [p for m in modules for p in m.parameters()]
    before = [p.requires_grad for p in params]
    want = feature_attribution(gemma3_adapter, last_sae, orig, para, method="grad_x_delta")
    try:
        for i, p in enumerate(params):
            p.requires_grad_(i % 3 == 0)
        mixed = [p.requires_grad for p in params]
        got = feature_attribution(gemma3_adapter, last_sae, orig, para, method="grad_x_delta")
        assert [p.requires_grad for p in params] == mixed
        torch.testing.assert_close(got.features, want.features, atol=0, rtol=0)
        seen: list[bool] = []
        plain = gemma3_adapter.margins

        def spy(batch: Batch, grad: bool = False, image_features=None) -> Tensor:  # type: ignore[no-untyped-def]
            if grad:
                seen.append(any(p.requires_grad for p in params) or image_features is None)
                raise RuntimeError("planted failure in the backward pass")
            return plain(batch, grad, image_features)

        with monkeypatch.context() as mp, pytest.raises(RuntimeError, match="planted failure"):
            mp.setattr(gemma3_adapter, "margins", spy)
            feature_attribution(gemma3_adapter, last_sae, orig, para, steps=2)
        assert seen == [False] and [p.requires_grad for p in params] == mixed
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
