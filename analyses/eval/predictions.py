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
named, and ``overwrite=True`` starts it afresh; what cannot change a prediction (batch size, a moved
model folder with equal weight hashes) is accepted and listed under ``resumes`` in ``meta.json``.

One process owns a folder at a time: :meth:`RunFolder.start` takes an exclusive ``flock`` on
``<folder>/.lock`` (held by the open file, so the kernel drops it when the process dies, SIGKILL
included) and writes the holder's pid, host, start time and command into it; a second run is refused
with :class:`RunFolderBusy` naming the holder. The lock is released by :meth:`RunFolder.release`, when an
error leaves :meth:`RunFolder.appender`, or when the ``RunFolder`` is garbage-collected. ``meta.json`` is written (atomically) only when the first
predictions are, so a run that fails before predicting anything leaves nothing that blocks the next one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from analyses.data.schema import QuestionRow
from analyses.eval.fingerprint import accepted_changes, compare_meta

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
#: The lock file of a run folder (never deleted by ``overwrite``: it is the lock being held).
LOCK_FILE = ".lock"
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


class RunFolderBusy(ValueError):
    """Another live process holds the run folder (:attr:`holder`: its pid, host, start time, command)."""

    def __init__(self, folder: Path, holder: dict[str, Any]) -> None:
        who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "since") if holder.get(k))
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        super().__init__(
            f"{folder} is in use by another run: {who or 'a process that has not written its details yet'}"
            f"{cmd}; wait for it to finish or stop it, or use another --out folder"
        )
        self.holder = holder


class RunChanged(ValueError):
    """The run folder holds a run of other weights, images or settings (every differing item is named)."""


class RunFolder:
    """A run folder: one process at a time, refuses to mix runs, and appends predictions so that a kill
    loses at most a batch."""

    def __init__(self, out_dir: Path | str) -> None:
        self.path = Path(out_dir)
        self.meta_path = self.path / META_FILE
        self.predictions_path = self.path / PREDICTIONS_FILE
        self._pending: dict[str, Any] | None = None
        self._lock: weakref.finalize | None = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the folder's lock (creating the folder), or raise :class:`RunFolderBusy` naming the holder."""
        if self._lock is not None and self._lock.alive:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(self.path, holder) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._lock = weakref.finalize(self, os.close, fd)  # closing the file drops the flock

    def release(self) -> None:
        """Drop the folder's lock (a no-op if this object does not hold it)."""
        if self._lock is not None:
            self._lock()
            self._lock = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock is not None and self._lock.alive

    def start(self, meta: dict[str, Any], overwrite: bool = False) -> None:
        """Lock the folder, then check that it holds this run (or nothing), or clear it with ``overwrite``.

        A recorded ``meta.json`` that differs in anything that can change a prediction is refused with every
        differing item named; predictions without a ``meta.json`` are refused too; on a refusal the lock is
        released. A new ``meta.json`` (or, for a resume with other batch size or model folder, the old
        one with the change listed under ``resumes``) is written by :meth:`commit`, with the first predictions.
        """
        self.acquire()
        try:
            self._check(meta, overwrite)
        except BaseException:
            self.release()
            raise

    def _check(self, meta: dict[str, Any], overwrite: bool) -> None:
        if overwrite:
            self.clear()
        if self.meta_path.exists():
            old = json.loads(self.meta_path.read_text())
            diff = compare_meta(old, meta)
            if diff:
                raise RunChanged(
                    f"{self.path} holds a different run ({'; '.join(diff)}): resume only with the same model, "
                    "weights, images and settings; pass --overwrite (overwrite=True) to start it afresh, "
                    "deleting its predictions, or use another --out folder"
                )
            changed = accepted_changes(old, meta)
            self._pending = None
            if changed:
                resume = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changed}
                self._pending = {**old, "resumes": [*old.get("resumes", []), resume]}
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
            except BaseException:
                app.flush(sync=False)
                self.release()  # the run is over: a caller holding the traceback must not keep the folder
                raise
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


def _read_holder(fd: int) -> dict[str, Any]:
    """What the holder of a lock file wrote into it (empty if it has not yet)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


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
