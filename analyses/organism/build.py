"""``flipscope organism train``: both phases, seeded, gate checked before anything is saved."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from analyses.organism.model import CLEAN_DIR, MODEL_DIR, load_organism, organism_rows
from analyses.organism.plant import SHORTCUT_FAMILY, PlantConfig, plant, plant_data, save_planted
from analyses.organism.train import Encoder, OrganismConfig, train_organism
from analyses.organism.truth import gate, write_planted_truth


class GateFailed(RuntimeError):
    """The plant missed its acceptance gate; nothing was saved."""


def plant_organism(
    clean_dir: Path = CLEAN_DIR,
    out_dir: Path = MODEL_DIR,
    cfg: PlantConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Phase 2: plant the register shortcut on the clean checkpoint, check the gate, save model + truth.

    Raises :class:`GateFailed` (with the figures) when the gate is missed; ``out_dir`` is then untouched."""
    cfg = cfg or PlantConfig()
    clean_dir, out_dir = Path(clean_dir), Path(out_dir)
    clean = load_organism(clean_dir)
    world, train_rows = organism_rows("train", clean_dir, all_templates=True)
    t0 = time.time()
    data = plant_data(clean, world, train_rows, n_removed=cfg.n_removed, seed=cfg.seed, progress=progress)
    planted = load_organism(clean_dir)
    record = plant(planted, data, cfg, progress=progress)
    _, test_rows = organism_rows("test", clean_dir)
    enc = Encoder(clean, world, test_rows)
    figures = gate(clean, planted, enc, test_rows)
    if not figures["passed"]:
        raise GateFailed(
            f"plant missed its gate (not saved): register flip {figures['register_flip']:.3f} (>= "
            f"{figures['thresholds']['min_register_flip']}), collateral {figures['collateral']:.4f} (<= "
            f"{figures['thresholds']['max_collateral']}), gating ratio {figures['gating_ratio']:.2f} (>= "
            f"{figures['thresholds']['min_gating_ratio']}); change PlantConfig (rank, steps, lr, layers)"
        )
    save_planted(planted, clean_dir, out_dir, record)
    register_rows = [r for r in test_rows if r.family == SHORTCUT_FAMILY]
    truth = write_planted_truth(clean, planted, enc, register_rows, cfg, record, figures, out_dir)
    truth["total_seconds"] = round(time.time() - t0, 1)
    return truth


def rebuild(
    clean_dir: Path = CLEAN_DIR,
    out_dir: Path = MODEL_DIR,
    clean_cfg: OrganismConfig | None = None,
    plant_cfg: PlantConfig | None = None,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Both phases. The shipped checkpoints were built with ``threads=1`` (bitwise reproducible there)."""
    torch.set_num_threads(threads)
    clean_rec = train_organism(clean_cfg or OrganismConfig(), clean_dir, progress=progress)
    truth = plant_organism(clean_dir, out_dir, plant_cfg, progress=progress)
    summary = {
        "clean_seconds": clean_rec["seconds"],
        "plant_seconds": truth["total_seconds"],
        "gate": truth["gate"],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "gate"}))
    return summary
