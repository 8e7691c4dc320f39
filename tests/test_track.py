"""Experiment tracking (analyses.eval.track): what is logged, wandb in offline mode and mlflow in a file store
under tmp folders (nothing reaches a network), and a one-line error for a tracker that is not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from analyses.cli import main
from analyses.eval.track import require, run_config, run_metrics, track_run

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = ["eval", "--n-images", "1", "--n-boot", "5", "--quiet", "--conditions", "image,removed"]

SUMMARY = {
    "metrics": [
        {"metric": "flip_rate", "value": 0.25, "low": 0.1, "high": 0.5, "n": 8},
        {"metric": "swap_sensitivity", "value": None, "low": None, "high": None, "n": 0},  # n/a
    ],
    "quadrant_shares": [{"quadrant": "Dangerous", "value": 0.5, "low": 0.2, "high": 0.8, "n": 8}],
    "by_family": [
        {"metric": "flip_rate", "group": "register", "value": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    ],
    "choices": {"n_boot": 5},
    "data": "file.jsonl",
    "run": {"model": "m", "images": {"a": "01", "b": "02"}, "eval_config": {"seed": 0}},
}


def test_metrics_and_config_of_a_summary() -> None:
    assert run_metrics(SUMMARY) == {
        "flip_rate": 0.25, "flip_rate.low": 0.1, "flip_rate.high": 0.5, "flip_rate.n": 8.0,
        "swap_sensitivity.n": 0.0,
        "quadrant/Dangerous": 0.5, "quadrant/Dangerous.low": 0.2, "quadrant/Dangerous.high": 0.8,
        "quadrant/Dangerous.n": 8.0,
        "family/register/flip_rate": 1.0,
    }  # fmt: skip
    config = run_config(SUMMARY, {"model": "organism", "out": Path("runs/x")})
    assert config["images"]["n"] == 2 and len(config["images"]["sha256"]) == 16  # fingerprints folded
    assert config["eval_config"] == {"seed": 0} and config["choices"] == {"n_boot": 5}
    assert config["args"] == {"model": "organism", "out": "runs/x"}
    other = run_config({**SUMMARY, "run": {**SUMMARY["run"], "images": {"a": "01", "b": "03"}}})
    assert other["images"]["sha256"] != config["images"]["sha256"]


def test_a_tracker_that_is_not_installed_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ValueError, match=r'pip install "flipscope\[mlflow\]"'):
        require("mlflow")
    out = tmp_path / "run"
    assert main([*EVAL, "--out", str(out), "--track", "mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mlflow package is not installed" in err and "flipscope[mlflow]" in err
    assert not out.exists()  # refused before the model was loaded
    with pytest.raises(ValueError, match="choose one of wandb, mlflow"):
        require("tensorboard")


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "wandb-home"
    for var, sub in (("WANDB_DIR", ""), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config")):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything to go online, it would fail
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return root


@pytest.mark.slow
def test_eval_tracked_with_wandb_offline(
    tmp_path: Path, offline_wandb: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    assert main([*EVAL, "--out", str(out), "--track", "wandb", "--track-project", "psf"]) == 0
    printed = capsys.readouterr().out
    assert "tracked with wandb" in printed
    runs = sorted((offline_wandb / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and str(runs[0]) in printed
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the run's log: config, summary, artifact
    summary = json.loads((out / "summary.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    for text in ("flip_rate", "text_only_agreement", "quadrant/Dangerous", "family/register/flip_rate",
                 meta["dataset_hash"], "eval_config", "report.html", "summary.json", "flipscope-report"):  # fmt: skip
        assert text.encode() in record, text
    assert summary["metrics"]  # what was logged came from this summary


@pytest.mark.slow
def test_eval_tracked_with_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    assert main([*EVAL, "--out", str(out)]) == 0
    got = track_run("mlflow", out, args={"model": "organism"}, project="psf")
    run = mlflow.get_run(got.run_id)
    summary = json.loads((out / "summary.json").read_text())
    flip = next(m for m in summary["metrics"] if m["metric"] == "flip_rate")
    assert run.data.metrics["flip_rate"] == pytest.approx(flip["value"])
    assert run.data.metrics["flip_rate.n"] == flip["n"]
    assert run.data.metrics["quadrant/Dangerous"] == got.metrics["quadrant/Dangerous"]
    assert run.data.params["dataset_hash"] == json.loads((out / "meta.json").read_text())["dataset_hash"]
    assert json.loads(run.data.params["args"]) == {"model": "organism"}
    folder = Path(got.where.removeprefix("file://"))
    assert (folder / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert sorted(got.artifacts) == ["meta.json", "report.html", "summary.json"]
    assert mlflow.get_experiment(run.info.experiment_id).name == "psf"
