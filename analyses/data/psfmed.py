"""The released PSF-Med data (``saillab/psf-med``: configs ``mimic``, ``padchest``, ``vindr``) and the
VinDR-CXR-PSF flip bank (``vindr_flip_bank.csv``) as clusters of question rows.

Both hold **original-paraphrase pairs**: one record per (image, original question, paraphrase, phenomenon,
answer). A record may instead hold a question with a list of its paraphrases (``paraphrases``: a list of
strings or of objects with the text, phenomenon and yes/no flags, or that list as a JSON string); it is
expanded into pairs first. Pairs become clusters: one ``original`` row per (image, original question) and
one row per distinct paraphrase, its family given by the **phenomenon map**.

**Columns.** The release's exact column names could not be checked offline, so every role is detected
from the names in :data:`KNOWN_COLUMNS` (first present wins, case-insensitive) and the report says which
column filled which role. Map others with ``column_map={"their_column": "role"}`` (``--column-map``).
Needed: ``question``, ``paraphrase`` (or ``paraphrases``), ``phenomenon`` (unless the nested paraphrases
carry it), ``answer``, and an image reference: ``image_path``, or ``image_id`` (with ``subject_id`` and
``study_id`` it is a MIMIC-CXR-JPG ``dicom_id``: ``files/p{subject_id[:2]}/p{subject_id}/s{study_id}/
{dicom_id}.jpg``; alone it is a file name or an id tried with the usual suffixes, anywhere under the image
root: PadChest file names, VinDr ids). Optional: ``question_id``, ``finding`` (else found from the question
text with :data:`FINDING_WORDS`, else ``unspecified``), ``split`` (else the hub split, else ``test``: the
release is a test set), ``subject_id`` / ``patient_id``, the yes/no flags.

**Phenomenon map** (:data:`DEFAULT_PHENOMENA`, names compared lower-case with spaces and hyphens as ``_``):
lexical_substitution -> lexical, syntactic_restructuring -> syntactic, scope and specificity -> scope,
negation_pattern -> operator (an answer-inverting variant, polarity -1: it leaves the flip clusters and
is scored as polarity consistency), plus register / voice / reordering names. PSF-Med says every
paraphrase passed an equivalence judge; if its negation rows keep the answer, map them to a paraphrase
family instead (``phenomenon_map={"negation_pattern": "syntactic"}``), or leave them out (``"skip"``).
Unknown names are skipped and counted, never guessed.

**Yes/no filter** (:data:`YESNO_FILTERS`): ``auto`` (default) keeps a pair when every yes/no flag column
present (``is_yesno``, ``is_yesno_claude`` and their paraphrase-side versions) is true; ``is_yesno`` /
``is_yesno_claude`` use one flag, ``both`` / ``either`` combine them, ``answer`` ignores the flags. In
every mode the answer must read as yes or no (it is the ground truth). Every record left out is a
:class:`~analyses.data.schema.SkippedRow` with its line. Tables of all of it: docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from analyses.data.loaded import MISSING_IMAGE, UNREADABLE_IMAGE, ImageFinder, LoadedRows, mimic_jpg_path
from analyses.data.records import Records
from analyses.data.schema import FAMILIES, OPERATOR, ORIGINAL, SPLIT_ALIASES, QuestionRow, SkippedRow

#: Role -> column names recognised for it, in order of preference (matched case-insensitively).
KNOWN_COLUMNS: dict[str, tuple[str, ...]] = {
    "question": ("original_question", "question", "orig_question", "source_question", "question_text", "original"),
    "paraphrase": ("paraphrase", "paraphrased_question", "paraphrase_question", "paraphrase_text",
                   "rephrased_question", "rephrased"),
    "paraphrases": ("paraphrases", "paraphrase_list"),
    "phenomenon": ("phenomenon", "paraphrase_phenomenon", "phenomenon_type", "paraphrase_type",
                   "linguistic_phenomenon", "transformation", "perturbation"),
    "answer": ("answer", "original_answer", "ground_truth", "gt_answer", "answer_text", "label"),
    "question_id": ("question_id", "qid", "orig_question_id", "original_id"),
    "image_id": ("dicom_id", "image_id", "imageid", "image_filename", "image_name", "image_file", "filename"),
    "image_path": ("image_path", "img_path", "file_path", "path"),
    "subject_id": ("subject_id",),
    "study_id": ("study_id",),
    "patient_id": ("patient_id", "patientid"),
    "finding": ("finding", "pathology", "disease", "class_name", "label_name"),
    "split": ("split",),
    "is_yesno": ("is_yesno",),
    "is_yesno_claude": ("is_yesno_claude",),
    "paraphrase_is_yesno": ("paraphrase_is_yesno", "is_yesno_paraphrase"),
    "paraphrase_is_yesno_claude": ("paraphrase_is_yesno_claude", "is_yesno_claude_paraphrase"),
}  # fmt: skip
ROLES: tuple[str, ...] = tuple(KNOWN_COLUMNS)
#: Phenomenon name (normalised) -> family (``skip`` leaves the pairs out, counted).
DEFAULT_PHENOMENA: dict[str, str] = {
    "lexical_substitution": "lexical", "lexical": "lexical", "synonym_substitution": "lexical",
    "syntactic_restructuring": "syntactic", "syntactic": "syntactic", "syntax": "syntactic",
    "negation_pattern": OPERATOR, "negation": OPERATOR,
    "scope": "scope", "specificity": "scope", "scope_specificity": "scope", "specificity_change": "scope",
    "register": "register", "formality": "register", "register_shift": "register", "formality_shift": "register",
    "voice": "voice", "voice_change": "voice", "active_passive": "voice",
    "clause_reordering": "reorder", "reordering": "reorder", "reorder": "reorder",
}  # fmt: skip
SKIP = "skip"
YESNO_FLAGS: tuple[str, ...] = ("is_yesno", "is_yesno_claude")
YESNO_FILTERS: tuple[str, ...] = ("auto", "is_yesno", "is_yesno_claude", "both", "either", "answer")
#: Finding key -> words that name it in a question (whole words, plural ``s`` / ``es`` allowed); the first
#: finding in this order that the question names wins.
FINDING_WORDS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "heart enlarged", "cardiac enlargement", "enlarged cardiac"),
    "pleural_effusion": ("pleural effusion", "effusion", "pleural fluid"),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "atelectasis": ("atelectasis",),
    "edema": ("edema", "oedema"),
    "pneumonia": ("pneumonia",),
    "fracture": ("fracture",),
    "nodule_mass": ("nodule", "mass"),
    "lung_opacity": ("opacity", "opacities", "infiltrate", "infiltration"),
    "support_devices": ("tube", "catheter", "pacemaker", "line", "device"),
}  # fmt: skip
UNSPECIFIED = "unspecified"
_TRUTH = {
    "yes": True,
    "no": False,
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "1.0": True,
    "0.0": False,
}


def _norm(name: str) -> str:
    return re.sub(r"[\s\-/]+", "_", name.strip().lower())


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def parse_answer(v: Any) -> bool | None:
    """yes / no (any case, trailing punctuation ignored), true / false, 1 / 0, bools -> bool; else ``None``."""
    if isinstance(v, bool):
        return v
    return _TRUTH.get(_text(v).lower().rstrip(".!"))


def phenomenon_map(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """:data:`DEFAULT_PHENOMENA` updated by ``overrides`` (names normalised; targets: a family or ``skip``)."""
    out = dict(DEFAULT_PHENOMENA)
    for name, family in (overrides or {}).items():
        fam = family.strip().lower()
        if fam not in (*FAMILIES[1:], SKIP):
            raise ValueError(
                f"phenomenon map {name}={family}: the target must be a family {FAMILIES[1:]} or 'skip'"
            )
        out[_norm(name)] = fam
    return out


def detect_columns(columns: list[str], column_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role -> column: the user's ``column_map`` (column -> role) first, then :data:`KNOWN_COLUMNS`."""
    cmap = dict(column_map or {})
    bad = {c: r for c, r in cmap.items() if r not in ROLES}
    if bad:
        raise ValueError(f"column map {bad}: PSF-Med roles are {ROLES}")
    absent = [c for c in cmap if c not in columns]
    if absent:
        raise ValueError(f"column map names columns {absent} that the file does not have; it has {columns}")
    found = {role: col for col, role in cmap.items()}
    lower = {c.lower(): c for c in reversed(columns)}
    taken = set(found.values())
    for role, names in KNOWN_COLUMNS.items():
        if role in found:
            continue
        hit = next((lower[n] for n in names if n in lower and lower[n] not in taken), None)
        if hit is not None:
            found[role] = hit
            taken.add(hit)
    return found


def looks_like_psfmed(columns: list[str], column_map: Mapping[str, str] | None = None) -> bool:
    """Whether the columns hold a question and its paraphrase(s): the PSF-Med / flip-bank layout."""
    roles = detect_columns(columns, column_map)
    return "question" in roles and ("paraphrase" in roles or "paraphrases" in roles)


_FINDING_RES = {
    key: re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")(?:s|es)?\b")
    for key, words in FINDING_WORDS.items()
}


def _finding(text: str) -> str:
    low = text.lower()
    return next((key for key, pattern in _FINDING_RES.items() if pattern.search(low)), UNSPECIFIED)


def _short_hash(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()[:10]


def _nested(rec: dict[str, Any], roles: dict[str, str]) -> list[dict[str, Any]]:
    """A record with a list of paraphrases -> one pair record per paraphrase (roles as keys)."""
    raw = rec.get(roles["paraphrases"])
    if isinstance(raw, str) and raw.strip().startswith("["):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if not isinstance(raw, list):
        return []
    base = {role: rec.get(col) for role, col in roles.items() if role != "paraphrases"}
    phen = base.get("phenomenon")
    out = []
    for i, item in enumerate(raw):
        pair = dict(base)
        if isinstance(item, dict):
            low = {k.lower(): v for k, v in item.items()}
            pair["paraphrase"] = next((low[k] for k in ("text", "paraphrase", "question") if k in low), None)
            pair["phenomenon"] = next((low[k] for k in KNOWN_COLUMNS["phenomenon"] if k in low), phen)
            for flag in YESNO_FLAGS:
                if flag in low:
                    pair["paraphrase_" + flag] = low[flag]
        else:
            pair["paraphrase"] = item
            pair["phenomenon"] = phen[i] if isinstance(phen, list) and i < len(phen) else phen
        out.append(pair)
    return out


class _Import:
    """State of one import: maps, the image finder, originals made, and everything left out."""

    def __init__(self, root: Path, split: str | None, default_split: str, yesno: str, pmap: dict[str, str]):
        self.split, self.default_split, self.yesno, self.pmap = split, default_split, yesno, pmap
        self.finder = ImageFinder(root)
        self.images: dict[str, tuple[str, str, str]] = {}  # image key -> (path, skip reason, detail)
        self.originals: dict[tuple[str, str], QuestionRow] = {}
        self.rows: list[QuestionRow] = []
        self.seen: set[str] = set()
        self.problems: list[SkippedRow] = []
        self.n_other_split = 0
        self.unknown: Counter[str] = Counter()
        self.families: Counter[str] = Counter()

    def skip(self, name: str, reason: str, detail: str, index: int, line: int | None) -> None:
        self.problems.append(SkippedRow(name, reason, detail, index, line))

    def yes_no(self, pair: dict[str, Any], flags: list[str]) -> bool:
        """Whether the question and the paraphrase are both yes/no under the filter (each side on its flags)."""
        if self.yesno == "answer" or not flags:
            return True
        sides: dict[bool, list[bool]] = {}
        for f in flags:
            sides.setdefault(f.startswith("paraphrase_"), []).append(parse_answer(pair.get(f)) is True)
        combine = any if self.yesno == "either" else all
        return all(combine(v) for v in sides.values())

    def image(self, pair: dict[str, Any]) -> tuple[str, str, str, str]:
        """(image key, path, skip reason, detail) of a pair's image, found and checked once per key."""
        image_id, rel = _text(pair.get("image_id")), _text(pair.get("image_path"))
        key = image_id or rel
        if not key:
            return "", "", MISSING_IMAGE, "no image reference (image_id / image_path is empty)"
        if key not in self.images:
            sid, study = _text(pair.get("subject_id")), _text(pair.get("study_id"))
            ref = rel or (mimic_jpg_path(sid, study, image_id) if sid and study else image_id)
            path = self.finder.find(ref)
            if path is None:
                self.images[key] = ("", MISSING_IMAGE, f"image file not found: {self.finder.root / ref}")
            else:
                bad = self.finder.check(path)
                self.images[key] = (path, UNREADABLE_IMAGE if bad else "", f"{path}: {bad}" if bad else "")
        path, reason, detail = self.images[key]
        return key, path, reason, detail


def _flags(roles: dict[str, str], yesno: str, nested: bool) -> list[str]:
    """The flag roles a pair must satisfy under ``yesno`` (question-side and paraphrase-side)."""
    wanted = {"auto": YESNO_FLAGS, "both": YESNO_FLAGS, "either": YESNO_FLAGS, "answer": ()}.get(
        yesno, (yesno,)
    )
    present = [f for f in wanted if f in roles]
    if yesno not in ("auto", "answer") and not present:
        raise ValueError(f"--yesno {yesno}: the file has no yes/no flag column ({', '.join(YESNO_FLAGS)})")
    side = [f"paraphrase_{f}" for f in wanted if f"paraphrase_{f}" in roles or nested]
    return present + side


def _pair(
    st: _Import, pair: dict[str, Any], flags: list[str], name: str, index: int, line: int | None
) -> None:
    """One original-paraphrase pair -> its original (made once) and its paraphrase row, or a skip (as ``name``)."""
    question, para = _text(pair.get("question")), _text(pair.get("paraphrase"))
    split = SPLIT_ALIASES.get(_text(pair.get("split")).lower() or st.default_split)
    if split is None:
        return st.skip(name, "invalid split", f"split={pair.get('split')!r}", index, line)
    if st.split is not None and split != st.split:
        st.n_other_split += 1
        return None
    truth = parse_answer(pair.get("answer"))
    phen = _norm(_text(pair.get("phenomenon")))
    family = st.pmap.get(phen)
    checks = (
        (not question, "empty question", "the original question is empty"),
        (not st.yes_no(pair, [f for f in flags if f in pair]), "not a yes/no question",
         ", ".join(f"{f}={pair.get(f)!r}" for f in flags if f in pair)),
        (truth is None, "answer is not yes/no", f"answer={pair.get('answer')!r}"),
    )  # fmt: skip
    for failed, reason, detail in checks:
        if failed:
            return st.skip(name, reason, detail, index, line)
    key, path, reason, detail = st.image(pair)
    if reason:
        return st.skip(name, reason, detail, index, line)
    assert truth is not None
    orig = st.originals.get((key, question.lower()))
    if orig is None:
        qid_part = _text(pair.get("question_id")) or f"q{_short_hash(question)}"
        subject = _text(pair.get("subject_id")) or _text(pair.get("patient_id"))
        finding = _text(pair.get("finding")).lower().replace(" ", "_") or _finding(question)
        orig = QuestionRow(
            f"{key}/{qid_part}", key, question, ORIGINAL, None, 1, truth, finding, split, subject, path
        )
        if orig.qid in st.seen:
            return st.skip(name, "duplicate question id", f"{orig.qid} names two questions", index, line)
        st.originals[(key, question.lower())] = orig
        st.seen.add(orig.qid)
        st.rows.append(orig)
    elif orig.ground_truth != truth:
        detail = f"answer {pair.get('answer')!r}; an earlier line gave {orig.ground_truth} for this question"
        return st.skip(name, "conflicting answer", detail, index, line)
    more = (
        (not para, "empty paraphrase", "the paraphrase is empty"),
        (family is None, "unknown phenomenon",
         f"{phen or '(empty)'!r}: map it, e.g. --phenomenon-map {phen or 'NAME'}=lexical (or =skip)"),
        (family == SKIP, "phenomenon mapped to skip", phen),
        (para.lower() == question.lower(), "paraphrase equals original", para),
    )  # fmt: skip
    for failed, reason, detail in more:
        if failed:
            if reason == "unknown phenomenon":
                st.unknown[phen or "(empty)"] += 1
            return st.skip(name, reason, detail, index, line)
    assert family is not None
    qid = f"{orig.qid}/{family}/{_short_hash(para)}"
    if qid in st.seen:
        return st.skip(name, "duplicate paraphrase", f"{para!r} of {orig.qid}", index, line)
    polarity = -1 if family == OPERATOR else 1
    st.seen.add(qid)
    st.families[family] += 1
    st.rows.append(
        QuestionRow(qid, key, para, family, orig.qid, polarity, truth == (polarity == 1), orig.finding,
                    split, orig.patient_id, path, meta={"phenomenon": phen})
    )  # fmt: skip
    return None


def psfmed_rows(
    records: Records,
    image_root: str | Path,
    split: str | None = None,
    column_map: Mapping[str, str] | None = None,
    phenomena: Mapping[str, str] | None = None,
    yesno: str = "auto",
    default_split: str = "test",
) -> LoadedRows:
    """PSF-Med / flip-bank records -> clusters of question rows (module docs); bad records are skipped.

    ``split`` keeps that split (records of others are counted); ``default_split`` is the split of records
    without a split column. Raises ``ValueError`` only for file-level problems (a needed role missing,
    a bad map or filter).
    """
    if yesno not in YESNO_FILTERS:
        raise ValueError(f"--yesno {yesno!r}: choose one of {', '.join(YESNO_FILTERS)}")
    roles = detect_columns(records.columns, column_map)
    nested = "paraphrase" not in roles and "paraphrases" in roles
    need = ["question", "answer"] + ([] if nested else ["paraphrase", "phenomenon"])
    missing = [r for r in need if r not in roles]
    if not any(r in roles for r in ("image_id", "image_path")):
        missing.append("image_id or image_path")
    if missing:
        raise ValueError(
            f"{records.source}: no column for {missing} (columns: {records.columns}); map yours with "
            f"--column-map THEIR_COLUMN=ROLE (roles: {', '.join(ROLES)})"
        )
    st = _Import(
        Path(image_root).expanduser().absolute(), split, default_split, yesno, phenomenon_map(phenomena)
    )
    flags = _flags(roles, yesno, nested)
    st.problems.extend(records.problems)
    n_pairs = 0
    for index, (rec, line) in enumerate(zip(records.rows, records.lines, strict=True)):
        pairs = _nested(rec, roles) if nested else [{r: rec.get(c) for r, c in roles.items()}]
        if not pairs:
            name = f"line {line}" if line is not None else f"row {index}"
            st.skip(
                name,
                "no paraphrases",
                f"{roles.get('paraphrases')}={rec.get(roles.get('paraphrases', ''))!r}",
                index,
                line,
            )
        where = f"line {line}" if line is not None else f"row {index}"
        for i, pair in enumerate(pairs, 1):
            n_pairs += 1
            _pair(st, pair, flags, f"{where} paraphrase {i}" if nested else where, index, line)
    return LoadedRows(
        rows=st.rows,
        problems=st.problems,
        n_read=records.n_read,
        source=records.source,
        image_paths={r.image_id: r.image_path for r in st.rows},
        n_other_split=st.n_other_split,
        layout="psf-med",
        notes=_notes(st, roles, flags, nested, n_pairs),
    )


def _notes(
    st: _Import, roles: dict[str, str], flags: list[str], nested: bool, n_pairs: int
) -> tuple[str, ...]:
    origs = [r for r in st.rows if r.family == ORIGINAL]
    found = ", ".join(f"{role} <- {col}" for role, col in roles.items())
    absent = [r for r in ("question_id", "finding", "split", "subject_id", "patient_id") if r not in roles]
    fams = ", ".join(f"{f} {n}" for f, n in sorted(st.families.items()))
    unspecified = sum(r.finding == UNSPECIFIED for r in origs)
    notes = [
        f"layout: PSF-Med {'questions with nested paraphrases' if nested else 'original-paraphrase pairs'} "
        f"({n_pairs} pairs) -> {len(origs)} originals, {len(st.rows) - len(origs)} variants ({fams or 'none'})",
        f"columns found: {found}" + (f"; not present: {', '.join(absent)}" if absent else ""),
        f"yes/no filter: {st.yesno} on {', '.join(flags) if flags else 'the answer only'}",
        "phenomenon map: " + ", ".join(f"{k} -> {v}" for k, v in sorted(st.pmap.items()) if k in _used(st)),
    ]
    if st.unknown:
        notes.append(
            f"unknown phenomena (skipped): {dict(st.unknown)}; map them with --phenomenon-map NAME=FAMILY"
        )
    if unspecified and "finding" not in roles:
        notes.append(f"{unspecified} originals name no known finding: finding '{UNSPECIFIED}'")
    if miss := st.finder.missing_note(len(st.images)):
        notes.append(miss)
    return tuple(notes)


def _used(st: _Import) -> set[str]:
    return {r.meta.get("phenomenon", "") for r in st.rows if r.family != ORIGINAL}
