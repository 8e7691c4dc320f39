"""Question bank for yes/no finding questions, grouped into paraphrase families.

For every finding there is one *original* question ("Is there cardiomegaly?"), several templates per
answer-preserving paraphrase family (:data:`analyses.data.schema.PARAPHRASE_FAMILIES`) and several
answer-inverting *operator* variants ("Can cardiomegaly be ruled out?", "Is the heart size normal?").
Operator variants are never paraphrases: their correct answer is the negation of the original's.

Within each family the last ``ceil(n / 3)`` templates are *held out*: :func:`make_rows` never uses them
for ``train`` rows, so an evaluation on ``val``/``test`` can compare seen and unseen surface forms of
the same family (``meta["held_out"]``).

The vocabulary is a small closed set (:func:`vocabulary`), tokenised by :func:`simple_tokenize`, so a
word-level tokenizer can be built from it.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from analyses.data.schema import FINDINGS, OPERATOR, ORIGINAL, PARAPHRASE_FAMILIES, QuestionRow

#: Families that have several templates (every paraphrase family plus the operator family).
TEMPLATE_FAMILIES: tuple[str, ...] = (*PARAPHRASE_FAMILIES, OPERATOR)
#: Answer words a yes/no model emits; not part of any question, see ``vocabulary(include_answers=True)``.
ANSWER_WORDS: tuple[str, ...] = ("yes", "no")


@dataclass(frozen=True)
class FindingTerms:
    """The words a finding is asked about with, and its finding-specific templates."""

    bare: str
    """Noun phrase without article ("pleural effusion")."""
    art: str
    """Noun phrase with the article it takes in a question ("a pleural effusion", "cardiomegaly")."""
    site: str
    """A scope phrase that fits the finding ("in either lung", "of any severity")."""
    lexical: tuple[str, ...]
    """Lexical-substitution paraphrases (complete questions using a synonym of the finding)."""
    operator_extra: tuple[str, ...] = ()
    """Finding-specific answer-inverting questions ("Is the heart size normal?")."""

    def __post_init__(self) -> None:
        if not self.bare or not self.art:
            raise ValueError("FindingTerms needs non-empty 'bare' and 'art' noun phrases")
        if len(self.lexical) < 2:
            raise ValueError(f"FindingTerms({self.bare!r}): give at least 2 lexical paraphrases")


TERMS: dict[str, FindingTerms] = {
    "cardiomegaly": FindingTerms(
        bare="cardiomegaly",
        art="cardiomegaly",
        site="of any severity",
        lexical=(
            "Is the heart enlarged?",
            "Is there an enlarged heart?",
            "Is the cardiac silhouette enlarged?",
            "Is there enlargement of the heart?",
            "Is the heart size increased?",
            "Is there an enlarged cardiac silhouette?",
        ),
        operator_extra=("Is the heart size normal?",),
    ),
    "pleural_effusion": FindingTerms(
        bare="pleural effusion",
        art="a pleural effusion",
        site="on either side",
        lexical=(
            "Is there fluid in the pleural space?",
            "Is there pleural fluid?",
            "Is there a collection of pleural fluid?",
            "Is there fluid around the lung?",
            "Is there an effusion in the pleural space?",
        ),
        operator_extra=("Are the costophrenic angles sharp?",),
    ),
    "pneumothorax": FindingTerms(
        bare="pneumothorax",
        art="a pneumothorax",
        site="on either side",
        lexical=(
            "Is there air in the pleural space?",
            "Is there free air around the lung?",
            "Is there pleural air?",
            "Is there air outside the lung?",
            "Is there a collection of air in the pleural space?",
        ),
        operator_extra=("Do the lung markings extend to the chest wall?",),
    ),
    "consolidation": FindingTerms(
        bare="consolidation",
        art="consolidation",
        site="in either lung",
        lexical=(
            "Is there an airspace opacity?",
            "Is there airspace disease?",
            "Is there alveolar filling?",
            "Is there opacification of the airspaces?",
            "Is there a focal airspace opacity?",
        ),
        operator_extra=("Are the airspaces clear?",),
    ),
    "atelectasis": FindingTerms(
        bare="atelectasis",
        art="atelectasis",
        site="in either lung",
        lexical=(
            "Is there lung collapse?",
            "Is there partial collapse of the lung?",
            "Is there collapse of lung tissue?",
            "Is there loss of lung volume?",
            "Is there a collapsed segment of lung?",
        ),
        operator_extra=("Are both hemidiaphragms at a normal level?",),
    ),
}

#: The original question per finding (``{art}`` is filled in).
ORIGINAL_TEMPLATE = "Is there {art}?"
#: Generic templates per family; ``{bare}``, ``{art}`` and ``{site}`` come from :data:`TERMS`.
GENERIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "syntactic": (
        "Does this radiograph show {art}?",
        "Is {art} present?",
        "Does the image show {art}?",
        "Does this chest x-ray contain {art}?",
        "Does the patient have {art}?",
    ),
    "register": (
        "Is there radiographic evidence of {bare}?",
        "Does the study demonstrate findings consistent with {bare}?",
        "Are there features suggestive of {bare}?",
        "Is there imaging evidence of {bare}?",
        "Are the radiographic findings compatible with {bare}?",
        "Do the findings support a diagnosis of {bare}?",
    ),
    "scope": (
        "Is there any {bare} in this chest x-ray?",
        "Is there any degree of {bare}?",
        "Is there {bare} anywhere on this image?",
        "Is there {art} {site}?",
        "Is there any {bare} at all?",
    ),
    "voice": (
        "Is {art} seen?",
        "Can {art} be identified on this image?",
        "Is {art} shown on this radiograph?",
        "Can {art} be seen?",
        "Is {art} depicted in this study?",
        "Is {art} demonstrated on the film?",
    ),
    "reorder": (
        "On this image, is there {art}?",
        "{bare}: is it present on this film?",
        "In this radiograph, is there {art}?",
        "Looking at this chest x-ray, is there {art}?",
        "For this patient, is there {art}?",
    ),
    OPERATOR: (
        "Can {bare} be ruled out?",
        "Is {art} absent?",
        "Is there no {bare}?",
        "Is this chest x-ray free of {bare}?",
        "Is {bare} excluded on this image?",
    ),
}


def _fill(template: str, terms: FindingTerms) -> str:
    text = template.format(bare=terms.bare, art=terms.art, site=terms.site)
    return text[0].upper() + text[1:]


def _build_bank() -> dict[str, dict[str, tuple[str, ...]]]:
    bank: dict[str, dict[str, tuple[str, ...]]] = {}
    for finding in FINDINGS:
        terms = TERMS[finding]
        fams = {ORIGINAL: (_fill(ORIGINAL_TEMPLATE, terms),), "lexical": terms.lexical}
        for family, generic in GENERIC_TEMPLATES.items():
            extra = terms.operator_extra if family == OPERATOR else ()
            fams[family] = tuple(_fill(t, terms) for t in generic) + extra
        for family, texts in fams.items():
            if len(set(texts)) != len(texts):
                raise RuntimeError(f"duplicate templates for {finding}/{family}: {texts}")
        bank[finding] = fams
    return bank


#: ``QUESTION_BANK[finding][family]`` -> the question texts (index = template id).
QUESTION_BANK: dict[str, dict[str, tuple[str, ...]]] = _build_bank()


def templates(finding: str, family: str) -> tuple[str, ...]:
    """All question texts of one family for one finding (index = template id)."""
    if finding not in QUESTION_BANK:
        raise ValueError(f"unknown finding {finding!r}; expected one of {FINDINGS}")
    if family not in QUESTION_BANK[finding]:
        raise ValueError(f"unknown family {family!r}; expected one of {(ORIGINAL, *TEMPLATE_FAMILIES)}")
    return QUESTION_BANK[finding][family]


def held_out_indices(n_templates: int) -> frozenset[int]:
    """Template ids held out from training in a family of ``n_templates``: the last ``ceil(n / 3)``.

    A family with a single template (the original) holds nothing out.
    """
    if n_templates <= 1:
        return frozenset()
    return frozenset(range(n_templates - math.ceil(n_templates / 3), n_templates))


def is_held_out(finding: str, family: str, index: int) -> bool:
    """Whether template ``index`` of ``family`` is reserved for val/test rows."""
    return index in held_out_indices(len(templates(finding, family)))


_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def simple_tokenize(text: str) -> list[str]:
    """Lowercase word-level tokens; every punctuation character (``? , : ' - .``) is its own token.

    This matches the word-level tokenizer of :func:`hooks.tiny.build_word_tokenizer` (whitespace split,
    then punctuation isolated): "x-ray" -> ``x - ray``, "patient's" -> ``patient ' s``.
    """
    return _TOKEN_RE.findall(text.lower())


def all_questions() -> list[str]:
    """Every question text in the bank (all findings, all families)."""
    return [q for fams in QUESTION_BANK.values() for texts in fams.values() for q in texts]


def vocabulary(include_answers: bool = False) -> list[str]:
    """Sorted set of every token of every question (plus "yes"/"no" if ``include_answers``)."""
    vocab = {tok for q in all_questions() for tok in simple_tokenize(q)}
    if include_answers:
        vocab.update(ANSWER_WORDS)
    return sorted(vocab)


class CaseLike(Protocol):
    """What :func:`make_rows` needs from a case (``analyses.synthcxr.Case`` or a real-data record)."""

    @property
    def image_id(self) -> str: ...
    @property
    def patient_id(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def findings(self) -> Mapping[str, bool]: ...


def _rng(image_id: str, rng_or_seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng([int(rng_or_seed), zlib.crc32(image_id.encode())])


def make_rows(
    case: CaseLike,
    split: str | None = None,
    rng_or_seed: int | np.random.Generator = 0,
    templates_per_family: int = 1,
    *,
    all_templates: bool = False,
    findings: tuple[str, ...] | None = None,
) -> list[QuestionRow]:
    """Question rows about one case: per finding an original, paraphrases and operator variants.

    Args:
        case: anything with ``image_id``, ``patient_id``, ``split`` and ``findings`` (finding -> bool).
        split: split written into the rows (default: ``case.split``). Train rows only use templates
            that are not held out; val/test rows draw from all templates.
        rng_or_seed: a Generator, or an int seed combined with the image id, so the template choice is
            deterministic per (seed, image) and varies across images.
        templates_per_family: how many distinct templates per family (paraphrase and operator) to emit;
            capped at the number available.
        all_templates: emit every eligible template of every family (overrides ``templates_per_family``).
        findings: restrict to these findings (default: all of :data:`FINDINGS`).

    qids: ``<image_id>/<finding>/orig`` and ``<image_id>/<finding>/<family>/<template id>``.
    ``meta`` holds ``template`` (the template id) and ``held_out`` (``"1"`` for held-out templates).
    """
    split = case.split if split is None else split
    if split not in ("train", "val", "test"):
        raise ValueError(f"make_rows: split must be 'train', 'val' or 'test', got {split!r}")
    if templates_per_family < 1:
        raise ValueError(f"make_rows: templates_per_family must be >= 1, got {templates_per_family}")
    rng = _rng(case.image_id, rng_or_seed)
    rows: list[QuestionRow] = []
    for finding in FINDINGS if findings is None else findings:
        if finding not in case.findings:
            raise ValueError(f"case {case.image_id!r} has no label for finding {finding!r}")
        label = bool(case.findings[finding])
        orig_qid = f"{case.image_id}/{finding}/orig"
        common = {"image_id": case.image_id, "patient_id": case.patient_id, "finding": finding}
        common["split"] = split
        rows.append(
            QuestionRow(
                qid=orig_qid,
                question=templates(finding, ORIGINAL)[0],
                family=ORIGINAL,
                paraphrase_of=None,
                polarity=1,
                ground_truth=label,
                meta={"template": "0", "held_out": "0"},
                **common,
            )
        )
        for family in TEMPLATE_FAMILIES:
            texts = templates(finding, family)
            held = held_out_indices(len(texts))
            eligible = [i for i in range(len(texts)) if split != "train" or i not in held]
            if all_templates:
                chosen = eligible
            else:
                k = min(templates_per_family, len(eligible))
                chosen = sorted(int(i) for i in rng.choice(eligible, size=k, replace=False))
            polarity = -1 if family == OPERATOR else 1
            for i in chosen:
                rows.append(
                    QuestionRow(
                        qid=f"{case.image_id}/{finding}/{family}/{i}",
                        question=texts[i],
                        family=family,
                        paraphrase_of=orig_qid,
                        polarity=polarity,
                        ground_truth=label == (polarity == 1),
                        meta={"template": str(i), "held_out": "1" if i in held else "0"},
                        **common,
                    )
                )
    return rows
