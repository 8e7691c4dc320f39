"""Models spread with a device map (hooks.devices): accelerate's AlignDevicesHook on every placed module, weights
offloaded until used, and every flipscope primitive giving the margins of the plain model. On this CPU-only
machine the map sends every module to "cpu" (accelerate then keeps the weights off the modules, on the meta
device, and loads them around each forward): what a GPU map does, without the GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analyses.cli import main
from analyses.data.resolve import model_options, resolve_model
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.organism.model import load_organism, organism_rows
from hooks.adapter import VLMAdapter
from hooks.devices import (
    device_map_of,
    dispatch,
    execution_devices,
    input_device,
    parse_max_memory,
    rank_max_memory,
)
from hooks.sites import mlp_out, resid_post
from interp import (
    PatchingConfig,
    ResumeUnsupported,
    attribution_patching,
    cache_activations,
    clamp_features,
    feature_attribution,
    feature_patch,
    load_sae,
    logit_lens,
    patching_sweep,
)
from tests.conftest import QUESTIONS, make_adapter, random_images
from tests.test_sae import write_gemma_scope

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 2**30


def test_parse_max_memory() -> None:
    assert parse_max_memory("0=70GiB,1=70GiB,cpu=200MB") == {0: 70 * GiB, 1: 70 * GiB, "cpu": 200 * 10**6}
    assert parse_max_memory({"cpu": 1024}) == {"cpu": 1024}
    assert parse_max_memory(None) is None and parse_max_memory("") is None
    for bad in ("gpu0=1GiB", "0=", "0=lots"):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_max_memory(bad)


def test_rank_max_memory_gives_each_process_its_own_gpus() -> None:
    given = {g: 70 * GiB for g in range(8)} | {"cpu": 100 * GiB}
    assert rank_max_memory(given, 1, 4, 8) == {2: 70 * GiB, 3: 70 * GiB, "cpu": 100 * GiB}
    assert rank_max_memory(given, 0, 8, 8) == {0: 70 * GiB, "cpu": 100 * GiB}
    assert rank_max_memory(given, 0, 1, 8) == given  # one process: as given
    assert rank_max_memory(None, 1, 2, 0) is None  # no GPUs: nothing to split
    with pytest.raises(ValueError, match="at least one GPU per process"):
        rank_max_memory(given, 0, 16, 8)


def spread(adapter: VLMAdapter, offload_dir: Path) -> VLMAdapter:
    """``adapter``'s model placed unit by unit (each text layer one unit, as accelerate places them) through
    accelerate's hooks: the first unit (the vision embeddings) and the odd text layers offloaded to disk
    (their weights on the meta device until a forward loads them), the rest on "cpu"."""
    model, layers = adapter.model, adapter.spec.text_layers
    above = {".".join(layers.split(".")[:k]) for k in range(1, len(layers.split(".")) + 1)}
    placed: dict[str, str] = {}
    for name, module in model.named_modules():
        if [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            parts = name.split(".")  # the unit: the shortest prefix that is not above the text layers
            unit = next(u for k in range(1, len(parts) + 1) if (u := ".".join(parts[:k])) not in above)
            odd = unit.startswith(layers + ".") and int(unit.rsplit(".", 1)[1]) % 2 == 1
            placed.setdefault(unit, "disk" if odd or not placed else "cpu")
    dispatch(model, placed, offload_dir=str(offload_dir), force_hooks=True)
    assert len(placed) > adapter.n_layers and device_map_of(model) == placed
    assert next(model.parameters()).device.type == "meta"  # weights live off the modules until used
    assert adapter.text_layer(1).mlp.down_proj.weight.device.type == "meta"
    assert all(hasattr(m, "_hf_hook") for m in model.get_submodule(layers).children())
    return adapter


@pytest.fixture(scope="module", params=["gemma3", "llava"])
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[VLMAdapter, VLMAdapter]:
    return make_adapter(request.param), spread(make_adapter(request.param), tmp_path_factory.mktemp("off"))


def test_input_device_of_offloaded_embeddings() -> None:
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(4, 2, device="meta")
    model.get_input_embeddings = lambda: model.emb  # type: ignore[assignment,method-assign]
    for where, device in (("disk", "cpu"), (1, "cuda:1"), ("cpu", "cpu")):
        model.hf_device_map = {"emb": where}  # type: ignore[assignment]
        assert input_device(model) == torch.device(device)
    model.hf_device_map = {"": 0}  # type: ignore[assignment]
    assert input_device(model) == torch.device("cuda", 0)
    model.emb = torch.nn.Embedding(4, 2)
    assert input_device(model) == torch.device("cpu")


def test_spread_model_margins_hooks_cache_and_lens(pair: tuple[VLMAdapter, VLMAdapter]) -> None:
    plain, placed = pair
    assert placed.device == torch.device("cpu") == input_device(placed.model)  # not "meta"
    imgs = random_images(3, plain.config.expected_image_size or 64, seed=5)
    batch = plain.prepare(imgs, QUESTIONS)
    assert torch.equal(placed.margins(batch), plain.margins(batch))
    sites = [resid_post(1), mlp_out(0)]
    a, b = (cache_activations(x, batch, sites, "all") for x in (plain, placed))
    for s in sites:
        assert torch.equal(a[s], b[s])
    assert logit_lens(placed, batch).to_frame().equals(logit_lens(plain, batch).to_frame())
    with placed.trace(batch):
        h = placed.sites[resid_post(1)].save()
    with plain.trace(batch):
        g = plain.sites[resid_post(1)].save()
    assert torch.equal(h, g)


@pytest.mark.parametrize("method", ["resume", "stack"])
def test_spread_model_patching_and_attribution(pair: tuple[VLMAdapter, VLMAdapter], method: str) -> None:
    plain, placed = pair
    imgs = random_images(3, plain.config.expected_image_size or 64, seed=6)
    clean, corrupt = plain.prepare(imgs, QUESTIONS), plain.prepare(imgs[::-1], QUESTIONS)
    cfg = PatchingConfig(positions=("image", "final"), method=method)
    a, b = patching_sweep(plain, clean, corrupt, cfg), patching_sweep(placed, clean, corrupt, cfg)
    assert a.to_frame().equals(b.to_frame())
    a, b = attribution_patching(plain, clean, corrupt, cfg), attribution_patching(placed, clean, corrupt, cfg)
    assert a.to_frame().equals(b.to_frame())


def test_spread_model_sae_attribution_patch_and_clamp(tmp_path: Path) -> None:
    plain, placed = make_adapter("gemma3"), spread(make_adapter("gemma3"), tmp_path / "off")
    sae = load_sae(write_gemma_scope(tmp_path, 1, plain.d_model))
    imgs = random_images(3, 64, seed=3)
    orig = plain.prepare(imgs, ["Is there cardiomegaly?"] * 3)
    para = plain.prepare(imgs, ["Is there an enlarged heart?"] * 3)
    fa, fb = (feature_attribution(x, sae, orig, para, steps=4) for x in (plain, placed))
    assert torch.equal(fa.features, fb.features) and torch.equal(fa.error, fb.error)
    pa, pb = (feature_patch(x, sae, orig, para, [1, 2]) for x in (plain, placed))
    assert torch.equal(pa.m_patched, pb.m_patched)
    assert torch.equal(clamp_features(plain, sae, orig, [1]), clamp_features(placed, sae, orig, [1]))


def test_resumed_sweep_refuses_a_model_on_several_devices_and_auto_falls_back() -> None:
    adapter = make_adapter("gemma3")
    imgs = random_images(2, 64, seed=7)
    clean, corrupt = adapter.prepare(imgs, QUESTIONS[:2]), adapter.prepare(imgs[::-1], QUESTIONS[:2])
    cfg = PatchingConfig(positions=("image", "final"))
    ref = patching_sweep(
        adapter, clean, corrupt, PatchingConfig(positions=("image", "final"), method="stack")
    )
    assert execution_devices(adapter.model) == {torch.device("cpu")}
    adapter.model.hf_device_map = {"model.language_model.layers.0": "cpu", "lm_head": "disk"}
    assert execution_devices(adapter.model) == {torch.device("cpu")}  # offloaded, one device computes
    adapter.model.hf_device_map = {"model": 0, "lm_head": "cpu"}
    assert execution_devices(adapter.model) == {torch.device("cuda", 0)}
    adapter.model.hf_device_map = {"model": 0, "lm_head": 1}  # what a two-GPU map records (weights stay here)
    try:
        assert execution_devices(adapter.model) == {torch.device("cuda", 0), torch.device("cuda", 1)}
        with pytest.raises(ResumeUnsupported, match=r"spread over 2 devices .* use method='stack'"):
            patching_sweep(
                adapter, clean, corrupt, PatchingConfig(positions=("image", "final"), method="resume")
            )
        auto = patching_sweep(adapter, clean, corrupt, cfg)
    finally:
        del adapter.model.hf_device_map
    assert auto.meta["method"] == "stack" and "spread over 2 devices" in auto.meta["resume_unsupported"]
    assert auto.to_frame().equals(ref.to_frame())


def test_evaluator_on_a_spread_organism_equals_the_plain_one(tmp_path: Path) -> None:
    world, rows = organism_rows("test")
    rows = [r for r in rows if r.image_id in sorted({r.image_id for r in rows})[:2]]
    cfg = EvalConfig(batch_size=32)
    plain = evaluate(load_organism(), rows, world.image_for, tmp_path / "plain", cfg, progress=False)
    placed = spread(load_organism(), tmp_path / "off")
    got = evaluate(placed, rows, world.image_for, tmp_path / "spread", cfg, progress=False)
    assert got.equals(plain)


def test_device_map_options_reach_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ns = type("Args", (), {"device_map": "auto", "max_memory": "cpu=8GiB", "dtype": None})()
    opts = model_options(ns)  # type: ignore[arg-type]
    assert opts == {"device_map": "auto", "max_memory": {"cpu": 8 * GiB}}
    adapter, _ = resolve_model("organism", **opts)  # a named model is placed after loading
    assert device_map_of(adapter.model) == {"": "cpu"}
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"": "cpu"}))
    ns.device_map, ns.max_memory = str(mapping), None
    assert model_options(ns) == {"device_map": {"": "cpu"}}  # type: ignore[arg-type]
    adapter, _ = resolve_model("organism/model", **model_options(ns))  # type: ignore[arg-type]
    assert adapter.device == torch.device("cpu")
    out = tmp_path / "run"
    args = ["eval", "--n-images", "1", "--n-boot", "5", "--quiet", "--conditions", "image", "--out", str(out)]
    assert main([*args, "--device-map", "auto", "--max-memory", "cpu=8GiB"]) == 0
    assert main([*args, "--max-memory", "cpu=8GiB"]) == 2
    assert "add --device-map auto" in capsys.readouterr().err
    assert main([*args, "--device-map", "everywhere"]) == 2
    assert "--device-map 'everywhere'" in capsys.readouterr().err
