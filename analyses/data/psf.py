"""Real-data loaders: PSF-Med-style question files, VinDr-CXR boxes and MIMIC-CXR-JPG image paths.

:func:`load_psf_rows` reads a question file (JSON Lines, JSON, CSV or parquet, optionally gzipped, chosen by the
suffix; :mod:`analyses.data.records`) into :class:`~analyses.data.schema.QuestionRow` objects. Expected columns (:data:`EXPECTED_COLUMNS`; rename yours
onto them with ``column_map={"yours": "expected"}``):

- ``qid`` unique row id; ``image_id`` (also the key into box tables); ``question``, the text exactly as
  shown to the model; ``finding``, e.g. ``cardiomegaly``; optional ``patient_id`` (empty when absent).
- ``family``: ``original``, a paraphrase family (lexical, syntactic, register, scope, voice, reorder) or
  ``operator``, case-insensitive; ``paraphrase_of``: the original's qid, empty / null for originals.
- ``polarity``: +1 / -1 or ``preserve`` / ``invert``; ``ground_truth`` (of *this* question, already
  inverted for operators): bool, 0/1, yes/no or true/false.
- ``split``: train, val (or validation) or test; ``image_path``: relative to ``image_root`` (default:
  the question file's folder) or absolute.

Other columns are carried in ``QuestionRow.meta`` as strings. A bad row (or a malformed line) never crashes
the load and is never silently dropped: it is recorded with its reason (see :data:`REASONS`) and line in
:attr:`LoadedRows.problems`, and :meth:`LoadedRows.report` prints the counts with example ids. Images may be
DICOM, 16-bit PNG or any 8-bit format PIL reads (:mod:`hooks.medimage`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from analyses.data.loaded import LoadedRows
from analyses.data.records import FORMATS, MALFORMED, Records, read_records
from analyses.data.schema import FAMILIES, ORIGINAL, SPLIT_ALIASES, QuestionRow, SkippedRow
from hooks.medimage import verify_image

__all__ = [
    "EXPECTED_COLUMNS",
    "FORMATS",
    "REASONS",
    "ROW_CHECKS",
    "LoadedRows",
    "SkippedRow",
    "load_psf_rows",
    "parse_ground_truth",
    "parse_polarity",
    "psf_rows",
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
_TRUTH_WORDS = {"yes": True, "no": False, "true": True, "false": False}
_POLARITY_WORDS = {"preserve": 1, "invert": -1}


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


def _apply_column_map(records: Records, cmap_in: Mapping[str, str] | None) -> None:
    columns, path = records.columns, records.source
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
        records.rows = [{cmap.get(k, k): v for k, v in rec.items()} for rec in records.rows]
        records.columns = [cmap.get(c, c) for c in columns]
    missing = [c for c in EXPECTED_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(
            f"{path} lacks columns {missing} (it has {records.columns}); rename yours with "
            "column_map={'your_name': 'expected_name'}"
        )


class _Row:
    """What the checks of one record have parsed so far (each check reads earlier fields, sets its own)."""

    def __init__(self, index: int, rec: dict[str, Any], line: int | None) -> None:
        self.index, self.rec, self.line = index, rec, line
        self.qid = self.split = self.image_id = self.finding = self.family = self.image_file = ""
        self.polarity: int | None = None
        self.truth: bool | None = None
        self.row: QuestionRow | None = None


class _Load:
    """State shared by the checks of one file: ids seen, rows of other splits, image checks."""

    def __init__(self, root: Path, split: str | None, extra: list[str]) -> None:
        self.root, self.split, self.extra = root, split, extra
        self.seen: set[str] = set()
        self.other_split: dict[str, str] = {}
        self.image_error: dict[str, str] = {}  # resolved path -> "" if readable, else the error
        self.image_paths: dict[str, str] = {}
        self.candidates: dict[str, tuple[int, QuestionRow]] = {}
        self.skipped: set[str] = set()


Check = Callable[[_Load, _Row], str | None]


def _qid(st: _Load, r: _Row) -> str | None:
    r.qid = _text(r.rec.get("qid"))
    return None if r.qid else "qid is empty"


def _unique(st: _Load, r: _Row) -> str | None:
    if r.qid in st.seen:
        where = f"line {r.line}" if r.line is not None else f"row {r.index} (0-based)"
        return f"{where} repeats a qid seen earlier; the first is kept"
    st.seen.add(r.qid)
    return None


def _split(st: _Load, r: _Row) -> str | None:
    r.split = SPLIT_ALIASES.get(_text(r.rec.get("split")).lower(), "")
    return None if r.split else f"split={r.rec.get('split')!r}; expected train, val or test"


def _question(st: _Load, r: _Row) -> str | None:
    return "question is empty" if _missing(r.rec.get("question")) else None


def _image_and_finding(st: _Load, r: _Row) -> str | None:
    r.image_id, r.finding = _text(r.rec.get("image_id")), _text(r.rec.get("finding"))
    return None if r.image_id and r.finding else f"image_id={r.image_id!r}, finding={r.finding!r}"


def _family(st: _Load, r: _Row) -> str | None:
    r.family = _text(r.rec.get("family")).lower()
    return None if r.family in FAMILIES else f"family={r.rec.get('family')!r}; expected one of {FAMILIES}"


def _polarity(st: _Load, r: _Row) -> str | None:
    r.polarity = parse_polarity(r.rec.get("polarity"))
    return None if r.polarity is not None else f"polarity={r.rec.get('polarity')!r}; need ±1, preserve/invert"


def _truth(st: _Load, r: _Row) -> str | None:
    r.truth = parse_ground_truth(r.rec.get("ground_truth"))
    return None if r.truth is not None else f"ground_truth={r.rec.get('ground_truth')!r}; need yes/no/0/1"


def _build(st: _Load, r: _Row) -> str | None:
    rel = _text(r.rec.get("image_path"))
    r.image_file = str(st.root / rel) if rel else ""
    assert r.polarity is not None and r.truth is not None
    try:
        r.row = QuestionRow(
            qid=r.qid,
            image_id=r.image_id,
            question=str(r.rec.get("question")),
            family=r.family,
            paraphrase_of=_text(r.rec.get("paraphrase_of")) or None,
            polarity=r.polarity,
            ground_truth=r.truth,
            finding=r.finding,
            split=r.split,
            patient_id=_text(r.rec.get("patient_id")),
            image_path=r.image_file,
            meta={c: _text(r.rec.get(c)) for c in st.extra},
        )
    except ValueError as err:
        return str(err)
    return None


def _image_exists(st: _Load, r: _Row) -> str | None:
    if r.image_file and Path(r.image_file).is_file():
        return None
    return f"image file not found: {r.image_file or '(no image_path)'}"


def _image_readable(st: _Load, r: _Row) -> str | None:
    if r.image_file not in st.image_error:
        st.image_error[r.image_file] = verify_image(r.image_file)
    err = st.image_error[r.image_file]
    return f"{r.image_file}: {err}" if err else None


def _one_path_per_image(st: _Load, r: _Row) -> str | None:
    known = st.image_paths.setdefault(r.image_id, r.image_file)
    return None if known == r.image_file else f"{r.image_file}; image {r.image_id!r} is {known}"


def _original_of(st: _Load, r: _Row) -> QuestionRow | None:
    """The loaded original a variant points to (``None`` for originals and when it is not loaded)."""
    assert r.row is not None
    if r.row.family == ORIGINAL or r.row.paraphrase_of is None:
        return None
    hit = st.candidates.get(r.row.paraphrase_of)
    return None if hit is None else hit[1]


def _is_original(st: _Load, r: _Row) -> str | None:
    orig = _original_of(st, r)
    if orig is None or orig.family == ORIGINAL:
        return None
    return f"paraphrase_of={orig.qid!r} has family {orig.family!r}"


def _same_image_and_finding(st: _Load, r: _Row) -> str | None:
    orig, row = _original_of(st, r), r.row
    assert row is not None
    if orig is None or (orig.image_id, orig.finding) == (row.image_id, row.finding):
        return None
    return f"original {orig.qid!r} is ({orig.image_id}, {orig.finding}), this row is ({row.image_id}, {row.finding})"


def _truth_matches_original(st: _Load, r: _Row) -> str | None:
    orig, row = _original_of(st, r), r.row
    assert row is not None
    if orig is None or row.ground_truth == (
        orig.ground_truth if row.polarity == 1 else not orig.ground_truth
    ):
        return None
    return f"ground_truth={row.ground_truth}, polarity={row.polarity:+d}, original's={orig.ground_truth}"


def _unloaded_original(st: _Load, r: _Row) -> str | None:
    """The qid a variant points to when that original was not loaded (``None`` otherwise)."""
    row = r.row
    assert row is not None
    target = row.paraphrase_of
    return None if row.family == ORIGINAL or target is None or target in st.candidates else target


def _original_not_skipped(st: _Load, r: _Row) -> str | None:
    target = _unloaded_original(st, r)
    return None if target is None or target not in st.skipped else f"original {target!r} was skipped"


def _original_present(st: _Load, r: _Row) -> str | None:
    target = _unloaded_original(st, r)
    if target is None:
        return None
    where = (
        f" (it is in split {st.other_split[target]!r})" if target in st.other_split else " (not in the file)"
    )
    return f"paraphrase_of={target!r}{where}"


#: The row validators, in the order they run: (reason, check). A check returns the detail of the
#: failure (the row is skipped with that reason; later checks do not run) or ``None``. Three stages:
#: the row's key (before the ``split`` filter), its own fields and image, and (once every row is read)
#: its original. Add a check by adding a row here.
ROW_CHECKS: dict[str, tuple[tuple[str, Check], ...]] = {
    "key": (
        ("missing qid", _qid),
        ("duplicate qid", _unique),
        ("invalid split", _split),
    ),
    "row": (
        ("empty question", _question),
        ("missing image_id or finding", _image_and_finding),
        ("unknown family", _family),
        ("invalid polarity", _polarity),
        ("invalid ground truth", _truth),
        ("rejected by QuestionRow", _build),
        ("missing image", _image_exists),
        ("unreadable image", _image_readable),
        ("conflicting image path", _one_path_per_image),
    ),
    "original": (
        ("not an original", _is_original),
        ("original mismatch", _same_image_and_finding),
        ("ground truth inconsistent with original", _truth_matches_original),
        ("original skipped", _original_not_skipped),
        ("original missing", _original_present),
    ),
}
#: Every reason a row can be skipped for: a malformed line, then the checks in the order they run (first
#: failing check wins).
REASONS: tuple[str, ...] = (MALFORMED, *(reason for stage in ROW_CHECKS.values() for reason, _ in stage))


def _first_failure(stage: str, st: _Load, r: _Row) -> SkippedRow | None:
    for reason, check in ROW_CHECKS[stage]:
        detail = check(st, r)
        if detail is not None:
            name = r.qid or (f"line {r.line}" if r.line is not None else f"row {r.index}")
            return SkippedRow(name, reason, detail, r.index, r.line)
    return None


def load_psf_rows(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    column_map: Mapping[str, str] | None = None,
) -> LoadedRows:
    """Read a PSF-Med-style question file; every bad row or line is skipped and reported, never fatal.

    ``split`` keeps only that split's rows (others are counted, not reported as errors). Images are
    checked once each (exists, readable: :func:`hooks.medimage.verify_image`). Variants are kept only if
    their original was loaded, shows the same image and finding, and their ground truth agrees with the
    polarity (:data:`ROW_CHECKS`). Raises ``ValueError`` only for file-level problems (suffix, unreadable
    file, missing columns).
    """
    path = Path(path)
    root = image_root if image_root is not None else path.parent
    return psf_rows(read_records(path), root, split, column_map)


def psf_rows(
    records: Records,
    image_root: str | Path,
    split: str | None = None,
    column_map: Mapping[str, str] | None = None,
) -> LoadedRows:
    """:func:`load_psf_rows` on records already read (a file or a hub dataset)."""
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val, test or None, got {split!r}")
    root = Path(image_root).expanduser().absolute()
    _apply_column_map(records, column_map)
    extra = [c for c in records.columns if c not in (*EXPECTED_COLUMNS, *OPTIONAL_COLUMNS)]
    st = _Load(root, split, extra)
    problems: list[SkippedRow] = list(records.problems)
    parsed: list[_Row] = []
    for i, (rec, line) in enumerate(zip(records.rows, records.lines, strict=True)):
        r = _Row(i, rec, line)
        problem = _first_failure("key", st, r)
        if problem is None and split is not None and r.split != split:
            st.other_split[r.qid] = r.split
            continue
        problem = problem or _first_failure("row", st, r)
        if problem is not None:
            problems.append(problem)
            continue
        assert r.row is not None
        st.candidates[r.qid] = (i, r.row)
        parsed.append(r)
    st.skipped = {p.qid for p in problems}
    rows: list[QuestionRow] = []
    for r in parsed:
        problem = _first_failure("original", st, r)
        if problem is None:
            assert r.row is not None
            rows.append(r.row)
        else:
            problems.append(problem)
    used = {r.image_id for r in rows}
    return LoadedRows(
        rows=rows,
        problems=problems,
        n_read=records.n_read,
        source=records.source,
        image_paths={k: v for k, v in st.image_paths.items() if k in used},
        n_other_split=len(st.other_split),
        notes=_missing_note(problems, root),
    )


def _missing_note(problems: list[SkippedRow], root: Path) -> tuple[str, ...]:
    """How many image files were not found, with an example and the fix (empty when none is missing)."""
    missing = sorted({p.detail for p in problems if p.reason == "missing image"})
    if not missing:
        return ()
    return (
        f"{len(missing)} image files not found under {root} ({missing[0]}); "
        "pass --image-root with the folder that holds them",
    )
