"""Audit stage 5: which layers to give LoRA, with the evidence; with ``--lora-check``, whether that choice helps.

The recommendation is stage 3's flagged layers (:attr:`analyses.audit.localize.Localization.layers`) with
each flagged site's recovery on the selection and the scoring pairs, and the same-size control (the
unflagged layers the analysis scored lowest, :func:`lora_targeted.targets.control_layers`).

The check (:func:`lora_check`) trains three arms (targeted, control, all layers) once per seed on the
training rows with the paper's objective (:meth:`lora_targeted.train.LoraTrainConfig.paper`), evaluates
every adapter and the base on the audited rows (:func:`lora_targeted.arms.run_arms`), and tabulates them
with :func:`analyses.eval.compare.compare_runs` and :func:`lora_targeted.arms.arm_table` (the target
family's flip rate with a seed x cluster bootstrap interval, flip rate, text-only agreement, quadrant
counts and moves into Dangerous). Targeted *beats* the control when its interval lies entirely below the
control's (``targeted_high < control_low``); the recommendation says so either way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analyses.data.schema import ImageSource, QuestionRow

if TYPE_CHECKING:
    from analyses.audit.localize import Localization
    from analyses.eval.evaluate import EvalConfig
    from analyses.eval.quadrants import QuadrantRule
    from hooks.adapter import VLMAdapter


@dataclass(frozen=True)
class LoraCheckConfig:
    """The ``--lora-check`` experiment."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds per arm."""
    steps: int = 300
    """Optimizer steps per adapter."""
    lr: float = 2e-4
    """Learning rate (the paper's)."""
    batch_size: int = 8
    """Clusters per step."""
    split: str = "train"
    """Split of the training rows."""
    n_boot: int = 2000
    """Bootstrap resamples of the arm table's intervals."""

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(
                f"bad training settings: steps {self.steps}, batch_size {self.batch_size}, lr {self.lr}"
            )


def recommend(loc: Localization, n_layers: int) -> dict[str, Any]:
    """Target layers, the same-size control and the evidence behind them."""
    from lora_targeted.arms import arm_layers

    arms = arm_layers(loc.layers, n_layers, loc.layer_scores())
    scoring = loc.scoring.set_index(["site", "position"])
    evidence = []
    for r in loc.flagged.itertuples():
        s = scoring.loc[(r.site, r.position)] if (r.site, r.position) in scoring.index else None
        evidence.append({"site": r.site, "position": r.position, "selection": [r.recovery, r.low, r.high],
                         "scoring": None if s is None else [s["recovery"], s["low"], s["high"]]})  # fmt: skip
    return {"arms": arms, "evidence": evidence, "weak": loc.weak,
            "text": f"LoRA on text layers {arms['targeted']} (control of the same size: {arms['control']})"
                    + (" — weak: no site passed the flag rule, the top site stands in" if loc.weak else "")}  # fmt: skip


@dataclass
class LoraCheck:
    """The arms' table and what it says."""

    table: pd.DataFrame
    """:func:`lora_targeted.arms.arm_table` (one row per arm, ``base`` first)."""
    family: str
    """The family whose flip rate decides."""
    beats: bool
    """Targeted's interval lies entirely below the control's."""

    def verdict(self) -> str:
        t, c = self.table.loc["targeted"], self.table.loc["control"]
        f = self.family
        iv = lambda r: f"{r[f + '_flip']:.3f} [{r[f + '_flip_low']:.3f}, {r[f + '_flip_high']:.3f}]"
        head = "targeted LoRA beat" if self.beats else "targeted LoRA did NOT beat"
        return (f"{head} the same-size control on this model: {f} flip rate targeted {iv(t)} vs control {iv(c)} "
                f"(base {iv(self.table.loc['base'])}, all layers {iv(self.table.loc['all_layers'])})")  # fmt: skip

    def save(self, folder: Path) -> None:
        self.table.to_csv(Path(folder) / "arms.csv")
        (Path(folder) / "check.json").write_text(json.dumps({"family": self.family, "beats": self.beats,
                                                             "verdict": self.verdict()}, indent=1))  # fmt: skip

    @classmethod
    def load(cls, folder: Path) -> LoraCheck:
        rec = json.loads((Path(folder) / "check.json").read_text())
        return cls(pd.read_csv(Path(folder) / "arms.csv", index_col="arm"), rec["family"], bool(rec["beats"]))


def lora_check(
    adapter: VLMAdapter,
    arms: dict[str, list[int]],
    train_rows: Sequence[QuestionRow],
    test_rows: Sequence[QuestionRow],
    images: ImageSource,
    family: str,
    out: Path,
    cfg: LoraCheckConfig,
    eval_config: EvalConfig,
    rule: QuadrantRule,
    progress: bool = True,
) -> LoraCheck:
    """Train and score the three arms (module doc); run folders under ``out/arms``."""
    from analyses.eval.compare import compare_runs
    from lora_targeted.arms import arm_table, run_arms
    from lora_targeted.train import LoraTrainConfig

    train = LoraTrainConfig.paper(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, split=cfg.split)
    runs = run_arms(adapter, arms, train_rows, test_rows, images, train, cfg.seeds, Path(out) / "arms", eval_config,
                    keep_adapters=False, progress=progress)  # fmt: skip
    comp = compare_runs(runs.folders, runs.names, rule, base="base", n_boot=min(cfg.n_boot, 1000))
    table = arm_table(runs, comp, family, n_boot=cfg.n_boot)
    beats = bool(table.loc["targeted", f"{family}_flip_high"] < table.loc["control", f"{family}_flip_low"])
    return LoraCheck(table, family, beats)
