"""Audit stage 2: flip pairs per paraphrase family, split by image into a selection half and a scoring half.

A flip pair is an (original, paraphrase) pair on the same image whose predictions differ under the
``image`` condition of an evaluator run (:func:`analyses.eval.pairs.flip_pairs`). The audit localizes one
family at a time: the *target family* is the one with the most flip pairs (``family="auto"``; ties: the
order of :data:`~analyses.data.schema.PARAPHRASE_FAMILIES`) unless named.

The split is by image, so no image informs both the choice of a site or feature and its score: the images
holding a target flip pair are permuted with ``seed`` and the first half (rounded up) is the selection
half; the other images are permuted and halved the same way. Every pair goes with its image. At most
``max_pairs`` flip pairs per half are kept (in the permuted image order), and up to ``max_others`` pairs of
the other families on scoring images (flipped or not: the collateral of an intervention is measured on
them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses.data.schema import PARAPHRASE_FAMILIES, QuestionRow
from analyses.eval.pairs import Pair, flip_pairs, paraphrase_pairs

PAIRS_FILE = "pairs.json"


@dataclass
class PairSplit:
    """The target family's flip pairs in two image-disjoint halves, and other-family pairs for collateral."""

    family: str
    """The paraphrase family localized."""
    flips_by_family: dict[str, int]
    """Flip pairs per paraphrase family (image condition), over the whole run."""
    pairs_by_family: dict[str, int]
    """(original, paraphrase) pairs per family with both predictions, over the whole run."""
    selection: list[Pair]
    """Target flip pairs on selection images (sites and features are chosen on these)."""
    scoring: list[Pair]
    """Target flip pairs on scoring images (what was chosen is scored on these)."""
    others: list[Pair]
    """Pairs of the other families on scoring images (collateral)."""
    selection_images: list[str]
    """Image ids of the selection half."""
    scoring_images: list[str]
    """Image ids of the scoring half."""
    seed: int
    """Seed of the image permutation and of the others' subset."""

    def __post_init__(self) -> None:
        overlap = {p.original.image_id for p in self.selection} & {p.original.image_id for p in self.scoring}
        if overlap:
            raise ValueError(
                f"selection and scoring pairs share images {sorted(overlap)[:5]}: the split is by image"
            )

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family, "flips_by_family": self.flips_by_family,
            "pairs_by_family": self.pairs_by_family, "n_selection": len(self.selection),
            "n_scoring": len(self.scoring), "n_others": len(self.others),
            "n_selection_images": len(self.selection_images), "n_scoring_images": len(self.scoring_images),
            "seed": self.seed,
        }  # fmt: skip

    def save(self, folder: Path) -> Path:
        ids = lambda ps: [[p.original.qid, p.paraphrase.qid] for p in ps]
        record = {**self.summary(), "selection": ids(self.selection), "scoring": ids(self.scoring),
                  "others": ids(self.others), "selection_images": self.selection_images,
                  "scoring_images": self.scoring_images}  # fmt: skip
        path = Path(folder) / PAIRS_FILE
        path.write_text(json.dumps(record, indent=1))
        return path

    @classmethod
    def load(cls, folder: Path, rows: Sequence[QuestionRow]) -> PairSplit:
        """Read :meth:`save`'s file back against the audited ``rows`` (every qid must be among them)."""
        rec = json.loads((Path(folder) / PAIRS_FILE).read_text())
        by_qid = {r.qid: r for r in rows}
        missing = sorted(
            {q for key in ("selection", "scoring", "others") for pair in rec[key] for q in pair} - set(by_qid)
        )
        if missing:
            raise ValueError(
                f"{folder / PAIRS_FILE} names rows not in the data: {missing[:5]}; audit the same data"
            )
        pairs = lambda key: [Pair(by_qid[o], by_qid[p]) for o, p in rec[key]]
        return cls(rec["family"], rec["flips_by_family"], rec["pairs_by_family"], pairs("selection"),
                   pairs("scoring"), pairs("others"), rec["selection_images"], rec["scoring_images"], rec["seed"])  # fmt: skip


def _halves(images: Sequence[str], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    order = [images[i] for i in rng.permutation(len(images))]
    cut = (len(order) + 1) // 2
    return order[:cut], order[cut:]


def choose_family(flips: dict[str, int], family: str = "auto") -> str:
    """``family`` itself (checked), or with ``auto`` the family with the most flip pairs."""
    if family != "auto":
        if family not in PARAPHRASE_FAMILIES:
            raise ValueError(
                f"family {family!r} is not a paraphrase family; choose one of {PARAPHRASE_FAMILIES} or 'auto'"
            )
        return family
    best = max(PARAPHRASE_FAMILIES, key=lambda f: (flips.get(f, 0), -PARAPHRASE_FAMILIES.index(f)))
    if flips.get(best, 0) == 0:
        raise ValueError(
            "no flip pairs in any paraphrase family: nothing to localize (the model never flips here)"
        )
    return best


def split_pairs(
    preds: pd.DataFrame,
    rows: Sequence[QuestionRow],
    family: str = "auto",
    seed: int = 0,
    max_pairs: int = 64,
    max_others: int = 256,
) -> PairSplit:
    """The pair split of an evaluator predictions table (see the module doc)."""
    if max_pairs < 1 or max_others < 0:
        raise ValueError(f"max_pairs must be >= 1 and max_others >= 0, got {max_pairs}, {max_others}")
    im = preds[preds["condition"] == "image"]
    have = set(im["qid"])
    scored_rows = [r for r in rows if r.qid in have]
    all_pairs = paraphrase_pairs(scored_rows)
    per_family = {f: sum(p.paraphrase.family == f for p in all_pairs) for f in PARAPHRASE_FAMILIES}
    flips = {f: flip_pairs(preds, scored_rows, f) for f in PARAPHRASE_FAMILIES}
    counts = {f: len(v) for f, v in flips.items()}
    fam = choose_family(counts, family)
    if not flips[fam]:
        raise ValueError(f"family {fam!r} has no flip pairs in this run (flip pairs per family: {counts})")
    rng = np.random.default_rng(seed)
    flip_images = sorted({p.original.image_id for p in flips[fam]})
    rest = sorted({r.image_id for r in scored_rows} - set(flip_images))
    sel_f, sco_f = _halves(flip_images, rng)
    sel_r, sco_r = _halves(rest, rng)
    sel_images, sco_images = sel_f + sel_r, sco_f + sco_r
    rank = {img: i for i, img in enumerate(sel_images + sco_images)}
    ordered = sorted(flips[fam], key=lambda p: (rank[p.original.image_id], p.paraphrase.qid))
    sel_set, sco_set = set(sel_images), set(sco_images)
    selection = [p for p in ordered if p.original.image_id in sel_set][:max_pairs]
    scoring = [p for p in ordered if p.original.image_id in sco_set][:max_pairs]
    others = [p for p in all_pairs if p.paraphrase.family != fam and p.original.image_id in sco_set]
    if 0 < max_others < len(others):
        keep = np.sort(rng.choice(len(others), max_others, replace=False))
        others = [others[i] for i in keep]
    elif max_others == 0:
        others = []
    return PairSplit(fam, counts, per_family, selection, scoring, others, sel_images, sco_images, seed)
