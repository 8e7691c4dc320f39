"""The `flipscope` CLI on the shipped organism: eval writes predictions, summary and report; errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyses.cli import main

pytestmark = pytest.mark.slow


def test_eval_writes_predictions_summary_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [
        "eval",
        "--n-images",
        "2",
        "--n-boot",
        "10",
        "--out",
        str(out),
        "--quiet",
        "--reliance",
        "margin_shift",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "flip rate by family" in printed and "register" in printed
    lines = (out / "predictions.jsonl").read_text().splitlines()
    from analyses.data.schema import first_images
    from analyses.eval.evaluate import EvalConfig, plan
    from analyses.organism.model import organism_rows

    planned = plan(first_images(organism_rows("test")[1], 2), EvalConfig(), frozenset())
    assert len(lines) == len(planned)  # every (row, condition), swaps only where a partner exists
    summary = json.loads((out / "summary.json").read_text())
    assert summary["choices"]["rule"]["reliance"] == "margin_shift"
    assert summary["run"]["removal"] == "removed:gray"
    assert "<html>" in (out / "report.html").read_text()[:200]
    meta = json.loads((out / "meta.json").read_text())  # the organism has no chat template: plain
    assert meta["prompt_mode"] == "plain" and meta["prompt_example"]["tokens"][:2] == [
        "<bos>",
        "<start_of_image>",
    ]
    assert meta["answer_ids"]["yes_tokens"] == ["yes"]
    # a second run resumes: nothing recomputed, nothing duplicated
    assert main(argv) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(lines)


def test_bad_model_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_prompt_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--out", str(tmp_path / "o"), "--n-images", "1", "--quiet", "--n-boot", "10"]
    assert main([*argv, "--prompt", "chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--prompt", "turns"])
    assert main([*argv, "--prompt", "plain", "--image-position", "after"]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["image_position"] == "after" and meta["prompt_example"]["text"].endswith("<start_of_image>")


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["organism_present"] is True


def test_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--n-images", "2", "--out", str(tmp_path / "demo")]) == 0
    assert "margin_shift" in capsys.readouterr().out
    assert (tmp_path / "demo" / "report.html").is_file()


def test_cache_lists_what_it_left_out_counts_its_bar_and_says_how_to_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld

    SynthCXRWorld(SynthCXRConfig(n_patients=10, seed=3)).save(tmp_path / "world")
    data = tmp_path / "world" / "questions.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")  # line 2 is malformed
    out = tmp_path / "cache"
    argv = ["cache", "--data", str(data), "--split", "train", "--n-images", "1", "--sites", "resid_post(1)"]
    assert main([*argv, "--batch-size", "4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["row"], s["line"], s["reason"]) for s in skipped] == [("line 2", 2, "malformed line")]
    assert f"1 rows left out (row, line, reason): {out / 'skipped.jsonl'}" in captured.out
    assert f"ActivationCache.load({str(out)!r})" in captured.out
    bars = re.findall(r"caching activations: 100%.*?\| (\d+)/(\d+) ", captured.err)
    assert bars and bars[-1][0] == bars[-1][1]  # the bar had a total, and reached it
