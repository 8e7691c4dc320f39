"""The predictions table and the run folder that holds it.

A *predictions table* has one row per (question row, condition): the
:class:`~analyses.data.schema.QuestionRow` fields plus ``condition`` (one of :data:`CONDITIONS`),
``margin`` (logit(yes) - logit(no)), ``pred`` (``margin > 0``) and ``swap_image_id`` on swap rows.

A *run folder* holds ``meta.json`` (what produced the run: model, answer ids, prompt, dataset hash,
removal, evaluator config, and content fingerprints of the weights and of every image:
:mod:`analyses.eval.fingerprint`), ``predictions.jsonl`` (appended and fsynced as batches finish, so a
killed run loses at most one batch and resumes where it stopped) and ``skipped.jsonl`` (one line per row
left out, while loading or scoring: ``row``, ``line``, ``reason``, ``detail``). A folder is only ever
resumed with the same settings, weights and images: any difference is refused with the differing items
named, and ``overwrite=True`` starts it afresh. ``meta.json`` is written (atomically) only when the first
predictions are, so a run that fails before predicting anything leaves nothing that blocks the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from analyses.data.schema import QuestionRow
from analyses.eval.fingerprint import compare_meta

Condition = Literal["image", "removed", "swap_random", "swap_label"]
#: Conditions a prediction can be made under: the row's own image, the image removed (how is recorded
#: in meta.json), another patient's image at random, another patient's image with the opposite label.
CONDITIONS: tuple[Condition, ...] = ("image", "removed", "swap_random", "swap_label")
#: ``swap_sensitivity(kind=...)`` -> condition.
SWAP_CONDITIONS: dict[str, Condition] = {"random": "swap_random", "label": "swap_label"}
#: Columns every predictions table must have.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "qid", "image_id", "question", "family", "paraphrase_of", "polarity", "ground_truth", "finding",
    "split", "condition", "margin", "pred",
)  # fmt: skip
META_FILE, PREDICTIONS_FILE, SKIPPED_FILE = "meta.json", "predictions.jsonl", "skipped.jsonl"
#: Files a run writes into its folder (``overwrite`` deletes exactly these; ``skipped.json`` is the old name).
RUN_FILES: tuple[str, ...] = (
    META_FILE,
    PREDICTIONS_FILE,
    SKIPPED_FILE,
    "skipped.json",
    "summary.json",
    "report.html",
)


def dataset_hash(rows: Sequence[QuestionRow]) -> str:
    """Content hash of the question rows (order-independent)."""
    h = hashlib.sha256()
    for line in sorted(json.dumps(r.to_dict(), sort_keys=True, default=str) for r in rows):
        h.update(line.encode())
    return h.hexdigest()[:16]


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


def prediction_record(row: QuestionRow, condition: str, margin: float, image_id: str | None) -> str:
    """One predictions.jsonl line (without the newline)."""
    rec = {**row.to_dict(), "condition": condition, "margin": margin, "pred": margin > 0}
    rec["swap_image_id"] = image_id if condition.startswith("swap") else None
    rec.pop("meta", None)
    return json.dumps(rec)


class RunFolder:
    """A run folder: refuses to mix runs, and appends predictions so that a kill loses at most a batch."""

    def __init__(self, out_dir: Path | str) -> None:
        self.path = Path(out_dir)
        self.meta_path = self.path / META_FILE
        self.predictions_path = self.path / PREDICTIONS_FILE
        self._pending: dict[str, Any] | None = None

    def start(self, meta: dict[str, Any], overwrite: bool = False) -> None:
        """Check that the folder holds this run (or nothing), or clear it first with ``overwrite``.

        A recorded ``meta.json`` that differs in anything but ``started`` is refused with every differing
        item named; predictions without a ``meta.json`` are refused too. A new ``meta.json`` is written
        by :meth:`commit`, when the first predictions are.
        """
        if overwrite:
            self.clear()
        if self.meta_path.exists():
            diff = compare_meta(json.loads(self.meta_path.read_text()), meta)
            if diff:
                raise ValueError(
                    f"{self.path} holds a different run ({'; '.join(diff)}): resume only with the same model, "
                    "weights, images and settings; pass --overwrite (overwrite=True) to start it afresh, "
                    "deleting its predictions, or use another --out folder"
                )
            self._pending = None
        elif self.predictions_path.exists() and self.predictions_path.stat().st_size:
            raise ValueError(
                f"{self.path} holds predictions.jsonl without meta.json, so it cannot be checked: pass "
                "--overwrite (overwrite=True) to start afresh, or use another --out folder"
            )
        else:
            self._pending = {**meta, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def commit(self) -> None:
        """Write the pending ``meta.json`` (atomically), if this run has not written it yet."""
        if self._pending is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self._pending, indent=1, default=str))
            tmp.replace(self.meta_path)
            self._pending = None

    def clear(self) -> None:
        """Delete this folder's run files (:data:`RUN_FILES`); anything else in it is left alone."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)

    def finished(self) -> set[tuple[str, str]]:
        """(qid, condition) pairs already in ``predictions.jsonl`` (a torn last line is cut first)."""
        self._drop_torn_tail()
        done = read_predictions(self.predictions_path)
        return set(zip(done["qid"], done["condition"], strict=True)) if len(done) else set()

    def predictions(self) -> pd.DataFrame:
        return read_predictions(self.predictions_path)

    @contextmanager
    def appender(self, flush_every: int = 1) -> Iterator[_Appender]:
        """Append lines to ``predictions.jsonl``; written and fsynced every ``flush_every`` batches.

        ``meta.json`` is committed just before the first lines are written.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        with self.predictions_path.open("a") as fh:
            app = _Appender(fh, flush_every, self.commit)
            try:
                yield app
            finally:
                app.flush(sync=False)

    def write_skipped(self, records: Sequence[dict[str, Any]]) -> None:
        """Write ``skipped.jsonl`` (one line per row left out: ``row``, ``line``, ``reason``, ``detail``, ...).

        Rewritten whole (atomically) each time; no file when nothing was skipped.
        """
        path = self.path / SKIPPED_FILE
        if not records:
            path.unlink(missing_ok=True)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        tmp.replace(path)

    def skipped(self) -> list[dict[str, Any]]:
        """The records of ``skipped.jsonl`` (empty if there is none)."""
        path = self.path / SKIPPED_FILE
        return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []

    def _drop_torn_tail(self) -> None:
        """Cut a last line that a kill left without its newline, so appends start on a fresh line."""
        path = self.predictions_path
        if not path.exists() or path.stat().st_size == 0:
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


class _Appender:
    def __init__(self, fh: Any, flush_every: int, before_first_write: Callable[[], None]) -> None:
        self.fh, self.flush_every, self.before_first_write = fh, flush_every, before_first_write
        self.buffer: list[str] = []
        self.n_batches = 0

    def add_batch(self, lines: list[str]) -> None:
        self.buffer.extend(lines)
        self.n_batches += 1
        if self.n_batches % self.flush_every == 0:
            self.flush(sync=True)

    def flush(self, sync: bool) -> None:
        if self.buffer:
            self.before_first_write()
            self.fh.write("\n".join(self.buffer) + "\n")
            self.fh.flush()
            if sync:
                os.fsync(self.fh.fileno())
            self.buffer.clear()
