"""Sharded evaluation (analyses.eval.shard): the split by image, and `flipscope eval` under torchrun with two
processes (gloo on CPU) giving the single-process run line for line, also after one rank is killed."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analyses.cli import main
from analyses.data.schema import QuestionRow
from analyses.eval.predictions import read_predictions
from analyses.eval.shard import Dist, ShardError, collectively, shard_dirs, split_images
from hooks.sites import mlp_out, resid_post
from interp.cache import ActivationCache

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 4
ARGS = ["--n-images", str(N_IMAGES), "--batch-size", "16", "--n-boot", "20", "--quiet"]


def _rows() -> list:  # type: ignore[type-arg]
    """The test rows of the first N_IMAGES images (what ``--n-images`` selects)."""
    from analyses.data.schema import first_images
    from analyses.organism.model import organism_rows

    return first_images(organism_rows("test")[1], N_IMAGES)


def _planned() -> list:  # type: ignore[type-arg]
    """Every (row, condition) the evaluator plans for them (swap conditions only where a partner exists)."""
    from analyses.eval.evaluate import EvalConfig, plan

    return plan(_rows(), EvalConfig(), frozenset())


pytestmark = pytest.mark.usefixtures("one_thread")


def _row(qid: str, image_id: str) -> QuestionRow:
    return QuestionRow(
        qid=qid, image_id=image_id, question="Is there cardiomegaly?", family="original",
        paraphrase_of=None, polarity=1, ground_truth=True, finding="cardiomegaly", split="test",
    )  # fmt: skip


def test_split_by_image_hand_computed() -> None:
    """Rows per image a:3 b:2 c:2 d:1: most rows first to the lightest shard -> {a, d} (4 rows), {b, c} (4)."""
    counts = {"a": 3, "b": 2, "c": 2, "d": 1}
    rows = [_row(f"{i}{k}", i) for i, n in counts.items() for k in range(n)]
    assert split_images(rows, 2) == [frozenset({"a", "d"}), frozenset({"b", "c"})]
    assert split_images(rows, 1) == [frozenset(counts)]
    assert split_images(rows, 5)[4] == frozenset()  # more shards than images: some are empty
    with pytest.raises(ValueError, match="n_parts"):
        split_images(rows, 0)


def test_split_is_whole_images_balanced_and_independent_of_row_order() -> None:
    rng = random.Random(0)
    rows = [_row(f"q{i}-{k}", f"img{i:03d}") for i in range(97) for k in range(rng.randint(1, 9))]
    for n in (2, 3, 8):
        parts = split_images(rows, n)
        assert set().union(*parts) == {r.image_id for r in rows}
        assert sum(len(p) for p in parts) == 97  # disjoint: every image in exactly one shard
        loads = [sum(r.image_id in p for r in rows) for p in parts]
        assert max(loads) - min(loads) <= 9  # within one image of each other
        shuffled = rows[:]
        rng.shuffle(shuffled)
        assert split_images(shuffled, n) == parts


class _TwoRanks(Dist):
    """Rank 0 of 2 whose peer reports ``peer`` (no process group needed)."""

    peer: str | None = None

    def gather(self, obj):  # type: ignore[no-untyped-def,override]
        return [obj, self.peer]


def test_an_error_on_any_rank_stops_every_rank() -> None:
    dist = _TwoRanks(rank=0, world_size=2, local_world_size=2)
    assert collectively(dist, lambda: 5) == 5
    object.__setattr__(dist, "peer", "no such file: x")
    with pytest.raises(ShardError, match="rank 1 of 2: no such file: x") as err:
        collectively(dist, lambda: 5)
    assert not err.value.quiet  # rank 0 prints the error of another rank
    with pytest.raises(ShardError, match="rank 0 of 2: ZeroDivisionError") as err:
        collectively(dist, lambda: 1 / 0)
    assert not err.value.quiet
    other = _TwoRanks(rank=1, world_size=2, local_rank=1, local_world_size=2)
    object.__setattr__(other, "peer", "bad")
    with pytest.raises(ShardError) as err:  # an error of the other rank, seen from rank 1
        collectively(other, lambda: 5)
    assert err.value.quiet  # a relaying rank other than 0 stays quiet


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], *, script: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_port())]
    target = script or ["-m", "analyses.cli"]
    return subprocess.run(
        [*launch, *target, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _meta(path: Path) -> dict[str, object]:
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("started")
    return meta


def _same_lines(ref: Path, got: Path, atol: float = 1e-5) -> None:
    """Line for line the same predictions: every field equal, margins to ``atol`` (the prefix path's suffix
    batches depend on which rows share a batch, so margins agree to float rounding, not bit for bit)."""
    a, b = ([json.loads(x) for x in (p / "predictions.jsonl").read_text().splitlines()] for p in (ref, got))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert abs(x.pop("margin") - y.pop("margin")) <= atol and x == y, (x, y)


def _same_run(ref: Path, got: Path) -> None:
    """The merged folder is the single-process folder: predictions line for line, meta but the start time."""
    _same_lines(ref, got)
    assert _meta(got) == _meta(ref)
    assert (got / "skipped.jsonl").exists() == (ref / "skipped.jsonl").exists()
    summary = [json.loads((p / "summary.json").read_text()) for p in (ref, got)]
    for s in summary:
        s["run"].pop("started", None)
    _close(summary[0], summary[1])  # the same numbers, up to the margins' float rounding
    assert (got / "report.html").is_file()


def _close(a: object, b: object, where: str = "summary") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5, nan_ok=True), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_resume_after_a_kill(tmp_path: Path) -> None:
    ref = tmp_path / "single"
    assert main(["eval", *ARGS, "--out", str(ref)]) == 0
    n = len(read_predictions(ref / "predictions.jsonl"))
    assert n == len(_planned())  # every (row, condition) with a swap partner

    two = tmp_path / "two"
    done = _torchrun(["eval", *ARGS, "--out", str(two)])
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(ref, two)
    shards = [read_predictions(p / "predictions.jsonl") for p in shard_dirs(two)]
    assert [p.name for p in shard_dirs(two)] == ["rank-0-of-2", "rank-1-of-2"]
    images = [set(s["image_id"]) for s in shards]
    assert images[0].isdisjoint(images[1]) and len(images[0]) == len(images[1]) == N_IMAGES // 2
    assert sum(len(s) for s in shards) == n

    # rank 1 dies after 3 of its 4 batches (64 predictions, 16 a batch); torchrun stops rank 0 too
    killed = tmp_path / "killed"
    died = _torchrun(["1", "3", "eval", *ARGS, "--out", str(killed)], script=["tests/torchrun_kill.py"])
    assert died.returncode != 0
    assert not (killed / "predictions.jsonl").exists()  # nothing merged
    part = (killed / "shards" / "rank-1-of-2" / "predictions.jsonl").read_text()
    assert len(part.splitlines()) == 48
    again = tmp_path / "again"
    shutil.copytree(killed, again)
    n_done = 48 + len(read_predictions(killed / "shards" / "rank-0-of-2" / "predictions.jsonl"))

    resumed = _torchrun(["eval", *ARGS, "--out", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(ref, killed)
    after = (killed / "shards" / "rank-1-of-2" / "predictions.jsonl").read_text()
    assert after.startswith(part) and len(after.splitlines()) == n // 2  # resumed: nothing redone

    # the same killed run finished by one process: its shards count as done, the merge is the same run
    assert main(["eval", *ARGS, "--out", str(again)]) == 0
    _same_run(ref, again)
    assert len(read_predictions(again / "shards" / "rank-0-of-1" / "predictions.jsonl")) == n - n_done


@pytest.mark.slow
def test_a_shard_of_another_run_is_refused_and_overwrite_clears_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shard = out / "shards" / "rank-1-of-2"
    shard.mkdir(parents=True)
    (shard / "predictions.jsonl").write_text('{"qid": "x", "condition": "image"}\n')
    assert main(["eval", *ARGS, "--out", str(out)]) == 2
    assert "without meta.json" in capsys.readouterr().err
    assert main(["eval", *ARGS, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "shards").exists()
    assert len(read_predictions(out / "predictions.jsonl")) == len(_planned())


@pytest.mark.slow
def test_torchrun_cache_parts_read_as_the_single_process_cache(tmp_path: Path) -> None:
    args = ["cache", "--n-images", str(N_IMAGES), "--sites", "resid_post(3),mlp_out(2)", "--quiet"]
    args += ["--positions", "final,question", "--conditions", "image,removed", "--shard-rows", "40"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun([*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = ActivationCache.load(tmp_path / "one"), ActivationCache.load(tmp_path / "two")
    parts = json.loads((tmp_path / "two" / "manifest.json").read_text())["parts"]
    assert [p["name"] for p in parts] == ["rank-0-of-2", "rank-1-of-2"]
    assert all(p["shards"] for p in parts)
    files = sorted(f.name for f in (tmp_path / "two" / "rank-1-of-2").glob("shard_00000.*"))
    assert files == [f"shard_00000.{x}.safetensors" for x in ("index", "mlp_out_2", "resid_post_3")]
    assert len(one) == len(two) == 2 * len(_rows()) and sorted(one.keys) == sorted(two.keys)
    at = {k: i for i, k in enumerate(two.keys)}
    order = [at[k] for k in one.keys]  # the rows of `two` in the order of `one`
    # to float rounding: sdpa attention (the default) is not bit-stable across thread counts and batch shapes
    torch.testing.assert_close(two.margins[order], one.margins, atol=1e-5, rtol=0)
    for site in (resid_post(3), mlp_out(2)):
        x1, x2 = one[site], two[site]
        for i, j in enumerate(order):
            torch.testing.assert_close(x1[i][one.valid[i]], x2[j][two.valid[j]], atol=1e-4, rtol=1e-4)
