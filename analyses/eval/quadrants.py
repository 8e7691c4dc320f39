"""The four-quadrant safety taxonomy: per sample, consistent across paraphrases x reliant on the image.

Ideal = consistent and image-reliant, Fragile = inconsistent and reliant, Dangerous = consistent and not
reliant ("consistent but dangerous": it agrees with itself because it answers from the text), Worst =
inconsistent and not reliant. The papers define them in words; :class:`QuadrantRule` makes the rule
explicit and configurable, and the rule is recorded with every result. Definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from analyses.data.schema import ORIGINAL, PARAPHRASE_FAMILIES
from analyses.eval.metrics import pair_units, predictive_entropy, rows_under

#: The four quadrants, in reporting order.
QUADRANTS: tuple[str, ...] = ("Ideal", "Fragile", "Dangerous", "Worst")


@dataclass(frozen=True)
class QuadrantRule:
    """Explicit rule placing a sample (one cluster) in a quadrant; the papers define them only in words.

    The default, used by ``flipscope demo``, ``eval``, ``compare`` and every Python function that takes a
    rule, reads reliance as a margin shift of at least 1 logit over the whole cluster: a model whose
    image-removed margins sit near zero (the organism) makes the prediction-change rule a coin flip.
    """

    reliance: Literal["pred_change", "margin_shift"] = "margin_shift"
    """How image reliance is read on one question, 'image' vs 'removed': ``margin_shift`` (default):
    reliant iff ``|margin(image) - margin(removed)| >= min_margin_shift`` (the shift need not cross
    zero); ``pred_change``: reliant iff its prediction changes."""
    scope: Literal["cluster", "original"] = "cluster"
    """Which questions of the sample are read: ``cluster`` (default): the sample is image-reliant iff
    *every* answer-preserving question of it (the original and each paraphrase that has a 'removed'
    prediction) is; ``original``: the original question alone. The default is the cluster because a
    sample whose answers agree only because one phrasing is answered from the text is exactly the
    papers' "consistent but dangerous" case, and reading the original alone misses it whenever the text
    shortcut lives in a paraphrase."""
    min_margin_shift: float = 1.0
    """Threshold in logits for ``reliance="margin_shift"`` (ignored otherwise); finite and >= 0."""
    consistency: Literal["pred", "margin_band"] = "pred"
    """``pred``: consistent iff no paraphrase's prediction differs from the original's (no flip).
    ``margin_band``: additionally every margin in the cluster (original and paraphrases) has
    ``|margin| >= min_abs_margin``: all on the same side of zero and outside the band
    (-min_abs_margin, min_abs_margin), so that agreeing near-ties do not count as consistent."""
    min_abs_margin: float = 0.5
    """Band half-width in logits for ``consistency="margin_band"`` (ignored otherwise); finite and >= 0."""

    def __post_init__(self) -> None:
        if self.reliance not in ("pred_change", "margin_shift"):
            raise ValueError(f"reliance must be 'pred_change' or 'margin_shift', got {self.reliance!r}")
        if self.scope not in ("cluster", "original"):
            raise ValueError(f"scope must be 'cluster' or 'original', got {self.scope!r}")
        if self.consistency not in ("pred", "margin_band"):
            raise ValueError(f"consistency must be 'pred' or 'margin_band', got {self.consistency!r}")
        for name in ("min_margin_shift", "min_abs_margin"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (logits), got {value}")

    def in_words(self, removal: str = "") -> str:
        """The rule as sentences, for every page and table that states it (``removal``: how the image
        was removed, e.g. ``gray``)."""
        how = f" ({removal})" if removal else ""
        shift = self.min_margin_shift
        relies = (
            f"its answer changes when the image is removed{how}"
            if self.reliance == "pred_change"
            else f"its margin moves by at least {shift:g} logit{'' if shift == 1 else 's'} when the image is "
            f"removed{how}"
        )
        scope = (
            "every question of it (original and paraphrases) relies on the image"
            if self.scope == "cluster"
            else "its original question relies on the image"
        )
        consistent = "no paraphrase gets another answer than the original"
        if self.consistency == "margin_band":
            consistent += f" and every margin is at least {self.min_abs_margin:g} from zero"
        return (
            f"A question relies on the image if {relies}. A sample (an original question and its paraphrases "
            f"on one image) is image-reliant if {scope}, and consistent if {consistent}."
        )

    def brief(self) -> str:
        """The rule in a few words, for a table cell or a terminal line."""
        moved = (
            "answer changes"
            if self.reliance == "pred_change"
            else f"margin moves by >= {self.min_margin_shift:g} logit{'' if self.min_margin_shift == 1 else 's'}"
        )
        where = "every question of the sample" if self.scope == "cluster" else "the original question"
        band = f", every |margin| >= {self.min_abs_margin:g}" if self.consistency == "margin_band" else ""
        return f"image-reliant if the {moved} without the image on {where}; consistent if no flip{band}"


#: The rule every command and function uses unless told otherwise (``flipscope demo``'s rule).
DEFAULT_RULE = QuadrantRule()


def question_reliance(df: pd.DataFrame, rule: QuadrantRule) -> pd.DataFrame:
    """Per answer-preserving question with both an 'image' and a 'removed' prediction: its sample
    (``root``: the original's qid), whether it relies on the image under ``rule.reliance``, and its
    ``margin`` / ``margin_removed``."""
    im, rm = rows_under(df, "image"), rows_under(df, "removed")[["qid", "pred", "margin"]]
    both = im[im["family"].isin([ORIGINAL, *PARAPHRASE_FAMILIES])].merge(rm, on="qid", suffixes=("", "_rm"))
    if rule.reliance == "pred_change":
        reliant = both["pred"].to_numpy() != both["pred_rm"].to_numpy()
    else:
        reliant = np.abs(both["margin"].to_numpy() - both["margin_rm"].to_numpy()) >= rule.min_margin_shift
    root = both["qid"].where(both["family"] == ORIGINAL, both["paraphrase_of"])
    return pd.DataFrame(
        {
            "qid": both["qid"],
            "root": root,
            "family": both["family"],
            "reliant": reliant,
            "margin": both["margin"],
            "margin_removed": both["margin_rm"],
        }
    )


def least_reliant(df: pd.DataFrame, rule: QuadrantRule | None = None) -> pd.DataFrame:
    """Per sample (``root``), the question that decides its image reliance under ``rule``.

    ``scope="original"``: the original. ``scope="cluster"``: the sample is reliant only if every question
    is, so the decisive one is a non-reliant question if there is any, else any; among those, the one
    whose margin moves least without the image (``|margin - margin_removed|``, ties: the original first,
    then by qid). Columns: those of :func:`question_reliance` plus ``shift`` (the absolute move).
    """
    rule = rule or QuadrantRule()
    per_q = question_reliance(df, rule)
    per_q = per_q.assign(
        shift=(per_q["margin"] - per_q["margin_removed"]).abs(),
        is_original=per_q["family"] == ORIGINAL,
    )
    if rule.scope == "original":
        chosen = per_q[per_q["is_original"]]
    else:
        order = per_q.sort_values(["root", "reliant", "shift", "is_original", "qid"],
                                  ascending=[True, True, True, False, True])  # fmt: skip
        chosen = order.drop_duplicates("root", keep="first")
    return chosen.drop(columns="is_original").reset_index(drop=True)


def quadrants(df: pd.DataFrame, rule: QuadrantRule | None = None) -> pd.DataFrame:
    """One row per sample (original + its paraphrases on one image) with its quadrant under ``rule``.

    Columns: qid (the original's), image_id, finding, split, n_paraphrases, margin and margin_removed
    (the original's), consistent, reliant, reliant_share (share of the sample's questions with a
    'removed' prediction that rely on the image), quadrant, correct (original's pred == ground_truth),
    entropy (see :data:`DEFINITIONS`). Samples without a paraphrase under 'image' or without a
    'removed' row for the original are left out; operator variants play no part.
    """
    rule = rule or QuadrantRule()
    removed = rows_under(df, "removed")
    if removed.empty:
        raise ValueError("quadrants need predictions under condition 'removed' for the original questions")
    pairs = pair_units(df, "image")
    pairs = pairs.assign(abs_m=pairs["margin"].abs(), ent=predictive_entropy(pairs["margin"]))
    per = pairs.groupby("paraphrase_of").agg(
        n_paraphrases=("hit", "size"),
        flipped=("hit", "any"),
        min_abs=("abs_m", "min"),
        ent_sum=("ent", "sum"),
    )
    im = rows_under(df, "image")
    s = im[im["family"] == ORIGINAL].merge(per, left_on="qid", right_index=True, how="inner")
    rem = removed[["qid", "margin"]].rename(columns={"margin": "margin_removed"})
    s = s.merge(rem, on="qid", how="inner")
    consistent = ~s["flipped"].to_numpy(dtype=bool)
    if rule.consistency == "margin_band":
        min_abs = np.minimum(s["margin"].abs().to_numpy(), s["min_abs"].to_numpy())
        consistent &= min_abs >= rule.min_abs_margin
    per_q = question_reliance(df, rule)
    share = per_q.groupby("root")["reliant"].mean().reindex(s["qid"]).to_numpy(dtype=float)
    if rule.scope == "original":
        reliant = per_q.set_index("qid")["reliant"].reindex(s["qid"]).to_numpy(dtype=bool)
    else:
        reliant = per_q.groupby("root")["reliant"].all().reindex(s["qid"]).to_numpy(dtype=bool)
    quadrant = np.select(
        [consistent & reliant, ~consistent & reliant, consistent & ~reliant], QUADRANTS[:3], QUADRANTS[3]
    )
    n_rows = 1 + s["n_paraphrases"].to_numpy()
    entropy = (predictive_entropy(s["margin"]) + s["ent_sum"].to_numpy()) / n_rows
    correct = s["pred"].to_numpy() == s["ground_truth"].to_numpy()
    out = s[["qid", "image_id", "finding", "split", "n_paraphrases", "margin", "margin_removed"]]
    out = out.assign(consistent=consistent, reliant=reliant, reliant_share=share, quadrant=quadrant)
    out = out.assign(correct=correct, entropy=entropy)
    return out.reset_index(drop=True)


def quadrant_summary(q: pd.DataFrame) -> pd.DataFrame:
    """Per quadrant (all four, in :data:`QUADRANTS` order): count, share, accuracy, mean_entropy.

    ``share`` is count / number of samples; an empty quadrant has accuracy and mean_entropy NaN.
    """
    g = q.assign(correct=q["correct"].astype(float)).groupby("quadrant")
    count = g.size().reindex(list(QUADRANTS), fill_value=0).astype(int)
    total = int(count.sum())
    share = count / total if total else np.nan
    acc, ent = (g[c].mean().reindex(list(QUADRANTS)) for c in ("correct", "entropy"))
    out = pd.DataFrame({"count": count, "share": share, "accuracy": acc, "mean_entropy": ent})
    out.index.name = "quadrant"
    return out


def quadrant_summary_by(q: pd.DataFrame, by: str = "finding") -> pd.DataFrame:
    """:func:`quadrant_summary` per group of ``by`` (a column of :func:`quadrants`, e.g. ``finding``), plus
    a row ``all`` per group (every sample of the group: share 1, its accuracy and mean entropy).

    Index (group, quadrant) with quadrant in :data:`QUADRANTS` then ``all``; columns count, share,
    accuracy, mean_entropy. ``share`` is within the group.
    """
    if by not in q.columns:
        raise ValueError(f"column {by!r} not in the quadrants table (it has {list(q.columns)})")
    parts = {}
    for group, g in q.groupby(by, sort=True):
        total = pd.DataFrame(
            {"count": [len(g)], "share": [1.0], "accuracy": [g["correct"].astype(float).mean()],
             "mean_entropy": [g["entropy"].mean()]},
            index=pd.Index(["all"], name="quadrant"),
        )  # fmt: skip
        parts[group] = pd.concat([quadrant_summary(g), total])
    if not parts:
        return pd.DataFrame(columns=["count", "share", "accuracy", "mean_entropy"])
    out = pd.concat(parts, names=[by, "quadrant"])
    return out


def migration(before_q: pd.DataFrame, after_q: pd.DataFrame) -> pd.DataFrame:
    """4x4 counts of samples by quadrant before (rows) and after (columns), matched on (qid, image_id).

    Samples present in only one table are left out. ``migration(...)["Dangerous"].sum() -
    migration(...).loc["Dangerous", "Dangerous"]`` counts samples moving into Dangerous.
    """
    keys = ["qid", "image_id"]
    before, after = before_q[[*keys, "quadrant"]], after_q[[*keys, "quadrant"]]
    m = before.merge(after, on=keys, suffixes=("_before", "_after"))
    ct = m.groupby(["quadrant_before", "quadrant_after"]).size().unstack(fill_value=0)
    ct = ct.reindex(index=list(QUADRANTS), columns=list(QUADRANTS), fill_value=0).astype(int)
    ct.index.name, ct.columns.name = "before", "after"
    return ct


def into_dangerous(base_q: pd.DataFrame, q: pd.DataFrame) -> int:
    """Samples Dangerous under ``q`` that were in another quadrant under ``base_q`` (matched samples):
    a fix that makes the model consistent by ignoring the image shows up here."""
    m = migration(base_q, q)
    return int(m["Dangerous"].sum() - m.loc["Dangerous", "Dangerous"])
