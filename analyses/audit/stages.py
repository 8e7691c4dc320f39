"""The audit's run folder: one subfolder per stage, each finished stage recorded with what it was computed from.

A stage's *key* is everything its result depends on: its settings, the model's fingerprint where it runs
the model, and the *digest* (a SHA-256 of the artifacts) of every stage it reads. A finished stage
(``<out>/<stage>/stage.json`` with ``finished``) whose recorded key equals the new one is not recomputed:
its artifacts are read back. A recorded key that differs is refused, every differing item named by its
dotted key (:func:`analyses.eval.fingerprint.compare_meta`'s diff), unless ``overwrite``, which deletes that
stage's folder and every later stage's before recomputing. A stage that never ran is computed (a stage
added to a finished audit, e.g. features); the report (:data:`DERIVED`) is redone whenever what it shows
changed. Because keys hold the upstream digests, a
changed input anywhere is caught at the first stage that reads it.

A stage is written into ``<stage>.tmp`` and renamed into place when done, so a crash leaves no half stage;
the whole folder is held by one process at a time (the eval run folder's lock,
:class:`analyses.eval.predictions.RunFolder`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyses.eval.fingerprint import _differences, _jsonable, _show
from analyses.eval.predictions import RunFolder

#: The audit's stages, in order.
STAGES: tuple[str, ...] = ("eval", "pairs", "localize", "features", "lora", "report")
STAGE_FILE = "stage.json"
#: Stages computed from the others' artifacts alone (the report): redone whenever those change, never refused.
DERIVED: tuple[str, ...] = ("report",)


class StageChanged(ValueError):
    """A finished stage was computed from other inputs than the ones given now."""


def digest_files(paths: Sequence[Path], root: Path) -> str:
    """SHA-256 over the files' names (relative to ``root``) and bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def digest_folder(folder: Path, exclude: Sequence[str] = (STAGE_FILE,)) -> str:
    """:func:`digest_files` of every file under ``folder`` except ``exclude`` names."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name not in exclude]
    return digest_files(files, folder)


def key_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``dotted.key: old -> new`` for every leaf that differs (keys of either side)."""
    diffs = _differences(old, new) | {k: (old[k], None) for k in old if k not in new}
    return [f"{k}: {_show(a, b)}" for k, (a, b) in diffs.items()]


@dataclass
class StageRecord:
    """What ``stage.json`` holds."""

    name: str
    """Stage name (one of :data:`STAGES`)."""
    key: dict[str, Any]
    """What the result was computed from (settings, fingerprints, upstream digests)."""
    digest: str
    """SHA-256 of the stage's artifacts."""
    seconds: float
    """Wall time of the computation."""
    summary: dict[str, Any]
    """The stage's headline (what the report and ``audit.json`` show)."""
    finished: str = ""
    """When it finished (local time)."""


class AuditFolder:
    """``<out>/<stage>/`` folders with their records; one process at a time (:meth:`hold`)."""

    def __init__(self, out: Path | str, overwrite: bool = False, progress: bool = True) -> None:
        self.path = Path(out)
        self.overwrite = overwrite
        self.progress = progress
        self._lock = RunFolder(self.path)

    @contextmanager
    def hold(self) -> Iterator[AuditFolder]:
        """Hold the folder's lock for the body (another process gets ``RunFolderBusy`` naming this one)."""
        self._lock.acquire()
        try:
            yield self
        finally:
            self._lock.release()

    def stage_dir(self, name: str) -> Path:
        return self.path / name

    def record(self, name: str) -> StageRecord | None:
        """The stage's record if it finished, else ``None``."""
        path = self.stage_dir(name) / STAGE_FILE
        if not path.is_file():
            return None
        return StageRecord(**json.loads(path.read_text()))

    def record_done(
        self, name: str, key: dict[str, Any], digest: str, seconds: float, summary: dict[str, Any]
    ) -> StageRecord:
        """Record a stage that wrote its own folder (the eval stage: a resumable run folder of its own)."""
        rec = StageRecord(name, _jsonable(key), digest, round(seconds, 2), _jsonable(summary),
                          time.strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
        path = self.stage_dir(name) / STAGE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec.__dict__, indent=1, default=str))
        tmp.replace(path)
        return rec

    def check(self, name: str, key: dict[str, Any]) -> StageRecord | None:
        """The stage's record when it finished with ``key``; ``None`` when it must be computed (new, or
        changed under ``overwrite``: then it and every later stage are deleted); :class:`StageChanged`
        when it finished with another key and ``overwrite`` is off."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {STAGES}")
        key = _jsonable(key)
        done = self.record(name)
        if done is not None and done.key == key:
            if self.progress:
                print(f"audit: {name} already done in {self.stage_dir(name)} ({done.seconds:.1f} s); reused")
            return done
        if done is not None and name not in DERIVED:
            self.refuse_or_clear(name, done.key, key)
            self._clear_from(name)
        return None

    def refuse_or_clear(self, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        """A finished stage's inputs changed from ``old`` to ``new``: :class:`StageChanged` naming every
        difference, or with ``overwrite`` delete every stage after ``name`` (the caller redoes ``name``)."""
        if not self.overwrite:
            raise StageChanged(
                f"{self.stage_dir(name)} was computed from other inputs ({'; '.join(key_diff(old, new))}): "
                "rerun with the same ones, or pass --overwrite (overwrite=True) to recompute this stage and "
                "the ones after it, or use another --out folder"
            )
        later = STAGES[STAGES.index(name) + 1 :]
        if later:
            self._clear_from(later[0])

    def _clear_from(self, name: str) -> None:
        for later in STAGES[STAGES.index(name) :]:
            for d in (self.stage_dir(later), self.stage_dir(later).with_name(later + ".tmp")):
                if d.exists():
                    shutil.rmtree(d)

    def run(
        self,
        name: str,
        key: dict[str, Any],
        compute: Callable[[Path], dict[str, Any]],
    ) -> StageRecord:
        """Run stage ``name`` (``compute(folder)`` writes its artifacts into ``folder`` and returns its
        summary), or read back its record when it finished with this ``key``. See the module doc."""
        done = self.check(name, key)
        if done is not None:
            return done
        key = _jsonable(key)
        tmp = self.stage_dir(name).with_name(name + ".tmp")
        for stale in (tmp, self.stage_dir(name)):  # a half-written stage, or a derived one being redone
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        summary = compute(tmp)
        rec = StageRecord(name, key, digest_folder(tmp), round(time.perf_counter() - t0, 2), _jsonable(summary),
                          time.strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
        (tmp / STAGE_FILE).write_text(json.dumps(rec.__dict__, indent=1, default=str))
        tmp.replace(self.stage_dir(name))
        if self.progress:
            print(f"audit: {name} done in {rec.seconds:.1f} s -> {self.stage_dir(name)}")
        return rec
