"""The `flipscope` CLI on the shipped organism: eval writes predictions, summary and report; errors are clear."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from analyses.cli import main

ROOT = Path(__file__).resolve().parents[1]

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
    info = json.loads(capsys.readouterr().out)
    assert info["organism_present"] is True
    versions = info["versions"]
    for name in ("torch", "transformers", "nnsight", "peft", "sae-lens", "accelerate", "safetensors", "plotly"):
        assert versions[name][0].isdigit(), (name, versions[name])
    assert info["devices"][0].startswith("cpu (") and len(info["devices"]) == 1 + torch.cuda.device_count()
    training = json.loads((ROOT / "organism" / "model" / "training.json").read_text())
    assert info["organism_version"].startswith(f"v{training['organism_version']} (planted")


def test_eval_help_is_grouped_with_defaults_and_help_on_every_option() -> None:
    from analyses.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    ev = sub.choices["eval"]
    groups = {g.title: [a.dest for a in g._group_actions] for g in ev._action_groups}
    assert {"data", "model", "run", "output"} <= set(groups)
    assert "data" in groups and {"data", "split", "n_images", "image_root", "removal"} <= set(groups["data"])
    assert {"model", "dtype", "device_map", "prompt"} <= set(groups["model"])
    assert {"batch_size", "forward"} <= set(groups["run"]) and {"out", "reliance", "quiet"} <= set(groups["output"])
    no_help = [a.dest for a in ev._actions if a.option_strings and a.dest != "help" and not (a.help or "").strip()]
    assert no_help == []
    text = " ".join(ev.format_help().split())  # help lines are wrapped
    assert "(default: 64)" in text and "(default: margin_shift)" in text and "(default: runs/eval)" in text


def test_demo_runs_the_audit_to_localization(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--n-images", "16", "--out", str(tmp_path / "demo")]) == 0
    first = capsys.readouterr().out
    assert "margin moves by >= 1 logit without the image on every question of the sample" in first
    assert "already done" not in first and "flagged: attn_out(3)@final" in first
    report = (tmp_path / "demo" / "audit.html").read_text()
    assert "A question relies on the image if its margin moves by at least 1 logit" in report
    assert "id='localization'" in report and "id='audit-flagged'" in report
    n = sum(1 for _ in (tmp_path / "demo" / "eval" / "predictions.jsonl").open())
    assert main(["demo", "--n-images", "16", "--out", str(tmp_path / "demo")]) == 0  # finished: says so
    again = capsys.readouterr().out
    assert f"{n}/{n} predictions already done in {tmp_path / 'demo' / 'eval'}; nothing to compute" in again
    assert "audit: localize already done" in again


def test_organism_card_writes_to_out_and_prints_each_planted_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import analyses.organism.card as card

    shipped = {f: (ROOT / "organism" / f).read_bytes() for f in ("MODEL_CARD.md", "model_card.json")}
    measured = json.loads(shipped["model_card.json"])
    seen: list[tuple[Path, Path, int]] = []

    def fake_measure(model_dir: Path, runs: Path, n_images: int = 0) -> dict:
        seen.append((Path(model_dir), Path(runs), n_images))
        return measured

    monkeypatch.setattr(card, "measure", fake_measure)
    out = tmp_path / "card"
    assert main(["organism", "card", "--n-images", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert seen == [(Path("organism/model"), out, 6)]
    assert "PASS     register shortcut: top sites" in printed and "PASS     text-prior finding" in printed
    assert "REPORTED rare family: separated from every other unplanted family: False" in printed
    assert (out / "MODEL_CARD.md").read_text().startswith("# Model card")
    assert json.loads((out / "model_card.json").read_text())["detections"] == measured["detections"]
    assert {f: (ROOT / "organism" / f).read_bytes() for f in shipped} == shipped  # committed card untouched
    assert main(["organism", "card", "--out", "organism"]) == 2
    assert "--in-place" in capsys.readouterr().err
    # --in-place: the card beside the model (a copy here), the runs still under --out
    model = tmp_path / "org" / "model"
    model.mkdir(parents=True)
    measured["detections"]["prior_finding"]["dangerous_share"] = 0.5
    assert main(["organism", "card", "--model", str(model), "--out", str(out), "--in-place"]) == 1
    io = capsys.readouterr()
    assert "FAIL     text-prior finding: Dangerous 0.500 (needs >= 0.8)" in io.out
    assert "planted failure(s) not found: text-prior finding" in io.err
    assert (model.parent / "MODEL_CARD.md").is_file() and seen[-1][1] == out


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
