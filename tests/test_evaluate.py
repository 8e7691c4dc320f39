"""The evaluator on a tiny random Gemma3 over a small SynthCXR world: conditions, swaps, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses.data.questions import vocabulary
from analyses.eval.evaluate import EvalConfig, evaluate, swap_partners
from analyses.eval.metrics import validate_predictions
from analyses.eval.predictions import read_predictions
from analyses.eval.summary import summarize
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.inputs import Removal
from hooks.tiny import build_word_tokenizer, tiny_gemma3


@pytest.fixture(scope="module")
def world() -> SynthCXRWorld:
    return SynthCXRWorld(SynthCXRConfig(n_patients=30, seed=3))


@pytest.fixture(scope="module")
def adapter() -> VLMAdapter:
    tok = build_word_tokenizer(vocabulary(), "gemma3")
    model, proc = tiny_gemma3(tok, seed=1)
    return VLMAdapter(model, proc, AdapterConfig(expected_image_size=64), name="tiny-eval")


@pytest.fixture(scope="module")
def rows(world: SynthCXRWorld) -> list:
    test = world.rows("test")
    keep = sorted({r.image_id for r in test})[:3]
    return [r for r in test if r.image_id in keep and r.finding in ("cardiomegaly", "pleural_effusion")]


@pytest.fixture(scope="module")
def full_run(
    adapter: VLMAdapter, rows: list, world: SynthCXRWorld, tmp_path_factory: pytest.TempPathFactory
) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("full")
    return evaluate(adapter, rows, world.image_for, out, EvalConfig(batch_size=16), progress=False)


def test_every_row_under_every_condition(full_run: pd.DataFrame, rows: list) -> None:
    counts = full_run.groupby("condition").size().to_dict()
    assert counts == {
        "image": len(rows),
        "removed": len(rows),
        "swap_random": len(rows),
        "swap_label": len(rows),
    }
    validate_predictions(full_run)
    assert not full_run.duplicated(["qid", "condition"]).any()


def test_margins_equal_direct_forward(
    full_run: pd.DataFrame, adapter: VLMAdapter, rows: list, world: SynthCXRWorld
) -> None:
    """Cached image features + batching give the same margins as one plain forward per row."""
    by = full_run.set_index(["qid", "condition"])["margin"]
    sample = rows[:: max(1, len(rows) // 6)]
    for r in sample:
        img = world.image(r.image_id)
        direct = adapter.margins(adapter.prepare([img], [r.question]))[0].item()
        assert by[(r.qid, "image")] == pytest.approx(direct, abs=1e-5)
        gray = Removal("gray").apply(img)
        direct_rm = adapter.margins(adapter.prepare([gray], [r.question]))[0].item()
        assert by[(r.qid, "removed")] == pytest.approx(direct_rm, abs=1e-5)
        swap_id = full_run.set_index(["qid", "condition"]).loc[(r.qid, "swap_label"), "swap_image_id"]
        direct_sw = adapter.margins(adapter.prepare([world.image(swap_id)], [r.question]))[0].item()
        assert by[(r.qid, "swap_label")] == pytest.approx(direct_sw, abs=1e-5)


def test_swap_partners_are_other_patients_and_label_controlled(rows: list, world: SynthCXRWorld) -> None:
    all_test = world.rows("test")
    partners = swap_partners(all_test, seed=0)
    for r in all_test[:200]:
        for kind in ("swap_random", "swap_label"):
            other = partners[(r.qid, kind)]
            assert other is not None and world.case(other).patient_id != world.case(r.image_id).patient_id
        lab = world.case(r.image_id).findings[r.finding]
        assert world.case(partners[(r.qid, "swap_label")]).findings[r.finding] != lab
    assert partners == swap_partners(all_test, seed=0)  # seeded
    assert partners != swap_partners(all_test, seed=1)


def test_resume_after_kill_gives_same_results(
    adapter: VLMAdapter, rows: list, world: SynthCXRWorld, full_run: pd.DataFrame, tmp_path: Path
) -> None:
    cfg = EvalConfig(batch_size=16)
    part = evaluate(adapter, rows, world.image_for, tmp_path, cfg, progress=False, max_batches=3)
    assert 0 < len(part) < len(full_run)
    # a kill in the middle of a write leaves a torn last line
    with (tmp_path / "predictions.jsonl").open("a") as f:
        f.write('{"qid": "torn", "cond')
    import analyses.eval.evaluate as ev

    calls = {"n": 0, "rows": 0}
    orig = ev.score

    def counting(adapter, items, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        calls["rows"] += len(items)
        return orig(adapter, items, *a, **k)

    ev.score = counting  # type: ignore[assignment]
    try:
        resumed = evaluate(adapter, rows, world.image_for, tmp_path, cfg, progress=False)
    finally:
        ev.score = orig  # type: ignore[assignment]
    n_left = len(full_run) - len(part)
    assert calls["n"] == -(-n_left // 16)  # exactly the unfinished rows are computed, in full batches
    assert calls["rows"] == n_left
    assert not resumed.duplicated(["qid", "condition"]).any()
    a = resumed.set_index(["qid", "condition"]).sort_index()["margin"]
    b = full_run.set_index(["qid", "condition"]).sort_index()["margin"]
    assert a.index.equals(b.index)
    torch.testing.assert_close(torch.tensor(a.to_numpy()), torch.tensor(b.to_numpy()), atol=1e-5, rtol=0)
    # resuming a finished run computes nothing
    again = evaluate(adapter, rows, world.image_for, tmp_path, cfg, progress=False)
    assert len(again) == len(resumed)


def test_run_records_its_settings_and_refuses_a_mismatch(
    adapter: VLMAdapter, rows: list, world: SynthCXRWorld, tmp_path: Path
) -> None:
    evaluate(adapter, rows[:4], world.image_for, tmp_path, EvalConfig(conditions=("image",)), progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    for key in (
        "model",
        "revision",
        "dataset_hash",
        "prompt_template",
        "removal",
        "eval_config",
        "answer_ids",
    ):
        assert key in meta
    assert meta["removal"] == "removed:gray" and meta["eval_config"]["seed"] == 0
    with pytest.raises(ValueError, match="different"):
        evaluate(adapter, rows[:4], world.image_for, tmp_path, EvalConfig(removal="white"), progress=False)


def test_unreadable_image_is_reported_and_skipped(
    adapter: VLMAdapter, rows: list, world: SynthCXRWorld, tmp_path: Path
) -> None:
    bad = rows[0].image_id

    def source(x):  # type: ignore[no-untyped-def]
        image_id = x if isinstance(x, str) else x.image_id
        if image_id == bad:
            raise FileNotFoundError(f"image file not found: {image_id}.png")
        return world.image(image_id)

    df = evaluate(
        adapter, rows, source, tmp_path, EvalConfig(conditions=("image", "removed")), progress=False
    )
    skipped = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    bad_rows = {r.qid for r in rows if r.image_id == bad}
    assert {(s["row"], s["condition"]) for s in skipped} == {
        (q, c) for q in bad_rows for c in ("image", "removed")
    }
    assert {s["reason"] for s in skipped} == {"unreadable image"} and all(bad in s["detail"] for s in skipped)
    assert bad not in set(df["image_id"]) and len(df) == 2 * sum(r.image_id != bad for r in rows)


def test_summary_runs_on_evaluator_output(full_run: pd.DataFrame) -> None:
    s = summarize(full_run, n_boot=20, seed=0)
    assert (
        s["quadrant_summary"]["count"].sum()
        == (full_run.query("condition == 'image'")["family"] == "original").sum()
    )
    assert 0 <= s["metrics"].loc["flip_rate", "value"] <= 1


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="unknown conditions"):
        EvalConfig(conditions=("image", "blur"))
    with pytest.raises(ValueError, match="removal"):
        EvalConfig(removal="black")
    assert EvalConfig(conditions=("removed",)).conditions == ("image", "removed")


def test_read_predictions_handles_missing_file(tmp_path: Path) -> None:
    assert read_predictions(tmp_path / "none.jsonl").empty


def test_prefix_and_full_paths_agree_and_are_recorded(
    adapter: VLMAdapter, rows: list, world: SynthCXRWorld, full_run: pd.DataFrame, tmp_path: Path
) -> None:
    """The default run took the prefix path (image first); a full-path run gives the same margins, records
    its path, and a resume on the other path is refused like any other changed setting."""
    out = tmp_path / "full"
    full = evaluate(
        adapter, rows, world.image_for, out, EvalConfig(batch_size=16, forward="full"), progress=False
    )
    assert json.loads((out / "meta.json").read_text())["forward_path"] == "full"
    a = full.set_index(["qid", "condition"]).sort_index()["margin"]
    b = full_run.set_index(["qid", "condition"]).sort_index()["margin"]
    torch.testing.assert_close(torch.tensor(a.to_numpy()), torch.tensor(b.to_numpy()), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="forward"):
        evaluate(
            adapter, rows, world.image_for, out, EvalConfig(batch_size=16, forward="prefix"), progress=False
        )


def test_prefix_path_needs_the_image_first(
    adapter: VLMAdapter, rows: list, world: SynthCXRWorld, tmp_path: Path
) -> None:
    after = VLMAdapter(
        adapter.model, adapter.processor, AdapterConfig(expected_image_size=64, image_position="after")
    )
    with pytest.raises(ValueError, match="needs the image before the question"):
        evaluate(
            after, rows[:4], world.image_for, tmp_path / "p", EvalConfig(forward="prefix"), progress=False
        )
    df = evaluate(
        after, rows[:4], world.image_for, tmp_path / "a", EvalConfig(conditions=("image",)), progress=False
    )
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["forward_path"] == "full"
    img = world.image(rows[0].image_id)
    direct = after.margins(after.prepare([img], [rows[0].question]))[0].item()
    assert df.set_index(["qid", "condition"]).loc[(rows[0].qid, "image"), "margin"] == pytest.approx(
        direct, abs=1e-5
    )


def test_rows_without_a_swap_partner_are_listed(
    adapter: VLMAdapter, world: SynthCXRWorld, tmp_path: Path
) -> None:
    """One image alone has no other patient to swap with: its swap predictions are missing *and* listed."""
    one = [
        r for r in world.rows("test") if r.image_id == sorted({x.image_id for x in world.rows("test")})[0]
    ][:5]
    df = evaluate(adapter, one, world.image_for, tmp_path, EvalConfig(batch_size=8), progress=False)
    assert set(df["condition"]) == {"image", "removed"}
    skipped = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert sorted((s["row"], s["condition"]) for s in skipped) == sorted(
        (r.qid, c) for r in one for c in ("swap_random", "swap_label")
    )
    assert all(s["reason"] == "no swap partner" for s in skipped)
