"""The paraphrase-sensitivity evaluator: every question x every condition, batched, resumable.

For each question row it computes the decision margin under up to four conditions:

- ``image``: the row's own image;
- ``removed``: the image removed as configured (``EvalConfig.removal``, recorded in ``meta.json``);
- ``swap_random``: the image of another patient, drawn at random (seeded);
- ``swap_label``: the image of another patient whose ground truth for this finding is the opposite.

Each image is encoded once (vision tower + projector) and the features are reused for all of its
questions and conditions. Results stream to ``<out>/predictions.jsonl`` after every batch; a killed
run resumes where it stopped (finished (qid, condition) pairs are not recomputed or duplicated).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from analyses.schema import QuestionRow
from hooks.adapter import VLMAdapter
from hooks.inputs import REMOVALS, Removal, load_image

CONDITIONS: tuple[str, ...] = ("image", "removed", "swap_random", "swap_label")
ImageSource = Callable[[QuestionRow | str], Image.Image]


@dataclass(frozen=True)
class EvalConfig:
    """What the evaluator runs (all recorded in the run's ``meta.json``)."""

    conditions: tuple[str, ...] = CONDITIONS
    """Which conditions to run, a subset of :data:`CONDITIONS` (``image`` is always run)."""
    removal: str = "gray"
    """Image removal for the ``removed`` condition: one of gray, white, noise, none."""
    batch_size: int = 64
    """Rows per forward pass."""
    seed: int = 0
    """Seed of the swap partner draw (and of noise removal)."""
    flush_every: int = 1
    """Write results to disk every this many batches (1 = after every batch)."""

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


def dataset_hash(rows: Sequence[QuestionRow]) -> str:
    """Content hash of the question rows (order-independent)."""
    h = hashlib.sha256()
    for line in sorted(json.dumps(r.to_dict(), sort_keys=True, default=str) for r in rows):
        h.update(line.encode())
    return h.hexdigest()[:16]


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


def read_predictions(path: Path) -> pd.DataFrame:
    """Load a predictions.jsonl, dropping a torn last line and duplicate (qid, condition) entries."""
    records = []
    if path.exists():
        with path.open() as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: its rows are recomputed on resume
    df = pd.DataFrame.from_records(records)
    if len(df):
        df = df.drop_duplicates(["qid", "condition"], keep="first").reset_index(drop=True)
    return df


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def evaluate(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    out_dir: Path | str,
    config: EvalConfig | None = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> pd.DataFrame:
    """Run (or resume) an evaluation; returns the predictions table (one row per qid x condition).

    ``images(row_or_image_id)`` returns the PIL image; rows whose image cannot be loaded are
    reported in ``skipped.json`` and left out (never silently scored). ``max_batches`` stops early
    (used to test resuming).
    """
    cfg = config or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        **adapter.describe(),
        "dataset_hash": dataset_hash(rows),
        "n_rows": len(rows),
        "removal": Removal(cfg.removal).label,  # type: ignore[arg-type]
        "eval_config": asdict(cfg),
    }
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = {
            k for k in meta if k != "started" and old.get(k) != json.loads(json.dumps(meta[k], default=str))
        }
        if diff:
            raise ValueError(
                f"{out} holds a run with different {sorted(diff)}; resume with the same settings or pass a new out_dir"
            )
    else:
        meta["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        meta_path.write_text(json.dumps(meta, indent=1, default=str))

    pred_path = out / "predictions.jsonl"
    _drop_torn_tail(pred_path)
    done = read_predictions(pred_path)
    finished = set(zip(done["qid"], done["condition"], strict=True)) if len(done) else set()
    partners = swap_partners(rows, cfg.seed)
    removal = Removal(cfg.removal, seed=cfg.seed)  # type: ignore[arg-type]

    # load images once; report unreadable ones
    skipped: dict[str, str] = {}
    image_cache: dict[str, Image.Image] = {}

    def get_image(image_id: str, row: QuestionRow | None = None) -> Image.Image | None:
        if image_id in image_cache:
            return image_cache[image_id]
        if image_id in skipped:
            return None
        try:
            im = load_image(images(row if row is not None and row.image_id == image_id else image_id))
        except (OSError, ValueError, KeyError) as err:
            skipped[image_id] = f"{type(err).__name__}: {err}"
            return None
        image_cache[image_id] = im
        return im

    work: list[tuple[QuestionRow, str, str | None]] = []  # (row, condition, image_id used)
    for r in rows:
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
            work.append((r, cond, img_id))
    # group work by condition so batches share a layout
    work.sort(key=lambda w: (w[1], w[0].image_id))

    features: dict[str, torch.Tensor] = {}

    def encode(im: Image.Image) -> torch.Tensor:
        pv = adapter.processor.image_processor(images=[im], return_tensors="pt")["pixel_values"]
        return adapter.image_features(pv)[0]

    def feats_for(image_id: str) -> torch.Tensor:
        if image_id not in features:
            features[image_id] = encode(image_cache[image_id])
        return features[image_id]

    # the removal replacement depends only on the image size: build and encode it once per size
    removed: dict[tuple[int, int], tuple[Image.Image | None, torch.Tensor | None]] = {}

    def removed_for(own: Image.Image) -> tuple[Image.Image | None, torch.Tensor | None]:
        if own.size not in removed:
            rep = removal.apply(own, 0)
            removed[own.size] = (rep, None if rep is None else encode(rep))
        return removed[own.size]

    buffer: list[str] = []
    n_batches = 0
    bar = tqdm(total=len(work), desc="eval", disable=not progress, unit="q")
    with pred_path.open("a") as fh:
        for start in range(0, len(work), cfg.batch_size):
            chunk = work[start : start + cfg.batch_size]
            batch_imgs: list[Image.Image | None] = []
            feat_list: list[torch.Tensor] = []
            keep: list[tuple[QuestionRow, str, str | None]] = []
            for r, cond, img_id in chunk:
                own = get_image(r.image_id, r)
                if own is None:
                    continue
                if cond == "removed":
                    rep, feat = removed_for(own)
                    batch_imgs.append(rep)
                    if feat is not None:
                        feat_list.append(feat)
                else:
                    assert img_id is not None
                    im = get_image(img_id)
                    if im is None:
                        continue
                    batch_imgs.append(im)
                    feat_list.append(feats_for(img_id))
                keep.append((r, cond, img_id))
            if keep:
                # only the prompt layout is needed from prepare; pixels come from the feature cache
                batch = adapter.prepare(batch_imgs, [r.question for r, _, _ in keep], [c for _, c, _ in keep])
                feats = torch.stack(feat_list) if feat_list else None
                with torch.no_grad():
                    m = adapter.margins(batch, image_features=feats).cpu().tolist()
                for (r, cond, img_id), mi in zip(keep, m, strict=True):
                    rec = {**r.to_dict(), "condition": cond, "margin": mi, "pred": mi > 0}
                    rec["swap_image_id"] = img_id if cond.startswith("swap") else None
                    rec.pop("meta", None)
                    buffer.append(json.dumps(rec))
            n_batches += 1
            bar.update(len(chunk))
            if n_batches % cfg.flush_every == 0 and buffer:
                fh.write("\n".join(buffer) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                buffer.clear()
            if max_batches is not None and n_batches >= max_batches:
                break
        if buffer:
            fh.write("\n".join(buffer) + "\n")
            fh.flush()
    bar.close()
    if skipped:
        (out / "skipped.json").write_text(json.dumps({"count": len(skipped), "images": skipped}, indent=1))
    return read_predictions(pred_path)


def run_metadata(out_dir: Path | str) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "meta.json").read_text())
