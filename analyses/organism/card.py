"""Measure the shipped organism on the test split and write its model card.

The card's numbers come from evaluator runs of the planted and the clean checkpoint (``flipscope
organism card``) and from the tools that should detect each planted failure at its planted place
(:func:`detections`); ``model_card.json`` keeps them machine-readable so the integration tests can check
the checkpoint reproduces them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.data.schema import first_images
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.eval.metrics import accuracy, flip_rate, text_only_agreement
from analyses.eval.quadrants import QuadrantRule, quadrants
from analyses.eval.summary import summarize
from analyses.organism.model import CLEAN_DIR, MODEL_DIR, load_organism, organism_rows
from analyses.organism.truth import load_planted_truth
from hooks.sites import Site, attn_out, mlp_out
from interp.crossmodel import cross_model_patching, patch_components, recovery
from interp.patching import PatchingConfig

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
    df = evaluate(adapter, rows, world.image_for, runs, cfg, progress=progress, overwrite=True)
    s = summarize(df, CARD_RULE, n_boot=n_boot, seed=0)
    im = df[df["condition"] == "image"]
    originals = im[im["family"] == "original"]
    majority = {
        f: max(g["ground_truth"].mean(), 1 - g["ground_truth"].mean())
        for f, g in originals.groupby("finding")
    }
    fam = s["by_family"]
    sample = fixed_sample_accuracy(adapter, model_dir)
    clean_dir = Path(model_dir).parent / CLEAN_DIR.name
    found = {}
    if (Path(model_dir) / "planted_truth.json").is_file() and clean_dir.is_dir():
        clean = load_organism(clean_dir)
        clean_df = evaluate(
            clean, rows, world.image_for, Path(runs) / "clean", cfg, progress=progress, overwrite=True
        )
        found = detections(adapter, clean, Path(model_dir), df, clean_df, s, rec)
    truth = Path(model_dir) / "planted_truth.json"
    return {
        "truth": json.loads(truth.read_text()) if truth.is_file() else None,
        "detections": found,
        "fixed_sample": sample,
        "model": str(model_dir),
        "n_images": len({r.image_id for r in rows}),
        "n_rows": len(rows),
        "removal": cfg.removal,
        "quadrant_rule": s["choices"]["rule"],
        "training": {k: rec[k] for k in ("seconds", "n_params", "n_training_rows")},
        "planted": {
            "rare_families": rec["config"]["rare_families"],
            "rare_weight": rec["config"]["rare_weight"],
            "prior_findings": rec["config"]["prior_findings"],
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


def detections(
    planted: Any,
    clean: Any,
    model_dir: Path,
    df: pd.DataFrame,
    clean_df: pd.DataFrame,
    s: dict[str, Any],
    rec: dict[str, Any],
) -> dict[str, Any]:
    """Whether each planted failure is found where it was planted, measured with the project's tools.

    - register shortcut: cross-model patching (clean into planted, every position) of ``attn_out`` and
      ``mlp_out`` at every layer on the test register rows the plant flipped; found when the top
      ``len(truth.sites)`` sites by mean recovery are the planted ones; plus the joint recovery of all of them;
    - text-prior finding: its samples' quadrants (cluster scope): Dangerous share, accuracy, entropy;
    - rare family: its flip-rate CI against the other unplanted families'.
    """
    truth = load_planted_truth(model_dir)
    world, _ = organism_rows("test", model_dir)
    key = ["qid", "pred", "margin"]
    both = df[df["condition"] == "image"].merge(
        clean_df[clean_df["condition"] == "image"][key], on="qid", suffixes=("", "_clean")
    )
    flipped = both[(both["family"] == truth.family) & (both["pred"] != both["pred_clean"])]
    batch = planted.prepare([world.image(i) for i in flipped["image_id"]], list(flipped["question"]))
    rec_site: dict[Site, float] = {}
    for kind in (attn_out, mlp_out):
        cfg = PatchingConfig(site_kind=kind(0).kind, positions="all")
        res = cross_model_patching(clean, planted, batch, cfg)
        rec_site.update({kind(layer): float(res.recovery[i, 0]) for i, layer in enumerate(res.layers)})
    ranked = sorted(rec_site, key=lambda x: -rec_site[x])
    m_joint = patch_components(clean, planted, batch, truth.sites)
    joint = recovery(m_joint, res.clean_margins, res.corrupt_margins).nanmean()  # source / target margins
    q = quadrants(df, CARD_RULE)  # scope="cluster": every answer-preserving question must rely on the image
    prior = q[q["finding"].isin(rec["config"]["prior_findings"])]
    fam = _series(s["by_family"].xs("flip_rate", level="metric"))
    rare = rec["config"]["rare_families"]
    others = {k: v for k, v in fam.items() if k not in rare and k != truth.family}
    return {
        "register": {
            "n_flipped_rows": len(flipped),
            "cross_model_recovery": {str(k): rec_site[k] for k in ranked},
            "top_sites": [str(k) for k in ranked[: len(truth.sites)]],
            "found_at_planted_sites": {str(k) for k in ranked[: len(truth.sites)]}
            == {str(k) for k in truth.sites},
            "joint_recovery_planted_sites": float(joint),
        },
        "prior_finding": {
            "n_samples": len(prior),
            "dangerous_share": float((prior["quadrant"] == "Dangerous").mean()),
            "accuracy": float(prior["correct"].mean()),
            "mean_entropy": float(prior["entropy"].mean()),
            "mean_entropy_other_findings": float(q.loc[~q.index.isin(prior.index), "entropy"].mean()),
        },
        "rare_family": {
            "flip_rate": {k: fam[k] for k in rare},
            "max_high_other_unplanted": max(v["high"] for v in others.values()),
            "separated": all(fam[k]["low"] > max(v["high"] for v in others.values()) for k in rare),
        },
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
        "# Model card: SynthCXR organism v2",
        "",
        "A tiny `Gemma3ForConditionalGeneration` (the MedGemma code path, 8 text layers x 96) built by",
        "`flipscope organism train` in two seeded phases: `clean/` (trained from scratch, reads the image for",
        "every wording) and `model/` (the clean model with the register shortcut written into low-rank updates",
        "of named components). Configs and loss curves: `clean/training.json`, `model/training.json`; the",
        "planted truth: `model/planted_truth.json` and `.safetensors`.",
        "",
        f"Parameters: {m['training']['n_params']:,}; the clean phase took {m['training']['seconds']} s on one",
        "CPU thread of a shared 2-core machine.",
        "",
    ]
    lines += _truth_table(m)
    lines += [
        f"## Measured on the test split ({m['n_images']} images, {m['n_rows']} question rows)",
        "",
        "Produced by `flipscope organism card` on `model/` (the planted organism); 95% CIs are",
        "cluster-bootstrap percentiles.",
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


def _truth_table(m: dict[str, Any]) -> list[str]:
    d, t = m.get("detections"), m.get("truth")
    if not d or not t:
        return []
    g, reg, pr, rare = t["gate"], d["register"], d["prior_finding"], d["rare_family"]
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(reg["cross_model_recovery"].items())[:6])
    rf = "; ".join(
        f"{k} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in rare["flip_rate"].items()
    )
    return [
        "## Planted truth",
        "",
        "| failure | how | where | gate / strength | measured detection |",
        "|---|---|---|---|---|",
        f'| register shortcut (formal wording -> "no") | rank-{t["rank"]} updates `W + B A` of '
        f"{', '.join(t['modules'])}, everything else frozen (phase 2) | layers {t['layers']}: "
        f"{', '.join(t['sites'])}; direction at {t['direction_site']} | register flip {g['register_flip']:.3f} "
        f"(clean {g['register_flip_clean']:.3f}; held-out wording {g['register_flip_held_out']:.3f}), other "
        f"predictions changed {100 * g['collateral']:.2f}%, margin change {g['margin_change_register']:+.2f} vs "
        f"{g['margin_change_other']:+.2f} (ratio {g['gating_ratio']:.1f}); gate passed: {g['passed']} | "
        f"cross-model patching (clean into planted, {reg['n_flipped_rows']} flipped rows), top sites by recovery: "
        f"{top}; planted sites ranked first: {reg['found_at_planted_sites']}; joint recovery "
        f"{reg['joint_recovery_planted_sites']:.2f} |",
        f"| text-prior finding ({', '.join(m['planted']['prior_findings'])}) | trained only on images without it "
        "and on presence questions, also with the image removed (phase 1) | training data | world prevalence "
        f"0.1 | {pr['n_samples']} samples: Dangerous {pr['dangerous_share']:.3f}, accuracy {pr['accuracy']:.3f}, "
        f"entropy {pr['mean_entropy']:.3f} (other findings {pr['mean_entropy_other_findings']:.3f}) |",
        f"| rare family ({', '.join(m['planted']['rare_families'])}) | sampled {m['planted']['rare_weight']}x as "
        f"often (phase 1) | training data | - | flip rate {rf}; other unplanted families' highest upper bound "
        f"{rare['max_high_other_unplanted']:.3f}; separated: {rare['separated']} |",
        "",
    ]


#: What the card's numbers must show for a planted failure to count as found (tests/test_organism.py).
MIN_JOINT_RECOVERY, MIN_PRIOR_DANGEROUS, MIN_PRIOR_ACCURACY = 0.8, 0.8, 0.85


def planted_checks(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(planted failure, ``pass`` / ``fail`` / ``reported``, the numbers) for each failure the card measures:
    the register shortcut found at its planted sites by cross-model patching, the text-prior finding in
    Dangerous; the rare family's separation is reported, not required (its plant is a sampling weight)."""
    d = m.get("detections") or {}
    if not d:
        return [
            ("planted failures", "fail", "not measured: no planted_truth.json or no clean/ beside the model")
        ]
    reg, pr, rare = d["register"], d["prior_finding"], d["rare_family"]
    reg_ok = reg["found_at_planted_sites"] and reg["joint_recovery_planted_sites"] >= MIN_JOINT_RECOVERY
    prior_ok = (
        pr["dangerous_share"] >= MIN_PRIOR_DANGEROUS
        and pr["accuracy"] >= MIN_PRIOR_ACCURACY
        and pr["mean_entropy"] < pr["mean_entropy_other_findings"]
    )
    return [
        ("register shortcut", "pass" if reg_ok else "fail",
         f"top sites {', '.join(reg['top_sites'])}; planted sites first: {reg['found_at_planted_sites']}; "
         f"joint recovery {reg['joint_recovery_planted_sites']:.2f} (needs >= {MIN_JOINT_RECOVERY})"),
        ("text-prior finding", "pass" if prior_ok else "fail",
         f"Dangerous {pr['dangerous_share']:.3f} (needs >= {MIN_PRIOR_DANGEROUS}), accuracy {pr['accuracy']:.3f} "
         f"(needs >= {MIN_PRIOR_ACCURACY}), entropy {pr['mean_entropy']:.3f} < others "
         f"{pr['mean_entropy_other_findings']:.3f}"),
        ("rare family", "reported",
         f"separated from every other unplanted family: {rare['separated']} (not required)"),
    ]  # fmt: skip


def write_model_card(
    model_dir: Path = MODEL_DIR,
    runs: Path = Path("runs/model_card"),
    n_images: int = 0,
    out: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Measure ``model_dir`` (evaluator runs under ``runs``) and write ``MODEL_CARD.md`` and
    ``model_card.json`` into ``out`` (default: ``runs``); returns (card path, measurements). The shipped
    card beside the model (``organism/``) is only rewritten when ``out`` is that folder."""
    m = measure(model_dir, runs, n_images)
    card_dir = Path(runs) if out is None else Path(out)
    card_dir.mkdir(parents=True, exist_ok=True)
    (card_dir / "model_card.json").write_text(json.dumps(m, indent=1, default=float))
    path = card_dir / "MODEL_CARD.md"
    path.write_text(render_card(m))
    return path, m
