"""Row schema shared by every loader, the synthetic world and the evaluator.

A *question row* is one question (an original, one of its answer-preserving paraphrases, or an
answer-inverting operator variant) asked about one image. Real loaders (PSF-Med-style files) and
the SynthCXR generator both produce exactly these rows, so the evaluator never knows which world
it runs on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from PIL import Image

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Split names found in data files (lower case) -> split (MIMIC-CXR says ``validate``, HF ``validation``).
SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "val": "val", "validation": "val", "validate": "val", "valid": "val", "test": "test",
}  # fmt: skip

#: Paraphrase families (answer-preserving), from the PSF-Med taxonomy.
PARAPHRASE_FAMILIES: tuple[str, ...] = (
    "lexical",  # word substitution: "enlarged heart" for "cardiomegaly"
    "syntactic",  # restructuring: "Does the image show X?" for "Is there X?"
    "register",  # formality shift: "Is there radiographic evidence of X?"
    "scope",  # specificity change: "Is there any X in this study?"
    "voice",  # active/passive: "Is X seen?" / "Can X be seen?"
    "reorder",  # clause reordering
)
#: Family of an original question.
ORIGINAL = "original"
#: Family of an answer-inverting operator variant ("Can X be ruled out?"). Never in a flip cluster.
OPERATOR = "operator"
FAMILIES: tuple[str, ...] = (ORIGINAL, *PARAPHRASE_FAMILIES, OPERATOR)

FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "atelectasis",
)


@dataclass(frozen=True)
class QuestionRow:
    """One yes/no question about one image."""

    qid: str
    """Unique id of this question row."""
    image_id: str
    """Id of the image the question is asked about (also the key into box tables)."""
    question: str
    """The question text, exactly as shown to the model."""
    family: str
    """``original``, a paraphrase family from :data:`PARAPHRASE_FAMILIES`, or ``operator``."""
    paraphrase_of: str | None
    """qid of the original question this row varies; ``None`` for originals."""
    polarity: int
    """+1 if the correct answer equals the original's, -1 for an answer-inverting variant."""
    ground_truth: bool
    """Correct yes/no answer to *this* question (already inverted for operator variants)."""
    finding: str
    """The finding the question is about (e.g. ``cardiomegaly``)."""
    split: str
    """``train``, ``val`` or ``test``; disjoint by patient."""
    patient_id: str = ""
    """Patient the image belongs to (splits are disjoint by patient)."""
    image_path: str = ""
    """Path to the image file for file-backed datasets; empty for generated images."""
    meta: dict[str, str] = field(default_factory=dict, compare=False)
    """Free-form extra columns carried through to results."""

    def __post_init__(self) -> None:
        if not self.qid:
            raise ValueError("QuestionRow.qid is empty: every row needs a unique id")
        if not self.question or not self.question.strip():
            raise ValueError(f"QuestionRow {self.qid!r}: question is empty")
        if self.family not in FAMILIES:
            raise ValueError(
                f"QuestionRow {self.qid!r}: unknown family {self.family!r}; expected one of {FAMILIES}"
            )
        if self.polarity not in (1, -1):
            raise ValueError(f"QuestionRow {self.qid!r}: polarity must be +1 or -1, got {self.polarity}")
        if self.family == ORIGINAL and self.paraphrase_of is not None:
            raise ValueError(f"QuestionRow {self.qid!r}: an original has paraphrase_of=None")
        if self.family != ORIGINAL and not self.paraphrase_of:
            raise ValueError(f"QuestionRow {self.qid!r}: family {self.family!r} needs paraphrase_of")
        if self.family == OPERATOR and self.polarity != -1:
            raise ValueError(f"QuestionRow {self.qid!r}: operator variants invert the answer (polarity -1)")
        if self.family in PARAPHRASE_FAMILIES and self.polarity != 1:
            raise ValueError(f"QuestionRow {self.qid!r}: paraphrases preserve the answer (polarity +1)")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedRow:
    """One record of a data file (or one question row) that was left out, and why. Nothing is dropped
    silently: every loader returns these, the CLI prints their counts and the run folder keeps them
    (``skipped.jsonl``)."""

    qid: str
    """The row's id (``row <index>`` / ``line <n>`` when there is no id)."""
    reason: str
    """Short reason shared by all rows skipped for it (e.g. ``missing image``; each loader lists its own)."""
    detail: str = ""
    """What exactly was wrong: the value, the path, the parser's message."""
    index: int = -1
    """0-based position of the record in the file (-1 if unknown)."""
    line: int | None = None
    """1-based line of the file the record starts on (``None`` where the format has no lines)."""

    def __post_init__(self) -> None:
        if not self.qid:
            raise ValueError(
                "SkippedRow.qid is empty: use 'row <index>' or 'line <n>' for rows without a qid"
            )
        if not self.reason or not self.reason.strip():
            raise ValueError(f"SkippedRow {self.qid!r}: the reason is empty")

    def record(self) -> dict[str, object]:
        """The ``skipped.jsonl`` line of this row: ``row``, ``line``, ``reason``, ``detail``."""
        return {"row": self.qid, "line": self.line, "reason": self.reason, "detail": self.detail}


#: Where images come from: ``images(row)`` or ``images(image_id)`` returns the PIL image
#: (``SynthCXRWorld.image_for``, ``LoadedRows.image_for``).
ImageSource = Callable[[QuestionRow | str], Image.Image]


def first_images(rows: Sequence[QuestionRow], n: int) -> list[QuestionRow]:
    """The rows about the first ``n`` image ids in sorted order (``n = 0``: all rows)."""
    if n < 0:
        raise ValueError(f"n_images must be >= 0 (0 = all images), got {n}")
    if not n:
        return list(rows)
    keep = set(sorted({r.image_id for r in rows})[:n])
    return [r for r in rows if r.image_id in keep]
