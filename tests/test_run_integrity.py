"""Run folders never mix or lose anything: weight and image fingerprints, --overwrite, skipped.jsonl, failed
starts, runs without paraphrases or conditions, one-line user errors; and a PSF-Med file with MIMIC-CXR-JPG
images run end to end through ``flipscope eval`` on a copy of the shipped organism.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analyses.cli import main
from analyses.data.questions import vocabulary
from analyses.eval import fingerprint
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.organism.model import MODEL_DIR
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.tiny import build_word_tokenizer, tiny_gemma3
from tests.test_importers import PAIR_COLUMNS, PAIRS, mimic_jpg, pair, write_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A copy of the shipped organism (safetensors folder), free to be overwritten."""
    return Path(shutil.copytree(MODEL_DIR, tmp_path / "organism-copy"))


@pytest.fixture
def psf_med(tmp_path: Path) -> tuple[Path, Path]:
    """(PSF-Med MIMIC-style pair file, MIMIC-CXR-JPG root); the images have different sizes, as real ones do."""
    root = tmp_path / "mimic-cxr-jpg"
    mimic_jpg(root, "d1", size=(40, 48), seed=1)
    mimic_jpg(root, "d2", size=(56, 44), seed=2)
    extra = pair("d2", "q5", "Is there cardiomegaly?", "Is the heart enlarged?", "lexical_substitution", "no")
    return write_table([*PAIRS, extra], PAIR_COLUMNS, tmp_path / "psf_med_mimic.csv"), root


def _eval(model: Path, data: Path, root: Path, out: Path, *extra: str) -> int:
    argv = ["eval", "--model", str(model), "--data", str(data), "--image-root", str(root), "--out", str(out)]
    return main([*argv, "--n-boot", "10", "--quiet", *extra])


def _error(stderr: str) -> str:
    """The one line the CLI printed for a user error (library progress bars aside)."""
    lines = [x for x in stderr.replace("\r", "\n").splitlines() if x.startswith("flipscope:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_psf_med_file_with_mimic_jpgs_end_to_end(
    model_dir: Path, psf_med: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, root = psf_med
    out = tmp_path / "run"
    assert _eval(model_dir, data, root, out) == 0
    printed = capsys.readouterr().out
    assert "layout: PSF-Med original-paraphrase pairs" in printed and "1 of 3 images not found" in printed
    preds = pd.read_json(out / "predictions.jsonl", lines=True)
    n_rows = 3 + 5 + 1 + 1  # originals d1/q1, d2/q2, d2/q5; 5 variants of d1/q1 (one operator); 1 each
    n_swap = 6 + 2  # cardiomegaly rows (d1/q1 and d2/q5): only they have another patient's image to swap in
    counts = {"image": n_rows, "removed": n_rows, "swap_random": n_swap, "swap_label": n_swap}
    assert preds.groupby("condition").size().to_dict() == counts
    assert set(preds["family"]) == {"original", "lexical", "syntactic", "scope", "operator"}
    skipped = _lines(out / "skipped.jsonl")
    assert [(s["row"], s["line"], s["reason"]) for s in skipped[:4]] == [
        ("line 7", 7, "duplicate paraphrase"),
        ("line 8", 8, "not a yes/no question"),
        ("line 10", 10, "unknown phenomenon"),
        ("line 11", 11, "missing image"),
    ]
    # every swap prediction left out is listed: the rows whose finding has no other patient's image
    no_swap = {(q, c) for q in set(preds["qid"]) for c in ("swap_random", "swap_label")}
    no_swap -= set(zip(preds["qid"], preds["condition"], strict=True))
    assert {(s["row"], s["condition"]) for s in skipped[4:]} == no_swap and len(skipped) == 4 + len(no_swap)
    assert {s["reason"] for s in skipped[4:]} == {"no swap partner"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["weights"]["files"]["model.safetensors"] == fingerprint.sha256_file(
        model_dir / "model.safetensors"
    )
    assert sorted(meta["images"]) == ["d1", "d2"]
    summary = json.loads((out / "summary.json").read_text())
    metrics = {m["metric"]: m for m in summary["metrics"]}
    assert metrics["flip_rate"]["n"] == 3 and metrics["swap_sensitivity_label"]["n"] == n_swap
    assert metrics["polarity_consistency"]["n"] == 1
    assert "<html>" in (out / "report.html").read_text()[:200]


def _perturb_weights(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.slow
def test_resume_refuses_other_weights_and_images_and_overwrite_starts_afresh(
    model_dir: Path, psf_med: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, root = psf_med
    out = tmp_path / "run"
    assert _eval(model_dir, data, root, out) == 0
    assert _eval(model_dir, data, root, out) == 0  # same everything: resumes, nothing recomputed
    before = (out / "predictions.jsonl").read_text()
    _perturb_weights(model_dir)  # what `flipscope organism train` does to organism/model
    capsys.readouterr()
    assert _eval(model_dir, data, root, out) == 2
    err = _error(capsys.readouterr().err)
    assert "holds a different run" in err and "model.safetensors" in err and "--overwrite" in err
    assert (out / "predictions.jsonl").read_text() == before  # nothing appended to the old run
    assert _eval(model_dir, data, root, out, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert _eval(model_dir, data, root, fresh) == 0
    a, b = (
        pd.read_json(p / "predictions.jsonl", lines=True).set_index(["qid", "condition"])
        for p in (out, fresh)
    )
    assert a.sort_index()["margin"].equals(b.sort_index()["margin"])  # the overwritten run is a clean run
    # an image overwritten at the same path
    im = root / "files/p10/p10000032/s50414267/d1.jpg"
    Image.fromarray(np.full((48, 40), 200, np.uint8)).save(im)
    capsys.readouterr()
    assert _eval(model_dir, data, root, out) == 2
    err = _error(capsys.readouterr().err)
    assert "images: 1 changed (d1)" in err


def test_weights_hash_is_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLIPSCOPE_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    real = fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: calls.append(p) or real(p))
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights v1")
    first = fingerprint.cached_sha256([f])
    assert fingerprint.cached_sha256([f]) == first and len(calls) == 1  # second call: from the cache
    assert (tmp_path / "cache" / fingerprint.CACHE_FILE).is_file()
    f.write_bytes(b"weights v2")  # same size, new content
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fingerprint.cached_sha256([f]) != first and len(calls) == 2


@pytest.fixture(scope="module")
def tiny() -> VLMAdapter:
    model, proc = tiny_gemma3(build_word_tokenizer(vocabulary(), "gemma3"), seed=1)
    return VLMAdapter(model, proc, AdapterConfig(expected_image_size=64), name="tiny-integrity")


@pytest.fixture(scope="module")
def world() -> SynthCXRWorld:
    return SynthCXRWorld(SynthCXRConfig(n_patients=12, seed=3))


def test_a_failed_start_leaves_nothing_that_blocks_the_next_run(
    tiny: VLMAdapter, world: SynthCXRWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [r for r in world.rows("test") if r.finding == "cardiomegaly"][:6]
    cfg = EvalConfig(conditions=("image",), batch_size=4)

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("the first batch fails")

    monkeypatch.setattr(tiny.model, "forward", boom)  # the first scoring forward fails, on either path
    with pytest.raises(RuntimeError, match="the first batch fails"):
        evaluate(tiny, rows, world.image_for, tmp_path, cfg, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "meta.json").exists()
    other = [r for r in world.rows("val") if r.finding == "cardiomegaly"][:6]  # another run, same folder
    df = evaluate(tiny, other, world.image_for, tmp_path, cfg, progress=False)
    assert set(df["qid"]) == {r.qid for r in other}


def test_parameters_of_an_in_memory_model_are_fingerprinted(
    tiny: VLMAdapter, world: SynthCXRWorld, tmp_path: Path
) -> None:
    import torch

    rows = [r for r in world.rows("test") if r.finding == "cardiomegaly"][:4]
    cfg = EvalConfig(conditions=("image",))
    evaluate(tiny, rows, world.image_for, tmp_path, cfg, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["weights"]["source"] == "parameters" and len(meta["images"]) == len(
        {r.image_id for r in rows}
    )
    other_model, proc = tiny_gemma3(build_word_tokenizer(vocabulary(), "gemma3"), seed=2)
    other = VLMAdapter(other_model, proc, AdapterConfig(expected_image_size=64), name="tiny-integrity")
    with pytest.raises(ValueError, match=r"weights \(parameters\): state_dict"):
        evaluate(other, rows, world.image_for, tmp_path, cfg, progress=False)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"predictions\.jsonl without meta\.json"):
        evaluate(tiny, rows, world.image_for, tmp_path, cfg, progress=False)
    df = evaluate(other, rows, world.image_for, tmp_path, cfg, progress=False, overwrite=True)
    assert len(df) == len(rows)
    with torch.no_grad():
        direct = other.margins(other.prepare([world.image(rows[0].image_id)], [rows[0].question]))[0].item()
    assert df.set_index("qid").loc[rows[0].qid, "margin"] == pytest.approx(direct, abs=1e-5)


# ------------------------------------------------------------------------------ the CLI
@pytest.fixture
def world_file(tmp_path: Path) -> Path:
    SynthCXRWorld(SynthCXRConfig(n_patients=10, seed=3)).save(tmp_path / "world")
    return tmp_path / "world" / "questions.jsonl"


@pytest.mark.slow
def test_data_file_applies_split_and_n_images(world_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["eval", "--data", str(world_file), "--split", "train", "--n-images", "1", "--out", str(out)]
    assert main([*argv, "--n-boot", "10", "--quiet", "--conditions", "image"]) == 0
    preds = pd.read_json(out / "predictions.jsonl", lines=True)
    every = pd.read_json(world_file, lines=True)
    first = sorted(every.loc[every["split"] == "train", "image_id"])[0]
    assert set(preds["split"]) == {"train"} and set(preds["image_id"]) == {first}
    assert len(preds) == int((every["image_id"] == first).sum())
    for bad in (["--split", "foo"], ["--n-images", "-1"]):
        other = tmp_path / "bad"
        assert main(["eval", "--data", str(world_file), *bad, "--out", str(other), "--quiet"]) == 2
        assert not other.exists()


@pytest.mark.slow
def test_a_run_without_paraphrases_or_removal_gets_a_summary_and_report(
    model_dir: Path, world_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    every = [json.loads(x) for x in world_file.read_text().splitlines()]
    originals = [r for r in every if r["family"] == "original"]
    only = tmp_path / "originals.jsonl"
    only.write_text("".join(json.dumps(r) + "\n" for r in originals))
    out = tmp_path / "run"
    assert _eval(model_dir, only, world_file.parent, out, "--conditions", "image", "--n-images", "2") == 0
    printed = capsys.readouterr().out
    assert "flip_rate                   n/a" in printed and "quadrants: n/a" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert {m["metric"]: m["value"] for m in summary["metrics"]}["flip_rate"] is None
    assert (out / "report.html").is_file()


def test_model_errors_are_one_line_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_folder").mkdir()
    cases = {
        "my_models/medgemma": "my_models/medgemma",  # a relative folder that does not exist
        "./my_models/medgemma": "model folder not found",
        "empty_folder": "has no config.json",
        "google/medgemma-4b-it": "hub could not provide it",  # offline
    }
    for model, expected in cases.items():
        assert main(["eval", "--model", model, "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = _error(capsys.readouterr().err)
        assert err.startswith("flipscope: error: --model")
        assert expected in err and "pass" in err
    assert not (tmp_path / "o").exists()


def test_bad_data_paths_are_one_line_errors_before_anything_is_written(
    psf_med: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, root = psf_med
    out, empty = tmp_path / "o", tmp_path / "empty"
    empty.mkdir()
    cases = {
        ("--data", str(tmp_path / "nope.csv")): "question file not found",
        ("--data", str(data), "--image-root", str(tmp_path / "no_such_dir")): "--image-root",
        ("--data", str(data), "--image-root", str(empty)): "pass --image-root with the folder",  # no images
        ("--data", str(data), "--image-root", str(root), "--split", "train"): "no rows of split 'train'",
        ("--data", str(data), "--image-root", str(root), "--phenomenon-map", "scope"): "NAME=VALUE",
        (
            "--data",
            str(data),
            "--image-root",
            str(root),
            "--phenomenon-map",
            "scope=negation",
        ): "must be a family",
    }
    for args, expected in cases.items():
        assert main(["eval", *args, "--out", str(out), "--quiet"]) == 2, args
        err = _error(capsys.readouterr().err)
        assert expected in err, (args, err)
    assert not out.exists()


def test_no_rows_is_refused_and_writes_nothing(
    tiny: VLMAdapter, world: SynthCXRWorld, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="no question rows"):
        evaluate(tiny, [], world.image_for, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
