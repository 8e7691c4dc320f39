"""Arms of a targeted-LoRA experiment: targeted vs a same-size control vs all layers, several seeds each.

An *arm* is a set of text layers that carry LoRA weights. :func:`arm_layers` builds the three arms of
the design (the flagged layers, as many unflagged layers as a control with the same number of trainable
parameters, and every layer); :func:`run_arms` trains each arm once per seed on the train split with one
:class:`~lora_targeted.train.LoraTrainConfig` and evaluates every trained adapter and the base on the
same test rows (one run folder each, so :func:`analyses.eval.compare.compare_runs` tabulates them).
Training and test rows are checked to be disjoint (split, image and patient) before anything trains.

Statistics across seeds: :func:`family_hits` gives one flip indicator per test cluster and run;
:func:`seed_cluster_bootstrap` resamples seeds and clusters (the same test clusters under every seed)
and returns the mean over (seed, cluster) cells with a percentile interval; :func:`arm_table`
aggregates the per-run comparison table by arm (mean, sd and range over seeds). :func:`where_changed`
runs cross-model patching base -> adapter on the rows whose answer the adapter changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from analyses.data.schema import ORIGINAL, PARAPHRASE_FAMILIES, ImageSource, QuestionRow
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.eval.metrics import cluster_units
from hooks.progress import tqdm
from interp.stats import check_bootstrap, draw_clusters, percentile_interval
from lora_targeted.targets import control_layers, select_layers
from lora_targeted.train import LoraTrainConfig, train_lora

if TYPE_CHECKING:
    from analyses.eval.compare import RunComparison
    from hooks.adapter import VLMAdapter
    from interp.scores import LayerScores

#: The three arms of the design, in reporting order.
ARMS: tuple[str, ...] = ("targeted", "control", "all_layers")
#: Run record written beside the run folders by :func:`run_arms`.
ARMS_FILE = "arms.json"


def arm_layers(
    flagged: Sequence[int], n_layers: int, scores: LayerScores | None = None
) -> dict[str, list[int]]:
    """``{"targeted": flagged, "control": same number of unflagged layers, "all_layers": every layer}``.

    The control is :func:`lora_targeted.targets.control_layers` (with ``scores``: the unflagged layers
    the analysis scored lowest; without: the unflagged layers farthest from the flagged ones). Every
    text layer has the same shapes, so targeted and control train the same number of parameters.
    """
    targeted = select_layers(layers=list(flagged), n_layers=n_layers)
    return {
        "targeted": targeted,
        "control": control_layers(targeted, n_layers, scores),
        "all_layers": list(range(n_layers)),
    }


def check_disjoint(train_rows: Sequence[QuestionRow], test_rows: Sequence[QuestionRow], split: str) -> int:
    """Refuse test rows that a run on ``train_rows`` (split ``split``) would see; returns the number of
    training rows used. A test row must not be of ``split`` and must not share an image or a patient
    with a training row."""
    used = [r for r in train_rows if r.split == split]
    if not used:
        have = sorted({r.split for r in train_rows})
        raise ValueError(f"no training rows of split {split!r} (they have splits {have})")
    if not test_rows:
        raise ValueError("no test rows to evaluate on")
    in_split = sorted({r.qid for r in test_rows if r.split == split})
    images = {r.image_id for r in used}
    patients = {r.patient_id for r in used if r.patient_id}
    shared = sorted({r.image_id for r in test_rows if r.image_id in images or (r.patient_id in patients)})
    if in_split or shared:
        raise ValueError(
            f"test rows overlap the training split {split!r}: {len(in_split)} rows of that split "
            f"(e.g. {in_split[:3]}), {len(shared)} images or patients trained on (e.g. {shared[:3]}); "
            "evaluate on another split (e.g. organism_rows('test'))"
        )
    return len(used)


@dataclass
class ArmRun:
    """One trained adapter of one arm and seed, and where its evaluation lives."""

    arm: str
    """Arm name (e.g. ``targeted``)."""
    seed: int
    """Training seed (LoRA init, dropout, cluster sampling)."""
    layers: list[int]
    """Text layers that carry LoRA weights."""
    trainable: int
    """Trainable (LoRA) parameters."""
    train_seconds: float
    """Training wall time."""
    eval_seconds: float
    """Evaluation wall time on the test rows."""
    folder: Path
    """Evaluator run folder of this adapter (``meta.json`` + ``predictions.jsonl``)."""
    final_loss: dict[str, float]
    """Loss terms averaged over the last 5 steps."""
    adapter: VLMAdapter | None = None
    """The trained adapter (kept in memory when ``keep_adapters`` says so), for cross-model patching."""

    @property
    def name(self) -> str:
        return f"{self.arm}_s{self.seed}"

    def record(self) -> dict[str, Any]:
        return {
            "arm": self.arm, "seed": self.seed, "layers": self.layers, "trainable": self.trainable,
            "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
            "folder": str(self.folder), "final_loss": self.final_loss,
        }  # fmt: skip


@dataclass
class ArmRuns:
    """Every arm x seed run of :func:`run_arms`, and the base run they are compared against."""

    runs: list[ArmRun]
    """In the order trained: arm by arm, seed by seed."""
    base_folder: Path
    """Evaluator run folder of the base model on the same test rows."""
    config: LoraTrainConfig
    """Training configuration shared by every run (its ``seed`` replaced per run)."""
    arms: dict[str, list[int]] = field(default_factory=dict)
    """Layers of each arm."""

    @property
    def names(self) -> list[str]:
        """``["base", "<arm>_s<seed>", ...]``: run labels in the order of :attr:`folders`."""
        return ["base", *(r.name for r in self.runs)]

    @property
    def folders(self) -> list[Path]:
        return [self.base_folder, *(r.folder for r in self.runs)]

    def of(self, arm: str) -> list[ArmRun]:
        """The runs of one arm, in seed order."""
        out = [r for r in self.runs if r.arm == arm]
        if not out:
            raise KeyError(f"no runs of arm {arm!r}; arms are {list(self.arms)}")
        return out

    def frame(self) -> pd.DataFrame:
        """One row per run: arm, seed, layers, trainable parameters, timings, final losses."""
        recs = [
            {**{k: v for k, v in r.record().items() if k != "final_loss"}, **r.final_loss} for r in self.runs
        ]
        return pd.DataFrame.from_records(recs).set_index(["arm", "seed"])


def run_arms(
    base: VLMAdapter,
    arms: Mapping[str, Sequence[int]],
    train_rows: Sequence[QuestionRow],
    test_rows: Sequence[QuestionRow],
    images: ImageSource,
    config: LoraTrainConfig,
    seeds: Sequence[int],
    out_dir: str | Path,
    eval_config: EvalConfig | None = None,
    keep_adapters: bool = True,
    progress: bool = True,
) -> ArmRuns:
    """Train every arm once per seed on ``train_rows`` (split ``config.split``) and evaluate each adapter
    and the base on ``test_rows`` (folders ``out_dir/base`` and ``out_dir/<arm>_s<seed>``).

    Refuses test rows that overlap the training split (:func:`check_disjoint`). The run records are
    appended to ``out_dir/arms.json`` as each run finishes, so a crash keeps what was done.
    """
    if not arms:
        raise ValueError("arms is empty: pass e.g. arm_layers(flagged, adapter.n_layers)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {list(seeds)}")
    check_disjoint(train_rows, test_rows, config.split)
    layers = {a: select_layers(layers=list(ls), n_layers=base.n_layers) for a, ls in arms.items()}
    cfg_eval = eval_config or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluate(base, test_rows, images, out / "base", cfg_eval, progress=False)
    train_only = [r for r in train_rows if r.split == config.split]
    result = ArmRuns([], out / "base", config, layers)
    jobs = [(a, s) for a in layers for s in seeds]
    for arm, seed in tqdm(jobs, desc="arms x seeds", disable=not progress):
        cfg = dataclasses.replace(config, seed=int(seed))
        t0 = time.time()
        res = train_lora(base, train_only, images, layers[arm], cfg, progress=False)
        t1 = time.time()
        folder = out / f"{arm}_s{seed}"
        evaluate(res.adapter, test_rows, images, folder, cfg_eval, progress=False)
        last = res.log_frame.tail(5).mean(numeric_only=True)
        run = ArmRun(
            arm, int(seed), res.layers, res.trainable, round(t1 - t0, 2), round(time.time() - t1, 2), folder,
            {k: float(last[k]) for k in ("loss", "task", "consistency", "reliance", "removed")},
            res.adapter if keep_adapters else None,
        )  # fmt: skip
        result.runs.append(run)
        record = {"arms": layers, "config": config.to_dict(), "runs": [r.record() for r in result.runs]}
        (out / ARMS_FILE).write_text(json.dumps(record, indent=1, default=str))
    return result


def family_hits(preds: pd.DataFrame, family: str, condition: str = "image") -> pd.Series:
    """Per cluster (index: the original's qid, sorted): 1.0 if a ``family`` paraphrase's prediction differs
    from the original's under ``condition``, else 0.0. Clusters without such a paraphrase are absent."""
    if family not in PARAPHRASE_FAMILIES:
        raise ValueError(f"family {family!r} is not a paraphrase family; choose one of {PARAPHRASE_FAMILIES}")
    units = cluster_units(preds, condition, per_family=True)
    units = units[units["family"] == family]
    return units.set_index("qid")["hit"].astype(float).sort_index().rename(f"flip_{family}")


def hits_matrix(frames: Sequence[pd.DataFrame], family: str) -> Float[np.ndarray, "seed cluster"]:
    """:func:`family_hits` of several runs over the same clusters, stacked (one row per run); refuses runs
    whose clusters differ."""
    if not frames:
        raise ValueError("no prediction tables given")
    hits = [family_hits(f, family) for f in frames]
    index = hits[0].index
    for i, h in enumerate(hits[1:], start=1):
        if not h.index.equals(index):
            raise ValueError(
                f"run {i} has other {family} clusters than run 0: compare runs over the same rows"
            )
    return np.stack([h.to_numpy() for h in hits])


def seed_cluster_bootstrap(
    values: Float[np.ndarray, "seed cluster"], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean over all (seed, cluster) cells, low, high): a two-way percentile bootstrap.

    Each resample draws seeds with replacement and, independently, clusters with replacement (the
    same cluster draw for every seed: the seeds were scored on the same test clusters), and takes the
    mean over the drawn cells; NaN cells are left out. The interval therefore carries both the
    test-set sampling and the seed-to-seed spread. With one seed it is the ordinary cluster bootstrap.
    """
    check_bootstrap(n_boot, level)
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise ValueError(f"values must be a non-empty (seed, cluster) matrix, got shape {v.shape}")
    ok = ~np.isnan(v)
    if not ok.any():
        raise ValueError("every cell is NaN: nothing to average")
    v0 = np.where(ok, v, 0.0)
    n_seed, n_cl = v.shape
    rng = np.random.default_rng(seed)
    ws = np.stack([np.bincount(rng.integers(0, n_seed, n_seed), minlength=n_seed) for _ in range(n_boot)])
    wc = np.stack([np.bincount(draw_clusters(rng, n_cl), minlength=n_cl) for _ in range(n_boot)])
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = ((ws @ v0) * wc).sum(axis=1) / ((ws @ ok.astype(float)) * wc).sum(axis=1)
    low, high = percentile_interval(boots.astype(float), level)
    return float(v0.sum() / ok.sum()), float(low), float(high)


#: Columns of :func:`arm_table` taken from the per-run comparison table.
TABLE_METRICS: tuple[str, ...] = (
    "flip_rate",
    "text_only_agreement",
    "swap_sensitivity_label",
    "accuracy",
    "Ideal",
    "Fragile",
    "Dangerous",
    "Worst",
    "into_dangerous",
)


def arm_table(
    runs: ArmRuns,
    comparison: RunComparison,
    family: str = "register",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per arm (``base`` first): ``<family>_flip`` with its :func:`seed_cluster_bootstrap`
    interval and per-seed sd / min / max, and the mean and sd over seeds of every
    :data:`TABLE_METRICS` column of ``comparison.table`` (the :func:`compare_runs` table of
    ``runs.folders`` labelled ``runs.names``)."""
    missing = [n for n in runs.names if n not in comparison.table.index]
    if missing:
        raise ValueError(
            f"comparison lacks runs {missing}: build it with compare_runs(runs.folders, runs.names)"
        )
    groups = {"base": ["base"], **{a: [r.name for r in runs.of(a)] for a in runs.arms}}
    recs = []
    for arm, names in groups.items():
        m = hits_matrix([comparison.predictions[n] for n in names], family)
        per_seed = np.nanmean(m, axis=1)
        mean, low, high = seed_cluster_bootstrap(m, n_boot, seed, level)
        rec: dict[str, Any] = {"arm": arm, "n_seeds": len(names), "n_clusters": m.shape[1]}
        rec.update({f"{family}_flip": mean, f"{family}_flip_low": low, f"{family}_flip_high": high,
                    f"{family}_flip_sd": float(np.std(per_seed, ddof=1)) if len(names) > 1 else 0.0,
                    f"{family}_flip_min": float(per_seed.min()), f"{family}_flip_max": float(per_seed.max())})  # fmt: skip
        t = comparison.table.loc[names]
        for c in TABLE_METRICS:
            col = t[c].astype(float)
            rec[c] = float(col.mean())
            rec[f"{c}_sd"] = float(col.std(ddof=1)) if len(names) > 1 else 0.0
        recs.append(rec)
    return pd.DataFrame.from_records(recs).set_index("arm")


def mean_migration(runs: ArmRuns, comparison: RunComparison, arm: str) -> pd.DataFrame:
    """4x4 quadrant migration base -> ``arm`` (rows before, columns after), averaged over its seeds."""
    names = [r.name for r in runs.of(arm)]
    absent = [n for n in names if n not in comparison.migrations]
    if absent:
        raise ValueError(f"no quadrant migration for {absent}: the runs need the 'removed' condition")
    return sum(comparison.migrations[n] for n in names) / len(names)  # type: ignore[return-value]


def changed_rows(
    base_preds: pd.DataFrame,
    preds: pd.DataFrame,
    rows: Sequence[QuestionRow],
    family: str | None = None,
    condition: str = "image",
) -> list[QuestionRow]:
    """The rows (of ``family``; ``None`` = every family, originals included) whose prediction under
    ``condition`` differs between two runs over the same rows: where an adapter changed the answer."""
    if family is not None and family not in (*PARAPHRASE_FAMILIES, ORIGINAL):
        raise ValueError(
            f"family {family!r} is neither 'original' nor a paraphrase family {PARAPHRASE_FAMILIES}"
        )
    a = base_preds[base_preds["condition"] == condition].set_index("qid")["pred"]
    b = preds[preds["condition"] == condition].set_index("qid")["pred"]
    both = a.index.intersection(b.index)
    if len(both) != len(a) or len(both) != len(b):
        raise ValueError(f"the runs predict different rows ({len(a)} vs {len(b)}, {len(both)} shared)")
    diff = set(both[a.loc[both].to_numpy() != b.loc[both].to_numpy()])
    return [r for r in rows if r.qid in diff and (family is None or r.family == family)]


def where_changed(
    base: VLMAdapter,
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    kinds: Sequence[str] = ("attn_out", "mlp_out"),
    positions: tuple[str, ...] = ("all", "final"),
) -> pd.DataFrame:
    """Cross-model patching base -> ``adapter`` on ``rows`` (e.g. :func:`changed_rows`): per site kind,
    layer and position class, the mean share of the adapter-vs-base margin difference that the base's
    activation at that site restores (:func:`interp.crossmodel.cross_model_patching`, source = base,
    target = adapter). High recovery = the adapter changed the answer through that site."""
    from interp.crossmodel import cross_model_patching
    from interp.patching import PatchingConfig

    if not rows:
        raise ValueError("no rows: pass the rows whose answer the adapter changed (changed_rows)")
    batch = base.prepare([images(r) for r in rows], [r.question for r in rows])
    recs = []
    for kind in kinds:
        res = cross_model_patching(base, adapter, batch, PatchingConfig(site_kind=kind, positions=positions))
        rec = res.recovery_per_pair.float().numpy()  # (layer, position, pair)
        for i, layer in enumerate(res.layers):
            for j, pos in enumerate(res.positions):
                vals = rec[i, j]
                ok = ~np.isnan(vals)
                recs.append({"site": f"{kind}({layer})", "kind": kind, "layer": layer, "position": pos,
                             "recovery": float(vals[ok].mean()) if ok.any() else float("nan"),
                             "n": int(ok.sum())})  # fmt: skip
    return pd.DataFrame.from_records(recs)


def component_scores(results: Sequence[Any], position: str = "final", source: str = "") -> LayerScores:
    """Per-layer scores from component patching sweeps (e.g. one ``attn_out`` and one ``mlp_out``
    :class:`~interp.patching.PatchingResult` over the same pairs and layers): a layer's score is the
    largest mean recovery at ``position`` among its components. The layers a fine-tune should act on
    are those whose own component carries the flip, not those downstream of it."""
    from interp.scores import LayerScores

    if not results:
        raise ValueError("no patching results: pass e.g. [attn_out sweep, mlp_out sweep]")
    layers = list(results[0].layers)
    for r in results:
        if list(r.layers) != layers:
            raise ValueError(f"the sweeps cover different layers ({layers} vs {list(r.layers)})")
        if position not in r.positions:
            raise ValueError(f"position {position!r} not in the sweep's positions {list(r.positions)}")
    per = np.stack([r.recovery[:, list(r.positions).index(position)].float().numpy() for r in results])
    best = np.nanmax(np.where(np.isnan(per), -np.inf, per), axis=0)
    kinds = [r.site_kind for r in results]
    return LayerScores(
        layers=layers,
        scores=[float(x) if np.isfinite(x) else float("nan") for x in best],
        method="component_patching_max",
        source=source,
        site_kind="+".join(kinds),
        position=position,
        meta={k: per[i].tolist() for i, k in enumerate(kinds)},
    )
