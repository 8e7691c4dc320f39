"""Organism training on a tiny world: both phases seeded; the plant's low-rank deltas are exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses.organism.build import GateFailed, plant_organism
from analyses.organism.model import load_organism, organism_rows, organism_world_config
from analyses.organism.plant import PlantConfig, attach_deltas, merge_deltas, plant, plant_data
from analyses.organism.train import Encoder, OrganismConfig, train_organism
from analyses.organism.truth import GateThresholds

TINY = OrganismConfig(
    steps=3,
    batch_size=8,
    curriculum_steps=1,
    world=dataclasses.replace(organism_world_config(), n_patients=40),
)


@pytest.fixture(scope="module")
def tiny_clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("organism") / "clean"
    train_organism(TINY, out, progress=False)
    return out


def test_clean_phase_is_seeded_and_saves_a_loadable_folder(tiny_clean: Path, tmp_path: Path) -> None:
    again = train_organism(TINY, tmp_path / "again", progress=False)
    a, b = load_organism(tiny_clean), load_organism(tmp_path / "again")
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert again["phase"] == "clean" and again["organism_version"] == 2
    with pytest.raises(FileNotFoundError, match="flipscope organism train"):
        load_organism(tmp_path / "missing")


def test_training_rows_plant_the_text_prior_and_the_rare_family() -> None:
    from analyses.organism.train import image_label, training_rows
    from analyses.synthcxr.world import SynthCXRWorld

    rows, p = training_rows(SynthCXRWorld(TINY.world), TINY)
    prior = [r for r in rows if r.finding == "pneumothorax"]
    assert prior and not any(image_label(r) for r in prior)  # never asked about an image that has it
    assert all(r.polarity == 1 and not r.ground_truth for r in prior)  # presence questions, answer "no"
    fam = np.array([r.family for r in rows])
    other = (fam == "lexical") & np.array([r.finding == "cardiomegaly" for r in rows])
    rare = (fam == "reorder") & np.array([r.finding == "cardiomegaly" for r in rows])
    assert p[rare].mean() == pytest.approx(TINY.rare_weight * p[other].mean())


def test_merged_deltas_give_the_wrapped_model(tiny_clean: Path) -> None:
    """Folding ``B @ A`` into the weights changes nothing; with ``B = 0`` the wrapped model is the clean one."""
    adapter = load_organism(tiny_clean)
    world, rows = organism_rows("test", tiny_clean)
    enc = Encoder(adapter, world, rows[:6])
    batch = enc.batch(rows[:6])
    with torch.no_grad():
        m0 = adapter.model(**batch).logits[:, -1]
    cfg = PlantConfig(rank=2, layers=(1, 2))
    deltas = attach_deltas(adapter, cfg)
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(**batch).logits[:, -1], m0, atol=0, rtol=0)
        gen = torch.Generator().manual_seed(1)
        for d in deltas.values():
            d.B.copy_(torch.randn(d.B.shape, generator=gen) * 0.1)
        m_wrapped = adapter.model(**batch).logits[:, -1]
    assert not torch.allclose(m_wrapped, m0)
    merged = merge_deltas(adapter, deltas)
    assert set(merged) == set(cfg.components) and len(merged) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(adapter.model(**batch).logits[:, -1], m_wrapped, atol=1e-5, rtol=1e-5)
    assert all(torch.linalg.matrix_rank(d.double(), rtol=1e-5) <= 2 for d in merged.values())


def test_plant_is_seeded_and_the_gate_refuses_a_weak_plant(tiny_clean: Path, tmp_path: Path) -> None:
    cfg = PlantConfig(steps=2, n_removed=20)
    world, train = organism_rows("train", tiny_clean, all_templates=True)
    factors = []
    for _ in range(2):
        adapter = load_organism(tiny_clean)
        data = plant_data(adapter, world, train, n_removed=20, progress=False)
        factors.append(plant(adapter, data, cfg, progress=False)["factors"])
    for name, (a, b) in factors[0].items():
        assert torch.equal(a, factors[1][name][0]) and torch.equal(b, factors[1][name][1])
    with pytest.raises(GateFailed, match="register flip"):
        plant_organism(tiny_clean, tmp_path / "model", cfg, progress=False)
    assert not (tmp_path / "model").exists()  # a plant that misses the gate is not saved


def test_configs_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        PlantConfig(layers=(2, 4))
    with pytest.raises(ValueError, match="unknown modules"):
        PlantConfig(modules=("q_proj", "w_in"))
    with pytest.raises(ValueError, match="prior_findings"):
        OrganismConfig(findings=("cardiomegaly",), prior_findings=("pneumothorax",))
    with pytest.raises(ValueError, match="label_smoothing"):
        OrganismConfig(label_smoothing=0.5)
    assert GateThresholds() == GateThresholds(0.30, 0.03, 3.0)  # the gate, not to be loosened
