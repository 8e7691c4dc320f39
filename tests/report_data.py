"""Predictions tables of a model with a known, planted behaviour on SynthCXR rows (no model needed).

The *planted* model answers every question from the image (margin +3 on a positive image, -3 on a
negative one, plus a little noise) except register paraphrases, which it answers "no" from the text
(margin about -4 with or without the image). Without the image every other margin is about 0.
Under ``QuadrantRule(reliance="margin_shift", min_margin_shift=1)`` read over the cluster this gives:
positive images flip (original yes, register no) and are Worst; negative images are consistent but
their register question ignores the image: Dangerous. The *fixed* model answers register from the
image too: no flip, every sample Ideal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.data.schema import QuestionRow
from analyses.eval.predictions import CONDITIONS, META_FILE, PREDICTIONS_FILE, dataset_hash
from analyses.eval.quadrants import QuadrantRule
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld

RULE = QuadrantRule(reliance="margin_shift", min_margin_shift=1.0)


def small_world() -> tuple[SynthCXRWorld, list[QuestionRow]]:
    """A small SynthCXR world and the test rows of its first 6 images, two findings."""
    world = SynthCXRWorld(SynthCXRConfig(n_patients=40, seed=3))
    rows = [r for r in world.rows("test") if r.finding in ("cardiomegaly", "pleural_effusion")]
    keep = sorted({r.image_id for r in rows})[:6]
    return world, [r for r in rows if r.image_id in keep]


def predictions(rows: Sequence[QuestionRow], planted: bool = True, seed: int = 0) -> pd.DataFrame:
    """One row per (question row, condition) with margins of the planted (or fixed) model."""
    rng = np.random.default_rng(seed)
    ids = sorted({r.image_id for r in rows})
    records = []
    for r in rows:
        sign = 1.0 if r.ground_truth else -1.0
        text_only = planted and r.family == "register"
        for cond in CONDITIONS:
            noise = float(rng.uniform(-0.3, 0.3))
            if text_only:
                m = -4.0 + noise
            elif cond == "image":
                m = 3.0 * sign + noise
            elif cond == "removed":
                m = noise
            elif cond == "swap_label":
                m = -3.0 * sign + noise
            else:
                m = 3.0 * (1 if rng.random() < 0.5 else -1) + noise
            other = ids[(ids.index(r.image_id) + 1) % len(ids)] if cond.startswith("swap") else None
            rec = {**r.to_dict(), "condition": cond, "margin": m, "pred": m > 0, "swap_image_id": other}
            rec.pop("meta")
            records.append(rec)
    return pd.DataFrame.from_records(records)


def write_run(folder: Path, rows: Sequence[QuestionRow], df: pd.DataFrame, model: str) -> Path:
    """A run folder as the evaluator writes it: meta.json and predictions.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "architecture": "Gemma3ForConditionalGeneration", "n_layers": 6,
            "dataset_hash": dataset_hash(rows), "n_rows": len(rows), "removal": "removed:gray"}  # fmt: skip
    (folder / META_FILE).write_text(json.dumps(meta))
    (folder / PREDICTIONS_FILE).write_text(
        "".join(json.dumps(r) + "\n" for r in df.to_dict(orient="records"))
    )
    return folder
