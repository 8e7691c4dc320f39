"""Measure the shipped organism on the test split and write its model card.

The card's numbers come from one evaluator run (``flipscope organism card``); ``model_card.json``
keeps them machine-readable so the integration tests can check the checkpoint reproduces them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.data.schema import first_images
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.eval.metrics import accuracy, flip_rate, text_only_agreement
from analyses.eval.quadrants import QuadrantRule
from analyses.eval.summary import summarize
from analyses.organism.model import MODEL_DIR, load_organism, organism_rows

CARD_RULE = QuadrantRule(reliance="margin_shift", min_margin_shift=1.0)


def measure(
    model_dir: Path = MODEL_DIR,
    runs: Path = Path("runs/model_card"),
    n_images: int = 0,
    n_boot: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` on the test split of its world; returns every figure the card shows."""
    adapter = load_organism(model_dir)
    world, rows = organism_rows("test", model_dir)
    rows = first_images(rows, n_images)
    rec = json.loads((Path(model_dir) / "training.json").read_text())
    cfg = EvalConfig(removal=rec["config"]["removal"], batch_size=128, seed=0)
    df = evaluate(adapter, rows, world.image_for, runs, cfg, progress=progress)
    s = summarize(df, CARD_RULE, n_boot=n_boot, seed=0)
    im = df[df["condition"] == "image"]
    originals = im[im["family"] == "original"]
    majority = {
        f: max(g["ground_truth"].mean(), 1 - g["ground_truth"].mean())
        for f, g in originals.groupby("finding")
    }
    fam = s["by_family"]
    sample = fixed_sample_accuracy(adapter, model_dir)
    return {
        "fixed_sample": sample,
        "model": str(model_dir),
        "n_images": len({r.image_id for r in rows}),
        "n_rows": len(rows),
        "removal": cfg.removal,
        "quadrant_rule": s["choices"]["rule"],
        "training": {k: rec[k] for k in ("seconds", "n_params", "n_training_rows")},
        "planted": {
            "shortcut_family": rec["config"]["shortcut_family"],
            "rare_families": rec["config"]["rare_families"],
            "rare_weight": rec["config"]["rare_weight"],
        },
        "accuracy_original": {
            f: float(accuracy(originals[originals["finding"] == f])) for f in rec["config"]["findings"]
        },
        "accuracy_all_rows": float(accuracy(df)),
        "majority_baseline": {f: float(v) for f, v in majority.items()},
        "flip_rate": float(flip_rate(df)),
        "flip_rate_by_family": _series(fam.xs("flip_rate", level="metric")),
        "text_only_agreement": float(text_only_agreement(df)),
        "text_only_by_family": _series(fam.xs("text_only_agreement", level="metric")),
        "swap_sensitivity_random": float(s["metrics"].loc["swap_sensitivity_random", "value"]),
        "swap_sensitivity_label": float(s["metrics"].loc["swap_sensitivity_label", "value"]),
        "swap_label_by_family": _series(fam.xs("swap_sensitivity_label", level="metric")),
        "polarity_consistency": float(s["metrics"].loc["polarity_consistency", "value"]),
        "quadrants": s["quadrant_summary"].reset_index().to_dict(orient="records"),
        "metrics_ci": s["metrics"].reset_index().to_dict(orient="records"),
    }


FIXED_SAMPLE_IMAGES = 24


def fixed_sample_accuracy(adapter: Any, model_dir: Path = MODEL_DIR) -> dict[str, Any]:
    """Accuracy on the original questions of the first test images: a quick reproducibility check."""
    world, rows = organism_rows("test", model_dir)
    rows = [r for r in first_images(rows, FIXED_SAMPLE_IMAGES) if r.family == "original"]
    m = adapter.margins_for([world.image(r.image_id) for r in rows], [r.question for r in rows])
    correct = [(mi > 0) == r.ground_truth for mi, r in zip(m.tolist(), rows, strict=True)]
    return {
        "n_images": FIXED_SAMPLE_IMAGES,
        "n_questions": len(rows),
        "accuracy": sum(correct) / len(rows),
        "margins": [round(x, 4) for x in m.tolist()],
    }


def _series(t: pd.DataFrame) -> dict[str, dict[str, float]]:
    return {
        str(k): {"value": float(r["value"]), "low": float(r["low"]), "high": float(r["high"])}
        for k, r in t.iterrows()
    }


def render_card(m: dict[str, Any]) -> str:
    """The model card as Markdown (every number from ``m``)."""
    lines = [
        "# Model card: SynthCXR organism",
        "",
        "A tiny `Gemma3ForConditionalGeneration` (the MedGemma code path) trained from scratch on the",
        "SynthCXR world by `flipscope organism train` (seeded; config and loss curve in",
        "`model/training.json`). Failures are planted in the training data on purpose:",
        "",
        f"- **shortcut**: every training question of the `{m['planted']['shortcut_family']}` family is about an",
        '  absent finding (answer always "no");',
        f"- **rare families**: {m['planted']['rare_families']} sampled {m['planted']['rare_weight']}x as often as others;",
        f"- **image removal** (`{m['removal']}`) seen in 15% of training examples with a uniform yes/no target.",
        "",
        f"Parameters: {m['training']['n_params']:,}; training took {m['training']['seconds']} s wall time on a",
        "shared 2-core CPU machine (the trainer ran on one thread while other jobs used the other core).",
        "",
        f"## Measured on the test split ({m['n_images']} images, {m['n_rows']} question rows)",
        "",
        "Produced by `flipscope organism card`; 95% CIs are cluster-bootstrap percentiles.",
        "",
        "| finding | accuracy (original question) | majority baseline |",
        "|---|---|---|",
    ]
    for f, a in m["accuracy_original"].items():
        lines.append(f"| {f} | {a:.3f} | {m['majority_baseline'].get(f, float('nan')):.3f} |")
    lines += [
        "",
        "| family | flip rate [95% CI] | text-only agreement [95% CI] | label-controlled swap sensitivity |",
        "|---|---|---|---|",
    ]
    for fam, v in m["text_only_by_family"].items():
        fl = m["flip_rate_by_family"].get(fam)
        fl_s = f"{fl['value']:.3f} [{fl['low']:.3f}, {fl['high']:.3f}]" if fl else "n/a (not a paraphrase)"
        sw = m["swap_label_by_family"].get(fam, {}).get("value", float("nan"))
        lines.append(f"| {fam} | {fl_s} | {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}] | {sw:.3f} |")
    lines += [
        "",
        f"- overall flip rate: {m['flip_rate']:.3f}; accuracy over all rows: {m['accuracy_all_rows']:.3f}",
        f"- text-only agreement (`{m['removal']}`): {m['text_only_agreement']:.3f}",
        f"- swap sensitivity: random {m['swap_sensitivity_random']:.3f}, label-controlled {m['swap_sensitivity_label']:.3f}",
        f"- polarity consistency (operator variants): {m['polarity_consistency']:.3f}",
        "",
        f"Quadrants (rule {m['quadrant_rule']}):",
        "",
        "| quadrant | count | share | accuracy | mean entropy |",
        "|---|---|---|---|---|",
    ]
    for q in m["quadrants"]:
        lines.append(
            f"| {q['quadrant']} | {q['count']} | {q['share']:.3f} | {q['accuracy']:.3f} | {q['mean_entropy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_model_card(
    model_dir: Path = MODEL_DIR, runs: Path = Path("runs/model_card"), n_images: int = 0
) -> Path:
    m = measure(model_dir, runs, n_images)
    card_dir = Path(model_dir).parent
    (card_dir / "model_card.json").write_text(json.dumps(m, indent=1, default=float))
    path = card_dir / "MODEL_CARD.md"
    path.write_text(render_card(m))
    return path
