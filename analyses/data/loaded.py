"""What every file loader returns (:class:`LoadedRows`) and how it finds and checks image files.

Every loader (:mod:`analyses.data.psf`, :mod:`analyses.data.psfmed`, :mod:`analyses.data.labels`) returns
the loaded rows, every skipped record with its reason and line (:class:`~analyses.data.schema.SkippedRow`),
and one image file per image id. :class:`ImageFinder` resolves image references against the user's image
root (relative paths, the MIMIC-CXR-JPG layout, bare file names in any subfolder, ids without a suffix)
and checks each file once (:func:`hooks.medimage.verify_image`: DICOM and 16-bit PNG included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from analyses.data.schema import QuestionRow, SkippedRow
from hooks.medimage import read_image, verify_image

#: Suffixes tried, in order, for an image reference without one (VinDr ids, PadChest names without suffix).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
MISSING_IMAGE, UNREADABLE_IMAGE = "missing image", "unreadable image"


@dataclass(frozen=True)
class LoadedRows:
    """A loader's result: the valid rows, every skipped record, and the image file of every image id."""

    rows: list[QuestionRow]
    """Valid question rows, in file order."""
    problems: list[SkippedRow]
    """Every skipped record (or question) with its reason, detail and line."""
    n_read: int
    """Records read from the file (lines skipped as malformed included)."""
    source: str
    """The file (or hub id) the rows came from."""
    image_paths: dict[str, str]
    """image_id -> image file for every loaded row."""
    n_other_split: int = 0
    """Records left out because they belong to another split than the one asked for (not errors)."""
    layout: str = "flipscope"
    """The file layout read: ``flipscope`` (one record per question row), ``psf-med`` (original-paraphrase
    pairs or questions with their paraphrases), ``labels`` (CheXpert-style label table)."""
    notes: tuple[str, ...] = ()
    """Extra report lines: columns detected, maps applied, counts of what was made and left out."""

    def __post_init__(self) -> None:
        accounted = len(self.rows) + len(self.problems) + self.n_other_split
        if self.layout == "flipscope" and self.n_read != accounted:
            raise ValueError(
                f"LoadedRows: n_read={self.n_read} != loaded {len(self.rows)} + skipped {len(self.problems)} "
                f"+ other splits {self.n_other_split}: every row read must be accounted for"
            )
        qids = [r.qid for r in self.rows]
        if len(set(qids)) != len(qids):
            raise ValueError("LoadedRows: loaded rows have duplicate qids")
        unmapped = sorted({r.image_id for r in self.rows} - set(self.image_paths))
        if unmapped:
            raise ValueError(f"LoadedRows: image_ids without an image path: {unmapped[:10]}")

    @property
    def skipped(self) -> dict[str, list[str]]:
        """Reason -> ids of the rows skipped for it (reasons in order of first occurrence)."""
        out: dict[str, list[str]] = {}
        for p in self.problems:
            out.setdefault(p.reason, []).append(p.qid)
        return out

    def image_for(self, row_or_image_id: QuestionRow | str) -> Image.Image:
        """The 8-bit RGB image of a row (or of an image id); ``KeyError`` for an id not in this load."""
        image_id = row_or_image_id if isinstance(row_or_image_id, str) else row_or_image_id.image_id
        path = self.image_paths.get(image_id)
        if path is None and not isinstance(row_or_image_id, str) and row_or_image_id.image_path:
            path = row_or_image_id.image_path
        if path is None:
            n = len(self.image_paths)
            raise KeyError(f"image_id {image_id!r} is not among the {n} images loaded from {self.source}")
        return read_image(path)

    def report(self, max_ids: int = 10) -> str:
        """Multi-line summary: rows read / loaded / skipped, notes, then per reason the count, ids and an example."""
        lines = [
            f"{self.source}: read {self.n_read} rows, loaded {len(self.rows)} "
            f"({len({r.image_id for r in self.rows})} images), skipped {len(self.problems)}"
            + (f", {self.n_other_split} in other splits (not loaded)" if self.n_other_split else "")
        ]
        lines += [f"  {n}" for n in self.notes]
        for reason, ids in self.skipped.items():
            more = f" ... and {len(ids) - max_ids} more" if len(ids) > max_ids else ""
            lines.append(f"  {reason}: {len(ids)} ({', '.join(ids[:max_ids])}{more})")
            example = next(p for p in self.problems if p.reason == reason)
            if example.detail:
                named = example.line is None or example.qid == f"line {example.line}"
                at = "" if named else f" (line {example.line})"
                lines.append(f"    e.g. {example.qid}{at}: {example.detail}")
        return "\n".join(lines)


class ImageFinder:
    """Image files under one root: each reference resolved and checked once.

    A reference is tried as a path relative to the root (or absolute); without a suffix, with each of
    :data:`IMAGE_SUFFIXES`; and, failing that, as a bare file name anywhere under the root (the root is
    walked once, on the first such miss: PadChest images sit in numbered subfolders, VinDr in train/test).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self._index: dict[str, str] | None = None
        self._checked: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        """image reference -> where it was looked for, for every reference not found."""

    def _by_name(self) -> dict[str, str]:
        if self._index is None:
            index: dict[str, str] = {}
            if self.root.is_dir():
                for folder, _dirs, files in os.walk(self.root):
                    for name in files:
                        index.setdefault(name, os.path.join(folder, name))
                        index.setdefault(os.path.splitext(name)[0], os.path.join(folder, name))
            self._index = index
        return self._index

    def find(self, ref: str) -> str | None:
        """The file of an image reference (a relative path, a file name, or an id without a suffix), or ``None``."""
        ref = ref.strip()
        if not ref:
            return None
        direct = self.root / ref
        candidates = [direct, *(direct.with_name(direct.name + s) for s in IMAGE_SUFFIXES)]
        for c in candidates:
            if c.is_file():
                return str(c)
        hit = self._by_name().get(Path(ref).name)
        if hit is None:
            self.missing[ref] = str(direct)
        return hit

    def check(self, path: str) -> str:
        """``""`` if the file can be read, else why (checked once per file)."""
        if path not in self._checked:
            self._checked[path] = verify_image(path)
        return self._checked[path]

    def missing_note(self, n_images: int) -> str:
        """``"N of M images not found under ROOT (e.g. PATH)"``, or ``""`` when none is missing."""
        if not self.missing:
            return ""
        example = next(iter(self.missing.values()))
        return (
            f"{len(self.missing)} of {n_images} images not found under {self.root} (e.g. {example}); "
            "pass --image-root with the folder that holds them"
        )


def mimic_jpg_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    """MIMIC-CXR-JPG: ``files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`` (relative)."""
    s, st = subject_id.strip().lstrip("p"), study_id.strip().lstrip("s")
    return f"files/p{s[:2]}/p{s}/s{st}/{dicom_id.strip()}.jpg"
