"""The organism's shipped SAE: a TopK SAE on the final-token residual stream at ``resid_post(3)``.

``flipscope organism sae`` retrains it (seeded) from activations of train-split questions with their
images and saves it in sae-lens format under ``organism/sae/``, next to the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analyses.organism.model import MODEL_DIR, ORGANISM_DIR, load_organism, organism_rows
from hooks.sites import resid_post

SAE_DIR = ORGANISM_DIR / "sae" / "resid_post_3"


def organism_activations(layer: int = 3, n_rows: int = 2048, split: str = "train", seed: int = 0) -> Any:
    """Final-token ``resid_post(layer)`` activations of ``n_rows`` questions of ``split`` (every family)."""
    import numpy as np

    from interp import cache_activations

    adapter = load_organism(MODEL_DIR)
    world, rows = organism_rows(split, MODEL_DIR)
    pick = np.random.default_rng(seed).permutation(len(rows))[:n_rows]
    chosen = [rows[i] for i in sorted(pick)]
    batches = [
        adapter.prepare(
            [world.image(r.image_id) for r in chosen[i : i + 128]], [r.question for r in chosen[i : i + 128]]
        )
        for i in range(0, len(chosen), 128)
    ]
    cache = cache_activations(adapter, batches, [resid_post(layer)], positions="final", progress=False)
    return cache[resid_post(layer)].float()


def train_organism_sae(
    out_dir: Path = SAE_DIR, layer: int = 3, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Train and save the organism's SAE; returns its report (also written to ``report.json``)."""
    from interp import SAETrainConfig, save_sae, train_sae

    x = organism_activations(layer, seed=seed)
    cfg = SAETrainConfig(
        site=resid_post(layer),
        width=128,
        k=8,
        steps=300,
        batch_size=256,
        lr=3e-3,
        seed=seed,
        release="organism-topk",
        progress=progress,
    )
    sae, report = train_sae(x, cfg)
    save_sae(sae, out_dir)
    rec = {
        "site": str(resid_post(layer)),
        "width": 128,
        "k": 8,
        "steps": 300,
        "seed": seed,
        "n_activations": int(x.shape[0]),
        "fvu": float(report.fvu),
        "l0": float(report.l0),
        "dead_fraction": float(report.dead_fraction),
    }
    (Path(out_dir) / "report.json").write_text(json.dumps(rec, indent=1))
    return rec
