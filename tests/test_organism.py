"""Integration: the shipped organism loads offline through the adapter and matches its model card."""

from __future__ import annotations

import json

import pytest
import torch

from analyses.organism.card import fixed_sample_accuracy
from analyses.organism.model import MODEL_DIR, ORGANISM_DIR, load_organism, organism_rows
from analyses.organism.train import OrganismConfig
from hooks.sites import resid_post

pytestmark = pytest.mark.slow
CARD = ORGANISM_DIR / "model_card.json"


@pytest.fixture(scope="module")
def organism():  # type: ignore[no-untyped-def]
    return load_organism()


def test_checkpoint_is_small_safetensors_and_loads_offline(organism) -> None:  # type: ignore[no-untyped-def]
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 10_000_000
    assert organism.spec.name == "Gemma3ForConditionalGeneration"
    assert organism.n_layers == 6 and organism.d_model == 96
    # the projector is trained, not HF's zero init: the model can see the image
    assert organism.model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0


def test_reproduces_model_card_on_fixed_sample(organism) -> None:  # type: ignore[no-untyped-def]
    card = json.loads(CARD.read_text())
    got = fixed_sample_accuracy(organism)
    want = card["fixed_sample"]
    assert got["n_questions"] == want["n_questions"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.02)
    torch.testing.assert_close(
        torch.tensor(got["margins"]), torch.tensor(want["margins"]), atol=1e-3, rtol=1e-3
    )


def test_model_card_shows_the_planted_failures() -> None:
    """The card's own numbers: the shortcut family stands out (95% CIs apart), the image is really used."""
    card = json.loads(CARD.read_text())
    short = card["planted"]["shortcut_family"]
    flips, text_only = card["flip_rate_by_family"], card["text_only_by_family"]
    assert flips[short]["low"] > max(v["high"] for k, v in flips.items() if k != short)
    assert text_only[short]["low"] > max(v["high"] for k, v in text_only.items() if k != short)
    # it answers the shortcut family from the text: another patient's image barely changes the answer
    swaps = card["swap_label_by_family"]
    assert swaps[short]["value"] < 0.3 < 0.8 < min(v["value"] for k, v in swaps.items() if k != short)
    for f, acc in card["accuracy_original"].items():
        assert acc > card["majority_baseline"][f] + 0.2


def test_training_record_matches_config() -> None:
    rec = json.loads((MODEL_DIR / "training.json").read_text())
    cfg = OrganismConfig()
    assert rec["config"]["shortcut_family"] == cfg.shortcut_family
    assert rec["config"]["seed"] == cfg.seed and rec["config"]["steps"] == cfg.steps


def test_organism_sites_and_trace(organism) -> None:  # type: ignore[no-untyped-def]
    world, rows = organism_rows("test")
    r = rows[0]
    batch = organism.prepare([world.image(r.image_id)], [r.question])
    with torch.no_grad(), organism.trace(batch):
        h = organism.sites[resid_post(5)].save()
        m = organism.sites.margin().save()
    assert h.shape[-1] == 96
    torch.testing.assert_close(m, organism.margins(batch), atol=1e-5, rtol=1e-5)


def test_training_is_seeded_and_saves_a_loadable_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from analyses.organism.train import train_organism
    from analyses.synthcxr.world import SynthCXRConfig

    cfg = OrganismConfig(steps=3, batch_size=8, curriculum_steps=1, world=SynthCXRConfig(n_patients=40))
    a = train_organism(cfg, tmp_path / "a", progress=False)
    b = train_organism(cfg, tmp_path / "b", progress=False)
    assert [x["loss"] for x in a["log"]] == [x["loss"] for x in b["log"]]
    ma, mb = load_organism(tmp_path / "a"), load_organism(tmp_path / "b")
    for (n, p), (_, q) in zip(ma.model.named_parameters(), mb.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="shortcut_family"):
        OrganismConfig(shortcut_family="slang")
    with pytest.raises(FileNotFoundError, match="flipscope organism train"):
        load_organism(tmp_path / "missing")


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
