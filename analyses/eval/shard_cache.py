"""Activation caches of a large run, written by every process of a launcher (``flipscope cache``).

Each rank takes its images (:func:`analyses.eval.shard.split_images`, the split of the evaluator), runs
their question rows under the chosen conditions through :func:`interp.cache.cache_activations` and
writes its part ``<out>/rank-R-of-N/``: shards of ``shard_rows`` rows, one safetensors file per shard
and site, and a ``part.json``. After every rank is done, rank 0 lists the parts in ``<out>/manifest.json``
(:func:`interp.cache.merge_parts`); ``ActivationCache.load(out)`` then reads them as one dataset, rows
in rank order, each named by its key ``qid/condition`` (:attr:`~interp.cache.ActivationCache.keys`).
Rows whose image cannot be read are left out and listed in ``<out>/rank-R-of-N/skipped.json``; rank 0
writes ``<out>/skipped.jsonl``: the loader's skipped records, then those rows (one line each: ``row``,
``line``, ``reason``, ``detail``). The images are checked before the first forward, so the progress bar
knows its total. A cache is not resumed: a rerun writes its parts afresh.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from analyses.data.schema import ImageSource, QuestionRow, SkippedRow
from analyses.eval.predictions import SKIPPED_FILE, RunFolder
from analyses.eval.shard import Dist, collectively, split_images
from hooks.adapter import VLMAdapter
from hooks.batch import Batch
from hooks.inputs import Removal, RemovalKind, check_image_size, load_image
from hooks.sites import Site
from interp.cache import MANIFEST_FILE, ActivationCache, cache_activations, merge_parts

#: Conditions a cache can hold: the row's own image, or the image removed.
CACHE_CONDITIONS: tuple[str, ...] = ("image", "removed")


def part_name(rank: int, world_size: int) -> str:
    return f"rank-{rank}-of-{world_size}"


class _Counted(Sequence[Batch]):
    """Batches made lazily, in order, whose number is known up front (the progress bar's total)."""

    def __init__(self, make: Callable[[], Iterator[Batch]], n: int) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Batch]:
        return self.make()

    def __getitem__(self, i: Any) -> Any:
        raise TypeError("cache batches are made in order: iterate over them")


def _readable(
    rows: Sequence[QuestionRow], images: ImageSource, size: int | None = None
) -> tuple[list[QuestionRow], dict[str, str]]:
    """The rows whose image loads, and ``qid -> error`` of the others (each image loaded once); an image
    of another side than ``size`` (the adapter's :attr:`~hooks.adapter.VLMAdapter.size_guard`) is refused."""
    bad: dict[str, str] = {}
    seen: set[str] = set()
    keep: list[QuestionRow] = []
    skipped: dict[str, str] = {}
    for r in rows:
        if r.image_id not in seen:
            seen.add(r.image_id)
            try:
                im = load_image(images(r))
            except (OSError, ValueError, KeyError) as err:
                bad[r.image_id] = f"{type(err).__name__}: {err}"
            else:
                check_image_size(r.image_id, im, size)
        if r.image_id in bad:
            skipped[r.qid] = f"{r.image_id}: {bad[r.image_id]}"
        else:
            keep.append(r)
    return keep, skipped


def _batches(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    conditions: Sequence[str],
    removal: Removal,
    batch_size: int,
    keys: list[str],
    skipped: dict[str, str],
) -> Iterator[Batch]:
    """Batches of (row, condition) in row order; fills ``keys`` (``qid/condition``) and ``skipped`` as it goes."""
    shown: list[Image.Image | None] = []
    questions: list[str] = []
    conds: list[str] = []
    last: tuple[str, Image.Image] | None = None  # the rows of an image usually follow each other
    for r in rows:
        try:
            own = last[1] if last and last[0] == r.image_id else load_image(images(r))
        except (OSError, ValueError, KeyError) as err:
            skipped[r.qid] = f"{r.image_id}: {type(err).__name__}: {err}"
            continue
        last = (r.image_id, own)
        for c in conditions:
            shown.append(own if c == "image" else removal.apply(own, 0))
            questions.append(r.question)
            conds.append(c)
            keys.append(f"{r.qid}/{c}")
            if len(questions) == batch_size:
                yield adapter.prepare(shown, questions, conds)
                shown, questions, conds = [], [], []
    if questions:
        yield adapter.prepare(shown, questions, conds)


def cache_run(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    sites: Sequence[Site],
    out_dir: Path | str,
    *,
    positions: str | Sequence[str] = "final",
    conditions: Sequence[str] = ("image",),
    removal: RemovalKind = "gray",
    batch_size: int = 32,
    shard_rows: int = 1024,
    dist: Dist | None = None,
    progress: bool = True,
    skipped: Sequence[SkippedRow] = (),
) -> ActivationCache | None:
    """Cache this rank's rows into its part of ``out_dir``; rank 0 lists the parts (module docs).

    ``skipped``: the records the loader left out, written first in ``<out>/skipped.jsonl``. Returns the
    whole cache on rank 0 and ``None`` on the other ranks.
    """
    bad = [c for c in conditions if c not in CACHE_CONDITIONS]
    if bad or not conditions:
        raise ValueError(f"cache conditions {list(conditions)}: choose from {', '.join(CACHE_CONDITIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dist = dist or Dist()
    out = Path(out_dir)
    mine = split_images(rows, dist.world_size)[dist.rank]
    name = part_name(dist.rank, dist.world_size)
    own = [r for r in rows if r.image_id in mine]

    def write() -> None:
        readable, unreadable = _readable(own, images, adapter.size_guard)  # refusals before any deletion
        if dist.is_main:
            (out / MANIFEST_FILE).unlink(missing_ok=True)  # the manifest is rewritten once every part is
        shutil.rmtree(out / name, ignore_errors=True)
        keys: list[str] = []
        rm = Removal(removal)
        batches = _Counted(
            lambda: _batches(adapter, readable, images, conditions, rm, batch_size, keys, unreadable),
            math.ceil(len(readable) * len(conditions) / batch_size),
        )
        show = progress and dist.is_main
        cache_activations(adapter, batches, sites, positions, out, shard_rows=shard_rows, progress=show,
                          part=name, keys=keys)  # fmt: skip
        if unreadable:
            (out / name / "skipped.json").write_text(json.dumps(unreadable, indent=1))

    collectively(dist, write)
    if not dist.is_main:
        return None
    names = [part_name(r, dist.world_size) for r in range(dist.world_size)]
    merge_parts(out, names)
    _write_skipped(out, names, skipped)
    return ActivationCache.load(out)


def _write_skipped(out: Path, parts: Sequence[str], loaded: Sequence[SkippedRow]) -> None:
    """``<out>/skipped.jsonl``: the loader's records, then each part's rows with an unreadable image."""
    records: list[dict[str, Any]] = [p.record() for p in loaded]
    for name in parts:
        path = out / name / "skipped.json"
        for qid, detail in (json.loads(path.read_text()) if path.is_file() else {}).items():
            records.append({"row": qid, "line": None, "reason": "unreadable image", "detail": detail})
    RunFolder(out).write_skipped(records)  # no file when nothing was left out


def skipped_count(out_dir: Path | str) -> int:
    """Lines of a cache's (or run's) ``skipped.jsonl`` (0 if there is none)."""
    path = Path(out_dir) / SKIPPED_FILE
    return sum(1 for line in path.read_text().splitlines() if line) if path.is_file() else 0
