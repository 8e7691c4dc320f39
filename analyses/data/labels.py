"""CheXpert-style label tables as presence questions: MIMIC-CXR ``mimic-cxr-2.0.0-chexpert.csv``, CheXpert
``train.csv`` / ``valid.csv``, or any table with the CheXpert label columns.

A label is ``1.0`` (present), ``0.0`` (absent), ``-1.0`` (uncertain) or blank (not mentioned). Each
present / absent label of a finding the question bank knows (:data:`LABEL_FINDINGS`) becomes that
finding's questions about the image (:func:`analyses.data.questions.make_rows`: an original, one
paraphrase per family, operator variants). Uncertain labels are skipped and recorded (reason
``uncertain label``, with the line); blank labels are counted per finding in the report.

**Images.** CheXpert: the ``Path`` column, relative to the image root (the folder that holds
``CheXpert-v1.0-small/``); patient from ``patientNNNNN`` in the path; frontal images only
(``Frontal/Lateral``) unless ``frontal_only=False``. MIMIC-CXR: labels are per study (``subject_id``,
``study_id``); the images of a study come from ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (passed, or found next
to the label file or in the image root), frontal views (PA, AP) unless ``frontal_only=False``, at
``files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`` under the image root; a ``dicom_id``
column in the label table is used directly.

**Nothing is left out silently**: a view that is not frontal gets a skipped record (reason
``not a frontal view``, with the image id and its view), a study whose images in the metadata are all
lateral gets one (``no frontal view``, naming the study and the views it has), and a study absent from the
metadata gets one (``study not in metadata``), each with the label table's line.

**Splits.** A ``split`` column, else MIMIC's ``mimic-cxr-2.0.0-split.csv[.gz]`` (``validate`` = val) when
found beside the label file or in the image root, else a split by patient: ``crc32(patient) % 10``, 0-7
train, 8 val, 9 test (disjoint by patient; stated in the report).
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from analyses.data.loaded import MISSING_IMAGE, UNREADABLE_IMAGE, ImageFinder, LoadedRows, mimic_jpg_path
from analyses.data.questions import make_rows
from analyses.data.records import Records, read_records
from analyses.data.schema import SPLIT_ALIASES, QuestionRow, SkippedRow

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)  # fmt: skip
#: Label column -> question-bank finding (the findings the bank has questions for).
LABEL_FINDINGS: dict[str, str] = {
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural_effusion",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Atelectasis": "atelectasis",
}
#: Other columns a label table may have (targets of a column map besides the label names).
LABEL_ROLES: tuple[str, ...] = ("Path", "subject_id", "study_id", "dicom_id", "split", "Frontal/Lateral")
METADATA_NAMES = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
SPLIT_FILE_NAMES = ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")
FRONTAL_VIEWS = ("PA", "AP")


def looks_like_labels(columns: list[str]) -> bool:
    """A CheXpert-style label table: at least two CheXpert label columns and an image or study column."""
    has_labels = sum(c in CHEXPERT_LABELS for c in columns) >= 2
    return has_labels and ("Path" in columns or {"subject_id", "study_id"} <= set(columns))


def parse_label(v: Any) -> str:
    """``"1"``, ``"0"``, ``"-1"`` (uncertain), ``""`` (blank) or ``"?"`` (anything else)."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    text = str(v).strip()
    if not text:
        return ""
    try:
        num = float(text)
    except ValueError:
        return "?"
    return {1.0: "1", 0.0: "0", -1.0: "-1"}.get(num, "?")


@dataclass(frozen=True)
class _Case:
    image_id: str
    patient_id: str
    split: str
    findings: dict[str, bool]


#: Reasons an image or study of a label table is left out before its labels are read.
NOT_FRONTAL, NO_FRONTAL, NOT_IN_METADATA = "not a frontal view", "no frontal view", "study not in metadata"


@dataclass
class _Image:
    image_id: str
    patient_id: str
    ref: str
    line: int | None
    index: int
    labels: dict[str, str] = field(default_factory=dict)
    split: str = ""
    left_out: tuple[str, str] | None = None
    """(reason, detail) of an image or study left out for its view or metadata (recorded, never used)."""
    split_id: str = ""
    """The id its split is looked up by, if not ``image_id`` (a study left out: one of its images)."""


def _beside(names: tuple[str, ...], *folders: Path) -> Path | None:
    return next((f / n for f in folders for n in names if (f / n).is_file()), None)


def _mimic_images(records: Records, metadata: Path | None) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(subject_id, study_id) -> (dicom id, view) of every image of that study in the metadata."""
    if metadata is None:
        raise ValueError(
            f"{records.source}: MIMIC-CXR labels are per study; pass the image table with --metadata "
            f"mimic-cxr-2.0.0-metadata.csv (or put it next to the label file or in the image root)"
        )
    meta = read_records(metadata)
    need = {"dicom_id", "subject_id", "study_id", "ViewPosition"}
    if not need <= set(meta.columns):
        raise ValueError(
            f"{metadata} lacks columns {sorted(need - set(meta.columns))}; MIMIC metadata has {sorted(need)}"
        )
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for rec in meta.rows:
        key = (str(rec["subject_id"]).strip(), str(rec["study_id"]).strip())
        out.setdefault(key, []).append((str(rec["dicom_id"]).strip(), str(rec["ViewPosition"] or "").strip()))
    return out


def _study_images(
    study: tuple[str, str],
    images: list[tuple[str, str]] | None,
    frontal_only: bool,
    base: _Image,
    metadata: str,
) -> list[_Image]:
    """The images of one MIMIC study; the views left out (and a study without any usable one) as records."""
    sid, st = study
    where = f"study s{st} of subject p{sid}"
    if images is None:
        return [
            replace(
                base, image_id=f"p{sid}/s{st}", left_out=(NOT_IN_METADATA, f"{where} is not in {metadata}")
            )
        ]
    keep = [d for d, v in images if not frontal_only or v in FRONTAL_VIEWS]
    if not keep:
        views = ", ".join(f"{v or 'blank'} ({d})" for d, v in images)
        why = f"{where} has only {views} in {metadata}; --all-views uses them"
        return [replace(base, image_id=f"p{sid}/s{st}", left_out=(NO_FRONTAL, why), split_id=images[0][0])]
    out = [replace(base, image_id=d, ref=mimic_jpg_path(sid, st, d)) for d in keep]
    for d, v in images:
        if d not in keep:
            why = f"ViewPosition {v or 'blank'} ({where}); --all-views uses it"
            out.append(replace(base, image_id=d, ref=mimic_jpg_path(sid, st, d), left_out=(NOT_FRONTAL, why)))
    return out


#: Split of a patient without a split column or file: ``crc32(patient) % 10`` indexes this.
HASH_SPLITS: tuple[str, ...] = ("train",) * 8 + ("val", "test")


def _split_of(patient: str, given: str, table: dict[str, str], image_id: str) -> str:
    """The image's split (``""``: invalid, or not in the split file)."""
    if given:
        return SPLIT_ALIASES.get(given.strip().lower(), "")
    if table:
        return SPLIT_ALIASES.get(table.get(image_id, "").strip().lower(), "")
    return HASH_SPLITS[zlib.crc32((patient or image_id).encode()) % 10]


def _images(
    records: Records, columns: dict[str, str], metadata: Path | None, frontal_only: bool
) -> list[_Image]:
    """One :class:`_Image` per image of the table (a MIMIC study expands into its dicom images)."""
    col = columns
    studies = None
    if "Path" not in col and "dicom_id" not in col:
        studies = _mimic_images(records, metadata)
    out: list[_Image] = []
    for index, (rec, line) in enumerate(zip(records.rows, records.lines, strict=True)):
        labels = {name: parse_label(rec.get(c)) for name, c in col.items() if name in CHEXPERT_LABELS}
        split = str(rec.get(col["split"], "") or "") if "split" in col else ""
        if "Path" in col:
            path = str(rec.get(col["Path"], "") or "").strip()
            view = str(rec.get(col.get("Frontal/Lateral", ""), "") or "Frontal").strip()
            found = re.search(r"patient\d+", path)
            patient = found.group(0) if found else ""
            im = _Image(re.sub(r"\.[A-Za-z]+$", "", path), patient, path, line, index, labels, split)
            if frontal_only and view.lower() != "frontal":
                im.left_out = (NOT_FRONTAL, f"Frontal/Lateral = {view}; --all-views uses it")
            out.append(im)
            continue
        sid, study = str(rec.get(col["subject_id"], "")).strip(), str(rec.get(col["study_id"], "")).strip()
        base = _Image("", sid, "", line, index, labels, split)
        if studies is None:
            dicom = str(rec.get(col["dicom_id"], "")).strip()
            out.append(replace(base, image_id=dicom, ref=mimic_jpg_path(sid, study, dicom)))
        else:
            name = metadata.name if metadata else "the metadata"
            out += _study_images((sid, study), studies.get((sid, study)), frontal_only, base, name)
    return out


def label_rows(
    records: Records,
    image_root: str | Path,
    split: str | None = None,
    n_images: int = 0,
    column_map: Mapping[str, str] | None = None,
    metadata: str | Path | None = None,
    frontal_only: bool = True,
    seed: int = 0,
) -> LoadedRows:
    """Presence questions from a CheXpert-style label table (module docs).

    ``n_images`` keeps the first N usable images of the split in sorted id order (the same rule as
    :func:`analyses.data.schema.first_images`), so a huge table is not turned into rows it will not use;
    only those images are looked up on disk.
    """
    root = Path(image_root).expanduser().absolute()
    cmap = dict(column_map or {})
    bad = {
        c: r for c, r in cmap.items() if r not in (*LABEL_ROLES, *CHEXPERT_LABELS) or c not in records.columns
    }
    if bad:
        raise ValueError(f"column map {bad}: map existing columns onto {LABEL_ROLES} or CheXpert label names")
    columns = {c: c for c in records.columns if c not in cmap} | {role: c for c, role in cmap.items()}
    source_dir = Path(records.source).parent
    meta_path = Path(metadata) if metadata else _beside(METADATA_NAMES, source_dir, root)
    images = _images(records, columns, meta_path, frontal_only)
    split_file = (
        None if "split" in columns or "Path" in columns else _beside(SPLIT_FILE_NAMES, source_dir, root)
    )
    table = (
        {str(r["dicom_id"]).strip(): str(r["split"]) for r in read_records(split_file).rows}
        if split_file
        else {}
    )
    problems: list[SkippedRow] = list(records.problems)
    blank: Counter[str] = Counter()
    usable: dict[str, tuple[_Image, dict[str, bool]]] = {}
    n_other = 0
    for im in images:
        given = im.split
        im.split = _split_of(im.patient_id, im.split, table, im.split_id or im.image_id)
        if im.left_out is not None:  # recorded unless it is known to be of another split
            if split is None or im.split in ("", split):
                problems.append(SkippedRow(im.image_id, *im.left_out, im.index, im.line))
            continue
        if not im.split:
            why = f"split={given!r}" if given else "not in the split file"
            problems.append(SkippedRow(im.image_id, "invalid split", why, im.index, im.line))
            continue
        if split is not None and im.split != split:
            n_other += 1
            continue
        if im.image_id in usable:
            problems.append(
                SkippedRow(im.image_id, "duplicate image", f"{im.ref} appears twice", im.index, im.line)
            )
            continue
        found: dict[str, bool] = {}
        for name, finding in LABEL_FINDINGS.items():
            value = im.labels.get(name, "")
            key = f"{im.image_id}/{finding}"
            if value in ("1", "0"):
                found[finding] = value == "1"
            elif value == "-1":
                problems.append(SkippedRow(key, "uncertain label", f"{name} = -1.0", im.index, im.line))
            elif value == "?":
                problems.append(
                    SkippedRow(key, "invalid label", f"{name} is not 1, 0, -1 or blank", im.index, im.line)
                )
            elif name in columns:
                blank[name] += 1
        if found:
            usable[im.image_id] = (im, found)
    finder = ImageFinder(root)
    rows: list[QuestionRow] = []
    paths: dict[str, str] = {}
    for image_id in sorted(usable):
        if n_images and len(paths) >= n_images:
            break
        im, found = usable[image_id]
        path = finder.find(im.ref)
        bad_file = "" if path is None else finder.check(path)
        if path is None or bad_file:
            reason, detail = (
                (MISSING_IMAGE, f"not found: {root / im.ref}")
                if path is None
                else (UNREADABLE_IMAGE, bad_file)
            )
            problems.append(SkippedRow(image_id, reason, detail, im.index, im.line))
            continue
        paths[image_id] = path
        case = _Case(image_id, im.patient_id, im.split, found)
        made = make_rows(case, im.split, seed, findings=tuple(sorted(found)))
        rows += [replace(r, image_path=path) for r in made]
    notes = _notes(records, columns, blank, split_file, table, meta_path, finder, len(usable), rows)
    return LoadedRows(rows, problems, records.n_read, records.source, paths, n_other, "labels", notes)


def _notes(
    records: Records,
    columns: dict[str, str],
    blank: Counter[str],
    split_file: Path | None,
    table: dict[str, str],
    meta_path: Path | None,
    finder: ImageFinder,
    n_usable: int,
    rows: list[QuestionRow],
) -> tuple[str, ...]:
    labels = [c for c in columns if c in CHEXPERT_LABELS]
    ignored = [c for c in labels if c not in LABEL_FINDINGS]
    kind = "CheXpert (Path)" if "Path" in columns else "MIMIC-CXR (subject_id, study_id)"
    how = (
        "the split column"
        if "split" in columns
        else f"{split_file}"
        if table
        else "patient hash (crc32 % 10: 0-7 train, 8 val, 9 test; no split column or split file)"
    )
    origs = Counter(r.finding for r in rows if r.family == "original")
    notes = [
        f"layout: {kind} label table; images from {meta_path if 'Path' not in columns and 'dicom_id' not in columns else 'the table'}",
        f"splits from {how}",
        f"questions per finding (originals): {dict(sorted(origs.items()))} over {n_usable} usable images",
        f"blank (not mentioned) labels, not asked: {dict(blank)}",
    ]
    if ignored:
        notes.append(f"label columns without questions in the bank (ignored): {', '.join(ignored)}")
    if miss := finder.missing_note(len({r.image_id for r in rows}) + len(finder.missing)):
        notes.append(miss)
    return tuple(notes)
