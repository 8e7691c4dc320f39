"""The paraphrase-sensitivity evaluator: every question x every condition, batched, resumable.

For each question row it computes the decision margin under up to four conditions
(:data:`~analyses.eval.predictions.CONDITIONS`):

- ``image``: the row's own image;
- ``removed``: the image removed as configured (``EvalConfig.removal``, recorded in ``meta.json``);
- ``swap_random``: the image of another patient, drawn at random (seeded);
- ``swap_label``: the image of another patient whose ground truth for this finding is the opposite.

Four steps: **plan** the (row, condition, image) work not yet in the run folder; **encode** each image
once (image processor, vision tower and projector, :class:`hooks.features.ImageFeatureCache`) and reuse
it for all of its questions and conditions: rows are laid out by the tokenizer alone
(:mod:`hooks.layout`), and with the image before the question each image's prefix (everything up to its
last image token) runs once, every row of it a suffix-only forward (:mod:`hooks.prefix`; the path is a
setting, ``EvalConfig.forward``, recorded in ``meta.json`` as ``forward_path``); **score** a batch;
**write** the batch to
``<out>/predictions.jsonl`` (:class:`~analyses.eval.predictions.RunFolder`). A killed run resumes where
it stopped: finished (qid, condition) pairs are neither recomputed nor duplicated, and only if the weights,
every image and every setting are the ones recorded (:mod:`analyses.eval.fingerprint`). Every row left
out, while loading (passed in) or because an image cannot be read, is listed in ``skipped.jsonl``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pandas as pd
import torch
from PIL import Image

from analyses.data.schema import ImageSource, QuestionRow, SkippedRow
from analyses.eval.fingerprint import image_fingerprints, runtime_fingerprint, weights_fingerprint
from analyses.eval.predictions import CONDITIONS, Condition, RunFolder, dataset_hash, prediction_record
from hooks.adapter import VLMAdapter
from hooks.features import ImageFeatureCache
from hooks.inputs import REMOVALS, Removal, RemovalKind, check_image_size, load_image
from hooks.layout import EncodedImage, layout_features
from hooks.prefix import PrefixStore, image_first, prefix_margins
from hooks.progress import tqdm

if TYPE_CHECKING:
    from analyses.eval.shard import Part

ForwardPath = Literal["auto", "prefix", "full"]
FORWARD_PATHS: tuple[str, ...] = ("auto", "prefix", "full")


@dataclass(frozen=True)
class EvalConfig:
    """What the evaluator runs (all recorded in the run's ``meta.json``)."""

    conditions: tuple[Condition, ...] = CONDITIONS
    """Which conditions to run, a subset of :data:`CONDITIONS` (``image`` is always run)."""
    removal: RemovalKind = "gray"
    """Image removal for the ``removed`` condition: one of gray, white, noise, none."""
    batch_size: int = 64
    """Rows per forward pass."""
    seed: int = 0
    """Seed of the swap partner draw (and of noise removal)."""
    flush_every: int = 1
    """Write results to disk every this many batches (1 = after every batch)."""
    forward: ForwardPath = "auto"
    """``prefix``: each image's prefix runs once and rows are suffix-only forwards (needs the image before
    the question); ``full``: every row is a whole-sequence forward (image features still cached); ``auto``:
    ``prefix`` where the prompt puts the image first, else ``full``. Both give the same margins to float
    rounding; the path that ran is recorded (``forward_path``) and a resume on the other one is refused."""
    compile: bool = False
    """``torch.compile`` the text decoder layers (dynamic shapes) before scoring: faster on a GPU once
    compiled, slow to start; numerics may differ from eager by rounding, so it is a recorded setting."""

    def __post_init__(self) -> None:
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown conditions {bad}; choose from {CONDITIONS}")
        if "image" not in self.conditions:
            object.__setattr__(self, "conditions", ("image", *self.conditions))
        if self.removal not in REMOVALS:
            raise ValueError(f"removal {self.removal!r} is not one of {REMOVALS}")
        if self.batch_size < 1 or self.flush_every < 1:
            raise ValueError("batch_size and flush_every must be >= 1")
        if self.forward not in FORWARD_PATHS:
            raise ValueError(f"forward {self.forward!r} is not one of {FORWARD_PATHS}")


def swap_partners(rows: Sequence[QuestionRow], seed: int) -> dict[tuple[str, str], str | None]:
    """For each (qid, kind) the image to swap in: another patient's image, random or label-controlled.

    Partners are drawn per (image, finding), so every question about the same image and finding
    gets the same partner; ``None`` when no valid partner exists (e.g. a single-patient set).
    """
    by_finding: dict[str, dict[str, tuple[str, bool]]] = {}
    for r in rows:
        label = r.ground_truth if r.polarity == 1 else not r.ground_truth
        by_finding.setdefault(r.finding, {})[r.image_id] = (r.patient_id or r.image_id, label)
    out: dict[tuple[str, str], str | None] = {}
    cache: dict[tuple[str, str, str], str | None] = {}
    for r in rows:
        pool = by_finding[r.finding]
        patient, label = pool[r.image_id]
        for kind in ("swap_random", "swap_label"):
            key = (r.image_id, r.finding, kind)
            if key not in cache:
                rng = random.Random(f"{seed}/{kind}/{r.image_id}/{r.finding}")
                cands = sorted(
                    i
                    for i, (p, lab) in pool.items()
                    if p != patient and (kind == "swap_random" or lab != label)
                )
                cache[key] = rng.choice(cands) if cands else None
            out[(r.qid, kind)] = cache[key]
    return out


class WorkItem(NamedTuple):
    """One prediction to make: a row under a condition, shown ``image_id`` (``None``: removed)."""

    row: QuestionRow
    condition: str
    image_id: str | None


def plan(
    rows: Sequence[QuestionRow],
    cfg: EvalConfig,
    finished: set[tuple[str, str]] | frozenset[tuple[str, str]],
    only_images: frozenset[str] | None = None,
) -> list[WorkItem]:
    """Every (row, condition) not yet finished, grouped by condition then shown image so batches share it.

    Swap conditions without a valid partner (see :func:`swap_partners`) are left out. ``only_images``
    keeps the rows of those images (a shard, :mod:`analyses.eval.shard`); partners are drawn over all rows.
    """
    partners = swap_partners(rows, cfg.seed)
    work: list[WorkItem] = []
    for r in rows:
        if only_images is not None and r.image_id not in only_images:
            continue
        for cond in cfg.conditions:
            if (r.qid, cond) in finished:
                continue
            img_id: str | None = r.image_id
            if cond.startswith("swap"):
                img_id = partners[(r.qid, cond)]
                if img_id is None:
                    continue
            elif cond == "removed":
                img_id = None
            work.append(WorkItem(r, cond, img_id))
    # rows that show the same image are neighbours, so they share batches (and the image's prefix)
    work.sort(key=lambda w: (w.condition, w.image_id or "", w.row.image_id))
    return work


def unpaired(
    rows: Sequence[QuestionRow],
    cfg: EvalConfig,
    planned: Sequence[WorkItem],
    only_images: frozenset[str] | None = None,
) -> list[dict[str, object]]:
    """``skipped.jsonl`` records of the swap predictions :func:`plan` left out of ``planned`` (its plan with
    nothing finished): no other patient's image (with the opposite label, for ``swap_label``) exists for
    the row's finding."""
    has = {(w.row.qid, w.condition) for w in planned}
    out: list[dict[str, object]] = []
    for r in rows:
        if only_images is not None and r.image_id not in only_images:
            continue
        for cond in cfg.conditions:
            if cond.startswith("swap") and (r.qid, cond) not in has:
                what = "with the opposite label " if cond == "swap_label" else ""
                detail = f"no other patient's image {what}for {r.finding} among the loaded rows"
                out.append(
                    {
                        "row": r.qid,
                        "line": None,
                        "reason": "no swap partner",
                        "detail": detail,
                        "condition": cond,
                    }
                )
    return out


class ImageInputs:
    """Images and their features for the evaluator: each image loaded and encoded once.

    An image that cannot be loaded is recorded in :attr:`skipped` (id -> error) and the work items that
    needed it in :attr:`dropped`; they are left out, never silently scored. The removal replacement depends only on the image size, so it is
    built and encoded once per size.
    """

    def __init__(self, adapter: VLMAdapter, source: ImageSource, removal: Removal) -> None:
        self.source, self.removal, self.adapter = source, removal, adapter
        self.features = ImageFeatureCache(adapter)
        self.prefixes = PrefixStore()
        """Image prefixes' keys/values (the prefix path), kept across batches."""
        self.skipped: dict[str, str] = {}
        self.dropped: list[dict[str, object]] = []
        self._pil: dict[str, Image.Image] = {}
        self._removed: dict[tuple[int, int], Image.Image | None] = {}

    def pil(self, image_id: str, row: QuestionRow | None = None) -> Image.Image | None:
        """The image (``row`` lets a file-backed source use the row's path); ``None`` if unreadable."""
        if image_id not in self._pil and image_id not in self.skipped:
            try:
                ref = row if row is not None and row.image_id == image_id else image_id
                self._pil[image_id] = load_image(self.source(ref))
            except (OSError, ValueError, KeyError) as err:
                self.skipped[image_id] = f"{type(err).__name__}: {err}"
        return self._pil.get(image_id)

    def inputs(self, item: WorkItem) -> tuple[str | None, EncodedImage | None] | None:
        """(feature key, encoded image shown) for a work item (``(None, None)``: no image tokens);
        ``None`` if an image it needs is unreadable."""
        own = self.pil(item.row.image_id, item.row)
        if own is None:
            return None
        if item.condition == "removed":
            if own.size not in self._removed:
                self._removed[own.size] = self.removal.apply(own, 0)
            rep = self._removed[own.size]
            key = f"removed:{own.size[0]}x{own.size[1]}"
            return (None, None) if rep is None else (key, self.features.encoded(key, rep))
        assert item.image_id is not None
        im = self.pil(item.image_id)
        return None if im is None else (item.image_id, self.features.encoded(item.image_id, im))

    def check_sizes(self, items: Sequence[WorkItem]) -> None:
        """Before anything runs, refuse an image of a size the model does not take
        (:attr:`~hooks.adapter.VLMAdapter.size_guard`), naming it and the fix; an unreadable one is left to the run."""
        size = self.adapter.size_guard
        if size is None:
            return
        seen: set[str] = set()
        for item in items:
            for image_id, row in ((item.row.image_id, item.row), (item.image_id, None)):
                if image_id is not None and image_id not in seen:
                    seen.add(image_id)
                    im = self.pil(image_id, row)
                    if im is not None:
                        check_image_size(image_id, im, size)

    def drop(self, item: WorkItem) -> None:
        """Record a work item left out because an image it needs could not be read."""
        own = item.row.image_id in self.skipped
        bad = item.row.image_id if own else str(item.image_id)
        self.dropped.append(
            {
                "row": item.row.qid,
                "line": None,
                "reason": "unreadable image" if own else "unreadable swap image",
                "detail": f"{bad}: {self.skipped.get(bad, '')}",
                "condition": item.condition,
            }
        )


def score(
    adapter: VLMAdapter, items: Sequence[WorkItem], images: ImageInputs, path: str = "full"
) -> list[str]:
    """Margins of a batch of work items (``path``: ``prefix`` or ``full``), as predictions.jsonl lines."""
    kept: list[WorkItem] = []
    shown: list[EncodedImage | None] = []
    keys: list[str] = []
    for item in items:
        got = images.inputs(item)
        if got is None:
            images.drop(item)
            continue
        kept.append(item)
        shown.append(got[1])
        if got[0] is not None:
            keys.append(got[0])
    if not kept:
        return []
    batch = adapter.layout([w.row.question for w in kept], shown, [w.condition for w in kept])
    feats = layout_features(shown)
    with torch.no_grad():
        if path == "prefix":
            m = prefix_margins(adapter, batch, feats, keys, images.prefixes).tolist()
        else:
            m = adapter.margins(batch, image_features=feats).float().cpu().tolist()
    return [prediction_record(w.row, w.condition, mi, w.image_id) for w, mi in zip(kept, m, strict=True)]


def forward_path(adapter: VLMAdapter, rows: Sequence[QuestionRow], cfg: EvalConfig) -> str:
    """The path a run takes (``prefix`` or ``full``): :attr:`EvalConfig.forward` resolved for this prompt."""
    first = image_first(adapter, rows[0].question) if rows else True
    if cfg.forward == "prefix" and not first:
        raise ValueError(
            "forward='prefix' needs the image before the question, but this prompt puts the question first "
            f"(image_position={adapter.config.image_position!r}); use forward='full' or 'auto'"
        )
    return "prefix" if cfg.forward == "prefix" or (cfg.forward == "auto" and first) else "full"


def run_meta(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    cfg: EvalConfig,
    progress: bool = False,
    image_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What a run records in ``meta.json`` (``image_hashes``: the image fingerprints, if already computed)."""
    return {
        **adapter.describe(example_question=rows[0].question if rows else None),
        "dataset_hash": dataset_hash(rows),
        "n_rows": len(rows),
        "removal": Removal(cfg.removal, seed=cfg.seed).label,
        "eval_config": asdict(cfg),
        "forward_path": forward_path(adapter, rows, cfg),
        "weights": weights_fingerprint(adapter),
        "runtime": runtime_fingerprint(adapter),
        "images": image_fingerprints(rows, images, progress) if image_hashes is None else image_hashes,
    }


def resume_note(done: int, todo: int, folder: Path) -> str:
    """What a resumed run has left: ``528/528 predictions already done in runs/x; nothing to compute``."""
    left = "nothing to compute" if todo == 0 else f"{todo} to compute"
    return f"{done}/{done + todo} predictions already done in {folder}; {left}"


def evaluate(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    out_dir: Path | str,
    config: EvalConfig | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    *,
    skipped: Sequence[SkippedRow] = (),
    overwrite: bool = False,
    part: Part | None = None,
) -> pd.DataFrame:
    """Run (or resume) an evaluation; returns the predictions table (one row per qid x condition).

    ``images(row_or_image_id)`` returns the PIL image; rows whose image cannot be loaded are left out
    (never silently scored) and listed in ``skipped.jsonl`` after ``skipped``, the rows the loader left
    out. A folder holding another run (other settings, weights or images) is refused unless
    ``overwrite``, which starts it afresh. ``max_batches`` stops early (used to test resuming). ``part``:
    this process's share of a sharded run (:func:`analyses.eval.shard.evaluate_sharded`).
    """
    if not rows:
        raise ValueError("no question rows to evaluate: the data source gave none for this split")
    cfg = config or EvalConfig()
    run = RunFolder(out_dir)
    removal = Removal(cfg.removal, seed=cfg.seed)
    inputs = ImageInputs(adapter, images, removal)
    only = None if part is None else part.images
    full = plan(rows, cfg, frozenset(), only)  # every (row, condition) of this process
    inputs.check_sizes(full)
    meta = run_meta(adapter, rows, images, cfg, progress) if part is None else part.meta
    run.start(meta, overwrite=overwrite)
    loaded = [p.record() for p in skipped]
    run.write_skipped(loaded)
    finished = run.finished() if part is None else run.finished() | part.finished
    work = [w for w in full if (w.row.qid, w.condition) not in finished]  # plan's order, finished left out
    if finished and progress:
        print(resume_note(len(full) - len(work), len(work), run.path))
    path = str(meta["forward_path"])
    if cfg.compile:
        adapter.compile_text_stack()
    bar = tqdm(total=len(work), desc=f"eval ({path})", disable=not progress, unit="q")
    with run.appender(cfg.flush_every) as out:
        for n, start in enumerate(range(0, len(work), cfg.batch_size), 1):
            chunk = work[start : start + cfg.batch_size]
            out.add_batch(score(adapter, chunk, inputs, path))
            bar.update(len(chunk))
            if max_batches is not None and n >= max_batches:
                break
    bar.close()
    run.write_skipped(loaded + inputs.dropped + unpaired(rows, cfg, full, only))
    return run.predictions()
