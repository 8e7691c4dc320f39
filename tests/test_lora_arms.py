"""Arms of a targeted-LoRA experiment (lora_targeted.arms): layers, split checks, the seed x cluster
bootstrap, per-cluster flips, the arm table and cross-model patching base -> adapter, on hand-built
tables and a tiny Gemma3 over the SynthCXR vocabulary."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.data.questions import vocabulary
from analyses.data.schema import QuestionRow
from analyses.eval.compare import compare_runs
from analyses.eval.evaluate import EvalConfig
from analyses.eval.quadrants import QUADRANTS, QuadrantRule
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.tiny import build_word_tokenizer, tiny_gemma3
from interp.patching import PatchingResult
from lora_targeted.arms import (
    ARMS_FILE,
    arm_layers,
    arm_table,
    changed_rows,
    check_disjoint,
    component_scores,
    family_hits,
    hits_matrix,
    mean_migration,
    run_arms,
    seed_cluster_bootstrap,
    where_changed,
)
from lora_targeted.train import LoraTrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- layers and splits
def test_arm_layers_same_budget_disjoint_and_all() -> None:
    arms = arm_layers([4, 3], 8)
    assert arms["targeted"] == [3, 4]
    assert len(arms["control"]) == 2 and not set(arms["control"]) & {3, 4}
    assert arms["control"] == [0, 7]  # farthest from the flagged layers without scores
    assert arms["all_layers"] == list(range(8))
    with pytest.raises(ValueError, match="out of range"):
        arm_layers([8], 8)


def _row(qid: str, image: str, split: str, patient: str = "") -> QuestionRow:
    return QuestionRow(qid=qid, image_id=image, question="Is there cardiomegaly?", family="original",
                       paraphrase_of=None, polarity=1, ground_truth=True, finding="cardiomegaly", split=split,
                       patient_id=patient)  # fmt: skip


def test_check_disjoint_refuses_overlap() -> None:
    train = [_row("a", "i1", "train", "p1"), _row("b", "i2", "train", "p2"), _row("v", "i9", "val", "p9")]
    assert check_disjoint(train, [_row("t", "i3", "test", "p3")], "train") == 2
    with pytest.raises(ValueError, match="1 rows of that split"):
        check_disjoint(train, [_row("t", "i3", "train", "p3")], "train")
    with pytest.raises(ValueError, match="1 images or patients"):
        check_disjoint(train, [_row("t", "i1", "test", "p3")], "train")  # same image
    with pytest.raises(ValueError, match="1 images or patients"):
        check_disjoint(train, [_row("t", "i5", "test", "p2")], "train")  # same patient, other image
    # the val row is not trained on: sharing its image is fine
    assert check_disjoint(train, [_row("t", "i9", "test", "p9")], "train") == 2


# ----------------------------------------------------------------------------- statistics
def test_seed_cluster_bootstrap_by_hand() -> None:
    v = np.array([[1.0, 0.0, np.nan, 1.0], [0.0, 0.0, 1.0, 1.0]])
    mean, low, high = seed_cluster_bootstrap(v, n_boot=500)
    assert mean == pytest.approx(4 / 7)  # NaN cells left out of the mean
    assert 0 <= low < mean < high <= 1
    const = np.full((3, 5), 0.25)
    assert seed_cluster_bootstrap(const, n_boot=200) == pytest.approx((0.25, 0.25, 0.25))
    # seeds that disagree completely: a quarter of the resamples draw seed 0 twice -> the interval is [0, 1]
    split = np.stack([np.zeros(50), np.ones(50)])
    assert seed_cluster_bootstrap(split, n_boot=2000) == pytest.approx((0.5, 0.0, 1.0))
    # one seed: the plain cluster bootstrap, narrower than with a disagreeing second seed
    one = seed_cluster_bootstrap(split[1:] * 0.0 + (np.arange(50) % 2), n_boot=2000)
    assert one[0] == pytest.approx(0.5) and 0.3 < one[1] < 0.5 < one[2] < 0.7
    with pytest.raises(ValueError, match="every cell is NaN"):
        seed_cluster_bootstrap(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="seed, cluster"):
        seed_cluster_bootstrap(np.zeros(3))


def _preds(flips: dict[str, bool], family: str = "register") -> pd.DataFrame:
    """A predictions table: per cluster an original (pred True) and one paraphrase of ``family``."""
    recs = []
    for root, flip in flips.items():
        recs.append({"qid": root, "family": "original", "paraphrase_of": None, "condition": "image",
                     "pred": True, "margin": 1.0, "ground_truth": True, "image_id": root, "finding": "f"})  # fmt: skip
        recs.append({"qid": f"{root}-p", "family": family, "paraphrase_of": root, "condition": "image",
                     "pred": not flip, "margin": -1.0 if flip else 1.0, "ground_truth": True, "image_id": root,
                     "finding": "f"})  # fmt: skip
    return pd.DataFrame.from_records(recs)


def test_family_hits_and_matrix() -> None:
    a = _preds({"q2": True, "q1": False, "q3": True})
    hits = family_hits(a, "register")
    assert list(hits.index) == ["q1", "q2", "q3"] and hits.tolist() == [0.0, 1.0, 1.0]
    assert family_hits(a, "lexical").empty  # no lexical paraphrase in these clusters
    b = _preds({"q1": True, "q2": False, "q3": False})
    assert hits_matrix([a, b], "register").tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="other register clusters"):
        hits_matrix([a, _preds({"q1": True})], "register")
    with pytest.raises(ValueError, match="not a paraphrase family"):
        family_hits(a, "operator")


def test_changed_rows_by_hand() -> None:
    a = _preds({"q1": True, "q2": False})
    b = _preds({"q1": False, "q2": False})
    rows = [QuestionRow(qid=q, image_id="i", question="?", family="register" if q.endswith("-p") else "original",
                        paraphrase_of=q[:-2] if q.endswith("-p") else None, polarity=1, ground_truth=True,
                        finding="f", split="test") for q in a["qid"]]  # fmt: skip
    assert [r.qid for r in changed_rows(a, b, rows, "register")] == ["q1-p"]
    assert changed_rows(a, b, rows, "original") == []
    with pytest.raises(ValueError, match="different rows"):
        changed_rows(a, b.iloc[:2], rows)


def test_component_scores_take_the_best_component() -> None:
    def result(kind: str, rec: list[float]) -> PatchingResult:
        patched = torch.tensor(rec)[:, None, None]  # clean 1, corrupt 0: recovery = patched margin
        return PatchingResult(kind, [0, 1, 2], ["final"], patched, torch.ones(1), torch.zeros(1))

    s = component_scores([result("attn_out", [0.1, 0.9, 0.2]), result("mlp_out", [0.3, 0.1, 0.6])])
    assert s.scores == pytest.approx([0.3, 0.9, 0.6]) and s.top_k(2) == [1, 2]
    assert s.meta["attn_out"] == pytest.approx([0.1, 0.9, 0.2])
    with pytest.raises(ValueError, match="position 'image'"):
        component_scores([result("attn_out", [0, 0, 0])], "image")


# ----------------------------------------------------------------------------- end to end, tiny model
def _tiny() -> VLMAdapter:
    tok = build_word_tokenizer(vocabulary(), "gemma3")
    model, proc = tiny_gemma3(tok, seed=1)
    with torch.no_grad():
        model.model.language_model.norm.weight.fill_(9.0)
    return VLMAdapter(model, proc, AdapterConfig(expected_image_size=64), name="tiny-arms")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    world = SynthCXRWorld(SynthCXRConfig(n_patients=30, seed=3))
    rows = world.rows()
    base = _tiny()
    test = world.rows("test")
    keep = sorted({r.image_id for r in test})[:3]
    test = [r for r in test if r.image_id in keep]
    arms = {"targeted": [1], "control": [0], "all_layers": list(range(base.n_layers))}
    cfg = LoraTrainConfig(steps=4, lr=5e-3, batch_size=4, seed=0)
    out = tmp_path_factory.mktemp("arms")
    ev = EvalConfig(conditions=("image", "removed", "swap_label"), batch_size=64)
    runs = run_arms(base, arms, rows, test, world.image_for, cfg, (0, 1), out, ev, progress=False)
    comp = compare_runs(runs.folders, runs.names, QuadrantRule(), base="base", n_boot=50)
    return base, world, test, runs, comp


def test_run_arms_trains_every_arm_and_seed(experiment) -> None:  # type: ignore[no-untyped-def]
    base, world, _test, runs, comp = experiment
    assert runs.names == ["base", "targeted_s0", "targeted_s1", "control_s0", "control_s1",
                          "all_layers_s0", "all_layers_s1"]  # fmt: skip
    f = runs.frame()
    assert f.loc[("targeted", 0), "trainable"] == f.loc[("control", 0), "trainable"]
    assert f.loc[("all_layers", 0), "trainable"] == base.n_layers * f.loc[("targeted", 0), "trainable"]
    assert (runs.base_folder.parent / ARMS_FILE).is_file()
    # seeds give different adapters
    m0 = comp.predictions["targeted_s0"].set_index(["qid", "condition"])["margin"]
    m1 = comp.predictions["targeted_s1"].set_index(["qid", "condition"])["margin"]
    assert not np.allclose(m0.sort_index().to_numpy(), m1.sort_index().to_numpy())
    with pytest.raises(ValueError, match="overlap the training split"):
        run_arms(base, {"t": [1]}, world.rows(), world.rows("train")[:5], world.image_for,
                 runs.config, (0,), runs.base_folder.parent / "bad", progress=False)  # fmt: skip


def test_arm_table_aggregates_the_runs(experiment) -> None:  # type: ignore[no-untyped-def]
    _base, _world, _test, runs, comp = experiment
    table = arm_table(runs, comp, "register", n_boot=200)
    assert list(table.index) == ["base", "targeted", "control", "all_layers"]
    for arm in ("targeted", "control"):
        names = [r.name for r in runs.of(arm)]
        per_seed = [family_hits(comp.predictions[n], "register").mean() for n in names]
        assert table.loc[arm, "register_flip"] == pytest.approx(np.mean(per_seed))
        assert table.loc[arm, "register_flip_sd"] == pytest.approx(np.std(per_seed, ddof=1))
        assert table.loc[arm, "text_only_agreement"] == pytest.approx(
            comp.table.loc[names, "text_only_agreement"].mean()
        )
        lo, hi = table.loc[arm, "register_flip_low"], table.loc[arm, "register_flip_high"]
        assert lo <= table.loc[arm, "register_flip"] <= hi
    assert table.loc["base", "into_dangerous"] == 0 and table.loc["base", "n_seeds"] == 1
    mig = mean_migration(runs, comp, "control")
    assert list(mig.index) == list(QUADRANTS)
    expected = (comp.migrations["control_s0"] + comp.migrations["control_s1"]) / 2
    pd.testing.assert_frame_equal(mig, expected)
    with pytest.raises(ValueError, match="comparison lacks runs"):
        arm_table(runs, dataclasses.replace(comp, table=comp.table.drop(index="control_s1")))


def test_where_changed_is_zero_below_the_lora_layers(experiment) -> None:  # type: ignore[no-untyped-def]
    base, world, test, runs, _comp = experiment
    run = runs.of("targeted")[0]  # LoRA on layer 1 only
    rows = [r for r in test if r.family != "operator"][:6]
    w = where_changed(base, run.adapter, rows, world.image_for)
    assert set(w["position"]) == {"all", "final"} and set(w["kind"]) == {"attn_out", "mlp_out"}
    below = w[(w["layer"] == 0) & (w["position"] == "all")]
    assert below["recovery"].abs().max() < 1e-4  # below the adapter's layer base and adapter agree
    at = w[(w["layer"] == 1) & (w["position"] == "all")]
    assert at["recovery"].abs().max() > 0.05  # the LoRA layer's components carry the change
    with pytest.raises(ValueError, match="no rows"):
        where_changed(base, run.adapter, [], world.image_for)
