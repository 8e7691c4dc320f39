"""Experiment tracking, off by default: ``flipscope eval --track wandb`` or ``--track mlflow``.

After a run is summarized (on rank 0 of a sharded run), one tracked run is logged with

- **config**: what produced the run (its ``meta.json`` without the per-image fingerprints, which are
  replaced by their count and one digest), the summary's choices (quadrant rule, bootstrap) and the
  command's arguments;
- **metrics**: every metric of ``summary.json`` with its CI and n (``flip_rate``, ``flip_rate.low``, ``flip_rate.high``, ``flip_rate.n``),
  the quadrant shares (``quadrant/Dangerous``) and the metrics by family (``family/register/flip_rate``);
- **artifact**: ``report.html`` with ``summary.json`` and ``meta.json``.

Neither package is a dependency of flipscope: install the extra (``pip install "flipscope[wandb]"`` or
``"flipscope[mlflow]"``); asking for a tracker that is not installed is a one-line error naming it.
Where runs go is the tracker's own setting: ``WANDB_MODE=offline`` / ``WANDB_DIR`` / ``WANDB_PROJECT``,
``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``; nothing here sets a server.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

#: ``--track`` values: tracker -> the module it needs (installed by the extra of the same name).
TRACKERS: dict[str, str] = {"wandb": "wandb", "mlflow": "mlflow"}
#: Files of a run folder logged as the artifact, when present.
ARTIFACT_FILES: tuple[str, ...] = ("report.html", "summary.json", "meta.json")


@dataclass(frozen=True)
class Tracked:
    """What was logged, and where."""

    tracker: str
    """``wandb`` or ``mlflow``."""
    run_id: str
    """The tracker's id of the run."""
    where: str
    """The tracker's record of the run: the wandb run folder, the mlflow artifact URI."""
    config: dict[str, Any] = field(default_factory=dict)
    """The config logged."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The metrics logged."""
    artifacts: list[str] = field(default_factory=list)
    """The files logged as the run's artifact."""


def require(tracker: str) -> ModuleType:
    """The tracker's package, or a one-line ``ValueError`` naming the extra that installs it."""
    if tracker not in TRACKERS:
        raise ValueError(f"--track {tracker!r}: choose one of {', '.join(TRACKERS)}")
    try:
        return importlib.import_module(TRACKERS[tracker])
    except ImportError:
        raise ValueError(
            f"--track {tracker}: the {TRACKERS[tracker]} package is not installed; install the extra with "
            f'pip install "flipscope[{tracker}]" (or pip install {TRACKERS[tracker]})'
        ) from None


def run_config(summary: dict[str, Any], args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config of a run: ``summary["run"]`` (image fingerprints folded), choices, data, arguments."""
    run = dict(summary.get("run", {}))
    images = run.pop("images", None)
    if isinstance(images, dict):
        digest = hashlib.sha256(json.dumps(images, sort_keys=True).encode()).hexdigest()[:16]
        run["images"] = {"n": len(images), "sha256": digest}
    out = {**run, "choices": summary.get("choices", {}), "data": summary.get("data")}
    if args:
        out["args"] = {k: v for k, v in args.items() if not callable(v)}
    return json.loads(json.dumps(out, default=str))


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def run_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Every finite number of the summary's metric tables, flat (n/a metrics are left out)."""
    out: dict[str, float] = {}
    tables = (("metrics", "metric", ""), ("quadrant_shares", "quadrant", "quadrant/"))
    for table, key, prefix in tables:
        for rec in summary.get(table, []):
            base = f"{prefix}{rec[key]}"
            for part, suffix in (("value", ""), ("low", ".low"), ("high", ".high"), ("n", ".n")):
                if (x := _number(rec.get(part))) is not None:
                    out[base + suffix] = x
    for rec in summary.get("by_family", []):
        if (x := _number(rec.get("value"))) is not None:
            out[f"family/{rec['group']}/{rec['metric']}"] = x
    return out


def _wandb(mod: ModuleType, name: str, project: str | None, config: dict[str, Any],
           metrics: dict[str, float], files: list[Path]) -> tuple[str, str]:  # fmt: skip
    run = mod.init(
        project=project or "flipscope", name=name, config=config, job_type="eval", reinit="finish_previous"
    )
    try:
        run.summary.update(metrics)
        art = mod.Artifact(f"report-{run.id}", type="flipscope-report")
        for f in files:
            art.add_file(str(f), name=f.name)
        run.log_artifact(art)
        return str(run.id), str(Path(run.dir).parent)
    finally:
        run.finish()


def _mlflow(mod: ModuleType, name: str, project: str | None, config: dict[str, Any],
            metrics: dict[str, float], files: list[Path]) -> tuple[str, str]:  # fmt: skip
    if project:
        mod.set_experiment(project)
    flat = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in config.items()}
    with mod.start_run(run_name=name) as run:
        mod.log_params({k: str(v)[:6000] for k, v in flat.items()})
        mod.log_metrics({k.replace("(", "_").replace(")", ""): v for k, v in metrics.items()})
        for f in files:
            mod.log_artifact(str(f))
        return str(run.info.run_id), str(run.info.artifact_uri)


def track_run(
    tracker: str,
    run_dir: Path | str,
    *,
    args: dict[str, Any] | None = None,
    name: str | None = None,
    project: str | None = None,
) -> Tracked:
    """Log a summarized run folder (``summary.json``, ``report.html``) to ``tracker`` (module docs)."""
    mod = require(tracker)
    folder = Path(run_dir)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{folder} has no summary.json to track: summarize the run first")
    summary = json.loads(summary_path.read_text())
    config, metrics = run_config(summary, args), run_metrics(summary)
    files = [folder / f for f in ARTIFACT_FILES if (folder / f).is_file()]
    log = _wandb if tracker == "wandb" else _mlflow
    run_id, where = log(mod, name or folder.name, project, config, metrics, files)
    return Tracked(tracker, run_id, where, config, metrics, [f.name for f in files])
