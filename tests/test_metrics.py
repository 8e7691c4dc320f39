"""Hand-computed cases for every metric in analyses.eval.metrics (pure pandas, no model)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analyses.eval.metrics import (
    accuracy,
    add_cluster_root,
    bootstrap_ci,
    cluster_root,
    flip_rate,
    pairwise_flip_rate,
    polarity_consistency,
    predictive_entropy,
    swap_sensitivity,
    text_only_agreement,
    validate_predictions,
)
from analyses.eval.quadrants import QUADRANTS, QuadrantRule, migration, quadrant_summary, quadrants
from analyses.eval.summary import summarize

LN2 = math.log(2.0)


def H(m: float) -> float:
    """Binary entropy (nats) of sigmoid(m), written out independently of the module."""
    p = 1.0 / (1.0 + math.exp(-m))
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


def make_cluster(
    root: str, finding: str, gt: bool, margins: dict[str, dict[str, float]], image: str | None = None
) -> list[dict[str, object]]:
    """Rows for one original ``root`` and its variants; ``margins[family][condition] = margin``."""
    image = image or f"img_{root}"
    rows = []
    for fam, per_cond in margins.items():
        qid = root if fam == "original" else f"{root}_{fam}"
        polarity = -1 if fam == "operator" else 1
        for cond, m in per_cond.items():
            row: dict[str, object] = {
                "qid": qid,
                "image_id": image,
                "question": f"{fam} question about {finding}?",
                "family": fam,
                "paraphrase_of": None if fam == "original" else root,
                "polarity": polarity,
                "ground_truth": gt if polarity == 1 else not gt,
                "finding": finding,
                "split": "test",
                "condition": cond,
                "margin": float(m),
                "pred": m > 0,
                "swap_image_id": f"other_{root}" if cond.startswith("swap") else None,
            }
            rows.append(row)
    return rows


def frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame(rows)


@pytest.fixture
def preds() -> pd.DataFrame:
    """3 clusters x (original + lexical/register/voice + 1 operator); removed and swaps on originals.

    Under 'image' (pred = margin > 0):
      a (cardiomegaly, gt yes): orig +2 Y | lexical -1 N (flip) | register +1 Y | voice +3 Y | op -2 N (ok)
      b (cardiomegaly, gt no):  orig -2 N | lexical -1 N | register -3 N | voice -0.5 N     | op +1 Y (ok)
      c (effusion, gt yes):     orig +1 Y | lexical +2 Y | register -1 N (flip) | voice -2 N (flip)
                                | op +2 Y (bad)
    Originals: removed a -1 (change), b -1.5 (same), c +0.5 (same);
               swap_random a +1 (same), b +0.5 (change), c +3 (same);
               swap_label  a -1 (change), b +2 (change), c -0.2 (change).
    """
    a = make_cluster("a", "cardiomegaly", True, {
        "original": {"image": 2, "removed": -1, "swap_random": 1, "swap_label": -1},
        "lexical": {"image": -1}, "register": {"image": 1}, "voice": {"image": 3}, "operator": {"image": -2},
    })  # fmt: skip
    b = make_cluster("b", "cardiomegaly", False, {
        "original": {"image": -2, "removed": -1.5, "swap_random": 0.5, "swap_label": 2},
        "lexical": {"image": -1}, "register": {"image": -3}, "voice": {"image": -0.5},
        "operator": {"image": 1},
    })  # fmt: skip
    c = make_cluster("c", "pleural_effusion", True, {
        "original": {"image": 1, "removed": 0.5, "swap_random": 3, "swap_label": -0.2},
        "lexical": {"image": 2}, "register": {"image": -1}, "voice": {"image": -2}, "operator": {"image": 2},
    })  # fmt: skip
    return frame(a + b + c)


# ---------------------------------------------------------------------------------------------- basics


def test_validate_accepts_fixture(preds: pd.DataFrame) -> None:
    assert validate_predictions(preds) is preds


def test_accuracy(preds: pd.DataFrame) -> None:
    # a: lexical wrong -> 4/5; b: all 5 right; c: register, voice, operator wrong -> 2/5; total 11/15
    assert accuracy(preds) == pytest.approx(11 / 15)
    by = accuracy(preds, by="family")
    assert by["original"] == 1.0
    for fam in ("lexical", "register", "voice", "operator"):
        assert by[fam] == pytest.approx(2 / 3)
    # removed (originals only): a -1 N (gt Y) wrong, b N right, c +0.5 Y right -> 2/3
    assert accuracy(preds, condition="removed") == pytest.approx(2 / 3)
    assert math.isnan(accuracy(preds[preds.condition == "image"], condition="removed"))


def test_flip_rate_and_operator_exclusion(preds: pd.DataFrame) -> None:
    # a: lexical disagrees -> flip; b: none; c: register and voice disagree -> flip. flip = 2/3.
    # If operators counted, b (op Y vs orig N) would flip too -> 3/3.
    assert flip_rate(preds) == pytest.approx(2 / 3)
    by_finding = flip_rate(preds, by="finding")
    assert by_finding["cardiomegaly"] == pytest.approx(1 / 2)
    assert by_finding["pleural_effusion"] == 1.0
    by_family = flip_rate(preds, by="family")
    assert set(by_family.index) == {"lexical", "register", "voice"}  # no operator, no original
    assert by_family["lexical"] == pytest.approx(1 / 3)  # a
    assert by_family["register"] == pytest.approx(1 / 3)  # c
    assert by_family["voice"] == pytest.approx(1 / 3)  # c


def test_pairwise_flip_rate(preds: pd.DataFrame) -> None:
    # a 1/3, b 0/3, c 2/3 disagreeing pairs -> 3/9 (operators would add a and b: 5/12)
    assert pairwise_flip_rate(preds) == pytest.approx(3 / 9)
    by_finding = pairwise_flip_rate(preds, by="finding")
    assert by_finding["cardiomegaly"] == pytest.approx(1 / 6)
    assert by_finding["pleural_effusion"] == pytest.approx(2 / 3)
    assert pairwise_flip_rate(preds, by="family").to_dict() == pytest.approx(
        {"lexical": 1 / 3, "register": 1 / 3, "voice": 1 / 3}
    )


def test_flip_ignores_clusters_without_paraphrase_and_orphans(preds: pd.DataFrame) -> None:
    # cluster d has only an original -> cannot flip, left out: still 2/3
    d = make_cluster("d", "cardiomegaly", True, {"original": {"image": 1}})
    assert flip_rate(pd.concat([preds, frame(d)])) == pytest.approx(2 / 3)
    # drop c's original under image: c's paraphrases have nothing to compare with -> a flips, b not: 1/2
    no_c = preds[~((preds.qid == "c") & (preds.condition == "image"))]
    assert flip_rate(no_c) == pytest.approx(1 / 2)
    assert pairwise_flip_rate(no_c) == pytest.approx(1 / 6)


def test_polarity_consistency(preds: pd.DataFrame) -> None:
    # a: op N vs orig Y ok; b: op Y vs orig N ok; c: op Y vs orig Y not inverted -> 2/3
    assert polarity_consistency(preds) == pytest.approx(2 / 3)
    by = polarity_consistency(preds, by="finding")
    assert by["cardiomegaly"] == 1.0
    assert by["pleural_effusion"] == 0.0


def test_text_only_agreement(preds: pd.DataFrame) -> None:
    # only originals have 'removed': a changes, b and c keep their pred -> 2/3
    assert text_only_agreement(preds) == pytest.approx(2 / 3)
    assert text_only_agreement(preds, by="family").to_dict() == pytest.approx({"original": 2 / 3})
    # add removed for a's lexical (image N, removed N -> agree): 3/4
    extra = make_cluster("a", "cardiomegaly", True, {"lexical": {"removed": -4}})
    assert text_only_agreement(pd.concat([preds, frame(extra)])) == pytest.approx(3 / 4)


def test_swap_sensitivity_both_kinds(preds: pd.DataFrame) -> None:
    # random: only b changes -> 1/3; label-controlled: all three change -> 1
    assert swap_sensitivity(preds, kind="random") == pytest.approx(1 / 3)
    assert swap_sensitivity(preds, kind="label") == 1.0
    by = swap_sensitivity(preds, kind="random", by="finding")
    assert by["cardiomegaly"] == pytest.approx(1 / 2)
    assert by["pleural_effusion"] == 0.0
    with pytest.raises(ValueError, match="kind"):
        swap_sensitivity(preds, kind="other")  # type: ignore[call-overload]


def test_unknown_group_column(preds: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="nope"):
        flip_rate(preds, by="nope")


def test_cluster_root(preds: pd.DataFrame) -> None:
    root = cluster_root(preds)
    assert (root[preds.qid.str.startswith("a")] == "a").all()
    assert (root[preds.qid == "b_operator"] == "b").all()
    assert add_cluster_root(preds)["paraphrase_root"].nunique() == 3


def test_predictive_entropy() -> None:
    assert predictive_entropy(0.0) == pytest.approx(LN2)
    assert predictive_entropy([1.0, -1.0]) == pytest.approx([H(1.0), H(1.0)])
    assert predictive_entropy(800.0) == pytest.approx(0.0, abs=1e-12)  # stable, no overflow


# ------------------------------------------------------------------------------------------- quadrants


@pytest.fixture
def qpreds() -> pd.DataFrame:
    """Five samples (original + lexical + register; 'removed' for the original).

       image margins (orig, lex, reg)   removed   gt   consistent  pred change  |shift|
    s1 (+3, +2, +4)                     -1        Y    yes         yes          4
    s2 (+1, -1, +2)                     -2        Y    no          yes          3
    s3 (-2, -3, -1)                     -2.5      Y    yes         no           0.5
    s4 ( 0, +1, -1)                     -0.2      N    no          no           0.2
    s5 (+0.1, +0.2, +0.3)               -0.1      N    yes         yes          0.2
    """
    spec = {
        "s1": ((3, 2, 4), -1, True),
        "s2": ((1, -1, 2), -2, True),
        "s3": ((-2, -3, -1), -2.5, True),
        "s4": ((0, 1, -1), -0.2, False),
        "s5": ((0.1, 0.2, 0.3), -0.1, False),
    }
    rows = []
    for root, ((mo, ml, mr), rem, gt) in spec.items():
        rows += make_cluster(root, "cardiomegaly", gt, {
            "original": {"image": mo, "removed": rem}, "lexical": {"image": ml}, "register": {"image": mr},
            "operator": {"image": -mo},
        })  # fmt: skip
    return frame(rows)


def quadrant_of(q: pd.DataFrame) -> dict[str, str]:
    return dict(zip(q.qid, q.quadrant, strict=True))


#: The prediction-change rule these fixtures were built around (the default is the margin-shift rule).
PRED = QuadrantRule(reliance="pred_change")


def test_the_default_rule_is_the_demos_margin_shift_over_the_cluster(qpreds: pd.DataFrame) -> None:
    from analyses.cli import build_parser
    from analyses.eval.quadrants import DEFAULT_RULE

    assert QuadrantRule() == DEFAULT_RULE == QuadrantRule(reliance="margin_shift", min_margin_shift=1.0)
    assert DEFAULT_RULE.scope == "cluster"
    assert quadrant_of(quadrants(qpreds)) == quadrant_of(quadrants(qpreds, DEFAULT_RULE))
    for argv in (["eval"], ["compare", "runs/a"], ["demo"]):
        args = build_parser().parse_args(argv)
        if argv[0] != "demo":
            assert (args.reliance, args.min_margin_shift) == ("margin_shift", 1.0), argv
    assert "margin moves by at least 1 logit when the image is removed (gray)" in DEFAULT_RULE.in_words("gray")
    assert "answer changes" in PRED.brief() and "every question of the sample" in DEFAULT_RULE.brief()


def test_quadrants_pred_change(qpreds: pd.DataFrame) -> None:
    q = quadrants(qpreds, PRED)
    assert quadrant_of(q) == {"s1": "Ideal", "s2": "Fragile", "s3": "Dangerous", "s4": "Worst", "s5": "Ideal"}
    assert dict(zip(q.qid, q.correct, strict=True)) == {
        "s1": True, "s2": True, "s3": False, "s4": True, "s5": False,  # s4: margin 0 -> no == gt no
    }  # fmt: skip
    assert q.set_index("qid").loc["s4", "entropy"] == pytest.approx((LN2 + 2 * H(1.0)) / 3)
    assert set(q.n_paraphrases) == {2}  # the operator is not a paraphrase


def test_quadrants_margin_shift(qpreds: pd.DataFrame) -> None:
    # |shift| >= 0.4: s3 (0.5) becomes reliant -> Ideal; s5 (0.2) is no longer reliant -> Dangerous
    q = quadrants(qpreds, QuadrantRule(reliance="margin_shift", min_margin_shift=0.4))
    assert quadrant_of(q) == {"s1": "Ideal", "s2": "Fragile", "s3": "Ideal", "s4": "Worst", "s5": "Dangerous"}


def test_quadrants_margin_band(qpreds: pd.DataFrame) -> None:
    # |margin| >= 0.5 everywhere: s1 (min 2) and s3 (min 1) stay consistent; s5 (min 0.1) does not -> Fragile
    q = quadrants(qpreds, QuadrantRule(reliance="pred_change", consistency="margin_band", min_abs_margin=0.5))
    expected = {"s1": "Ideal", "s2": "Fragile", "s3": "Dangerous", "s4": "Worst", "s5": "Fragile"}
    assert quadrant_of(q) == expected
    # band 0 is the plain prediction rule
    q0 = quadrants(qpreds, QuadrantRule(reliance="pred_change", consistency="margin_band", min_abs_margin=0.0))
    assert quadrant_of(q0) == quadrant_of(quadrants(qpreds, PRED))


def test_quadrants_read_reliance_over_the_cluster_or_the_original() -> None:
    """A consistent sample whose original reads the image but whose register paraphrase answers from the
    text: Dangerous over the cluster (the default), Ideal when only the original is read."""
    rows = make_cluster(
        "t1",
        "cardiomegaly",
        False,
        {
            "original": {"image": -3.0, "removed": 0.2},  # reads the image: the answer moves by 3.2
            "register": {"image": -2.5, "removed": -2.4},  # answers from the text: moves by 0.1
            "lexical": {"image": -2.0, "removed": 0.1},  # reads the image
        },
    ) + make_cluster(
        "t2",
        "cardiomegaly",
        True,
        {
            "original": {"image": 2.0, "removed": -0.1},
            "register": {"image": 1.5},  # no 'removed' prediction: not read
        },
    )
    df = frame(rows)
    for reliance, threshold in (("margin_shift", 1.0), ("pred_change", 0.0)):
        by_cluster = quadrants(df, QuadrantRule(reliance=reliance, min_margin_shift=threshold))
        by_original = quadrants(
            df, QuadrantRule(reliance=reliance, scope="original", min_margin_shift=threshold)
        )
        assert quadrant_of(by_original) == {"t1": "Ideal", "t2": "Ideal"}
        assert quadrant_of(by_cluster) == {"t1": "Dangerous", "t2": "Ideal"}
        share = dict(zip(by_cluster.qid, by_cluster.reliant_share, strict=True))
        assert share == pytest.approx({"t1": 2 / 3, "t2": 1.0})
        assert by_original.reliant_share.tolist() == by_cluster.reliant_share.tolist()
    with pytest.raises(ValueError, match="scope"):
        QuadrantRule(scope="paraphrase")  # type: ignore[arg-type]


def test_quadrant_summary(qpreds: pd.DataFrame) -> None:
    s = quadrant_summary(quadrants(qpreds, PRED))
    assert list(s.index) == list(QUADRANTS)
    assert s["count"].tolist() == [2, 1, 1, 1]
    assert s["share"].tolist() == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert s["accuracy"].tolist() == pytest.approx([0.5, 1.0, 0.0, 1.0])  # Ideal: s1 right, s5 wrong
    ideal = ((H(3) + H(2) + H(4)) / 3 + (H(0.1) + H(0.2) + H(0.3)) / 3) / 2
    assert s.loc["Ideal", "mean_entropy"] == pytest.approx(ideal)
    assert s.loc["Worst", "mean_entropy"] == pytest.approx((LN2 + 2 * H(1.0)) / 3)
    # only s1: the other quadrants are present with count 0 and NaN accuracy / entropy
    one = quadrant_summary(quadrants(qpreds[cluster_root(qpreds) == "s1"], PRED))
    assert one["count"].tolist() == [1, 0, 0, 0]
    assert one.loc["Ideal", "share"] == 1.0
    assert one.loc[["Fragile", "Dangerous", "Worst"], ["accuracy", "mean_entropy"]].isna().all().all()


def test_quadrants_need_removed(qpreds: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="removed"):
        quadrants(qpreds[qpreds.condition == "image"])


def test_quadrant_rule_validation() -> None:
    with pytest.raises(ValueError, match="reliance"):
        QuadrantRule(reliance="attention")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="consistency"):
        QuadrantRule(consistency="vibes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_margin_shift"):
        QuadrantRule(min_margin_shift=-1.0)
    with pytest.raises(ValueError, match="min_abs_margin"):
        QuadrantRule(min_abs_margin=float("nan"))


def test_migration(qpreds: pd.DataFrame) -> None:
    before = quadrants(qpreds, PRED)
    after = quadrants(qpreds, QuadrantRule(reliance="margin_shift", min_margin_shift=0.4))
    m = migration(before, after)
    assert list(m.index) == list(QUADRANTS) and list(m.columns) == list(QUADRANTS)
    assert int(m.to_numpy().sum()) == 5
    assert m.loc["Dangerous", "Ideal"] == 1  # s3
    assert m.loc["Ideal", "Dangerous"] == 1  # s5 moved into Dangerous
    assert m.loc["Ideal", "Ideal"] == 1 and m.loc["Fragile", "Fragile"] == 1 and m.loc["Worst", "Worst"] == 1
    # samples present on one side only are left out
    assert int(migration(before, after[after.qid != "s1"]).to_numpy().sum()) == 4


# ------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_contains_point_and_is_deterministic(preds: pd.DataFrame) -> None:
    point, low, high = bootstrap_ci(preds, flip_rate, n_boot=50, seed=3)
    assert point == pytest.approx(2 / 3)
    assert low <= point <= high
    assert 0.0 <= low < high <= 1.0  # three clusters with different flips: a non-degenerate interval
    assert bootstrap_ci(preds, flip_rate, n_boot=50, seed=3) == (point, low, high)


def test_bootstrap_zero_width_for_identical_clusters() -> None:
    rows = []
    for i in range(6):  # six copies of the same flipping cluster
        rows += make_cluster(f"k{i}", "cardiomegaly", True, {
            "original": {"image": 2}, "lexical": {"image": -1}, "register": {"image": 1},
        })  # fmt: skip
    assert bootstrap_ci(frame(rows), pairwise_flip_rate, n_boot=30) == pytest.approx((0.5, 0.5, 0.5))


def test_bootstrap_resamples_whole_clusters() -> None:
    # clusters with 1, 2 and 4 rows (original + 0, 1, 3 paraphrases)
    fams = [[], ["lexical"], ["lexical", "register", "voice"]]
    rows = []
    for i, fs in enumerate(fams):
        rows += make_cluster(f"c{i}", "cardiomegaly", True, {f: {"image": 1.0} for f in ["original", *fs]})
    df = frame(rows)
    seen: list[pd.DataFrame] = []

    def record(d: pd.DataFrame) -> float:
        seen.append(d)
        return float(len(d))

    bootstrap_ci(df, record, n_boot=60, seed=0)
    resamples = seen[:-1]  # the last call is the point estimate on the table itself
    sums3 = {a + b + c for a in (1, 2, 4) for b in (1, 2, 4) for c in (1, 2, 4)}
    lengths = {len(d) for d in resamples}
    assert lengths <= sums3
    assert len(lengths) > 1  # resampling rows would always give 7 rows
    for d in resamples:
        # each drawn copy is complete: one original and all its rows, and keys never collide
        per_copy = d.groupby("paraphrase_root")
        assert set(per_copy.size()) <= {1, 2, 4}
        assert (per_copy["family"].apply(lambda f: (f == "original").sum()) == 1).all()
        assert not d.duplicated(["qid", "condition"]).any()
        assert len(d) == 3 or d.paraphrase_root.nunique() == 3
    # a statistic constant per cluster has a zero-width interval under cluster resampling
    # (row resampling would change the share of originals)
    rows = []
    for i in range(5):
        rows += make_cluster(f"e{i}", "cardiomegaly", True, {
            "original": {"image": 1.0}, "lexical": {"image": 2.0}, "register": {"image": -1.0},
        })  # fmt: skip
    share_orig = lambda d: float((d.family == "original").mean())
    assert bootstrap_ci(frame(rows), share_orig, n_boot=50) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


def test_bootstrap_argument_checks(preds: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="n_boot=0"):
        bootstrap_ci(preds, flip_rate, n_boot=0)
    with pytest.raises(ValueError, match=r"level=1\.5"):
        bootstrap_ci(preds, flip_rate, level=1.5)
    with pytest.raises(ValueError, match="cluster column"):
        bootstrap_ci(preds, flip_rate, cluster_col="patient")


# ------------------------------------------------------------------------------------------- summarize


def test_summarize(preds: pd.DataFrame) -> None:
    rule = QuadrantRule(reliance="margin_shift", min_margin_shift=0.75)
    out = summarize(preds, rule, n_boot=20, seed=1)
    m = out["metrics"]
    expected = {
        "accuracy": 11 / 15,
        "flip_rate": 2 / 3,
        "pairwise_flip_rate": 3 / 9,
        "polarity_consistency": 2 / 3,
        "text_only_agreement": 2 / 3,
        "swap_sensitivity_random": 1 / 3,
        "swap_sensitivity_label": 1.0,
    }
    assert m["value"].to_dict() == pytest.approx(expected)
    assert m["n"].to_dict() == {
        "accuracy": 15, "flip_rate": 3, "pairwise_flip_rate": 9, "polarity_consistency": 3,
        "text_only_agreement": 3, "swap_sensitivity_random": 3, "swap_sensitivity_label": 3,
    }  # fmt: skip
    assert ((m["low"] <= m["value"] + 1e-12) & (m["value"] <= m["high"] + 1e-12)).all()
    fam = out["by_family"]
    assert fam.loc[("flip_rate", "lexical"), "value"] == pytest.approx(1 / 3)
    assert fam.loc[("accuracy", "original"), "value"] == 1.0
    fin = out["by_finding"]
    assert fin.loc[("flip_rate", "cardiomegaly"), "value"] == pytest.approx(1 / 2)
    assert fin.loc[("flip_rate", "cardiomegaly"), "n"] == 2
    # shifts: a 3 (reliant), b 0.5, c 0.5 -> a Fragile, b Dangerous, c Worst
    assert quadrant_of(out["quadrants"]) == {"a": "Fragile", "b": "Dangerous", "c": "Worst"}
    assert out["quadrant_summary"]["count"].tolist() == [0, 1, 1, 1]
    choices = out["choices"]
    assert choices["rule"]["reliance"] == "margin_shift" and choices["rule"]["min_margin_shift"] == 0.75
    assert (choices["n_boot"], choices["seed"], choices["n_clusters"]) == (20, 1, 3)
    assert "flip_rate" in choices["definitions"] and "entropy" in choices["definitions"]
    assert summarize(preds, rule, n_boot=20, seed=1)["metrics"].equals(m)  # deterministic
    # summarize's vectorised bootstrap uses the same resamples as bootstrap_ci with the same seed
    for name, fn in [("flip_rate", flip_rate), ("polarity_consistency", polarity_consistency)]:
        _, low, high = bootstrap_ci(preds, fn, n_boot=20, seed=1)
        assert (m.loc[name, "low"], m.loc[name, "high"]) == pytest.approx((low, high))
    cardio = lambda d: flip_rate(d, by="finding").get("cardiomegaly", np.nan)
    _, low, high = bootstrap_ci(preds, cardio, n_boot=20, seed=1)
    assert tuple(fin.loc[("flip_rate", "cardiomegaly"), ["low", "high"]]) == pytest.approx((low, high))


def test_summarize_without_optional_conditions(preds: pd.DataFrame) -> None:
    out = summarize(preds[preds.condition == "image"], n_boot=5)
    assert out["quadrants"] is None and out["quadrant_summary"] is None
    assert out["metrics"].loc["swap_sensitivity_label", "n"] == 0
    assert math.isnan(out["metrics"].loc["text_only_agreement", "value"])


# ------------------------------------------------------------------------------------------ validation


def test_validate_missing_columns(preds: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"missing columns \['margin'\]"):
        validate_predictions(preds.drop(columns="margin"))


def test_validate_duplicates(preds: pd.DataFrame) -> None:
    dup = pd.concat([preds, preds.iloc[[0]]])
    with pytest.raises(ValueError, match=r"duplicate \(qid, condition\).*'qid': 'a'.*drop_duplicates"):
        validate_predictions(dup)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.assign(pred=~d.pred), "pred must equal margin > 0"),
        (lambda d: d.assign(pred=d.pred.astype(int)), "pred and ground_truth must be bool"),
        (lambda d: d.assign(margin=d.margin.astype(str)), "margin must be a float column"),
        (lambda d: d.assign(margin=d.margin.where(d.qid != "b", np.nan)), "margin must be finite"),
        (lambda d: d.assign(condition=d.condition.replace("removed", "gray")), r"unknown condition.*gray"),
        (lambda d: d.assign(family=d.family.replace("voice", "tone")), r"unknown family.*tone"),
        (lambda d: d[d.qid != "c"], "paraphrase_of is not an original's qid"),
        (lambda d: d.assign(swap_image_id=None), "swap_image_id"),
        (lambda d: d.assign(ground_truth=d.ground_truth.where(d.qid != "a_operator", True)), "negation"),
        (lambda d: d.assign(finding=d.finding.where(d.condition != "removed", "x")), "differ between"),
    ],
)
def test_validate_rejects(preds: pd.DataFrame, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        validate_predictions(mutate(preds))
