"""Real-data loaders: PSF-Med-style question files, VinDr-CXR boxes and MIMIC-CXR-JPG image paths.

:func:`load_psf_rows` reads a question file (JSON Lines, CSV or parquet, chosen by the suffix) into
:class:`~analyses.schema.QuestionRow` objects. Expected columns (:data:`EXPECTED_COLUMNS`; rename yours
onto them with ``column_map={"yours": "expected"}``):

- ``qid`` unique row id; ``image_id`` (also the key into box tables); ``question``, the text exactly as
  shown to the model; ``finding``, e.g. ``cardiomegaly``; optional ``patient_id`` (empty when absent).
- ``family``: ``original``, a paraphrase family (lexical, syntactic, register, scope, voice, reorder) or
  ``operator``, case-insensitive; ``paraphrase_of``: the original's qid, empty / null for originals.
- ``polarity``: +1 / -1 or ``preserve`` / ``invert``; ``ground_truth`` (of *this* question, already
  inverted for operators): bool, 0/1, yes/no or true/false.
- ``split``: train, val (or validation) or test; ``image_path``: relative to ``image_root`` (default:
  the question file's folder) or absolute.

Other columns are carried in ``QuestionRow.meta`` as strings. A bad row never crashes the load and is
never silently dropped: it is recorded with its reason (see :data:`REASONS`) in
:attr:`LoadedRows.problems`, and :meth:`LoadedRows.report` prints the counts with example ids.
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from PIL import Image

from analyses.schema import FAMILIES, ORIGINAL, QuestionRow
from analyses.synthcxr import BOX_COLUMNS, VINDR_CLASS_NAMES

log = logging.getLogger(__name__)
__all__ = [
    "EXPECTED_COLUMNS",
    "FORMATS",
    "REASONS",
    "BoxTuple",
    "LoadedRows",
    "SkippedRow",
    "boxes_for",
    "load_psf_rows",
    "load_vindr_boxes",
    "mimic_image_paths",
    "parse_ground_truth",
    "parse_polarity",
]

#: Columns every PSF-Med-style file must have (after ``column_map``); ``patient_id`` is optional.
EXPECTED_COLUMNS: tuple[str, ...] = (
    "qid",
    "image_id",
    "question",
    "family",
    "paraphrase_of",
    "polarity",
    "ground_truth",
    "finding",
    "split",
    "image_path",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("patient_id",)
#: File suffix -> ``datasets`` builder.
FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_NAMES: dict[str, str] = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_TRUTH_WORDS = {"yes": True, "no": False, "true": True, "false": False}
_POLARITY_WORDS = {"preserve": 1, "invert": -1}

#: Every reason a row can be skipped for, in the order checks run (first failing check wins).
REASONS: tuple[str, ...] = (
    "missing qid",
    "duplicate qid",
    "invalid split",
    "empty question",
    "missing image_id or finding",
    "unknown family",
    "invalid polarity",
    "invalid ground truth",
    "rejected by QuestionRow",
    "missing image",
    "unreadable image",
    "conflicting image path",
    "not an original",
    "original mismatch",
    "ground truth inconsistent with original",
    "original skipped",
    "original missing",
)


@dataclass(frozen=True)
class SkippedRow:
    """One row of a question file that was left out, and why."""

    qid: str
    """The row's qid (``row <index>`` when the qid itself is missing)."""
    reason: str
    """One of :data:`REASONS`."""
    detail: str = ""
    """What exactly was wrong: the value, the path, or QuestionRow's message."""
    index: int = -1
    """0-based position of the row in the file (-1 if unknown)."""

    def __post_init__(self) -> None:
        if not self.qid:
            raise ValueError("SkippedRow.qid is empty: use 'row <index>' for rows without a qid")
        if self.reason not in REASONS:
            raise ValueError(f"SkippedRow {self.qid!r}: unknown reason {self.reason!r}; see REASONS")


@dataclass(frozen=True)
class LoadedRows:
    """The result of :func:`load_psf_rows`: the valid rows, every skipped row, and the image paths."""

    rows: list[QuestionRow]
    """Valid question rows, in file order."""
    problems: list[SkippedRow]
    """Every skipped row with its reason and detail, in file order per check."""
    n_read: int
    """Rows read from the file (= loaded + skipped + rows of other splits)."""
    source: str
    """The file the rows came from."""
    image_paths: dict[str, str]
    """image_id -> image file for every loaded row."""
    n_other_split: int = 0
    """Rows left out because they belong to another split than the one asked for (not errors)."""

    def __post_init__(self) -> None:
        if self.n_read != len(self.rows) + len(self.problems) + self.n_other_split:
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
        """Reason -> qids of the rows skipped for it (in :data:`REASONS` order, empty reasons left out)."""
        by_reason = {reason: [p.qid for p in self.problems if p.reason == reason] for reason in REASONS}
        return {reason: ids for reason, ids in by_reason.items() if ids}

    def image_for(self, row_or_image_id: QuestionRow | str) -> Image.Image:
        """The RGB image of a row (or of an image id); ``KeyError`` for an id not in this load."""
        image_id = row_or_image_id if isinstance(row_or_image_id, str) else row_or_image_id.image_id
        path = self.image_paths.get(image_id)
        if path is None and not isinstance(row_or_image_id, str) and row_or_image_id.image_path:
            path = row_or_image_id.image_path
        if path is None:
            n = len(self.image_paths)
            raise KeyError(f"image_id {image_id!r} is not among the {n} images loaded from {self.source}")
        with Image.open(path) as im:
            return im.convert("RGB")

    def report(self, max_ids: int = 10) -> str:
        """Multi-line summary: rows read / loaded / skipped, then per reason the count, ids and one detail."""
        lines = [
            f"{self.source}: read {self.n_read} rows, loaded {len(self.rows)} "
            f"({len({r.image_id for r in self.rows})} images), skipped {len(self.problems)}"
            + (f", {self.n_other_split} in other splits (not loaded)" if self.n_other_split else "")
        ]
        for reason, ids in self.skipped.items():
            more = f" ... and {len(ids) - max_ids} more" if len(ids) > max_ids else ""
            lines.append(f"  {reason}: {len(ids)} ({', '.join(ids[:max_ids])}{more})")
            example = next(p for p in self.problems if p.reason == reason)
            if example.detail:
                lines.append(f"    e.g. {example.qid}: {example.detail}")
        return "\n".join(lines)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _text(v: Any) -> str:
    """A cell as text; integral floats (ids read as numbers) lose their ``.0``; missing -> ``""``."""
    if _missing(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _number(v: Any) -> float | None:
    """A non-bool number, or text that parses as one ("1", "-1.0"); else ``None``."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    try:
        return float(v) if isinstance(v, str) else None
    except ValueError:
        return None


def parse_ground_truth(v: Any) -> bool | None:
    """bool, 0/1 (number or text), yes/no, true/false -> bool; anything else -> ``None``."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUTH_WORDS:
        return _TRUTH_WORDS[v.strip().lower()]
    num = _number(v)
    return bool(num) if num in (0.0, 1.0) else None


def parse_polarity(v: Any) -> int | None:
    """+1 / -1 (number or text) or preserve / invert -> +1 / -1; anything else (bools too) -> ``None``."""
    if isinstance(v, str) and v.strip().lower() in _POLARITY_WORDS:
        return _POLARITY_WORDS[v.strip().lower()]
    num = _number(v)
    return int(num) if num in (1.0, -1.0) else None


def _read_records(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSON Lines / CSV / parquet file via ``datasets`` (nothing written next to the data)."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot read {path}: unsupported suffix {path.suffix!r}; use {sorted(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    import datasets

    kwargs: dict[str, Any] = {}
    if fmt == "csv":  # read every column as text so ids like "007" survive; values are parsed below
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if not header:
            raise ValueError(f"cannot read {path}: the CSV file has no header row")
        kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="flipscope-datasets-") as cache:
            ds = datasets.load_dataset(
                fmt, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **kwargs
            )
            records = list(ds.to_list())
    except (ValueError, OSError, TypeError, KeyError, datasets.exceptions.DatasetsError) as err:
        cause = err.__cause__ or err.__context__ or err  # datasets wraps the arrow / pandas parse error
        raise ValueError(f"cannot read {path} as {fmt}: {type(cause).__name__}: {cause}") from err
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if not records:
        raise ValueError(f"{path} has no rows")
    return records


def _apply_column_map(records: list[dict[str, Any]], cmap_in: Mapping[str, str] | None, path: Path) -> None:
    columns = list(records[0])
    cmap = dict(cmap_in or {})
    bad_targets = {k: v for k, v in cmap.items() if v not in (*EXPECTED_COLUMNS, *OPTIONAL_COLUMNS)}
    if bad_targets:
        raise ValueError(f"column_map targets {bad_targets} are not expected columns {EXPECTED_COLUMNS}")
    absent = [k for k in cmap if k not in columns]
    if absent:
        raise ValueError(f"column_map names columns {absent} that {path} does not have; it has {columns}")
    clash = [v for k, v in cmap.items() if v in columns and v not in cmap]
    if clash:
        raise ValueError(f"column_map renames onto {clash}, which {path} already has; map or drop those too")
    if cmap:
        for i, rec in enumerate(records):
            records[i] = {cmap.get(k, k): v for k, v in rec.items()}
    missing = [c for c in EXPECTED_COLUMNS if c not in records[0]]
    if missing:
        raise ValueError(
            f"{path} lacks columns {missing} (it has {list(records[0])}); rename yours with "
            "column_map={'your_name': 'expected_name'}"
        )


def load_psf_rows(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    column_map: Mapping[str, str] | None = None,
) -> LoadedRows:
    """Read a PSF-Med-style question file; every bad row is skipped and reported, never fatal.

    ``split`` keeps only that split's rows (others are counted, not reported as errors). Images are
    checked once each (exists, ``PIL.Image.verify``). Variants are kept only if their original was
    loaded, shows the same image and finding, and their ground truth agrees with the polarity.
    Raises ``ValueError`` only for file-level problems (suffix, unreadable file, missing columns).
    """
    path = Path(path)
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val, test or None, got {split!r}")
    root = Path(image_root if image_root is not None else path.parent).expanduser().absolute()
    records = _read_records(path)
    _apply_column_map(records, column_map, path)
    extra = [c for c in records[0] if c not in (*EXPECTED_COLUMNS, *OPTIONAL_COLUMNS)]

    problems: list[SkippedRow] = []
    seen: set[str] = set()
    other_split: dict[str, str] = {}
    candidates: dict[str, tuple[int, QuestionRow]] = {}
    image_paths: dict[str, str] = {}
    image_error: dict[str, str] = {}  # resolved path -> "" if readable, else the error

    def skip(qid: str, reason: str, detail: str, index: int) -> None:
        problems.append(SkippedRow(qid, reason, detail, index))

    for i, rec in enumerate(records):
        qid = _text(rec.get("qid"))
        if not qid:
            skip(f"row {i}", "missing qid", "qid is empty", i)
            continue
        if qid in seen:
            skip(qid, "duplicate qid", f"row {i} (0-based) repeats a qid seen earlier; the first is kept", i)
            continue
        seen.add(qid)
        row_split = SPLIT_NAMES.get(_text(rec.get("split")).lower())
        if row_split is None:
            skip(qid, "invalid split", f"split={rec.get('split')!r}; expected train, val or test", i)
            continue
        if split is not None and row_split != split:
            other_split[qid] = row_split
            continue
        question = rec.get("question")
        if _missing(question):
            skip(qid, "empty question", "question is empty", i)
            continue
        image_id, finding = _text(rec.get("image_id")), _text(rec.get("finding"))
        if not image_id or not finding:
            skip(qid, "missing image_id or finding", f"image_id={image_id!r}, finding={finding!r}", i)
            continue
        family = _text(rec.get("family")).lower()
        if family not in FAMILIES:
            skip(qid, "unknown family", f"family={rec.get('family')!r}; expected one of {FAMILIES}", i)
            continue
        polarity = parse_polarity(rec.get("polarity"))
        if polarity is None:
            skip(qid, "invalid polarity", f"polarity={rec.get('polarity')!r}; need ±1, preserve/invert", i)
            continue
        truth = parse_ground_truth(rec.get("ground_truth"))
        if truth is None:
            skip(qid, "invalid ground truth", f"ground_truth={rec.get('ground_truth')!r}; need yes/no/0/1", i)
            continue
        rel = _text(rec.get("image_path"))
        image_file = str(root / rel) if rel else ""
        try:
            row = QuestionRow(
                qid=qid,
                image_id=image_id,
                question=str(question),
                family=family,
                paraphrase_of=_text(rec.get("paraphrase_of")) or None,
                polarity=polarity,
                ground_truth=truth,
                finding=finding,
                split=row_split,
                patient_id=_text(rec.get("patient_id")),
                image_path=image_file,
                meta={c: _text(rec.get(c)) for c in extra},
            )
        except ValueError as err:
            skip(qid, "rejected by QuestionRow", str(err), i)
            continue
        if not rel or not Path(image_file).is_file():
            skip(qid, "missing image", f"image file not found: {image_file or '(no image_path)'}", i)
            continue
        if image_file not in image_error:
            image_error[image_file] = _verify_image(image_file)
        if image_error[image_file]:
            skip(qid, "unreadable image", f"{image_file}: {image_error[image_file]}", i)
            continue
        if image_paths.setdefault(image_id, image_file) != image_file:
            detail = f"{image_file}; image {image_id!r} is {image_paths[image_id]}"
            skip(qid, "conflicting image path", detail, i)
            continue
        candidates[qid] = (i, row)

    skipped_qids = {p.qid for p in problems}
    rows: list[QuestionRow] = []
    for i, row in candidates.values():
        reason = _variant_problem(row, candidates, skipped_qids, other_split)
        if reason is None:
            rows.append(row)
        else:
            skip(row.qid, *reason, i)
    used = {r.image_id for r in rows}
    return LoadedRows(
        rows=rows,
        problems=problems,
        n_read=len(records),
        source=str(path),
        image_paths={k: v for k, v in image_paths.items() if k in used},
        n_other_split=len(other_split),
    )


def _verify_image(path: str) -> str:
    """``""`` if PIL can open and verify the file, else the error message."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error... for corrupt files
        return f"{type(err).__name__}: {err}"
    return ""


def _variant_problem(
    row: QuestionRow, candidates: dict[str, tuple[int, QuestionRow]], skipped: set[str], other: dict[str, str]
) -> tuple[str, str] | None:
    """(reason, detail) if a variant cannot be scored against its original, else ``None``."""
    if row.family == ORIGINAL or row.paraphrase_of is None:
        return None
    target = row.paraphrase_of
    if target in candidates:
        orig = candidates[target][1]
        if orig.family != ORIGINAL:
            return "not an original", f"paraphrase_of={target!r} has family {orig.family!r}"
        if (orig.image_id, orig.finding) != (row.image_id, row.finding):
            return "original mismatch", (
                f"original {target!r} is ({orig.image_id}, {orig.finding}), "
                f"this row is ({row.image_id}, {row.finding})"
            )
        if row.ground_truth != (orig.ground_truth if row.polarity == 1 else not orig.ground_truth):
            return "ground truth inconsistent with original", (
                f"ground_truth={row.ground_truth}, polarity={row.polarity:+d}, original's={orig.ground_truth}"
            )
        return None
    if target in skipped:
        return "original skipped", f"original {target!r} was skipped"
    where = f" (it is in split {other[target]!r})" if target in other else " (not in the file)"
    return "original missing", f"paraphrase_of={target!r}{where}"


class BoxTuple(NamedTuple):
    """One box of one image (pixel coordinates of the original image)."""

    class_name: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float


def load_vindr_boxes(path: str | Path, class_map: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A VinDr-CXR annotations CSV as a box table with columns :data:`BOX_COLUMNS` (+ ``rad_id`` if present).

    Drops and counts "No finding" rows, rows with missing coordinates and invalid boxes (need
    0 <= x_min < x_max and 0 <= y_min < y_max); the counts are in ``df.attrs["dropped"]``.
    ``class_map`` renames class names (default: VinDr name -> flipscope finding key, e.g.
    ``"Pleural effusion" -> "pleural_effusion"``); unmapped classes keep their VinDr name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"box file not found: {path}")
    raw = pd.read_csv(path, dtype={"image_id": str, "class_name": str, "rad_id": str})
    missing = [c for c in BOX_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; a VinDr-CXR box table has {list(BOX_COLUMNS)}")
    cols = [*BOX_COLUMNS, *(["rad_id"] if "rad_id" in raw.columns else [])]
    df = raw[cols].copy()
    coords = list(BOX_COLUMNS[2:])
    for c in coords:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    no_finding = df["class_name"].fillna("").str.strip().str.lower().eq("no finding")
    no_coords = ~no_finding & df[coords].isna().any(axis=1)
    ok = ~no_finding & ~no_coords
    invalid = ok & ~(
        (df["x_min"] >= 0) & (df["y_min"] >= 0) & (df["x_min"] < df["x_max"]) & (df["y_min"] < df["y_max"])
    )
    out = df[ok & ~invalid].reset_index(drop=True)
    cmap = dict(class_map) if class_map is not None else {v: k for k, v in VINDR_CLASS_NAMES.items()}
    out["class_name"] = out["class_name"].map(lambda c: cmap.get(c, c))
    dropped = {"no finding": no_finding, "missing coordinates": no_coords, "invalid box": invalid}
    out.attrs["dropped"] = {k: int(v.sum()) for k, v in dropped.items()}
    out.attrs["invalid_image_ids"] = df.loc[invalid, "image_id"].tolist()
    log.info("%s: kept %d boxes, dropped %s", path, len(out), out.attrs["dropped"])
    return out


def boxes_for(image_id: str, boxes_df: pd.DataFrame, class_name: str | None = None) -> list[BoxTuple]:
    """The boxes of one image (optionally of one class) as ``(class_name, x_min, y_min, x_max, y_max)``."""
    sel = boxes_df[boxes_df["image_id"].astype(str) == str(image_id)]
    if class_name is not None:
        sel = sel[sel["class_name"] == class_name]
    return [
        BoxTuple(str(r.class_name), float(r.x_min), float(r.y_min), float(r.x_max), float(r.y_max))
        for r in sel.itertuples(index=False)
    ]


def mimic_image_paths(
    metadata_csv: str | Path, root: str | Path, views: Sequence[str] | None = None
) -> pd.DataFrame:
    """Image paths of MIMIC-CXR-JPG from ``mimic-cxr-2.0.0-metadata.csv``.

    Path: ``root/files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg``. Columns:
    ``image_id`` (dicom_id), ``patient_id`` (subject_id), ``study_id``, ``view`` (ViewPosition, ``""``
    if missing), ``image_path``, ``exists``. ``views`` (e.g. ``("PA", "AP")``) keeps only those views.
    """
    meta = pd.read_csv(metadata_csv, dtype=str, keep_default_na=False)
    need = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
    missing = [c for c in need if c not in meta.columns]
    if missing:
        raise ValueError(f"{metadata_csv} lacks columns {missing}; MIMIC-CXR-JPG metadata has {need}")
    meta = meta.apply(lambda s: s.str.strip())
    if views is not None:
        meta = meta[meta["ViewPosition"].isin(list(views))]
    base = Path(root).expanduser()
    paths = [
        str(base / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
        for d, s, st in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"], strict=True)
    ]
    out = meta[["dicom_id", "subject_id", "study_id", "ViewPosition"]].reset_index(drop=True)
    out.columns = pd.Index(["image_id", "patient_id", "study_id", "view"])
    return out.assign(image_path=paths, exists=[Path(p).is_file() for p in paths])
