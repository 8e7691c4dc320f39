"""`flipscope` command line: organism training, evaluation, run comparison, the demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from analyses.options import HelpFormatter, add_eval_data, add_eval_model, add_eval_run, add_rule_arguments

DEFAULT_RUNS = Path("runs")


def _cmd_organism_train(args: argparse.Namespace) -> int:
    from analyses.organism.build import GateFailed, plant_organism, rebuild
    from analyses.organism.model import CLEAN_DIR, MODEL_DIR
    from analyses.organism.plant import PlantConfig
    from analyses.organism.train import OrganismConfig

    root = Path(args.out) if args.out else None
    clean_dir = root / "clean" if root else CLEAN_DIR
    out_dir = root / "model" if root else MODEL_DIR
    plant_cfg = PlantConfig(seed=args.seed)
    try:
        if args.phase == "plant":
            import torch

            torch.set_num_threads(args.threads)
            truth = plant_organism(clean_dir, out_dir, plant_cfg, progress=not args.quiet)
            g = truth["gate"]
        else:
            cfg = OrganismConfig(seed=args.seed, steps=args.steps)
            g = rebuild(clean_dir, out_dir, cfg, plant_cfg, threads=args.threads, progress=not args.quiet)[
                "gate"
            ]
    except GateFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"clean -> {clean_dir}, planted -> {out_dir}: register flip {g['register_flip']:.3f}, "
        f"collateral {100 * g['collateral']:.2f}%, gating ratio {g['gating_ratio']:.1f} (gate passed)"
    )
    return 0


def _cmd_organism_card(args: argparse.Namespace) -> int:
    from analyses.organism.card import planted_checks, write_model_card

    model, runs = Path(args.model), Path(args.out)
    if runs.resolve() == model.parent.resolve():
        raise ValueError(
            f"--out {runs} is the shipped card's folder: pick a run folder, and --in-place to rewrite the card"
        )
    card_dir = model.parent if args.in_place else runs  # the runs stay under --out either way
    path, measured = write_model_card(model, runs, n_images=args.n_images, out=card_dir)
    checks = planted_checks(measured)
    for name, status, detail in checks:
        print(f"{status.upper():<8} {name}: {detail}")
    print(f"wrote {path} and {path.with_name('model_card.json')}")
    failed = [name for name, status, _ in checks if status == "fail"]
    if failed:
        print(f"flipscope: planted failure(s) not found: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_organism_sae(args: argparse.Namespace) -> int:
    from analyses.organism.sae import SAE_DIR, train_organism_sae

    rec = train_organism_sae(SAE_DIR, seed=args.seed)
    print(f"SAE at {SAE_DIR}: FVU {rec['fvu']:.3f}, L0 {rec['l0']:.2f}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from analyses.data.resolve import (
        NAMED_DATA,
        check_n_images,
        check_split,
        data_options,
        model_options,
        resolve_data,
        resolve_model,
    )
    from analyses.eval.evaluate import EvalConfig
    from analyses.eval.quadrants import QuadrantRule
    from analyses.eval.report import summary_table, write_report
    from analyses.eval.shard import evaluate_sharded, init_dist, rank_placement

    check_split(args.split)  # every argument is checked before the model loads
    check_n_images(args.n_images)
    track = getattr(args, "track", None)
    if track:
        from analyses.eval.track import require

        require(track)  # a tracker that is not installed fails now, not after the run
    conditions: Any = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    cfg = EvalConfig(
        conditions=conditions,
        removal=args.removal,
        batch_size=args.batch_size,
        seed=args.seed,
        forward=getattr(args, "forward", "auto"),
        compile=getattr(args, "compile", False),
    )
    rule = QuadrantRule(reliance=args.reliance, min_margin_shift=args.min_margin_shift)
    options = data_options(args)
    placement = model_options(args)
    data = None
    if args.data not in NAMED_DATA:  # a file or hub dataset: read it before the (slow) model load
        data = resolve_data(args.data, args.split, args.n_images, None, args.image_root, options)
    dist = init_dist()  # one process, or one rank of torchrun / accelerate launch (analyses.eval.shard)
    adapter, model_dir = resolve_model(args.model, **rank_placement(dist, placement))
    adapter.set_prompt(args.prompt, args.image_position)
    if data is None:
        data = resolve_data(args.data, args.split, args.n_images, model_dir, args.image_root, options)
    if data.report and dist.is_main:
        print(data.report)
    out = Path(args.out)
    df = evaluate_sharded(
        adapter, data.rows, data.images, out, cfg, dist, progress=not args.quiet,
        skipped=data.problems, overwrite=args.overwrite,
    )  # fmt: skip
    if df is None:  # another rank: rank 0 merged the shards and writes the summary and report
        return 0
    if df.empty:
        raise ValueError(f"no predictions were made: every row was left out (see {out / 'skipped.jsonl'})")
    print(summary_table(df, n_boot=args.n_boot, seed=args.seed, rule=rule))
    report = write_report(
        df,
        out,
        title=f"flipscope eval: {args.model}",
        n_boot=args.n_boot,
        seed=args.seed,
        rule=rule,
        images=data.images,
        data=data.source,
    )
    print(f"predictions: {out / 'predictions.jsonl'}\nreport: {report}")
    if track:
        from analyses.eval.track import track_run

        settings = {k: v for k, v in vars(args).items() if k != "func"}
        got = track_run(track, out, args=settings, project=getattr(args, "track_project", None))
        print(f"tracked with {got.tracker}: run {got.run_id} ({len(got.metrics)} metrics) at {got.where}")
    if (out / "skipped.jsonl").exists():
        print(f"rows left out (row, line, reason): {out / 'skipped.jsonl'}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from analyses.data.resolve import (
        check_n_images,
        check_split,
        data_options,
        model_options,
        resolve_data,
        resolve_model,
    )
    from analyses.eval.shard import init_dist, rank_placement
    from analyses.eval.shard_cache import cache_run, skipped_count
    from hooks.sites import parse_site

    check_split(args.split)
    check_n_images(args.n_images)
    sites = [parse_site(s) for s in args.sites.split(",") if s.strip()]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    positions = [p.strip() for p in args.positions.split(",") if p.strip()]
    placement, options = model_options(args), data_options(args)
    dist = init_dist()
    adapter, model_dir = resolve_model(args.model, **rank_placement(dist, placement))
    data = resolve_data(args.data, args.split, args.n_images, model_dir, args.image_root, options)
    if data.report and dist.is_main:
        print(data.report)
    cache = cache_run(
        adapter, data.rows, data.images, sites, args.out, positions=positions, conditions=conditions,
        removal=args.removal, batch_size=args.batch_size, shard_rows=args.shard_rows, dist=dist,
        progress=not args.quiet, skipped=data.problems,
    )  # fmt: skip
    if cache is None:
        return 0
    print(f"cached {len(cache)} rows x {len(sites)} site(s) from {dist.world_size} process(es): {cache}")
    out = Path(args.out)
    if n := skipped_count(out):
        print(f"{n} rows left out (row, line, reason): {out / 'skipped.jsonl'}")
    print(f"load it: from interp.cache import ActivationCache; cache = ActivationCache.load({str(out)!r})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The shipped organism through the audit's first stages: eval, flip pairs, localization, report."""
    from analyses.audit.cli import summary_lines
    from analyses.audit.localize import LocalizeConfig
    from analyses.audit.run import AuditConfig, run_audit
    from analyses.data.resolve import resolve_data, resolve_model
    from analyses.eval.evaluate import EvalConfig
    from analyses.eval.quadrants import QuadrantRule
    from analyses.eval.report import summary_table

    adapter, model_dir = resolve_model("organism")
    data = resolve_data("synthcxr", "test", args.n_images, model_dir)
    cfg = AuditConfig(
        eval=EvalConfig(removal="gray", batch_size=128, seed=0),
        localize=LocalizeConfig(n_boot=200),
        # the organism's image-removed margins sit near 0: signs are coin flips, so reliance is a margin shift
        rule=QuadrantRule(reliance="margin_shift", min_margin_shift=1.0),
        n_boot=200,
    )
    res = run_audit(adapter, data.rows, data.images, Path(args.out), cfg, overwrite=args.overwrite,
                    title="flipscope demo: the shipped organism", data_name=data.source)  # fmt: skip
    print(summary_table(res.predictions, n_boot=cfg.n_boot, seed=0, rule=cfg.rule))
    print(summary_lines(res))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from analyses.eval.compare import compare_runs
    from analyses.eval.quadrants import QuadrantRule

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    rule = QuadrantRule(reliance=args.reliance, min_margin_shift=args.min_margin_shift)
    comp = compare_runs(
        args.runs,
        names,
        rule,
        base=args.base,
        allow_different_rows=args.allow_different_rows,
        n_boot=args.n_boot,
        seed=args.seed,
        families=args.families,
    )
    print(comp.to_text())
    paths = comp.save(args.out)
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


#: Packages ``flipscope info`` reports besides the project's own requirements (read from its metadata).
STACK = ("torch", "transformers", "nnsight", "peft", "sae-lens", "accelerate", "safetensors", "tokenizers",
         "datasets", "numpy", "pandas", "pyarrow", "plotly", "pillow", "pydicom", "tqdm", "jaxtyping",
         "torchvision", "transformer-lens", "wandb", "mlflow-skinny")  # fmt: skip


def stack_versions() -> dict[str, str]:
    """Installed version of every package of the stack (the project's requirements and :data:`STACK`);
    ``not installed`` for an optional one that is absent."""
    import re
    from importlib import metadata

    names = list(STACK)
    try:
        names += [re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in metadata.requires("flipscope") or []
                  if "extra ==" not in r]  # fmt: skip
        own = metadata.version("flipscope")
    except metadata.PackageNotFoundError:
        own = "not installed (run from a checkout)"
    out = {"flipscope": own}
    for name in dict.fromkeys(n.lower() for n in names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def devices() -> list[str]:
    """Every device torch can use: the CPU (threads) and each CUDA / MPS device with its name and memory."""
    import torch

    out = [f"cpu ({torch.get_num_threads()} threads)"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def organism_version(model_dir: Path) -> str:
    """The shipped organism's version and phase, from its ``training.json``."""
    rec = model_dir / "training.json"
    if not rec.is_file():
        return f"not found ({rec} missing)"
    t = json.loads(rec.read_text())
    return (
        f"v{t.get('organism_version', '?')} ({t.get('phase', '?')}, trained with torch {t.get('torch', '?')})"
    )


def _cmd_info(_args: argparse.Namespace) -> int:
    import torch

    from analyses.organism.model import MODEL_DIR

    info = {
        "versions": stack_versions(),
        "python": sys.version.split()[0],
        "devices": devices(),
        "cuda": torch.cuda.is_available(),
        "organism": str(MODEL_DIR),
        "organism_present": (MODEL_DIR / "config.json").is_file(),
        "organism_version": organism_version(MODEL_DIR),
    }
    print(json.dumps(info, indent=1))
    return 0


def _add_eval_output(ev: argparse.ArgumentParser) -> None:
    g = ev.add_argument_group("output", "where results go and how they are summarised")
    g.add_argument(
        "--out", default=str(DEFAULT_RUNS / "eval"), help="run folder (resumed if it holds this run)"
    )
    g.add_argument(
        "--overwrite", action="store_true", help="start the --out folder afresh (deletes its predictions)"
    )
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    add_rule_arguments(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument(
        "--track",
        default=None,
        choices=["wandb", "mlflow"],
        help="log config, metrics and the report to Weights & Biases or MLflow (extra: flipscope[wandb|mlflow])",
    )
    g.add_argument(
        "--track-project", default=None, help="wandb project / mlflow experiment (default: flipscope)"
    )


def _add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="paraphrase-sensitivity evaluation (resumable)",
        description="Evaluate a model on paraphrased questions; resumable: re-run the same command to "
        "continue, or to re-print a finished run's summary.",
        formatter_class=HelpFormatter,
    )
    add_eval_data(ev)
    add_eval_model(ev)
    add_eval_run(ev)
    _add_eval_output(ev)
    ev.set_defaults(func=_cmd_eval)


def _add_organism_parsers(sub: Any) -> None:
    org = sub.add_parser("organism", help="the SynthCXR model organism").add_subparsers(
        dest="action", required=True
    )
    tr = org.add_parser(
        "train", help="rebuild the organism: clean phase then plant (~25 min on 1 core), gate checked"
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=2500, help="clean-phase optimizer steps")
    tr.add_argument(
        "--phase", choices=("all", "plant"), default="all", help="plant: phase 2 only, on <out>/clean"
    )
    tr.add_argument("--threads", type=int, default=1, help="torch threads (the shipped organism: 1)")
    tr.add_argument(
        "--out", default="", help="folder to write clean/ and model/ into (default: the shipped organism/)"
    )
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_cmd_organism_train)
    card = org.add_parser(
        "card",
        formatter_class=HelpFormatter,
        help="measure the checkpoint, check each planted failure is found, write MODEL_CARD.md to --out",
    )
    card.add_argument("--model", default="organism/model", help="the planted checkpoint (clean/ beside it)")
    card.add_argument(
        "--out",
        default=str(DEFAULT_RUNS / "model_card"),
        help="folder for the runs, MODEL_CARD.md and model_card.json",
    )
    card.add_argument(
        "--in-place",
        action="store_true",
        help="write the card beside the model instead (organism/MODEL_CARD.md, model_card.json: the committed card)",
    )
    card.add_argument("--n-images", type=int, default=0, help="0 = the whole test split")
    card.set_defaults(func=_cmd_organism_card)
    sae = org.add_parser("sae", help="retrain the organism's shipped SAE (TopK, organism/sae/<site>)")
    sae.add_argument("--seed", type=int, default=0)
    sae.set_defaults(func=_cmd_organism_sae)


def _add_compare_parser(sub: Any) -> None:
    from analyses.eval.compare import DEFAULT_FAMILIES

    cmp = sub.add_parser(
        "compare",
        formatter_class=HelpFormatter,
        help="tabulate finished run folders: metrics and quadrant shares with CIs, one row per run",
    )
    cmp.add_argument(
        "runs", nargs="+", help="run folders (meta.json + predictions.jsonl), e.g. runs/a runs/b"
    )
    cmp.add_argument("--names", default="", help="comma-separated row labels (default: the folder names)")
    cmp.add_argument(
        "--base", default=None, help="run that into_dangerous is relative to (default: the first)"
    )
    cmp.add_argument(
        "--allow-different-rows",
        action="store_true",
        help="tabulate runs over different question rows anyway",
    )
    cmp.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    cmp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_rule_arguments(cmp)
    cmp.add_argument(
        "--families",
        default=",".join(DEFAULT_FAMILIES),
        help="paraphrase families with their own flip-rate column, comma-separated, or 'all'",
    )
    cmp.add_argument(
        "--out", default=str(DEFAULT_RUNS / "compare"), help="folder for the table, page and CSVs"
    )
    cmp.set_defaults(func=_cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    from analyses.data.resolve import add_data_arguments, add_model_arguments

    p = argparse.ArgumentParser(prog="flipscope", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    _add_organism_parsers(sub)
    _add_eval_parser(sub)

    ca = sub.add_parser(
        "cache",
        help="cache activations of a run to disk (one file per shard and site; sharded under torchrun)",
    )
    ca.add_argument("--model", default="organism", help="'organism', a local folder, or a hub id")
    add_model_arguments(ca)
    ca.add_argument("--data", default="synthcxr", help="as for eval")
    ca.add_argument("--split", default="test")
    ca.add_argument("--n-images", type=int, default=0, help="only the first N images (0 = all)")
    add_data_arguments(ca)
    ca.add_argument(
        "--sites", required=True, help="comma-separated text sites, e.g. resid_post(3),mlp_out(2)"
    )
    ca.add_argument(
        "--positions", default="final", help="position classes: final, image, question, text, all"
    )
    ca.add_argument("--conditions", default="image", help="image and/or removed")
    ca.add_argument("--removal", default="gray", choices=["gray", "white", "noise", "none"])
    ca.add_argument("--batch-size", type=int, default=32)
    ca.add_argument("--shard-rows", type=int, default=1024, help="rows per shard file")
    ca.add_argument("--out", default=str(DEFAULT_RUNS / "cache"))
    ca.add_argument("--quiet", action="store_true")
    ca.set_defaults(func=_cmd_cache)

    demo = sub.add_parser(
        "demo", help="audit the shipped organism (eval, flip pairs, localization) and write audit.html"
    )
    demo.add_argument("--n-images", type=int, default=120)
    demo.add_argument("--out", default=str(DEFAULT_RUNS / "demo"))
    demo.add_argument("--overwrite", action="store_true", help="start the --out folder afresh")
    demo.set_defaults(func=_cmd_demo)

    _add_compare_parser(sub)

    from analyses.audit.cli import add_audit_parser
    from lora_targeted.cli import add_lora_parser

    add_audit_parser(sub)
    add_lora_parser(sub)

    info = sub.add_parser("info", help="versions and where the organism is")
    info.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as err:  # user errors (bad value, missing file or model, hub unreachable)
        if not getattr(err, "quiet", False):  # a rank that only relays another rank's error stays quiet
            print(f"flipscope: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    finally:
        close_dist()


def close_dist() -> None:
    """Destroy the process group a launcher's rank set up (``init_dist``), if any. A rank that exits with
    gloo's threads still running can abort at interpreter exit ("terminate called without an active
    exception", SIGABRT: seen once in ~10 torchrun runs of the cache command)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
