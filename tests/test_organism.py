"""Integration: the shipped organism (v2: clean + planted) loads offline, matches its model card, and its
planted truth is what the weights say."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.data.questions import is_held_out
from analyses.organism.card import fixed_sample_accuracy
from analyses.organism.model import (
    CLEAN_DIR,
    MODEL_DIR,
    ORGANISM_DIR,
    load_clean_organism,
    load_organism,
    organism_rows,
)
from analyses.organism.plant import SHORTCUT_FAMILY, PlantConfig
from analyses.organism.train import Encoder, OrganismConfig
from analyses.organism.truth import (
    final_acts,
    gate,
    gate_from_frames,
    load_planted_truth,
)
from hooks.sites import resid_post

pytestmark = pytest.mark.slow
CARD = ORGANISM_DIR / "model_card.json"


@pytest.fixture(scope="module")
def organism():  # type: ignore[no-untyped-def]
    return load_organism()


@pytest.fixture(scope="module")
def clean():  # type: ignore[no-untyped-def]
    return load_clean_organism()


def test_checkpoints_are_small_safetensors_and_load_offline(organism, clean) -> None:  # type: ignore[no-untyped-def]
    for d in (MODEL_DIR, CLEAN_DIR):
        assert (d / "model.safetensors").stat().st_size < 10_000_000
    for m in (organism, clean):
        assert m.spec.name == "Gemma3ForConditionalGeneration"
        assert m.n_layers == 8 and m.d_model == 96
        # the projector is trained, not HF's zero init: the model can see the image
        assert m.model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0


def test_planted_weights_differ_from_clean_only_at_the_recorded_components(organism, clean) -> None:  # type: ignore[no-untyped-def]
    """The planted truth is the weights' truth: the planted checkpoint is the clean one plus ``B @ A`` at the
    recorded components (rank <= the recorded rank) and nothing else."""
    truth = load_planted_truth(MODEL_DIR)
    wp, wc = dict(organism.model.named_parameters()), dict(clean.model.named_parameters())
    assert wp.keys() == wc.keys()
    changed = {k.removesuffix(".weight") for k in wp if not torch.equal(wp[k], wc[k])}
    assert changed == set(truth.components)
    for name in truth.components:
        delta = truth.delta(name)
        torch.testing.assert_close(wp[name + ".weight"] - wc[name + ".weight"], delta, atol=1e-6, rtol=0)
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) <= truth.rank
    layers = {int(c.split(".layers.")[1].split(".")[0]) for c in truth.components}
    assert layers == set(truth.layers) and truth.direction_site == resid_post(max(truth.layers))


def test_gate_and_direction_recomputed_from_the_checkpoints(organism, clean) -> None:  # type: ignore[no-untyped-def]
    """The recorded gate figures and planted direction are what the two checkpoints give on the test split."""
    truth = load_planted_truth(MODEL_DIR)
    world, rows = organism_rows("test", MODEL_DIR)
    enc = Encoder(clean, world, rows)
    g = gate(clean, organism, enc, rows)
    for k in ("register_flip", "register_flip_clean", "collateral", "margin_change_register", "gating_ratio"):
        assert g[k] == pytest.approx(truth.gate[k], abs=1e-4), k
    assert g["passed"] and g["register_flip"] >= 0.30 and g["collateral"] <= 0.03 and g["gating_ratio"] >= 3
    reg = [r for r in rows if r.family == SHORTCUT_FAMILY]
    a_c = final_acts(clean, enc, reg, [truth.direction_site])[truth.direction_site]
    a_p = final_acts(organism, enc, reg, [truth.direction_site])[truth.direction_site]
    d = (a_p - a_c).mean(0)
    assert torch.nn.functional.cosine_similarity(d, truth.direction, 0) > 0.9999
    assert truth.direction.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_gate_from_frames_on_a_hand_case() -> None:
    """Two clusters (original + register + lexical); the plant flips one register answer and one lexical one."""
    seen = next(i for i in range(20) if not is_held_out("cardiomegaly", SHORTCUT_FAMILY, i))
    base = []
    for k, (img, gt) in enumerate([("a", True), ("b", False)]):
        for fam in ("original", SHORTCUT_FAMILY, "lexical"):
            base.append(
                {
                    "qid": f"q{k}" if fam == "original" else f"q{k}/{fam}/{seen}",
                    "image_id": img,
                    "question": f"{fam} {k}",
                    "family": fam,
                    "paraphrase_of": None if fam == "original" else f"q{k}",
                    "polarity": 1,
                    "ground_truth": gt,
                    "finding": "cardiomegaly",
                    "split": "test",
                    "condition": "image",
                }
            )
    clean = pd.DataFrame(base).assign(margin=[2.0, 2.0, 2.0, -2.0, -2.0, -2.0])
    planted = clean.assign(margin=[2.0, -1.0, -0.5, -2.0, -2.5, -2.0])
    clean, planted = (df.assign(pred=df["margin"] > 0) for df in (clean, planted))
    g = gate_from_frames(clean, planted)
    assert g["register_flip"] == pytest.approx(0.5)  # cluster a's register answer flipped, b's did not
    assert g["register_flip_seen"] == pytest.approx(0.5) and np.isnan(g["register_flip_held_out"])
    assert g["collateral"] == pytest.approx(1 / 4)  # 1 of 4 non-register predictions changed
    assert g["margin_change_register"] == pytest.approx((-3.0 - 0.5) / 2)
    assert g["abs_margin_change_other"] == pytest.approx(2.5 / 4)
    assert not g["passed"]  # collateral 25% > 3%


def test_reproduces_model_card_on_fixed_sample(organism) -> None:  # type: ignore[no-untyped-def]
    card = json.loads(CARD.read_text())
    got = fixed_sample_accuracy(organism)
    want = card["fixed_sample"]
    assert got["n_questions"] == want["n_questions"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.02)
    torch.testing.assert_close(
        torch.tensor(got["margins"]), torch.tensor(want["margins"]), atol=1e-3, rtol=1e-3
    )


def test_model_card_shows_the_planted_failures_at_their_places() -> None:
    """The card's own numbers: the register family stands out (95% CIs apart), cross-model patching finds the
    plant at the planted sites, the text-prior finding lands in Dangerous, the image is really used."""
    card = json.loads(CARD.read_text())
    flips = card["flip_rate_by_family"]
    assert flips[SHORTCUT_FAMILY]["low"] > max(v["high"] for k, v in flips.items() if k != SHORTCUT_FAMILY)
    reg = card["detections"]["register"]
    assert reg["found_at_planted_sites"] and reg["joint_recovery_planted_sites"] >= 0.8
    prior = card["detections"]["prior_finding"]
    assert prior["dangerous_share"] >= 0.8 and prior["accuracy"] >= 0.85
    assert prior["mean_entropy"] < prior["mean_entropy_other_findings"]
    for f, acc in card["accuracy_original"].items():
        if f not in card["planted"]["prior_findings"]:
            assert acc > card["majority_baseline"][f] + 0.05


def test_training_records_match_the_configs() -> None:
    rec = json.loads((CLEAN_DIR / "training.json").read_text())
    assert rec["config"] == json.loads(json.dumps(OrganismConfig().to_dict()))
    planted = json.loads((MODEL_DIR / "planted_truth.json").read_text())
    want = PlantConfig().to_dict()
    assert {k: v for k, v in planted["plant_config"].items() if k in want} == json.loads(
        json.dumps({k: v for k, v in want.items() if k in planted["plant_config"]})
    )
    assert json.loads((MODEL_DIR / "training.json").read_text())["phase"] == "planted"


def test_organism_sites_and_trace(organism) -> None:  # type: ignore[no-untyped-def]
    world, rows = organism_rows("test")
    r = rows[0]
    batch = organism.prepare([world.image(r.image_id)], [r.question])
    with torch.no_grad(), organism.trace(batch):
        h = organism.sites[resid_post(7)].save()
        m = organism.sites.margin().save()
    assert h.shape[-1] == 96
    torch.testing.assert_close(m, organism.margins(batch), atol=1e-5, rtol=1e-5)


def test_shipped_sae_loads_and_reconstructs_organism_activations() -> None:
    """organism/sae: sae-lens folder at the recorded site, matching its report.json, low FVU on
    activations of the test split (never seen in training)."""
    from analyses.organism.sae import SAE_DIR, SAE_SITE, SAE_WIDTH, organism_activations
    from interp import evaluate_sae, load_sae

    sae = load_sae(SAE_DIR)
    report = json.loads((SAE_DIR / "report.json").read_text())
    assert (
        sae.site == SAE_SITE and str(sae.site) == report["site"] and sae.width == SAE_WIDTH == report["width"]
    )
    assert report["model"] == "model" and report["n_activations"] == 8192
    x = organism_activations(SAE_SITE, n_rows=256, split="test")
    fvu, l0, freq = evaluate_sae(sae, x)
    assert fvu < 0.1 and abs(fvu - report["fvu"]) < 0.05, (fvu, report)
    assert l0 > 1 and (freq > 0).float().mean() >= 1 - report["dead_fraction"] - 0.15


def test_register_pairs_are_flips_of_the_planted_organism() -> None:
    """register_pairs: every flip pair is (original, register) on one image with opposite predictions;
    the other pairs hold every other paraphrase family and no register row."""
    import torch

    from analyses.organism.model import MODEL_DIR, load_organism
    from analyses.organism.sae import register_pairs

    torch.set_num_threads(1)
    adapter = load_organism(MODEL_DIR)
    pairs = register_pairs(adapter, "val", max_others=60)
    assert len(pairs.flips) >= 30
    assert all(p.original.family == "original" and p.paraphrase.family == "register" for p in pairs.flips)
    assert all(p.paraphrase.paraphrase_of == p.original.qid for p in pairs.flips + pairs.others)
    m_o, m_p = (adapter.margins(b) for b in pairs.flip_batches)
    assert ((m_o > 0) != (m_p > 0)).all()
    assert len(pairs.others) == 60 and "register" not in {p.paraphrase.family for p in pairs.others}
    assert {p.paraphrase.family for p in pairs.others} == {
        "lexical",
        "syntactic",
        "scope",
        "voice",
        "reorder",
    }
