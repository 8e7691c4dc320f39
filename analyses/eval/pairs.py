"""(original, paraphrase) pairs: the unit of paraphrase patching and feature attribution.

A pair is an original question and one of its answer-preserving paraphrases about the same image. The
clean run asks the original, the corrupted run asks the paraphrase; a *flip pair* is one whose two
predictions differ. Built here once, from rows or from an evaluator predictions table, so every
notebook and analysis selects pairs the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import pandas as pd
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.data.schema import ORIGINAL, PARAPHRASE_FAMILIES, ImageSource, QuestionRow

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter
    from hooks.batch import Batch


class Pair(NamedTuple):
    """An original question and one of its paraphrases, same image."""

    original: QuestionRow
    paraphrase: QuestionRow


def _check_family(family: str | None) -> None:
    if family is not None and family not in PARAPHRASE_FAMILIES:
        raise ValueError(f"family {family!r} is not a paraphrase family; choose one of {PARAPHRASE_FAMILIES}")


def paraphrase_pairs(
    rows: Sequence[QuestionRow], family: str | None = None, ground_truth: bool | None = None
) -> list[Pair]:
    """Every (original, paraphrase) pair among ``rows``, in the order of the originals.

    ``family`` keeps paraphrases of one family; ``ground_truth`` keeps pairs whose original has that
    answer (e.g. ``True``: positive images, where a shortcut to "no" shows as a flip).
    """
    _check_family(family)
    paras: dict[str, list[QuestionRow]] = {}
    for r in rows:
        if r.family in PARAPHRASE_FAMILIES and (family is None or r.family == family):
            paras.setdefault(str(r.paraphrase_of), []).append(r)
    return [
        Pair(o, p)
        for o in rows
        if o.family == ORIGINAL and (ground_truth is None or o.ground_truth == ground_truth)
        for p in paras.get(o.qid, [])
    ]


def flip_pairs(
    preds: pd.DataFrame,
    rows: Sequence[QuestionRow],
    family: str | None = None,
    ground_truth: bool | None = None,
    condition: str = "image",
) -> list[Pair]:
    """The pairs whose predictions differ under ``condition`` in an evaluator predictions table.

    Ordered as the paraphrase rows appear in ``preds``; rows missing from ``rows`` are refused.
    """
    _check_family(family)
    by_qid = {r.qid: r for r in rows}
    im = preds[preds["condition"] == condition]
    orig_pred = im[im["family"] == ORIGINAL].set_index("qid")["pred"]
    para = im[im["family"].isin([family] if family else list(PARAPHRASE_FAMILIES))]
    para = para[para["paraphrase_of"].isin(orig_pred.index)]
    if ground_truth is not None:
        para = para[para["ground_truth"] == ground_truth]
    flipped = para[para["pred"].to_numpy() != orig_pred.loc[para["paraphrase_of"]].to_numpy()]
    missing = sorted(set(flipped["qid"]) - set(by_qid) | set(flipped["paraphrase_of"]) - set(by_qid))
    if missing:
        raise ValueError(
            f"predictions name rows not in `rows`: {missing[:5]}; pass the rows that were evaluated"
        )
    return [Pair(by_qid[o], by_qid[q]) for q, o in zip(flipped["qid"], flipped["paraphrase_of"], strict=True)]


def pair_batches(adapter: VLMAdapter, pairs: Sequence[Pair], images: ImageSource) -> tuple[Batch, Batch]:
    """(clean, corrupt) batches: the originals and the paraphrases, each on its pair's image."""
    if not pairs:
        raise ValueError("no pairs: pass at least one (original, paraphrase) pair")
    shown = [images(p.original) for p in pairs]
    clean = adapter.prepare(shown, [p.original.question for p in pairs])
    corrupt = adapter.prepare(shown, [p.paraphrase.question for p in pairs])
    return clean, corrupt


@dataclass
class ScoredPairs:
    """(original, paraphrase) pairs with both margins from one model: which flip, which stay consistent."""

    pairs: list[Pair]
    """Every pair scored, in the order given."""
    m_original: Float[Tensor, " pair"]
    """Margin of each pair's original question on its image."""
    m_paraphrase: Float[Tensor, " pair"]
    """Margin of each pair's paraphrase on the same image."""

    def __post_init__(self) -> None:
        n = len(self.pairs)
        if self.m_original.shape != (n,) or self.m_paraphrase.shape != (n,):
            raise ValueError(
                f"{n} pairs but margins of shape {tuple(self.m_original.shape)} and "
                f"{tuple(self.m_paraphrase.shape)}: give one margin per pair"
            )

    @property
    def flipped(self) -> Bool[Tensor, " pair"]:
        """Whether the two predictions (margin > 0) differ."""
        return (self.m_original > 0) != (self.m_paraphrase > 0)

    @property
    def flips(self) -> list[Pair]:
        """The flip pairs, in order."""
        return [p for p, f in zip(self.pairs, self.flipped.tolist(), strict=True) if f]

    @property
    def consistent(self) -> list[Pair]:
        """The pairs whose predictions agree, in order."""
        return [p for p, f in zip(self.pairs, self.flipped.tolist(), strict=True) if not f]

    @property
    def flip_rate(self) -> float:
        """Share of pairs that flip (NaN without pairs)."""
        return float(self.flipped.float().mean()) if self.pairs else float("nan")


def score_pairs(
    adapter: VLMAdapter, pairs: Sequence[Pair], images: ImageSource, batch_size: int = 128
) -> ScoredPairs:
    """Both margins of every pair (original and paraphrase on the pair's image), ``batch_size`` per pass."""
    if not pairs:
        raise ValueError("no pairs: pass at least one (original, paraphrase) pair")
    shown = [images(p.original) for p in pairs]
    m_o = adapter.margins_for(shown, [p.original.question for p in pairs], batch_size)
    m_p = adapter.margins_for(shown, [p.paraphrase.question for p in pairs], batch_size)
    return ScoredPairs(list(pairs), m_o.float(), m_p.float())


def flip_pairs_from_rows(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    family: str | None = None,
    ground_truth: bool | None = None,
    batch_size: int = 128,
) -> ScoredPairs:
    """Score every (original, paraphrase) pair among ``rows`` (:func:`paraphrase_pairs` with ``family`` and
    ``ground_truth``) with ``adapter``, without an evaluator run; ``.flips`` are the flip pairs."""
    pairs = paraphrase_pairs(rows, family, ground_truth)
    if not pairs:
        raise ValueError(
            f"no (original, paraphrase) pairs among {len(rows)} rows for family={family!r}, "
            f"ground_truth={ground_truth!r}; pass rows that hold both the originals and their paraphrases"
        )
    return score_pairs(adapter, pairs, images, batch_size)


def pair_attention_in_box(
    adapter: VLMAdapter,
    scored: ScoredPairs,
    images: ImageSource,
    boxes: pd.DataFrame,
    image_size: int | tuple[int, int],
    exclude_findings: Sequence[str] = (),
    per_group: int | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Attention-in-box (:func:`interp.attention.attention_in_box`) of the paraphrase run of flip and
    consistent pairs, one row per pair, with the finding's box on the pair's image.

    ``exclude_findings``: findings left out (e.g. a finding answered from a text prior: it never flips,
    so it would only sit in the consistent group); ``per_group``: at most this many flip and this many
    consistent pairs, in order. Pairs without a box for their finding get NaN coverage / precision.
    Columns: those of ``attention_in_box`` plus qid (the paraphrase's), finding, flip.
    """
    from analyses.data.boxes import boxes_for
    from interp.attention import attention_in_box

    chosen: list[tuple[Pair, bool]] = []
    taken = {True: 0, False: 0}
    for pair, flip in zip(scored.pairs, scored.flipped.tolist(), strict=True):
        if pair.paraphrase.finding in exclude_findings or (
            per_group is not None and taken[flip] >= per_group
        ):
            continue
        chosen.append((pair, flip))
        taken[flip] += 1
    if not chosen:
        raise ValueError(f"no pairs left after excluding findings {list(exclude_findings)}")
    parts = []
    for i in range(0, len(chosen), batch_size):
        block = chosen[i : i + batch_size]
        para = [p.paraphrase for p, _ in block]
        batch = adapter.prepare([images(p.original) for p, _ in block], [r.question for r in para])
        found = [boxes_for(r.image_id, boxes, r.finding) for r in para]
        att = attention_in_box(adapter, batch, [b[0] if b else None for b in found], image_size)
        parts.append(att.assign(qid=[r.qid for r in para], finding=[r.finding for r in para],
                                flip=[f for _, f in block]))  # fmt: skip
    out = pd.concat(parts, ignore_index=True)
    out["row"] = range(len(out))
    return out
