"""A run folder has one owner and one set of settings.

One process at a time (two real processes: a second run into a held folder is refused naming the holder;
a SIGKILLed holder leaves the folder usable); everything that changes predictions is in the fingerprint
(dtype, processor configuration, chat template), and what does not (batch size, a copied model folder)
is accepted on resume and recorded; a refusal names each differing key with its old and new value.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from analyses.cli import main
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.eval.fingerprint import compare_meta
from analyses.eval.predictions import RunFolder
from analyses.organism.model import MODEL_DIR, load_organism, organism_rows
from analyses.synthcxr.world import SynthCXRWorld
from hooks.adapter import AdapterConfig, VLMAdapter

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys; from analyses.eval.predictions import RunFolder\n"
    "run = RunFolder(sys.argv[1]); run.start({'held': True}); print('held', flush=True); sys.stdin.read()\n"
)


@pytest.fixture(scope="module")
def organism() -> tuple[SynthCXRWorld, list]:
    world, rows = organism_rows("test")
    first = sorted({r.image_id for r in rows})[:2]
    return world, [r for r in rows if r.image_id in first]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process that holds ``tmp_path/run`` (started through RunFolder.start) until killed."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc, out
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_the_folder(
    holder: tuple[subprocess.Popen[str], Path], organism: tuple[SynthCXRWorld, list],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    proc, out = holder
    world, rows = organism
    adapter = load_organism()
    cfg = EvalConfig(conditions=("image",), batch_size=8)
    with pytest.raises(
        ValueError, match=rf"in use by another run: pid {proc.pid}, host {socket.gethostname()}"
    ):
        evaluate(adapter, rows, world.image_for, out, cfg, progress=False)
    assert not (out / "predictions.jsonl").exists()
    argv = [
        "eval",
        "--n-images",
        "1",
        "--conditions",
        "image",
        "--quiet",
        "--n-boot",
        "10",
        "--out",
        str(out),
    ]
    assert main(argv) == 2  # the CLI: one line, exit 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("flipscope:")]
    assert len(err) == 1 and f"pid {proc.pid}" in err[0] and "another --out folder" in err[0]
    proc.send_signal(signal.SIGKILL)  # a killed holder leaves nothing stuck
    proc.wait()
    df = evaluate(adapter, rows, world.image_for, out, cfg, progress=False)
    assert len(df) == len(rows)


def test_one_process_cannot_open_a_folder_twice_and_release_frees_it(tmp_path: Path) -> None:
    first = RunFolder(tmp_path)
    first.start({"a": 1})
    with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
        RunFolder(tmp_path).start({"a": 1})
    first.release()
    second = RunFolder(tmp_path)
    second.start({"a": 1})
    assert second.locked
    del second  # garbage collection drops the lock too
    RunFolder(tmp_path).start({"a": 1})


# ------------------------------------------------------------------------------ fingerprints
@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(MODEL_DIR, tmp_path / "organism-copy"))


def _partial(adapter: VLMAdapter, rows: list, world: SynthCXRWorld, out: Path, **cfg: object) -> None:
    cfg = {"conditions": ("image", "removed"), "batch_size": 8, **cfg}
    evaluate(adapter, rows, world.image_for, out, EvalConfig(**cfg), progress=False, max_batches=1)  # type: ignore[arg-type]


def test_a_float32_run_resumed_in_bfloat16_is_refused_naming_the_dtype(
    model_dir: Path, organism: tuple[SynthCXRWorld, list], tmp_path: Path
) -> None:
    world, rows = organism
    out = tmp_path / "run"
    _partial(load_organism(model_dir), rows, world, out)
    bf16 = VLMAdapter.from_pretrained(
        model_dir, config=AdapterConfig(expected_image_size=64), dtype="bfloat16"
    )
    with pytest.raises(ValueError, match=r'runtime\.dtype: "float32" -> "bfloat16"'):
        _partial(bf16, rows, world, out)


def test_a_changed_image_mean_in_the_model_folder_is_refused(
    model_dir: Path, organism: tuple[SynthCXRWorld, list], tmp_path: Path
) -> None:
    world, rows = organism
    out = tmp_path / "run"
    _partial(load_organism(model_dir), rows, world, out)
    path = model_dir / "processor_config.json"
    cfg = json.loads(path.read_text())
    cfg["image_processor"]["image_mean"] = [0.4, 0.5, 0.5]
    path.write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"runtime\.processor\.image_processor\.image_mean: \[0\.5, 0\.5, 0\.5\] -> \[0\.4, 0\.5, 0\.5\]",
    ):
        _partial(load_organism(model_dir), rows, world, out)


def test_a_changed_chat_template_is_refused(tmp_path: Path) -> None:
    from analyses.synthcxr.world import SynthCXRConfig
    from tests.test_families import GEMMA3_CHAT_TEMPLATE, chat_adapter

    world = SynthCXRWorld(SynthCXRConfig(n_patients=4, seed=3))
    rows = [r for r in world.rows("test") if r.finding == "cardiomegaly"][:4]
    a = chat_adapter("gemma3", GEMMA3_CHAT_TEMPLATE)
    assert a.prompt_mode == "chat"
    _partial(a, rows, world, tmp_path, conditions=("image",), batch_size=2)
    a.processor.chat_template = GEMMA3_CHAT_TEMPLATE + "{# v2: renders the same prompt #}"
    with pytest.raises(ValueError, match=r"runtime\.chat_template: \"[0-9a-f]{16}\" -> \"[0-9a-f]{16}\""):
        _partial(a, rows, world, tmp_path, conditions=("image",), batch_size=2)


def test_a_new_batch_size_and_a_copied_model_folder_are_accepted_and_recorded(
    model_dir: Path, organism: tuple[SynthCXRWorld, list], tmp_path: Path
) -> None:
    world, rows = organism
    out = tmp_path / "run"
    _partial(load_organism(model_dir), rows, world, out, batch_size=8)
    moved = Path(shutil.copytree(model_dir, tmp_path / "moved"))
    shutil.rmtree(model_dir)
    cfg = EvalConfig(conditions=("image", "removed"), batch_size=4)
    df = evaluate(load_organism(moved), rows, world.image_for, out, cfg, progress=False)
    assert len(df) == 2 * len(rows)
    (resume,) = json.loads((out / "meta.json").read_text())["resumes"]
    assert resume["changed"]["eval_config.batch_size"] == [8, 4]
    assert resume["changed"]["model"] == [str(model_dir), str(moved)]
    assert resume["changed"]["weights.source"] == [str(model_dir), str(moved)]


def test_a_refusal_names_every_differing_key_in_full() -> None:
    old = {"eval_config": {"conditions": ["image"], "removal": "gray", "batch_size": 64, "seed": 0},
           "model": "a", "weights": {"source": "a", "files": {"m.safetensors": "1"}}}  # fmt: skip
    new = {"eval_config": {"conditions": ["image"], "removal": "white", "batch_size": 8, "seed": 1},
           "model": "b", "weights": {"source": "b", "files": {"m.safetensors": "1"}}}  # fmt: skip
    assert compare_meta(old, new) == ['eval_config.removal: "gray" -> "white"', "eval_config.seed: 0 -> 1"]
    other = {**new, "weights": {"source": "b", "files": {"m.safetensors": "2"}}}
    diff = compare_meta(old, other)
    assert 'model: "a" -> "b"' in diff and "weights (b): m.safetensors 1 -> 2" in diff
