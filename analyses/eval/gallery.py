"""The report's gallery: flips and "consistent but dangerous" samples, shown as a reader checks them.

A *flip example* is an (original, paraphrase) pair on one image whose answers differ under 'image';
a *Dangerous example* is a sample in the Dangerous quadrant (consistent across paraphrases, yet some
question is answered the same without the image). Each card shows the image, the questions, their
answers and margins, and the margin with the image removed. Examples are chosen deterministically
(largest margin gap for flips, smallest move without the image for Dangerous; one card per image
within a group) and grouped by paraphrase family.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from analyses.data.schema import ORIGINAL, ImageSource
from analyses.eval.metrics import pair_units, rows_under
from analyses.eval.page import QUADRANT_COLORS, esc, fmt_num, thumbnail_uri
from analyses.eval.quadrants import QuadrantRule, question_reliance


def _removed_margins(df: pd.DataFrame) -> pd.Series:
    return rows_under(df, "removed").set_index("qid")["margin"]


def flip_examples(df: pd.DataFrame, per_family: int = 4) -> tuple[pd.DataFrame, pd.Series]:
    """(examples, number of flip pairs per family): up to ``per_family`` flip pairs per family, those
    with the largest margin gap first, one per image. Columns: family, image_id, finding, ground_truth,
    qid / question / margin / margin_removed of the paraphrase, the same with ``_orig`` for the
    original, gap = |margin - margin_orig|; ``margin_removed`` is NaN without a 'removed' row."""
    pairs = pair_units(df, "image")
    flips = pairs[pairs["hit"]].copy()
    counts = flips.groupby("family").size()
    if flips.empty:
        return flips.assign(gap=[]), counts
    im = rows_under(df, "image").set_index("qid")
    removed = _removed_margins(df)
    flips["question_orig"] = im.loc[flips["paraphrase_of"], "question"].to_numpy()
    flips["margin_removed"] = flips["qid"].map(removed)
    flips["margin_removed_orig"] = flips["paraphrase_of"].map(removed)
    flips["gap"] = (flips["margin"] - flips["margin_orig"]).abs()
    flips = flips.sort_values(["family", "gap", "qid"], ascending=[True, False, True])
    chosen = flips.drop_duplicates(["family", "image_id"]).groupby("family").head(per_family)
    return chosen.reset_index(drop=True), counts


def dangerous_examples(
    df: pd.DataFrame, q: pd.DataFrame, rule: QuadrantRule | None = None, n: int = 8
) -> pd.DataFrame:
    """Up to ``n`` Dangerous samples, those whose answers move least without the image first, one per
    image. Per sample: its original (``*_orig`` columns) and its least image-reliant paraphrase, and
    ``family``: the family of the least reliant question of the sample (``original`` if that is the
    original), ``family_para`` (the shown paraphrase's family), ``text_only_orig`` / ``text_only``:
    whether each shown question is not image-reliant."""
    rule = rule or QuadrantRule()
    dangerous = q.loc[q["quadrant"] == "Dangerous", ["qid", "image_id", "finding"]]
    per_q = question_reliance(df, rule)
    per_q = per_q.assign(shift=(per_q["margin"] - per_q["margin_removed"]).abs())
    per_q = per_q[per_q["root"].isin(dangerous["qid"])].sort_values(["root", "reliant", "shift", "qid"])
    if per_q.empty:
        return pd.DataFrame()
    question = rows_under(df, "image").set_index("qid")["question"]
    gt = rows_under(df, "image").set_index("qid")["ground_truth"]
    decisive = per_q.drop_duplicates("root").set_index("root")
    orig = per_q[per_q["family"] == ORIGINAL].set_index("root")
    para = per_q[per_q["family"] != ORIGINAL].drop_duplicates("root").set_index("root")
    para = para.rename(columns={"family": "family_para"})
    out = dangerous.set_index("qid").join(orig.add_suffix("_orig"), how="inner").join(para, how="inner")
    out["family"] = decisive["family"].reindex(out.index)
    out["decisive_shift"] = decisive["shift"].reindex(out.index)
    out["question_orig"] = question.reindex(out["qid_orig"]).to_numpy()
    out["question"] = question.reindex(out["qid"]).to_numpy()
    out["ground_truth"] = gt.reindex(out["qid_orig"]).to_numpy()
    out["text_only_orig"], out["text_only"] = ~out["reliant_orig"], ~out["reliant"]
    out = out.reset_index(names="root").sort_values(["decisive_shift", "root"])
    return out.drop_duplicates("image_id").head(n).reset_index(drop=True)


class Thumbnails:
    """Image id -> an ``<img>`` with an inline PNG (each image loaded once), or a placeholder saying
    why there is none. Images come from ``images`` (the run's image source) or, without one, from an
    existing file at the row's ``image_path``."""

    def __init__(self, images: ImageSource | None, paths: dict[str, str] | None = None, max_px: int = 128):
        self.images, self.paths, self.max_px = images, paths or {}, max_px
        self.cache: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    def _load(self, image_id: str) -> Callable[[], object] | None:
        if self.images is not None:
            source = self.images
            return lambda: source(image_id)
        path = self.paths.get(image_id, "")
        if path and Path(path).is_file():
            from hooks.inputs import load_image

            return lambda: load_image(path)
        return None

    def __call__(self, image_id: str) -> str:
        if image_id not in self.cache:
            load = self._load(image_id)
            if load is None:
                self.cache[image_id] = '<div class="noimg">no image source passed to the report</div>'
            else:
                try:
                    uri = thumbnail_uri(load(), self.max_px)  # type: ignore[arg-type]
                    self.cache[image_id] = f'<img src="{uri}" alt="image {esc(image_id)}">'
                except Exception as err:  # an unreadable image is shown as such, never hides the card
                    self.errors[image_id] = f"{type(err).__name__}: {err}"
                    self.cache[image_id] = (
                        f'<div class="noimg">image unreadable: {esc(type(err).__name__)}</div>'
                    )
        return self.cache[image_id]


def _answer(margin: float) -> str:
    return '<span class="yes">yes</span>' if margin > 0 else '<span class="no">no</span>'


def _qa_row(label: str, question: str, margin: float, removed: float, text_only: bool = False) -> str:
    flag = ' <span class="textonly">same without image</span>' if text_only else ""
    return (
        f'<tr><td class="f">{esc(label)}</td><td class="q">{esc(question)}{flag}</td><td>{_answer(margin)}</td>'
        f"<td>{fmt_num(margin, 2, signed=True)}</td><td>{fmt_num(removed, 2, signed=True)}</td></tr>"
    )


def example_card(ex: pd.Series, thumbs: Thumbnails, kind: str) -> str:
    """One gallery card (``kind`` = ``flip`` or ``dangerous``) from a row of :func:`flip_examples` or
    :func:`dangerous_examples`."""
    truth = "yes" if bool(ex["ground_truth"]) else "no"
    badge = ""
    if kind == "dangerous":
        badge = f'<span class="badge" style="background:{QUADRANT_COLORS["Dangerous"]}">Dangerous</span> '
    head = f"{badge}image <b>{esc(ex['image_id'])}</b> · {esc(ex['finding'])} · truth: <b>{truth}</b>"
    t_orig = bool(ex.get("text_only_orig", False))
    t_para = bool(ex.get("text_only", False))
    rows = [
        _qa_row("original", ex["question_orig"], ex["margin_orig"], ex["margin_removed_orig"], t_orig),
        _qa_row(ex["family_para"] if "family_para" in ex else ex["family"], ex["question"], ex["margin"],
                ex["margin_removed"], t_para),
    ]  # fmt: skip
    qa = (
        '<table class="qa"><tr><th></th><th style="text-align:left">question</th><th>answer</th>'
        "<th>margin</th><th>no image</th></tr>" + "".join(rows) + "</table>"
    )
    data = f'data-kind="{kind}" data-family="{esc(ex["family"])}"'
    return f'<div class="ex" {data}>{thumbs(str(ex["image_id"]))}<div class="body"><div class="m">{head}</div>{qa}</div></div>'


def gallery_section(
    df: pd.DataFrame, q: pd.DataFrame | None, rule: QuadrantRule, thumbs: Thumbnails, per_family: int = 4,
    max_dangerous: int = 8,
) -> str:  # fmt: skip
    """The gallery: flip pairs grouped by family, then Dangerous samples grouped by the family of the
    question that answers without the image."""
    flips, counts = flip_examples(df, per_family)
    n_pairs = pair_units(df, "image").groupby("family").size()
    parts = [
        "<h2 id='gallery'>Gallery: flips and consistent-but-dangerous samples</h2>",
        "<p class='note'>Margins are logit(yes) − logit(no) at the answer; <i>no image</i> is the margin of "
        "the same question with the image removed. Within each family, the cards shown have the largest "
        "margin gap (flips) or move least without the image (Dangerous).</p>",
        "<h3>Flips by paraphrase family</h3>",
    ]
    if flips.empty:
        parts.append("<p>No flip in this run.</p>")
    for fam in counts.sort_values(ascending=False, kind="stable").index:
        group = flips[flips["family"] == fam]
        total = int(counts.get(fam, 0))
        parts.append(
            f"<h3>{esc(fam)} <span class='note'>{total} of {int(n_pairs.get(fam, 0))} pairs flip; "
            f"{len(group)} shown</span></h3><div class='gallery'>"
            + "".join(example_card(r, thumbs, "flip") for _, r in group.iterrows())
            + "</div>"
        )
    if q is not None:
        dang = dangerous_examples(df, q, rule, max_dangerous)
        n_dang = int((q["quadrant"] == "Dangerous").sum())
        parts.append(
            f"<h3>Dangerous samples <span class='note'>{n_dang} of {len(q)} samples; {len(dang)} shown</span></h3>"
        )
        if dang.empty:  # may have no columns at all: nothing to group
            parts.append("<p>No Dangerous sample in this run.</p>")
        for fam, group in [] if dang.empty else dang.groupby("family", sort=False):
            parts.append(
                f"<h3 class='note'>answered without the image: {esc(fam)} question</h3><div class='gallery'>"
                + "".join(example_card(r, thumbs, "dangerous") for _, r in group.iterrows())
                + "</div>"
            )
    return "\n".join(parts)
