"""``flipscope lora ...``: targeted-LoRA training and the before/after comparison.

>>> flipscope lora train --layers 2,3 --steps 300 --out runs/lora/targeted
>>> flipscope lora train --scores runs/patching/scores.json --k 2 --out runs/lora/targeted
>>> flipscope lora train --all-layers --out runs/lora/all
>>> flipscope lora compare --adapter targeted=runs/lora/targeted --adapter all=runs/lora/all

``--model organism`` (the default) is the shipped SynthCXR organism and its world; another local
model folder works if it has the organism's ``training.json`` (for the world) or with ``--data`` a
PSF-Med-style file. Wire it into the main parser with ``add_lora_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analyses.data.schema import ImageSource

DEFAULT_OUT = Path("runs") / "lora"


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """``--prompt`` and ``--image-position`` (the adapter's prompt settings, recorded in every run)."""
    parser.add_argument(
        "--prompt",
        default="auto",
        choices=["auto", "chat", "plain"],
        help="chat: the model's chat template (user turn + generation prompt); plain: image + prompt; "
        "auto (default): chat if the processor has a chat template, else plain",
    )
    parser.add_argument(
        "--image-position",
        default=None,
        choices=["before", "after"],
        help="image before (default) or after the question text",
    )


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers like 2,3 (got {text!r})") from None


def _data(args: argparse.Namespace, model_dir: Path | None, split: str) -> tuple[list[Any], ImageSource]:
    """(rows of ``split``, image source), through the one ``--data`` resolver."""
    from analyses.data.resolve import data_options, resolve_data

    data = resolve_data(args.data, split, args.n_images, model_dir, args.image_root, data_options(args))
    if data.report:
        print(data.report)
    return data.rows, data.images


def _cmd_train(args: argparse.Namespace) -> int:
    from interp.scores import LayerScores
    from lora_targeted.targets import all_layers, select_layers
    from lora_targeted.train import LoraTrainConfig, train_lora

    chosen = [bool(args.layers), bool(args.scores), bool(args.all_layers)]
    if sum(chosen) != 1:
        raise ValueError(
            "pick the layers one way: --layers 2,3, or --scores scores.json --k N, or --all-layers"
        )
    if args.k is not None and not args.scores:
        raise ValueError("--k only applies with --scores")

    from analyses.data.resolve import resolve_model

    adapter, model_dir = resolve_model(args.model)
    adapter.set_prompt(args.prompt, args.image_position)
    if args.all_layers:
        layers = all_layers(adapter)
    elif args.scores:
        if args.k is None:
            raise ValueError("--scores needs --k, the number of top-scoring layers to adapt")
        layers = select_layers(LayerScores.from_json(Path(args.scores)), k=args.k, n_layers=adapter.n_layers)
    else:
        layers = select_layers(layers=_parse_layers(args.layers), n_layers=adapter.n_layers)
    cfg = LoraTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        consistency_weight=args.consistency_weight,
        image_reliance_weight=args.reliance_weight,
        removal=args.removal,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        split=args.split,
    )
    rows, source = _data(args, model_dir, args.split)
    res = train_lora(adapter, rows, source, layers, cfg, out_dir=args.out, progress=not args.quiet)
    last = res.log_frame.tail(min(20, len(res.log))).mean(numeric_only=True)
    print(
        f"LoRA on text layers {res.layers}: {res.trainable:,} / {res.total:,} parameters trainable "
        f"({100 * res.fraction:.3f}%), {res.seconds} s; last steps: task {last['task']:.4f}, "
        f"consistency {last['consistency']:.4f}\nadapter: {res.out_dir}"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from analyses.data.resolve import resolve_model
    from analyses.eval.evaluate import EvalConfig
    from analyses.eval.quadrants import QuadrantRule
    from lora_targeted.compare import compare
    from lora_targeted.train import load_lora

    base, model_dir = resolve_model(args.model)
    base.set_prompt(args.prompt, args.image_position)
    adapters = {"base": base}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=FOLDER (e.g. targeted=runs/lora/targeted), got {spec!r}")
        if name in adapters:
            raise ValueError(f"adapter name {name!r} given twice (or clashes with 'base')")
        adapters[name] = load_lora(base, path)
    rows, source = _data(args, model_dir, args.split)
    cfg = EvalConfig(removal=args.removal, batch_size=args.batch_size, seed=args.seed)
    rule = QuadrantRule(reliance=args.reliance, min_margin_shift=args.min_margin_shift)
    comp = compare(adapters, rows, source, args.out, cfg, rule, family=args.family, progress=not args.quiet)
    print(comp.to_markdown())
    comp.figure().write_html(Path(args.out) / "comparison.html", include_plotlyjs=True)
    print(f"\nwritten: {Path(args.out) / 'comparison.md'}, comparison.csv, comparison.html")
    return 0


def add_lora_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``lora train`` and ``lora compare`` to a top-level ``add_subparsers()`` object."""
    from analyses.data.resolve import add_data_arguments

    lora = subparsers.add_parser("lora", help="targeted LoRA: train on chosen text layers, compare")
    sub = lora.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser, split: str) -> None:
        p.add_argument("--model", default="organism", help="'organism', a local model folder, or a hub id")
        p.add_argument(
            "--data",
            default="synthcxr",
            help="'synthcxr', a question / label file or a hub dataset (docs/data.md)",
        )
        p.add_argument("--split", default=split)
        p.add_argument("--n-images", type=int, default=0, help="use only the first N images (0 = all)")
        add_data_arguments(p)
        p.add_argument("--removal", default="gray", choices=["gray", "white", "noise", "none"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true")
        add_prompt_options(p)

    tr = sub.add_parser("train", help="train LoRA on chosen text layers with a paraphrase-consistency loss")
    common(tr, "train")
    tr.add_argument("--layers", default="", help="comma-separated text layers, e.g. 15,16,17")
    tr.add_argument("--scores", default="", help="LayerScores JSON (interp.scores); use with --k")
    tr.add_argument("--k", type=int, default=None, help="number of top-scoring layers to adapt")
    tr.add_argument("--all-layers", action="store_true", help="adapt every text layer (the baseline)")
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--batch-size", type=int, default=8, help="clusters per step")
    tr.add_argument("--lr", type=float, default=2e-4)
    tr.add_argument("--consistency-weight", type=float, default=1.0)
    tr.add_argument("--reliance-weight", type=float, default=0.0, help="image-reliance hinge weight")
    tr.add_argument("--r", type=int, default=16)
    tr.add_argument("--alpha", type=int, default=32)
    tr.add_argument("--dropout", type=float, default=0.05)
    tr.add_argument("--out", default=str(DEFAULT_OUT / "targeted"))
    tr.set_defaults(func=_cmd_train)

    cp = sub.add_parser("compare", help="evaluate base + saved adapters and tabulate flip/reliance/quadrants")
    common(cp, "test")
    cp.add_argument("--adapter", action="append", default=[], help="NAME=FOLDER of a saved adapter (repeat)")
    cp.add_argument("--family", default="register", help="paraphrase family for family_flip_rate")
    cp.add_argument("--batch-size", type=int, default=64)
    cp.add_argument(
        "--reliance",
        default="margin_shift",
        choices=["pred_change", "margin_shift"],
        help="quadrant rule: image-reliant if the margin moves by --min-margin-shift, or if the answer changes",
    )
    cp.add_argument("--min-margin-shift", type=float, default=1.0, help="logits, for --reliance margin_shift")
    cp.add_argument("--out", default=str(DEFAULT_OUT / "compare"))
    cp.set_defaults(func=_cmd_compare)
    return lora
