"""One evaluation over several processes: ``torchrun --nproc_per_node N`` or ``accelerate launch``.

``flipscope eval`` runs unchanged under a launcher; each process (rank) of the process group (gloo on
CPU, NCCL on GPUs, set up by accelerate's ``PartialState``):

1. takes its share of the images (:func:`split_images`: deterministic, by image, so every question and
   condition of an image, hence every paraphrase cluster, is in one shard; balanced by rows; it depends
   only on the rows and the number of processes, never on what is already done);
2. hashes its images; the fingerprints are gathered so that every rank records the same ``meta.json``;
3. evaluates its images into its own run folder ``<out>/shards/rank-R-of-N`` (a complete run folder:
   ``meta.json`` + ``predictions.jsonl`` + ``skipped.jsonl``, resumable on its own); swap partners are
   drawn over all rows, so they are the ones a single process draws;
4. after every rank is done, rank 0 merges the shards into ``<out>`` in the order a single process
   writes them (:func:`merge_shards`), then the CLI writes the summary and the report once.

Predictions already made anywhere in the folder (the merged file, shards of a run with another number
of processes) count as done, so a run can be resumed with any number of processes. A shard holding
another run (other settings, weights or images) is refused like a run folder is; ``--overwrite``
clears the folder and its shards first. An error on one rank stops every rank with the same message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch

from analyses.data.schema import ImageSource, QuestionRow, SkippedRow
from analyses.eval.evaluate import EvalConfig, evaluate, plan, run_meta
from analyses.eval.fingerprint import image_fingerprints
from analyses.eval.predictions import (
    LOCK_FILE,
    META_FILE,
    PREDICTIONS_FILE,
    RUN_FILES,
    RunFolder,
    read_predictions,
)
from hooks.adapter import VLMAdapter
from hooks.devices import rank_max_memory

SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"^rank-(\d+)-of-(\d+)$")
T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    """One process's share of a sharded run (what :func:`~analyses.eval.evaluate.evaluate` needs of it)."""

    images: frozenset[str]
    """Image ids whose rows (every question and condition) this process evaluates."""
    meta: dict[str, Any]
    """The whole run's ``meta.json`` content, computed once and the same in every process."""
    finished: frozenset[tuple[str, str]] = frozenset()
    """(qid, condition) pairs already predicted elsewhere in the run folder (merged file, other shards)."""


class ShardError(ValueError):
    """An error on some rank, raised on every rank; ``quiet`` on the ranks that only relay it."""

    def __init__(self, message: str, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the process group (one process: rank 0 of 1)."""

    rank: int = 0
    """This process's rank (``RANK``)."""
    world_size: int = 1
    """Number of processes (``WORLD_SIZE``)."""
    local_rank: int = 0
    """Rank on this node (``LOCAL_RANK``): the GPU this process uses."""
    local_world_size: int = 1
    """Processes on this node (``LOCAL_WORLD_SIZE``)."""
    device: str = "cpu"
    """The device accelerate assigned to this process (``cuda:<local_rank>`` on GPUs)."""
    group: Any = field(default=None, repr=False, compare=False)
    """Process group of the small objects exchanged here (gloo also under NCCL); ``None``: the default."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"rank {self.rank} of {self.world_size} (local {self.local_rank}): out of range")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order (picklable objects; a no-op for one process)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def init_dist(timeout_hours: float = 24.0) -> Dist:
    """The process group of a launcher (``WORLD_SIZE`` > 1), set up by accelerate, or one process.

    The timeout bounds how long a rank waits for the slowest one at the end (default: a day).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    timeout = timedelta(hours=timeout_hours)
    state = PartialState(cpu=cpu, timeout=timeout)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(state.num_processes)))
    # file lists and fingerprints go over gloo: NCCL would need them on a GPU a model may fill
    group = None if state.backend == "gloo" else torch.distributed.new_group(backend="gloo", timeout=timeout)
    return Dist(
        state.process_index,
        state.num_processes,
        state.local_process_index,
        local_world,
        str(state.device),
        group,
    )


def rank_placement(dist: Dist, options: dict[str, Any]) -> dict[str, Any]:
    """Model options (:func:`~analyses.data.resolve.model_options`) for this rank: its own GPU, or, with a
    device map, its own group of the node's GPUs (:func:`hooks.devices.rank_max_memory`)."""
    out = dict(options)
    if dist.world_size == 1:
        return out
    if "device_map" in out:
        n_gpus = torch.cuda.device_count()
        mm = rank_max_memory(out.get("max_memory"), dist.local_rank, dist.local_world_size, n_gpus)
        out.pop("max_memory", None)
        return out if mm is None else {**out, "max_memory": mm}
    if dist.device != "cpu":
        out["device"] = dist.device
    return out


def split_images(rows: Sequence[QuestionRow], n_parts: int) -> list[frozenset[str]]:
    """Image ids of each of ``n_parts`` shards: whole images, balanced by number of rows, deterministic.

    Images go, most rows first (ties by id), to the shard with the fewest rows so far (ties: the lowest).
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    count: dict[str, int] = {}
    for r in rows:
        count[r.image_id] = count.get(r.image_id, 0) + 1
    load = [0] * n_parts
    parts: list[set[str]] = [set() for _ in range(n_parts)]
    for image_id, n in sorted(count.items(), key=lambda kv: (-kv[1], kv[0])):
        k = min(range(n_parts), key=lambda i: (load[i], i))
        parts[k].add(image_id)
        load[k] += n
    return [frozenset(p) for p in parts]


def shard_dir(out_dir: Path | str, rank: int, world_size: int) -> Path:
    """``<out>/shards/rank-R-of-N``: the run folder of one rank."""
    return Path(out_dir) / SHARDS_DIR / f"rank-{rank}-of-{world_size}"


def shard_dirs(out_dir: Path | str) -> list[Path]:
    """Every shard folder under ``out_dir`` (any number of processes), by (N, R)."""
    root = Path(out_dir) / SHARDS_DIR
    found = [(p, SHARD_NAME.match(p.name)) for p in root.iterdir()] if root.is_dir() else []
    return [p for p, m in sorted(((p, m) for p, m in found if m), key=lambda x: (int(x[1][2]), int(x[1][1])))]


def collectively(dist: Dist, fn: Callable[[], T]) -> T:
    """Run ``fn`` on this rank; if it fails on any rank, raise on every rank (no rank waits forever)."""
    result: Any = None
    status: str | None = None
    try:
        result = fn()
    except Exception as err:  # every failure must reach the other ranks, or they hang at the next collective
        status = str(err) if isinstance(err, ValueError | OSError) else f"{type(err).__name__}: {err}"
        status = " ".join(status.split())
    failed = [(r, s) for r, s in enumerate(dist.gather(status)) if s is not None]
    if failed:
        rank, message = failed[0]
        where = f"rank {rank} of {dist.world_size}: " if dist.world_size > 1 else ""
        raise ShardError(where + message, quiet=status is None and not dist.is_main)
    return result


def _check_folder(out: Path, meta: dict[str, Any], overwrite: bool) -> RunFolder:
    """Rank 0: lock the run folder (returned, held until the merge is written) and check that it and every
    shard in it hold this run (or nothing); ``overwrite`` clears them."""
    run = RunFolder(out)
    run.start(meta, overwrite=overwrite)
    try:
        for folder in shard_dirs(out):
            with RunFolder(folder) as shard:  # a shard in use by another run is refused too
                shard.start(meta, overwrite=overwrite)  # refuses a shard of another run, naming what differs
        if overwrite:
            _clear_shards(out)
    except BaseException:
        run.release()
        raise
    return run


def _clear_shards(out: Path) -> None:
    """Delete the run files of every shard (and the folders left empty); anything else stays.

    Called by the process that holds the lock of ``out``, so no other run is using the shards."""
    for folder in shard_dirs(out):
        for name in (*RUN_FILES, LOCK_FILE):
            (folder / name).unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
    root = out / SHARDS_DIR
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _done_elsewhere(out: Path, own: Path) -> frozenset[tuple[str, str]]:
    """(qid, condition) pairs in the merged file and in every shard but ``own`` (read only, never cut)."""
    done: set[tuple[str, str]] = set()
    for folder in [out, *shard_dirs(out)]:
        if folder == own:
            continue
        df = read_predictions(folder / PREDICTIONS_FILE)
        if len(df):
            done |= set(zip(df["qid"], df["condition"], strict=True))
    return frozenset(done)


def evaluate_sharded(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    out_dir: Path | str,
    config: EvalConfig | None = None,
    dist: Dist | None = None,
    *,
    progress: bool = True,
    max_batches: int | None = None,
    skipped: Sequence[SkippedRow] = (),
    overwrite: bool = False,
) -> pd.DataFrame | None:
    """Evaluate this rank's share of ``rows`` into its shard; rank 0 merges (module docs).

    Returns the merged predictions on rank 0 and ``None`` on the others. One process is plain
    :func:`~analyses.eval.evaluate.evaluate`, unless the folder holds shards (of a sharded run it goes on
    with: shard ``rank-0-of-1``, then a merge). Every rank must be given the same rows and settings.
    """
    dist = dist or Dist()
    cfg = config or EvalConfig()
    out = Path(out_dir)
    if dist.world_size == 1 and (overwrite or not shard_dirs(out)):
        if shard_dirs(out):  # only with overwrite: then every shard goes with the folder's predictions
            with RunFolder(out) as run:
                run.acquire()
                _clear_shards(out)
        return evaluate(adapter, rows, images, out, cfg, progress, max_batches,
                        skipped=skipped, overwrite=overwrite)  # fmt: skip
    if not rows:
        raise ValueError("no question rows to evaluate: the data source gave none for this split")
    mine = split_images(rows, dist.world_size)[dist.rank]
    own = shard_dir(out, dist.rank, dist.world_size)
    show = progress and dist.is_main
    own_rows = [r for r in rows if r.image_id in mine]
    hashes = collectively(dist, lambda: image_fingerprints(own_rows, images, show))
    every = dict(sorted((k, v) for part in dist.gather(hashes) for k, v in part.items()))
    meta: dict[str, Any] = dist.broadcast(
        collectively(
            dist, lambda: run_meta(adapter, rows, images, cfg, image_hashes=every) if dist.is_main else {}
        )
    )
    held = collectively(dist, lambda: _check_folder(out, meta, overwrite) if dist.is_main else None)
    with held or RunFolder(own):  # rank 0 holds <out> until its merge is written; every rank its shard
        done = _done_elsewhere(out, own)  # nobody writes until every rank has read
        part = Part(mine, meta, done)
        collectively(dist, lambda: None)
        collectively(dist, lambda: evaluate(adapter, rows, images, own, cfg, show, max_batches, part=part))
        if not dist.is_main:
            return None
        return merge_shards(out, rows, cfg, [p.record() for p in skipped])


def _lines(path: Path) -> list[tuple[tuple[str, str], str]]:
    """((qid, condition), line) of every whole line of a predictions file (a torn line is left out)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.append(((rec["qid"], rec["condition"]), line))
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def merge_shards(
    out_dir: Path | str,
    rows: Sequence[QuestionRow],
    config: EvalConfig,
    loaded: Sequence[dict[str, Any]] = (),
) -> pd.DataFrame:
    """Merge every shard of ``out_dir`` into its ``predictions.jsonl`` and ``skipped.jsonl``.

    Lines come in the order an uninterrupted single process writes them (its plan: condition, image,
    row), each (qid, condition) once (the merged file first, then shards by rank), so a merged run is
    line for line the single-process run. ``loaded``: the rows the loader left out (head of
    ``skipped.jsonl``). ``meta.json`` is written if the folder has none yet (from the first shard).
    """
    out = Path(out_dir)
    folders = shard_dirs(out)
    order = {(w.row.qid, w.condition): i for i, w in enumerate(plan(rows, config, set()))}
    seen: dict[tuple[str, str], str] = {}
    for folder in [out, *folders]:
        for key, line in _lines(folder / PREDICTIONS_FILE):
            seen.setdefault(key, line)
    ranked = sorted(seen.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    dropped: dict[tuple[str, str, str], dict[str, Any]] = {}
    for folder in folders:
        for rec in RunFolder(folder).skipped():
            row, condition = str(rec.get("row")), str(rec.get("condition"))
            if (row, condition) not in seen:
                dropped.setdefault((row, condition, str(rec.get("reason"))), rec)
    late = sorted(dropped.items(), key=lambda kv: (order.get((kv[0][0], kv[0][1]), len(order)), kv[0]))
    if not (out / META_FILE).exists() and folders and (folders[0] / META_FILE).exists():
        _write(out / META_FILE, (folders[0] / META_FILE).read_text())
    _write(out / PREDICTIONS_FILE, "".join(line + "\n" for _, line in ranked))
    RunFolder(out).write_skipped([*loaded, *(rec for _, rec in late)])
    return read_predictions(out / PREDICTIONS_FILE)
