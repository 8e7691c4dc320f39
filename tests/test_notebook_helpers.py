"""Library helpers behind notebooks 01-03: flip pairs from rows, component rankings and the flagged site,
per-layer sums over sweeps, grouped bootstrap intervals and their comparison, per-finding quadrants.

Hand-built results check the arithmetic; the shipped planted organism checks the pieces against the
evaluator and against the planted truth.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.eval.pairs import (
    Pair,
    ScoredPairs,
    flip_pairs,
    flip_pairs_from_rows,
    pair_attention_in_box,
    pair_batches,
    paraphrase_pairs,
    score_pairs,
)
from analyses.eval.quadrants import quadrant_summary, quadrant_summary_by
from hooks.sites import Site, attn_out, mlp_out
from interp.patching import PatchingResult
from interp.scores import (
    LayerScores,
    component_sweep,
    flagged_site,
    load_flagged,
    ranked_above,
    save_flagged,
    site_ranking,
)
from interp.stats import compare_intervals, interval_relation, mean_ci_by

pytestmark = pytest.mark.usefixtures("one_thread")


def _result(
    kind: str, per_pair: list[list[float]], positions: tuple[str, ...] = ("final",)
) -> PatchingResult:
    """A result whose recovery per (layer, pair) is ``per_pair`` (clean 1, corrupt 0: patched = recovery)."""
    rec = torch.tensor(per_pair, dtype=torch.float32)  # (layer, pair)
    n_layers, n_pairs = rec.shape
    patched = rec[:, None, :].expand(n_layers, len(positions), n_pairs).clone()
    return PatchingResult(
        kind, list(range(n_layers)), list(positions), patched, torch.ones(n_pairs), torch.zeros(n_pairs)
    )


# ---------------------------------------------------------------------- rankings
def test_site_ranking_orders_sites_by_mean_recovery_with_intervals() -> None:
    attn = _result("attn_out", [[0.1, 0.3], [0.9, 0.7], [0.2, float("nan")]])
    mlp = _result("mlp_out", [[0.0, 0.0], [0.5, 0.5], [0.95, 0.85]])
    r = site_ranking({"attn_out": attn, "mlp_out": mlp}, "final", n_boot=200)
    assert list(r["site"][:3]) == ["mlp_out(2)", "attn_out(1)", "mlp_out(1)"]
    assert list(r["rank"]) == list(range(1, 7))
    row = r.set_index("site").loc["attn_out(2)"]
    assert row["recovery"] == pytest.approx(0.2) and row["n"] == 1  # the NaN pair is left out
    top = r.set_index("site").loc["mlp_out(2)"]
    assert top["low"] <= top["recovery"] <= top["high"] and top["low"] >= 0.85 - 1e-6
    # ties: the lower layer first, then the order of the results
    tie = site_ranking([_result("attn_out", [[0.5], [0.5]]), _result("mlp_out", [[0.5], [0.5]])], n_boot=10)
    assert list(tie["site"]) == ["attn_out(0)", "mlp_out(0)", "attn_out(1)", "mlp_out(1)"]
    with pytest.raises(ValueError, match="position 'image'"):
        site_ranking([attn], "image")


def test_flagged_site_ranked_above_and_the_file_round_trip() -> None:
    attn = _result("attn_out", [[0.6, 0.6], [0.1, 0.1], [0.2, 0.2]])
    mlp = _result("mlp_out", [[0.0, 0.0], [0.3, 0.3], [0.5, 0.5]])
    assert flagged_site([attn, mlp]) == attn_out(0)
    r = site_ranking([attn, mlp], n_boot=10)
    above = ranked_above(r, [mlp_out(2), attn_out(2)])
    assert list(above["site"]) == ["attn_out(0)"] and above["upstream"].tolist() == [True]
    assert ranked_above(r, [attn_out(0)]).empty
    with pytest.raises(ValueError, match="none of"):
        ranked_above(r, [Site("attn_out", 7)])
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/deeper/02_flagged.json"
        record = save_flagged(path, {"attn_out": attn, "mlp_out": mlp}, source="hand-built")
        assert load_flagged(path) == attn_out(0)
        on_disk = json.loads(Path(path).read_text())
        assert (
            on_disk["site"] == "attn_out(0)"
            and on_disk["recovery"] == pytest.approx(0.6) == record["recovery"]
        )
        assert [x["site"] for x in on_disk["ranking"][:2]] == ["attn_out(0)", "mlp_out(2)"]
        with pytest.raises(FileNotFoundError, match="notebook 02"):
            load_flagged(f"{d}/missing.json")
    with pytest.raises(ValueError, match="no site has a recovery"):
        flagged_site([_result("attn_out", [[float("nan")]])])


def test_layer_scores_from_results_sum_absolute_recovery_over_kinds() -> None:
    attn = _result("attn_out", [[0.6, 0.6], [-0.4, -0.2], [0.1, 0.1]])
    mlp = _result("mlp_out", [[0.2, 0.2], [0.1, 0.1], [-0.6, -0.6]])
    s = LayerScores.from_results([attn, mlp], "final")
    assert s.scores == pytest.approx([0.8, 0.4, 0.7])
    assert s.top_k(1) == [0] and s.site_kind == "attn_out+mlp_out"
    signed = LayerScores.from_results([attn, mlp], "final", absolute=False)
    assert signed.scores == pytest.approx([0.8, -0.2, -0.5])
    with pytest.raises(ValueError, match="other layers"):
        LayerScores.from_results([attn, _result("mlp_out", [[0.0], [0.0]])])


# ---------------------------------------------------------------------- intervals
def test_mean_ci_by_matches_group_means_and_compare_intervals() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "g": ["a"] * 50 + ["b"] * 50,
            "f": ["x", "y"] * 50,
            "v": np.r_[rng.normal(0, 0.1, 50), rng.normal(1, 0.1, 50)],
        }
    )
    frame.loc[0, "v"] = np.nan
    t = mean_ci_by(frame, ["v"], "g", n_boot=300)
    assert t.loc[("a", "v"), "value"] == pytest.approx(frame.loc[frame.g == "a", "v"].mean())
    assert t.loc[("a", "v"), "n"] == 49 and t.loc[("b", "v"), "n"] == 50
    assert (t["low"] <= t["value"]).all() and (t["value"] <= t["high"]).all()
    assert compare_intervals(t, "g", "a", "b").tolist() == ["below"]
    two = mean_ci_by(frame, ["v"], ["f", "g"], n_boot=300)
    assert two.index.names == ["f", "g", "column"] and len(two) == 4
    assert compare_intervals(two, "g", "b", "a").tolist() == ["above", "above"]
    assert interval_relation((0.0, 1.0), (0.5, 2.0)) == "overlap"
    assert interval_relation((0.0, float("nan")), (0.5, 2.0)) == "overlap"
    with pytest.raises(ValueError, match="not in the frame"):
        mean_ci_by(frame, ["w"], "g")


def test_quadrant_summary_by_finding_is_the_summary_of_each_group() -> None:
    q = pd.DataFrame(
        {
            "finding": ["a", "a", "a", "b", "b"],
            "quadrant": ["Dangerous", "Dangerous", "Ideal", "Worst", "Ideal"],
            "correct": [True, False, True, True, True],
            "entropy": [0.1, 0.3, 0.5, 0.6, 0.2],
        }
    )
    t = quadrant_summary_by(q, "finding")
    assert t.loc[("a", "Dangerous"), "count"] == 2 and t.loc[("a", "Dangerous"), "share"] == pytest.approx(
        2 / 3
    )
    assert t.loc[("a", "Dangerous"), "accuracy"] == 0.5 and t.loc[("a", "Dangerous"), "mean_entropy"] == 0.2
    assert (
        t.loc[("a", "all"), "accuracy"] == pytest.approx(2 / 3) and t.loc[("a", "all"), "mean_entropy"] == 0.3
    )
    assert t.loc[("b", "Dangerous"), "count"] == 0 and math.isnan(t.loc[("b", "Dangerous"), "accuracy"])
    pd.testing.assert_frame_equal(
        t.loc["b"].drop("all"), quadrant_summary(q[q.finding == "b"]), check_names=False
    )
    with pytest.raises(ValueError, match="column 'split'"):
        quadrant_summary_by(q, "split")


# ---------------------------------------------------------------------- on the shipped organism
@pytest.fixture(scope="module")
def planted_setup():  # type: ignore[no-untyped-def]
    from analyses.data.schema import first_images
    from analyses.organism.model import MODEL_DIR, load_organism, organism_rows
    from analyses.organism.truth import load_planted_truth

    adapter = load_organism(MODEL_DIR)
    world, rows = organism_rows("test")
    return adapter, world, first_images(rows, 24), load_planted_truth(MODEL_DIR)


def test_flip_pairs_from_rows_agree_with_the_evaluator(planted_setup) -> None:  # type: ignore[no-untyped-def]
    adapter, world, rows, truth = planted_setup
    scored = flip_pairs_from_rows(adapter, rows, world.image_for, truth.family)
    pairs = paraphrase_pairs(rows, truth.family)
    assert scored.pairs == pairs and len(pairs) == 24 * 3
    # margins are the model's on each (image, question)
    i = 5
    m = adapter.margins_for(
        [world.image_for(pairs[i].original)] * 2, [pairs[i].original.question, pairs[i].paraphrase.question]
    )
    torch.testing.assert_close(
        torch.stack([scored.m_original[i], scored.m_paraphrase[i]]), m.float(), atol=1e-4, rtol=1e-4
    )
    # the same flips as the evaluator's predictions table gives
    with tempfile.TemporaryDirectory() as d:
        df = evaluate(adapter, rows, world.image_for, d, EvalConfig(conditions=("image",)), progress=False)
    from_table = flip_pairs(df, rows, truth.family)
    assert {p.paraphrase.qid for p in scored.flips} == {p.paraphrase.qid for p in from_table}
    assert len(scored.flips) > 0 and len(scored.flips) + len(scored.consistent) == len(pairs)
    assert scored.flip_rate == pytest.approx(len(scored.flips) / len(pairs))
    with pytest.raises(ValueError, match="no \\(original, paraphrase\\) pairs"):
        flip_pairs_from_rows(
            adapter, [r for r in rows if r.family != truth.family], world.image_for, truth.family
        )
    with pytest.raises(ValueError, match="one margin per pair"):
        ScoredPairs(pairs[:2], torch.zeros(3), torch.zeros(2))


def test_component_sweep_flags_a_planted_site(planted_setup) -> None:  # type: ignore[no-untyped-def]
    adapter, world, rows, truth = planted_setup
    flips = flip_pairs_from_rows(adapter, rows, world.image_for, truth.family, ground_truth=True).flips[:12]
    assert len(flips) >= 6
    clean, corrupt = pair_batches(adapter, flips, world.image_for)
    sweep = component_sweep(adapter, clean, corrupt, positions=("final",))
    assert set(sweep) == {"attn_out", "mlp_out"}
    assert flagged_site(sweep) in truth.sites


def test_pair_attention_in_box_rows_groups_and_exclusions(planted_setup) -> None:  # type: ignore[no-untyped-def]
    adapter, world, rows, truth = planted_setup
    scored = score_pairs(adapter, paraphrase_pairs(rows, truth.family, ground_truth=True), world.image_for)
    att = pair_attention_in_box(
        adapter, scored, world.image_for, world.boxes(), 64, exclude_findings=["pneumothorax"], per_group=5
    )
    assert "pneumothorax" not in set(att["finding"])
    assert att["flip"].sum() <= 5 and (~att["flip"]).sum() <= 5
    flipped = {p.paraphrase.qid: f for p, f in zip(scored.pairs, scored.flipped.tolist(), strict=True)}
    assert all(flipped[q] == f for q, f in zip(att["qid"], att["flip"], strict=True))
    assert att["coverage"].notna().all()  # every positive case of these findings has a box
    with pytest.raises(ValueError, match="no pairs left"):
        pair_attention_in_box(adapter, scored, world.image_for, world.boxes(), 64,
                              exclude_findings=sorted({p.original.finding for p in scored.pairs}))  # fmt: skip
    assert isinstance(scored.pairs[0], Pair)


def test_progress_bars_are_text_bars_off_in_a_notebook_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from tqdm.std import tqdm as text_tqdm

    from hooks.progress import in_notebook, tqdm

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not in_notebook()
    bar = tqdm(total=3, file=sys.stderr)
    assert isinstance(bar, text_tqdm) and type(bar).__mro__[1] is text_tqdm and not bar.disable
    bar.close()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert in_notebook() and tqdm(total=3).disable and tqdm(total=3, disable=True).disable
