"""``flipscope audit``: from a model and its questions to where the flip happens, which features carry it
and which layers to give LoRA, as one resumable pipeline of stages (:data:`analyses.audit.stages.STAGES`).

1. **eval** (:func:`stage_eval`): the evaluator into ``<out>/eval`` (resumable, fingerprinted), or the
   predictions of an existing eval run folder (``from_run``: same weights and rows, checked);
2. **pairs** (:func:`stage_pairs`): the target family's flip pairs split by image
   (:mod:`analyses.audit.pairs`);
3. **localize** (:func:`stage_localize`): sweeps, attribution and the flag rule (:mod:`analyses.audit.localize`);
4. **features** (:func:`stage_features`, optional): an SAE at the residual site (:mod:`analyses.audit.features`);
5. **lora** (:func:`stage_lora`): the recommendation, and with a check config the three arms
   (:mod:`analyses.audit.lora`);
6. **report** (:func:`stage_report`): ``audit.html`` and ``audit.json`` (:mod:`analyses.audit.report`).

Each stage is a function of the previous stages' results that notebooks call directly; :func:`run_audit`
chains them through an :class:`~analyses.audit.stages.AuditFolder` (resume, refusal, ``overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analyses.audit.features import TRAIN, FeatureResult, FeaturesConfig, get_sae, score_features
from analyses.audit.localize import Localization, LocalizeConfig, localize
from analyses.audit.lora import LoraCheck, LoraCheckConfig, lora_check, recommend
from analyses.audit.pairs import PairSplit, split_pairs
from analyses.audit.stages import STAGES, AuditFolder, StageRecord, digest_folder
from analyses.data.schema import ImageSource, QuestionRow
from analyses.eval.evaluate import EvalConfig, evaluate
from analyses.eval.fingerprint import OWN_KEYS, _jsonable
from analyses.eval.predictions import RunChanged, RunFolder, dataset_hash
from analyses.eval.quadrants import DEFAULT_RULE, QuadrantRule
from hooks.batch_features import reuse_features

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter


@dataclass(frozen=True)
class AuditConfig:
    """Every setting of an audit (each stage's part goes into that stage's key)."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """The evaluator's settings (stage 1)."""
    family: str = "auto"
    """Paraphrase family to localize; ``auto``: the one with the most flip pairs."""
    seed: int = 0
    """Seed of the image split and the others' subset (stage 2)."""
    max_pairs: int = 64
    """Flip pairs kept per half (bounds the cost of stages 3-4)."""
    max_others: int = 256
    """Other-family pairs on scoring images, for collateral (stage 4)."""
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    """Stage 3's sweeps."""
    features: FeaturesConfig | None = None
    """Stage 4's SAE (``None``: stage skipped)."""
    lora_check: LoraCheckConfig | None = None
    """Stage 5's three-arm check (``None``: the recommendation only)."""
    rule: QuadrantRule = DEFAULT_RULE
    """Quadrant rule of the report and of the arms' comparison."""
    n_boot: int = 1000
    """Bootstrap resamples of the report's intervals."""
    until: str = "report"
    """Last stage to run."""

    @property
    def needs_train_rows(self) -> bool:
        """An SAE trained here (``--sae train``) or the LoRA check reads the data's train split."""
        return (self.features is not None and self.features.sae == TRAIN) or self.lora_check is not None

    def __post_init__(self) -> None:
        if self.until not in STAGES:
            raise ValueError(f"until={self.until!r}: choose one of {STAGES}")


def _settings(obj: Any, drop: Sequence[str] = ("progress",)) -> dict[str, Any]:
    return {k: v for k, v in asdict(obj).items() if k not in drop}


def model_key(adapter: VLMAdapter, eval_rec: StageRecord) -> dict[str, Any]:
    """What identifies the model a stage runs: its description and runtime settings, and the weight hashes
    the eval stage recorded (computed there once, or checked against ``--from-run``'s: hashing a 4B model's
    parameters again would cost seconds per run)."""
    from analyses.eval.fingerprint import runtime_fingerprint

    meta = eval_rec.key.get("meta", eval_rec.key)
    return {
        "describe": adapter.describe(),
        "weights": meta.get("weights"),
        "runtime": runtime_fingerprint(adapter),
    }


def predictions_digest(path: Path) -> str:
    """SHA-256 of a predictions file's lines, sorted (a resumed run that wrote the same lines hashes alike)."""
    lines = sorted(x for x in path.read_text().splitlines() if x.strip())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def stage_eval(
    folder: AuditFolder,
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    cfg: EvalConfig,
    from_run: Path | None = None,
    skipped: Sequence[Any] = (),
) -> tuple[pd.DataFrame, StageRecord]:
    """Stage 1: the predictions table and its record (see the module doc)."""
    t0 = time.perf_counter()
    if from_run is not None:
        run = RunFolder(from_run)
        if not run.meta_path.is_file():
            raise ValueError(
                f"--from-run {from_run}: no meta.json there; give a finished `flipscope eval` run folder"
            )
        meta = json.loads(run.meta_path.read_text())
        _check_from_run(meta, adapter, rows, Path(from_run))
        preds = run.predictions()
        folder.stage_dir("eval").mkdir(parents=True, exist_ok=True)
        digest = predictions_digest(run.predictions_path)
        key = {
            "from_run": str(Path(from_run).resolve()),
            "meta": {k: v for k, v in meta.items() if k not in OWN_KEYS},
        }
    else:
        out = folder.stage_dir("eval")
        try:
            preds = evaluate(adapter, rows, images, out, cfg, progress=folder.progress, skipped=skipped)
        except RunChanged:
            if not folder.overwrite:
                raise
            preds = evaluate(
                adapter, rows, images, out, cfg, progress=folder.progress, skipped=skipped, overwrite=True
            )
        meta = json.loads((out / "meta.json").read_text())
        digest = predictions_digest(out / "predictions.jsonl")
        key = {k: v for k, v in meta.items() if k not in OWN_KEYS}
    old = folder.record("eval")
    key = {**key, "predictions": digest}
    if old is not None and old.key == _jsonable(key):
        if folder.progress:
            print(f"audit: eval already done in {folder.stage_dir('eval')}; reused")
        return preds, old
    if old is not None:  # other predictions than recorded: refused, or with overwrite the later stages go
        folder.refuse_or_clear("eval", old.key, _jsonable(key))
    summary = {
        "n_predictions": len(preds),
        "conditions": sorted(set(preds["condition"])),
        "from_run": str(from_run or ""),
    }
    rec = folder.record_done("eval", key, digest, time.perf_counter() - t0, summary)
    return preds, rec


def _check_from_run(
    meta: dict[str, Any], adapter: VLMAdapter, rows: Sequence[QuestionRow], path: Path
) -> None:
    from analyses.eval.fingerprint import weights_fingerprint

    now = weights_fingerprint(adapter).get("files")
    was = (meta.get("weights") or {}).get("files")
    if was and now and was != now:
        raise ValueError(f"--from-run {path} was evaluated with other weights ({meta.get('model')}): audit that model, "
                         "or run the eval stage here (drop --from-run)")  # fmt: skip
    if meta.get("dataset_hash") not in (None, dataset_hash(rows)):
        raise ValueError(f"--from-run {path} evaluated other rows than --data/--split/--n-images give now "
                         f"({meta.get('n_rows')} rows there, {len(rows)} here): pass the same data options")  # fmt: skip


def stage_pairs(
    folder: AuditFolder,
    preds: pd.DataFrame,
    rows: Sequence[QuestionRow],
    cfg: AuditConfig,
    eval_rec: StageRecord,
) -> tuple[PairSplit, StageRecord]:
    """Stage 2 (:func:`analyses.audit.pairs.split_pairs`)."""
    key = {"eval": eval_rec.digest, "family": cfg.family, "seed": cfg.seed, "max_pairs": cfg.max_pairs,
           "max_others": cfg.max_others}  # fmt: skip
    holder: dict[str, PairSplit] = {}

    def compute(tmp: Path) -> dict[str, Any]:
        holder["split"] = split = split_pairs(
            preds, rows, cfg.family, cfg.seed, cfg.max_pairs, cfg.max_others
        )
        split.save(tmp)
        return split.summary()

    rec = folder.run("pairs", key, compute)
    return holder.get("split") or PairSplit.load(folder.stage_dir("pairs"), rows), rec


class PairRuns:
    """(clean, corrupt) batches of the selection, scoring and other pairs, each built on first use (a stage
    read back from disk needs none of them); ``others`` is ``None`` when there are no other pairs."""

    def __init__(self, adapter: VLMAdapter, split: PairSplit, images: ImageSource) -> None:
        self.adapter, self.split, self.images = adapter, split, images
        self._built: dict[str, Any] = {}

    def _get(self, name: str) -> Any:
        from analyses.eval.pairs import pair_batches

        if name not in self._built:
            pairs = getattr(self.split, name)
            self._built[name] = pair_batches(self.adapter, pairs, self.images) if pairs else None
        return self._built[name]

    def __getitem__(self, name: str) -> Any:
        if name not in ("selection", "scoring", "others"):
            raise KeyError(f"{name!r}: the pair sets are selection, scoring and others")
        return self._get(name)


def pair_runs(adapter: VLMAdapter, split: PairSplit, images: ImageSource) -> PairRuns:
    """The batches of a split's pair sets, built lazily (:class:`PairRuns`)."""
    return PairRuns(adapter, split, images)


def stage_localize(
    folder: AuditFolder,
    adapter: VLMAdapter,
    runs: PairRuns,
    cfg: LocalizeConfig,
    pairs_rec: StageRecord,
    model: dict[str, Any],
) -> tuple[Localization, StageRecord]:
    """Stage 3 (:func:`analyses.audit.localize.localize`)."""
    key = {"pairs": pairs_rec.digest, "model": model, "config": _settings(cfg)}
    holder: dict[str, Localization] = {}

    def compute(tmp: Path) -> dict[str, Any]:
        holder["loc"] = loc = localize(adapter, runs["selection"], runs["scoring"], cfg)
        loc.save(tmp)
        return loc.summary()

    rec = folder.run("localize", key, compute)
    return holder.get("loc") or Localization.load(folder.stage_dir("localize")), rec


def stage_features(
    folder: AuditFolder,
    adapter: VLMAdapter,
    runs: PairRuns,
    loc: Localization,
    cfg: FeaturesConfig,
    train_rows: Sequence[QuestionRow],
    images: ImageSource,
    loc_rec: StageRecord,
    model: dict[str, Any],
) -> tuple[FeatureResult, StageRecord]:
    """Stage 4 (:mod:`analyses.audit.features`)."""
    source = dataset_hash(train_rows) if cfg.sae == TRAIN else digest_folder(Path(cfg.sae))
    key = {"localize": loc_rec.digest, "model": model, "config": asdict(cfg), "sae_source": source}
    holder: dict[str, FeatureResult] = {}

    def compute(tmp: Path) -> dict[str, Any]:
        sae, record = get_sae(adapter, cfg, loc.residual_site, train_rows, images, tmp, folder.progress)
        holder["res"] = res = score_features(
            adapter, sae, runs["selection"], runs["scoring"], runs["others"], record, cfg
        )
        res.save(tmp)
        return res.summary()

    rec = folder.run("features", key, compute)
    return holder.get("res") or FeatureResult.load(folder.stage_dir("features")), rec


def stage_lora(
    folder: AuditFolder,
    adapter: VLMAdapter,
    loc: Localization,
    split: PairSplit,
    cfg: AuditConfig,
    train_rows: Sequence[QuestionRow],
    test_rows: Sequence[QuestionRow],
    images: ImageSource,
    loc_rec: StageRecord,
) -> tuple[dict[str, Any], LoraCheck | None, StageRecord]:
    """Stage 5 (:mod:`analyses.audit.lora`)."""
    check = cfg.lora_check
    key = {"localize": loc_rec.digest, "check": None if check is None else asdict(check),
           "train_rows": dataset_hash(train_rows) if check else None, "eval": asdict(cfg.eval) if check else None,
           "rule": asdict(cfg.rule) if check else None, "family": split.family}  # fmt: skip
    holder: dict[str, Any] = {}

    def compute(tmp: Path) -> dict[str, Any]:
        holder["rec"] = r = recommend(loc, adapter.n_layers)
        (tmp / "recommendation.json").write_text(json.dumps(r, indent=1, default=float))
        if check is not None:
            holder["check"] = c = lora_check(adapter, r["arms"], train_rows, test_rows, images, split.family, tmp,
                                             check, cfg.eval, cfg.rule, folder.progress)  # fmt: skip
            c.save(tmp)
            r = {**r, "check": c.verdict(), "beats_control": c.beats}
        return r

    rec = folder.run("lora", key, compute)
    d = folder.stage_dir("lora")
    r = holder.get("rec") or json.loads((d / "recommendation.json").read_text())
    c = holder.get("check") or (LoraCheck.load(d) if (d / "check.json").is_file() else None)
    return r, c, rec


@dataclass
class AuditResult:
    """What :func:`run_audit` computed (``None`` for stages not run)."""

    out: Path
    predictions: pd.DataFrame
    records: dict[str, StageRecord]
    split: PairSplit | None = None
    localization: Localization | None = None
    features: FeatureResult | None = None
    recommendation: dict[str, Any] | None = None
    check: LoraCheck | None = None
    report: Path | None = None

    @property
    def seconds(self) -> dict[str, float]:
        return {k: r.seconds for k, r in self.records.items()}


def run_audit(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    out: Path | str,
    config: AuditConfig | None = None,
    *,
    train_rows: Sequence[QuestionRow] = (),
    from_run: Path | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    title: str = "",
    data_name: str | None = None,
    skipped: Sequence[Any] = (),
) -> AuditResult:
    """Run (or resume) the audit into ``out`` up to ``config.until`` (module doc)."""
    from analyses.audit.report import stage_report

    cfg = config or AuditConfig()
    if cfg.needs_train_rows and not train_rows:
        raise ValueError(
            "--sae train and --lora-check need training rows (the data's train split): none were given"
        )
    folder = AuditFolder(out, overwrite=overwrite, progress=progress)
    until = STAGES.index(cfg.until)
    with folder.hold():
        preds, rec = stage_eval(
            folder, adapter, rows, images, cfg.eval, Path(from_run) if from_run else None, skipped
        )
        result = AuditResult(Path(out), preds, {"eval": rec})
        if until < 1:
            return result
        result.split, result.records["pairs"] = stage_pairs(folder, preds, rows, cfg, rec)
        if until < 2:
            return result
        model = model_key(adapter, rec)
        runs = pair_runs(adapter, result.split, images)
        with reuse_features(adapter):  # every stage below patches the same pairs: each image encoded once
            result.localization, result.records["localize"] = stage_localize(
                folder,
                adapter,
                runs,
                replace(cfg.localize, progress=progress),
                result.records["pairs"],
                model,
            )
            loc_rec = result.records["localize"]
            if until >= 3 and cfg.features is not None:
                result.features, result.records["features"] = stage_features(
                    folder,
                    adapter,
                    runs,
                    result.localization,
                    cfg.features,
                    train_rows,
                    images,
                    loc_rec,
                    model,
                )
        if until >= 4:
            result.recommendation, result.check, result.records["lora"] = stage_lora(
                folder, adapter, result.localization, result.split, cfg, train_rows, rows, images, loc_rec
            )
        if until >= 5:
            result.report, result.records["report"] = stage_report(
                folder, result, cfg, images, title, data_name
            )
    return result
