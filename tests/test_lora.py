"""Targeted LoRA on a tiny Gemma3 over the SynthCXR vocabulary: targets, training, save/load, compare, CLI."""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.data.questions import vocabulary
from analyses.data.schema import OPERATOR, ORIGINAL, QuestionRow
from analyses.eval.evaluate import EvalConfig
from analyses.eval.quadrants import QUADRANTS, QuadrantRule
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.inputs import Removal
from hooks.sites import resid_post
from hooks.tiny import build_word_tokenizer, tiny_gemma3
from interp.scores import LayerScores
from lora_targeted.cli import add_lora_parser
from lora_targeted.compare import COLUMNS, Comparison, compare
from lora_targeted.targets import (
    all_layers,
    control_layers,
    lora_config,
    lora_module_names,
    select_layers,
    target_regex,
    trainable_fraction,
)
from lora_targeted.train import (
    CONFIG_FILE,
    ClusterImages,
    LoraTrainConfig,
    TrainResult,
    build_clusters,
    cluster_losses,
    load_lora,
    sample_clusters,
    train_lora,
    wrap_lora,
)

LAYERS = [1, 2]
TEXT = "model.language_model.layers"


def _tiny(seed: int = 1) -> VLMAdapter:
    tok = build_word_tokenizer(vocabulary(), "gemma3")
    model, proc = tiny_gemma3(tok, seed=seed)
    with torch.no_grad():  # sharpen the logits (Gemma RMSNorm scales by 1 + w): paraphrases now disagree
        model.model.language_model.norm.weight.fill_(9.0)
    return VLMAdapter(model, proc, AdapterConfig(expected_image_size=64), name="tiny-lora")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world() -> SynthCXRWorld:
    return SynthCXRWorld(SynthCXRConfig(n_patients=30, seed=3))


@pytest.fixture(scope="module")
def base() -> VLMAdapter:
    return _tiny()


@pytest.fixture(scope="module")
def rows(world: SynthCXRWorld) -> list[QuestionRow]:
    return world.rows()


@pytest.fixture(scope="module")
def probe(base: VLMAdapter, world: SynthCXRWorld, rows: list[QuestionRow]):  # type: ignore[no-untyped-def]
    """A fixed batch: image rows, a gray-removed row and a no-image row."""
    img = world.image(rows[0].image_id)
    qs = [r.question for r in rows[:4]]
    return base.prepare([img, img, Removal("gray").apply(img), None], qs)


@pytest.fixture(scope="module")
def trained(
    base: VLMAdapter, world: SynthCXRWorld, rows: list[QuestionRow], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, torch.Tensor, Path]:
    """30 steps, consistency weight 1, lr 1e-3; also returns the base margins on a probe before training."""
    img = world.image(rows[0].image_id)
    before = base.margins(base.prepare([img] * 3, [r.question for r in rows[:3]]))
    out = tmp_path_factory.mktemp("lora") / "targeted"
    cfg = LoraTrainConfig(steps=30, lr=1e-3, consistency_weight=1.0, batch_size=8, seed=0)
    return train_lora(base, rows, world.image_for, LAYERS, cfg, out_dir=out, progress=False), before, out


# ----------------------------------------------------------------------------- targets
def test_select_layers_top_k_explicit_and_errors() -> None:
    scores = LayerScores(
        layers=[0, 1, 2, 3], scores=[0.1, 0.9, float("nan"), 0.5], method="activation_patching"
    )
    assert select_layers(scores, k=2, n_layers=4) == [1, 3]
    assert select_layers(layers=[3, -4], n_layers=4) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(layers=[4], n_layers=4)
    with pytest.raises(ValueError, match="larger than the model's 4 text layers"):
        select_layers(scores, k=5, n_layers=4)
    with pytest.raises(ValueError, match="measure only 3 layers"):
        select_layers(scores, k=4, n_layers=4)
    with pytest.raises(ValueError, match="either scores"):
        select_layers(scores, k=1, layers=[1])
    with pytest.raises(ValueError, match="needs k"):
        select_layers(scores)
    with pytest.raises(ValueError, match="same layer twice"):
        select_layers(layers=[1, -3], n_layers=4)


def test_control_layers_match_the_budget_and_avoid_flagged() -> None:
    # without scores: the unflagged layers farthest from the flagged ones
    assert control_layers([3, 4], 8) == [0, 7]
    assert control_layers([0, 1], 8) == [6, 7]
    assert control_layers([2], 4) == [0]  # |0 - 2| = 2 beats |1 - 2| = |3 - 2| = 1
    scores = LayerScores(layers=list(range(6)), scores=[0.5, 0.0, 0.9, 0.8, 0.1, 0.2], method="patching")
    flagged = select_layers(scores, k=2, n_layers=6)
    assert flagged == [2, 3] and control_layers(flagged, 6, scores) == [1, 4]
    with pytest.raises(ValueError, match="leave only 1 of 3"):
        control_layers([0, 1], 3)
    partial = LayerScores(layers=[0, 1], scores=[0.1, 0.2], method="patching")
    with pytest.raises(ValueError, match="do not measure unflagged layers"):
        control_layers([0], 3, partial)


def test_lora_config_regex_and_bad_inputs(base: VLMAdapter) -> None:
    cfg = lora_config(base, [2, 1])
    assert cfg.target_modules == target_regex(TEXT, [1, 2])
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.layers_to_transform is None
    with pytest.raises(ValueError, match=r"layer 4 is out of range.*0\.\.3"):
        lora_config(base, [4])
    with pytest.raises(ValueError, match="no module for"):
        lora_config(base, [1], modules=("q_proj", "out_proj"))
    with pytest.raises(ValueError, match="rank"):
        lora_config(base, [1], r=0)
    with pytest.raises(ValueError, match="steps and batch_size"):
        LoraTrainConfig(steps=0)
    with pytest.raises(ValueError, match="removal"):
        LoraTrainConfig(removal="black")
    assert all_layers(base) == [0, 1, 2, 3]


def test_only_chosen_text_layers_get_lora(base: VLMAdapter) -> None:
    peft_model, lora = wrap_lora(base, LAYERS)
    names = lora_module_names(peft_model.base_model.model)
    blocks = {
        "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mlp": ("gate_proj", "up_proj", "down_proj"),
    }
    expected = {f"{TEXT}.{layer}.{b}.{m}" for layer in LAYERS for b, mods in blocks.items() for m in mods}
    assert set(names) == expected
    assert not any("vision_tower" in n for n, _ in peft_model.named_modules() if "lora_" in n)
    assert not any(hasattr(m, "lora_A") for n, m in base.model.named_modules()), "base model was modified"
    # the evaluation adapter keeps the original class and module paths: sites resolve unchanged
    assert type(lora.model).__name__ == "Gemma3ForConditionalGeneration"
    assert lora.resolve(resid_post(2)) == base.resolve(resid_post(2))
    assert lora.module(resid_post(2)) is peft_model.get_base_model().get_submodule(f"{TEXT}.2")


def test_sites_and_nnsight_on_trained_lora(  # type: ignore[no-untyped-def]
    trained: tuple[TrainResult, torch.Tensor, Path], probe
) -> None:
    lora = trained[0].adapter
    batch = probe.select([0, 3])
    with lora.trace(batch):
        h = lora.sites[resid_post(2)].save()
        m = lora.sites.margin().save()
    torch.testing.assert_close(m.detach(), lora.margins(batch), rtol=0, atol=1e-5)
    assert h.shape[-1] == lora.d_model


def test_layers_to_transform_pitfall_is_real(base: VLMAdapter) -> None:
    """Why targets.py builds a regex: peft's layers_to_transform also wraps vision layer 1."""
    from peft import LoraConfig, get_peft_model

    naive = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    from lora_targeted.train import peft_quietly

    with peft_quietly():  # peft's own deprecated-attribute read, filtered as the project does
        names = lora_module_names(get_peft_model(copy.deepcopy(base.model), naive))
    assert any("vision_tower" in n for n in names)


def test_trainable_fraction_counts_lora_params(base: VLMAdapter) -> None:
    peft_model, _ = wrap_lora(base, LAYERS)
    trainable, total, frac = trainable_fraction(peft_model)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert trainable == lora_params > 0
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    assert frac == pytest.approx(trainable / total)
    all_model, _ = wrap_lora(base, all_layers(base))
    assert trainable_fraction(all_model)[0] == 2 * trainable  # 4 layers vs 2, same shapes


def test_lora_at_init_gives_base_margins(base: VLMAdapter, probe) -> None:  # type: ignore[no-untyped-def]
    _, lora = wrap_lora(base, LAYERS)
    torch.testing.assert_close(lora.margins(probe), base.margins(probe), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- training
def test_clusters_use_train_split_and_keep_operators_out(rows: list[QuestionRow]) -> None:
    clusters = build_clusters(rows, "train")
    assert len(clusters) == sum(r.family == ORIGINAL and r.split == "train" for r in rows)
    assert all(r.split == "train" for c in clusters for r in (c.original, *c.paraphrases, *c.operators))
    assert all(r.family != OPERATOR for c in clusters for r in c.paraphrases)
    assert all(c.operators for c in clusters)
    batch = sample_clusters(clusters, np.random.default_rng(0), LoraTrainConfig(batch_size=4))
    assert len(batch) == 4 and all(len(c.paraphrases) == 3 and len(c.operators) == 1 for c in batch)
    with pytest.raises(ValueError, match="no rows of split 'nope'"):
        build_clusters(rows, "nope")


def test_training_lowers_consistency_loss(
    trained: tuple[TrainResult, torch.Tensor, Path],
    base: VLMAdapter,
    world: SynthCXRWorld,
    rows: list[QuestionRow],
) -> None:
    res, _, _ = trained
    assert len(res.log) == 30 and {"task", "consistency", "reliance", "loss"} <= set(res.log[0])
    log = res.log_frame
    assert log["consistency"].tail(5).mean() < log["consistency"].head(5).mean()
    # on a fixed batch of train clusters, before (base) vs after (trained), both in eval mode
    cfg = res.config
    fixed = sample_clusters(build_clusters(rows), np.random.default_rng(123), cfg)
    with torch.no_grad():
        before = cluster_losses(base, fixed, ClusterImages(base, world.image_for, "gray"), cfg)
        after = cluster_losses(res.adapter, fixed, ClusterImages(res.adapter, world.image_for, "gray"), cfg)
    assert before["consistency"] > 0.02
    assert after["consistency"] < 0.5 * before["consistency"]
    assert after["task"] < before["task"]


def test_objective_terms_by_hand(base: VLMAdapter, world: SynthCXRWorld, rows: list[QuestionRow]) -> None:
    """Each weight scales its own term; removed rows are the originals without the image, pushed to 50/50."""
    clusters = sample_clusters(build_clusters(rows), np.random.default_rng(5), LoraTrainConfig(batch_size=3))
    images = ClusterImages(base, world.image_for, "gray")
    full = LoraTrainConfig(
        task_weight=0.5, consistency_weight=2.0, image_reliance_weight=0.3, removed_weight=4.0
    )
    with torch.no_grad():
        parts = cluster_losses(base, clusters, images, full)
        only_task = cluster_losses(base, clusters, images, LoraTrainConfig(consistency_weight=0.0))
        b = base.prepare(
            [Removal("gray").apply(world.image(c.image_id)) for c in clusters],
            [c.original.question for c in clusters],
        )
        logp = torch.log_softmax(base.logits(b)[:, -1].float(), -1)
    yes, no = base.answer_ids.yes_ids[0], base.answer_ids.no_ids[0]
    want_removed = float(-0.5 * (logp[:, yes] + logp[:, no]).mean())
    assert float(parts["removed"]) == pytest.approx(want_removed, rel=1e-4)
    want = 0.5 * parts["task"] + 2.0 * parts["consistency"] + 0.3 * parts["reliance"] + 4.0 * parts["removed"]
    assert float(parts["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(only_task["loss"]) == pytest.approx(float(parts["task"]), rel=1e-5)
    assert float(only_task["removed"]) == 0.0  # no removed rows without a reliance or removed weight
    with pytest.raises(ValueError, match="nothing to train"):
        LoraTrainConfig(task_weight=0.0, consistency_weight=0.0)
    paper = LoraTrainConfig.paper(steps=10)
    assert (paper.r, paper.alpha, paper.dropout, paper.lr, paper.steps) == (16, 32, 0.05, 2e-4, 10)
    assert (paper.task_weight, paper.consistency_weight, paper.removed_weight) == (1.0, 1.0, 0.0)


def test_training_is_seeded(base: VLMAdapter, world: SynthCXRWorld, rows: list[QuestionRow]) -> None:
    cfg = LoraTrainConfig(steps=3, batch_size=2, lr=1e-3, image_reliance_weight=0.5, removal="none", seed=7)
    a = train_lora(base, rows, world.image_for, [3], cfg, progress=False)
    b = train_lora(base, rows, world.image_for, [3], cfg, progress=False)
    assert a.log == b.log and a.log[0]["reliance"] > 0


def test_training_leaves_base_untouched(
    trained: tuple[TrainResult, torch.Tensor, Path],
    base: VLMAdapter,
    world: SynthCXRWorld,
    rows: list[QuestionRow],
) -> None:
    _, before, _ = trained
    img = world.image(rows[0].image_id)
    torch.testing.assert_close(base.margins(base.prepare([img] * 3, [r.question for r in rows[:3]])), before)


def test_saved_adapter_round_trips_through_peft_alone(
    trained: tuple[TrainResult, torch.Tensor, Path], base: VLMAdapter, probe
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    res, _, out = trained
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    rec = json.loads((out / CONFIG_FILE).read_text())
    assert rec["layers"] == LAYERS and rec["trainable"] == res.trainable and rec["config"]["steps"] == 30
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 30
    fresh = _tiny()  # an independent copy of the base, as a user would load it
    from lora_targeted.train import peft_quietly

    with peft_quietly():
        peft_model = PeftModel.from_pretrained(fresh.model, str(out)).eval()
    assert set(lora_module_names(peft_model)) == set(lora_module_names(res.peft_model))
    reloaded = VLMAdapter(peft_model.get_base_model(), fresh.processor, fresh.config)
    trained_m = res.adapter.margins(probe)
    assert not torch.allclose(trained_m, base.margins(probe), atol=1e-3), "training changed nothing"
    torch.testing.assert_close(reloaded.margins(probe), trained_m, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_lora(base, out).margins(probe), trained_m, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def comparison(
    base: VLMAdapter,
    trained: tuple[TrainResult, torch.Tensor, Path],
    world: SynthCXRWorld,
    tmp_path_factory: pytest.TempPathFactory,
) -> Comparison:
    test = world.rows("test")
    keep = sorted({r.image_id for r in test})[:4]
    rows = [r for r in test if r.image_id in keep]
    out = tmp_path_factory.mktemp("compare")
    adapters = {"base": base, "targeted": trained[0].adapter}
    return compare(
        adapters, rows, world.image_for, out, EvalConfig(batch_size=64), QuadrantRule(), "register"
    )


def test_compare_table_and_migration(comparison: Comparison) -> None:
    t = comparison.table
    assert list(t.columns) == list(COLUMNS) and list(t.index) == ["base", "targeted"]
    assert t.loc["base", "into_dangerous"] == 0
    for name in t.index:
        q = comparison.quadrants[name]
        assert q is not None and int(t.loc[name, list(QUADRANTS)].sum()) == t.loc[name, "n_samples"] == len(q)
        for col in ("flip_rate", "text_only_agreement", "swap_sensitivity_label", "accuracy"):
            assert 0.0 <= t.loc[name, col] <= 1.0
    qb, qt = comparison.quadrants["base"], comparison.quadrants["targeted"]
    assert qb is not None and qt is not None
    m = qb.merge(qt, on=["qid", "image_id"], suffixes=("_b", "_t"))
    moved = int(((m["quadrant_t"] == "Dangerous") & (m["quadrant_b"] != "Dangerous")).sum())
    assert t.loc["targeted", "into_dangerous"] == moved
    mig = comparison.migrations["targeted"]
    assert int(mig.to_numpy().sum()) == len(m)
    assert int(mig["Dangerous"].sum()) == int(t.loc["targeted", "Dangerous"])
    runs = comparison.runs  # the same runs with CIs (analyses.eval.compare): same point values
    assert runs is not None and list(runs.table.index) == list(t.index)
    for col in ("flip_rate", "text_only_agreement", "swap_sensitivity_label", "accuracy", "into_dangerous"):
        assert runs.table[col].tolist() == pytest.approx(t[col].tolist())
    assert (runs.table["flip_rate_low"] <= t["flip_rate"]).all() and (
        t["flip_rate"] <= runs.table["flip_rate_high"]
    ).all()


def test_compare_outputs(comparison: Comparison, base: VLMAdapter, world: SynthCXRWorld) -> None:
    md = comparison.to_markdown()
    assert md.startswith("| adapter |") and "flip_rate[register]" in md and "| targeted |" in md
    fig = comparison.figure()
    assert len(fig.data) == 2 * len(comparison.table)
    with pytest.raises(ValueError, match="not a paraphrase family"):
        compare({"base": base}, [], world.image_for, ".", family="nope")
    with pytest.raises(ValueError, match="base 'x' is not one of"):
        compare({"base": base}, [], world.image_for, ".", base="x")


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flipscope")
    add_lora_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_train_and_compare_end_to_end(
    base: VLMAdapter, world: SynthCXRWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    base.model.save_pretrained(model_dir)  # type: ignore[operator]
    base.processor.save_pretrained(model_dir)
    record = {"config": {"world": asdict(world.config), "findings": ["cardiomegaly"]}}
    (model_dir / "training.json").write_text(json.dumps(record))
    p = _parser()
    common = ["--model", str(model_dir), "--n-images", "3", "--quiet"]
    adapter_dir = tmp_path / "lora"
    train = ["--layers", "1,2", "--steps", "2", "--batch-size", "2", "--out", str(adapter_dir)]
    args = p.parse_args(["lora", "train", *common, *train])
    assert args.func(args) == 0
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    out = tmp_path / "cmp"
    args = p.parse_args(
        ["lora", "compare", *common, "--adapter", f"targeted={adapter_dir}", "--out", str(out)]
    )
    assert args.func(args) == 0
    table = pd.read_csv(out / "comparison.csv", index_col=0)
    preds = pd.read_json(out / "targeted" / "predictions.jsonl", lines=True)
    assert set(preds["finding"]) == {"cardiomegaly"} and set(preds["split"]) == {"test"}
    assert list(table.index) == ["base", "targeted"] and (out / "comparison.html").is_file()
    assert list(pd.read_csv(out / "comparison_ci.csv", index_col=0).index) == ["base", "targeted"]
    assert "| targeted |" in capsys.readouterr().out
    bad = p.parse_args(["lora", "train", *common, "--layers", "9", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        bad.func(bad)
    both = p.parse_args(["lora", "train", *common, "--layers", "1", "--all-layers"])
    with pytest.raises(ValueError, match="one way"):
        both.func(both)
