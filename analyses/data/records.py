"""Reading question and label files into records, line by line: a bad line is skipped and recorded, never fatal.

:func:`read_records` reads JSON Lines (``.jsonl``), JSON (``.json``: an array of objects, or JSON Lines),
CSV (``.csv``; every cell as text, so ids like ``007`` survive) and parquet (``.parquet``); ``.jsonl.gz`` and
``.csv.gz`` are read through gzip (MIMIC ships its tables that way). Each record keeps the line it came
from (1-based, the header is line 1 of a CSV; ``None`` for parquet and JSON arrays), so every message
names the line to look at. A line that is not UTF-8, not valid JSON / CSV, or not an object is skipped
with reason ``malformed line`` and its line number. A UTF-8 byte-order mark (as Excel and Windows
tools write) is dropped before any format reads the text, so neither the first record nor the first
column name carries it. :func:`hub_records` reads a hub dataset through
``datasets.load_dataset`` (for users who are online); nothing else here touches the network.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyses.data.schema import SkippedRow

#: Supported suffixes (after an optional ``.gz``) -> reader.
FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MALFORMED = "malformed line"


@dataclass
class Records:
    """The records of one file, in file order, with the lines they came from and the lines skipped."""

    rows: list[dict[str, Any]]
    """One dict per record (column -> value)."""
    lines: list[int | None]
    """1-based line of each record (``None`` where a format has no lines)."""
    columns: list[str]
    """Every column seen, in order of first appearance."""
    source: str
    """The file (or hub id) read."""
    problems: list[SkippedRow] = field(default_factory=list)
    """Lines that could not be read (reason ``malformed line``)."""

    @property
    def n_read(self) -> int:
        """Records read plus lines skipped as malformed."""
        return len(self.rows) + len(self.problems)


def file_format(path: Path) -> str | None:
    """``json`` / ``csv`` / ``parquet`` for a supported suffix (``.gz`` allowed for text formats), else ``None``."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        inner = suffixes[0] if len(suffixes) == 2 else ""
        return FORMATS.get(inner) if inner in (".jsonl", ".json", ".csv") else None
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _raw_bytes(path: Path) -> bytes:
    """The file's bytes (gunzipped for ``.gz``), without a UTF-8 byte-order mark."""
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"cannot read {path}: not a valid gzip file ({err})") from err
    return data.removeprefix(codecs.BOM_UTF8)


def _bad(line: int, detail: str) -> SkippedRow:
    return SkippedRow(f"line {line}", MALFORMED, detail, index=-1, line=line)


def _json_lines(data: bytes, out: Records) -> None:
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            out.problems.append(
                _bad(n, f"not UTF-8: byte {raw[err.start : err.start + 1]!r} at column {err.start + 1}")
            )
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            out.problems.append(_bad(n, f"not valid JSON: {err.msg} at column {err.colno}"))
            continue
        if not isinstance(rec, dict):
            out.problems.append(_bad(n, f"a JSON {type(rec).__name__}, not an object"))
            continue
        out.rows.append(rec)
        out.lines.append(n)


def _json(data: bytes, path: Path, out: Records) -> None:
    """``.json``: one array of objects; if it is not one JSON document, read it as JSON Lines."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        _json_lines(data, out)
        return
    if isinstance(doc, dict):  # {"rows": [...]} or a single record
        doc = next((v for v in doc.values() if isinstance(v, list)), [doc])
    if not isinstance(doc, list):
        raise ValueError(f"cannot read {path}: a JSON {type(doc).__name__}, expected an array of objects")
    for i, rec in enumerate(doc):
        if isinstance(rec, dict):
            out.rows.append(rec)
            out.lines.append(None)
        else:
            out.problems.append(SkippedRow(f"row {i}", MALFORMED, f"a JSON {type(rec).__name__}", index=i))


def _csv_rows(text: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """(first line of the record, cells or ``None``, error) for each CSV record after the header."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # e.g. an unterminated quote swallows the lines after it: name them
            end = max(reader.line_num, start)
            span = f"line {start}" if end == start else f"lines {start}-{end}"
            yield start, None, f"not valid CSV: {err} ({span} not read)"
            continue
        yield start, cells, ""


def _csv(data: bytes, path: Path, out: Records) -> None:
    text = data.decode("utf-8", errors="surrogateescape")  # bad bytes are found per record below
    rows = _csv_rows(text)
    try:
        _, header, err = next(rows)
    except StopIteration:
        header, err = None, ""
    if not header:
        raise ValueError(f"cannot read {path}: the CSV file has no header row {err}".strip())
    if any(_has_bad_bytes(h) for h in header):
        raise ValueError(f"cannot read {path}: the header row is not UTF-8")
    out.columns = [h.strip() for h in header]
    for line, cells, err in rows:
        if cells is None:
            out.problems.append(_bad(line, err))
        elif not any(c.strip() for c in cells):
            continue
        elif any(_has_bad_bytes(c) for c in cells):
            col = next(h for h, c in zip(out.columns, cells, strict=False) if _has_bad_bytes(c))
            out.problems.append(_bad(line, f"not UTF-8 (column {col!r})"))
        elif len(cells) != len(out.columns):
            out.problems.append(_bad(line, f"{len(cells)} fields, the header has {len(out.columns)}"))
        else:
            out.rows.append(dict(zip(out.columns, cells, strict=True)))
            out.lines.append(line)


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parquet(path: Path, out: Records) -> None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a broken file
        raise ValueError(f"cannot read {path} as parquet: {type(err).__name__}: {err}") from err
    out.columns = list(table.column_names)
    out.rows = table.to_pylist()
    out.lines = [None] * len(out.rows)


def read_records(path: str | Path) -> Records:
    """Every record of a question / label file (module docs); ``ValueError`` only for file-level problems.

    File-level problems: unsupported suffix, an empty file, no header (CSV), no readable record at all.
    """
    path = Path(path)
    fmt = file_format(path)
    if fmt is None:
        raise ValueError(
            f"cannot read {path}: unsupported suffix {''.join(path.suffixes)!r}; use {sorted(FORMATS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    out = Records([], [], [], str(path))
    if fmt == "parquet":
        _parquet(path, out)
    elif fmt == "csv":
        _csv(_raw_bytes(path), path, out)
    elif path.name.lower().removesuffix(".gz").endswith(".jsonl"):
        _json_lines(_raw_bytes(path), out)
    else:
        _json(_raw_bytes(path), path, out)
    if not out.rows:
        why = f"; {len(out.problems)} malformed lines, e.g. {out.problems[0].detail}" if out.problems else ""
        raise ValueError(f"{path} has no data rows{why}")
    if not out.columns:
        out.columns = list(dict.fromkeys(k for rec in out.rows for k in rec))
    return out


def hub_records(repo: str, config: str | None = None, data_file: str | None = None) -> dict[str, Records]:
    """A hub dataset's splits (split name -> records) through ``datasets.load_dataset``; needs the network.

    ``config`` is a dataset configuration (e.g. ``mimic`` of ``saillab/psf-med``), ``data_file`` a file of
    the repository (e.g. ``vindr_flip_bank.csv`` of ``saillab/VinDR-CXR-PSF``). A hub that cannot be
    reached is a ``ValueError`` naming the id and the fix.
    """
    import datasets

    kwargs: dict[str, Any] = {"data_files": data_file} if data_file else {}
    try:
        loaded = datasets.load_dataset(repo, config, **kwargs)
    except Exception as err:  # ConnectionError, DatasetNotFoundError, FileNotFoundError, ValueError, ...
        what = repo + (f":{config or data_file}" if (config or data_file) else "")
        first = " ".join(str(err).split()).split(". ")[0][:200]
        raise ValueError(
            f"--data {what}: could not load it from the Hugging Face hub ({type(err).__name__}: {first}); "
            "check the id and that you are online (HF_HUB_OFFLINE unset, access to gated datasets accepted), "
            "or download the files where you are online and pass the local parquet / jsonl / csv file"
        ) from err
    splits = loaded if isinstance(loaded, dict) else {"train": loaded}
    out: dict[str, Records] = {}
    for name, ds in splits.items():
        rows = list(ds.to_list())
        out[str(name)] = Records(rows, [None] * len(rows), list(ds.column_names), f"{repo}[{name}]")
    return out
