"""Option groups shared by the commands that evaluate a model (``flipscope eval``, ``flipscope audit``):
data, model, run settings and the quadrant rule, each with its help and default."""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Help with each option's default appended, unless it is empty or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default == "" or default == argparse.SUPPRESS
        if not action.option_strings or empty or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def add_rule_arguments(p: Any) -> None:
    """``--reliance`` / ``--min-margin-shift``: the quadrant rule (default: ``QuadrantRule()``, the demo's)."""
    from analyses.eval.quadrants import DEFAULT_RULE

    p.add_argument(
        "--reliance",
        default=DEFAULT_RULE.reliance,
        choices=["pred_change", "margin_shift"],
        help="quadrant rule: image-reliant if the margin moves by --min-margin-shift without the image "
        "(margin_shift) or if the answer changes (pred_change), on every question of the sample",
    )
    p.add_argument(
        "--min-margin-shift",
        type=float,
        default=DEFAULT_RULE.min_margin_shift,
        help="logits, for --reliance margin_shift",
    )


def add_eval_data(ev: argparse.ArgumentParser) -> None:
    from analyses.data.resolve import add_data_arguments

    g = ev.add_argument_group("data", "which questions and images")
    g.add_argument(
        "--data",
        default="synthcxr",
        help="'synthcxr'; a file (jsonl/json/csv/parquet, .gz ok) in the flipscope, PSF-Med / flip-bank or "
        "CheXpert-label layout; or a hub dataset such as saillab/psf-med:mimic",
    )
    g.add_argument("--split", default="test", help="split of the data to evaluate (train, val, test)")
    g.add_argument("--n-images", type=int, default=0, help="evaluate only the first N images (0 = all)")
    add_data_arguments(g)  # type: ignore[arg-type]  # an argument group takes the same add_argument
    g.add_argument(
        "--conditions",
        default="image,removed,swap_random,swap_label",
        help="comma-separated subset of image, removed, swap_random, swap_label",
    )
    g.add_argument(
        "--removal",
        default="gray",
        choices=["gray", "white", "noise", "none"],
        help="what replaces the image under the 'removed' condition",
    )


def add_eval_model(ev: argparse.ArgumentParser) -> None:
    from analyses.data.resolve import add_model_arguments
    from lora_targeted.cli import add_prompt_options

    g = ev.add_argument_group("model", "which model and how it is prompted")
    g.add_argument("--model", default="organism", help="'organism', a local folder, or a hub id")
    add_model_arguments(g)  # type: ignore[arg-type]
    add_prompt_options(g)  # type: ignore[arg-type]


def add_eval_run(ev: argparse.ArgumentParser) -> None:
    g = ev.add_argument_group("run", "how the forwards run")
    g.add_argument("--batch-size", type=int, default=64, help="questions per forward (no effect on margins)")
    g.add_argument("--seed", type=int, default=0, help="seed of the swap partners, noise and bootstrap")
    g.add_argument(
        "--forward",
        default="auto",
        choices=["auto", "prefix", "full"],
        help="prefix: each image's prefix runs once, rows are suffix-only forwards (image before the question); "
        "full: whole-sequence forwards; auto (default): prefix where the prompt allows. Same margins to rounding",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the text layers (GPU: faster after a slow start; off by default)",
    )
