"""``flipscope audit``: the whole method as one resumable command (stages in :mod:`analyses.audit.run`).

>>> flipscope audit --model organism --out runs/audit
>>> flipscope audit --model organism --sae train --lora-check --seeds 3 --out runs/audit
>>> flipscope audit --model google/medgemma-4b-it --data psf_med.csv --image-root /data/mimic \\
...     --sae /path/to/gemma-scope-2-4b-it/resid_post/layer_17_width_16k_l0_medium --out runs/medgemma

Wire it into the main parser with ``add_audit_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from analyses.audit.stages import STAGES


def _add_audit_options(p: Any) -> None:
    g = p.add_argument_group("audit", "what the audit localizes and checks")
    g.add_argument("--out", default="runs/audit", help="audit folder (resumed if it holds this audit)")
    g.add_argument(
        "--from-run",
        default=None,
        help="use this finished `flipscope eval` folder's predictions (same model and rows)",
    )
    g.add_argument(
        "--family",
        default="auto",
        help="paraphrase family to localize (auto: the one with the most flip pairs)",
    )
    g.add_argument("--max-pairs", type=int, default=64, help="flip pairs per half (selection / scoring)")
    g.add_argument("--max-others", type=int, default=256, help="other-family pairs for collateral")
    g.add_argument(
        "--no-attribution", action="store_true", help="skip attribution patching beside the exact sweep"
    )
    g.add_argument(
        "--sae",
        default=None,
        help="'train' (an SAE trained on the train split) or an SAE folder (Gemma Scope 2 / sae-lens); default: no features stage",
    )
    g.add_argument("--sae-width", type=int, default=0, help="trained SAE: features (0 = 2 x d_model)")
    g.add_argument("--sae-k", type=int, default=8, help="trained SAE: active features per input (TopK)")
    g.add_argument("--sae-steps", type=int, default=600, help="trained SAE: Adam steps")
    g.add_argument("--sae-rows", type=int, default=4096, help="trained SAE: train-split rows")
    g.add_argument(
        "--lora-check",
        action="store_true",
        help="train targeted vs same-size control vs all layers and compare on the audited rows",
    )
    g.add_argument("--seeds", type=int, default=3, help="--lora-check: seeds per arm (0..N-1)")
    g.add_argument("--lora-steps", type=int, default=300, help="--lora-check: optimizer steps per adapter")
    g.add_argument(
        "--train-images",
        type=int,
        default=0,
        help="--sae train / --lora-check: first N train images (0 = all)",
    )
    g.add_argument("--until", default="report", choices=list(STAGES), help="last stage to run")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute a stage whose inputs changed, and every stage after it",
    )
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    g.add_argument("--quiet", action="store_true", help="no progress bars")  # fmt: skip


def audit_config(args: argparse.Namespace) -> Any:
    """The :class:`~analyses.audit.run.AuditConfig` the arguments describe."""
    from analyses.audit.features import FeaturesConfig
    from analyses.audit.localize import LocalizeConfig
    from analyses.audit.lora import LoraCheckConfig
    from analyses.audit.run import AuditConfig
    from analyses.eval.evaluate import EvalConfig
    from analyses.eval.quadrants import QuadrantRule

    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    ev = EvalConfig(conditions=conditions, removal=args.removal, batch_size=args.batch_size, seed=args.seed,  # type: ignore[arg-type]
                    forward=args.forward, compile=args.compile)  # fmt: skip
    features = None
    if args.sae:
        features = FeaturesConfig(sae=args.sae, width=args.sae_width, k=args.sae_k, steps=args.sae_steps,
                                  n_rows=args.sae_rows, n_boot=args.n_boot, seed=args.seed)  # fmt: skip
    check = None
    if args.lora_check:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        check = LoraCheckConfig(seeds=tuple(range(args.seeds)), steps=args.lora_steps)
    return AuditConfig(
        eval=ev, family=args.family, seed=args.seed, max_pairs=args.max_pairs, max_others=args.max_others,
        localize=LocalizeConfig(attribution=not args.no_attribution, n_boot=args.n_boot, seed=args.seed),
        features=features, lora_check=check,
        rule=QuadrantRule(reliance=args.reliance, min_margin_shift=args.min_margin_shift), n_boot=args.n_boot,
        until=args.until,
    )  # fmt: skip


def _cmd_audit(args: argparse.Namespace) -> int:
    from analyses.audit.run import run_audit
    from analyses.data.resolve import (
        check_n_images,
        check_split,
        data_options,
        model_options,
        resolve_data,
        resolve_model,
    )

    check_split(args.split)
    check_n_images(args.n_images)
    cfg = audit_config(args)  # every setting is checked before the model loads
    adapter, model_dir = resolve_model(args.model, **model_options(args))
    adapter.set_prompt(args.prompt, args.image_position)
    options = data_options(args)
    data = resolve_data(args.data, args.split, args.n_images, model_dir, args.image_root, options)
    if data.report:
        print(data.report)
    train_rows: list[Any] = []
    if cfg.needs_train_rows:
        train = resolve_data(args.data, "train", args.train_images, model_dir, args.image_root, options)
        train_rows = train.rows
    res = run_audit(
        adapter, data.rows, data.images, Path(args.out), cfg, train_rows=train_rows, from_run=args.from_run,
        overwrite=args.overwrite, progress=not args.quiet, title=f"flipscope audit: {args.model}",
        data_name=data.source, skipped=data.problems,
    )  # fmt: skip
    print(summary_lines(res))
    return 0


def summary_lines(res: Any) -> str:
    """What the audit found, in a few lines for the terminal."""
    lines = [f"audit folder: {res.out}"]
    if res.split is not None:
        s = res.split
        lines.append(f"family {s.family}: {len(s.selection)} selection / {len(s.scoring)} scoring flip pairs "
                     f"(flip pairs per family {s.flips_by_family})")  # fmt: skip
    if res.localization is not None:
        loc = res.localization
        flagged = ", ".join(f"{r.site}@{r.position} {r.recovery:.2f}" for r in loc.flagged.itertuples())
        lines.append(
            f"flagged{' (weak)' if loc.weak else ''}: {flagged}; layers {loc.layers}; residual {loc.residual_site}"
        )
    if res.features is not None:
        sc = res.features.score
        lines.append(f"feature #{res.features.feature} at {res.features.sae.get('site')}: recovery {sc['recovery'][0]:.2f} "
                     f"[{sc['recovery'][1]:.2f}, {sc['recovery'][2]:.2f}] on scoring pairs")  # fmt: skip
    if res.recommendation is not None:
        lines.append(res.recommendation["text"])
    if res.check is not None:
        lines.append(res.check.verdict())
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res.seconds.items()))
    if res.report is not None:
        lines.append(f"report: {res.report}")
    return "\n".join(lines)


def add_audit_parser(sub: Any) -> argparse.ArgumentParser:
    from analyses.options import (
        HelpFormatter,
        add_eval_data,
        add_eval_model,
        add_eval_run,
        add_rule_arguments,
    )

    p = sub.add_parser(
        "audit",
        description="The method in one command: evaluate, split flip pairs by image, localize the flip (component "
        "sweep, attribution, a fixed flag rule re-measured on held-out pairs), name SAE features, recommend LoRA "
        "layers (and check them), and write audit.html. Resumable: rerun the same command to continue.",
        formatter_class=HelpFormatter,
    )
    add_eval_data(p)
    add_eval_model(p)
    add_eval_run(p)
    _add_audit_options(p)
    add_rule_arguments(p)
    p.set_defaults(func=_cmd_audit)
    return p
