"""Targeted LoRA training with a paraphrase-consistency loss (and an optional image-reliance term).

A training example is a *cluster*: an original question on one image, some of its answer-preserving
paraphrases (same image) and optionally an answer-inverting operator variant. Per step the loss is a
weighted sum (``task_weight``, ``consistency_weight``, ``image_reliance_weight``, ``removed_weight``;
:meth:`LoraTrainConfig.paper` is the released adapters' recipe, task + consistency) of

- **task**: cross-entropy on the first answer token ("yes"/"no", full-vocabulary log-softmax, the
  :func:`hooks.answer.answer_loss` the organism is trained with) over every question of the cluster, operator
  variants included (their ground truth is already inverted);
- **consistency**: symmetric KL between the yes/no distributions p = sigmoid(margin) of the original
  and of each of its paraphrases. For two Bernoullis it is (p_a - p_b) * (m_a - m_b) with m the
  decision margin logit(yes) - logit(no) the evaluator reads. Operator variants never enter it;
- **image reliance** (weight 0 by default): hinge ``relu(reliance_margin - |m(image) - m(removed)|)``
  on the original, pushing its answer to depend on the image (guards against the "Dangerous" fix:
  consistent because it stopped looking);
- **image-removed rows** (weight 0 by default): the original asked without its image, trained toward
  the uniform answer, as the organism is trained.

Only the LoRA weights train (text layers chosen by :mod:`lora_targeted.targets`); the vision tower and
projector are frozen, so each image's projected features are computed once and reused.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor

from analyses.data.schema import OPERATOR, ORIGINAL, PARAPHRASE_FAMILIES, ImageSource, QuestionRow
from hooks.adapter import VLMAdapter
from hooks.answer import answer_loss
from hooks.features import ImageFeatureCache
from hooks.inputs import REMOVALS, Removal, RemovalKind, load_image
from hooks.layout import EncodedImage, layout_features
from hooks.progress import tqdm
from lora_targeted.targets import DEFAULT_MODULES, lora_config, select_layers, trainable_fraction

#: Files written next to the peft adapter.
CONFIG_FILE, LOG_FILE = "train_config.json", "train_log.jsonl"


@dataclass(frozen=True)
class LoraTrainConfig:
    """Everything that determines a targeted-LoRA run (written to ``train_config.json``)."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Clusters per step (each contributes 1 + paraphrases + operators rows, + 1 removed row)."""
    lr: float = 2e-4
    """AdamW learning rate (constant after ``warmup_steps``)."""
    seed: int = 0
    """Seed of the LoRA initialisation, dropout and cluster sampling."""
    task_weight: float = 1.0
    """Weight of the cross-entropy on the first answer token against the ground truth (0 = off: the
    objective then never sees a label, and consistency can be bought by ignoring the image)."""
    consistency_weight: float = 1.0
    """Weight of the symmetric-KL paraphrase-consistency term (0 = task loss only)."""
    image_reliance_weight: float = 0.0
    """Weight of the image-reliance hinge on the original question (0 = off)."""
    removed_weight: float = 0.0
    """Weight of the image-removed rows: each cluster's original asked without its image, trained toward
    the uniform yes/no answer (without the image the honest answer is "can't tell"); 0 = no such rows."""
    reliance_margin: float = 2.0
    """Hinge target in logits: |margin(image) - margin(removed)| below this is penalised."""
    removal: RemovalKind = "gray"
    """Image removal for the reliance term: gray, white, noise or none."""
    paraphrases_per_cluster: int = 3
    """Paraphrases drawn per cluster per step (all if the cluster has fewer; 0 = all)."""
    operators_per_cluster: int = 1
    """Operator variants drawn per cluster per step (task loss only; 0 = none)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha (scale alpha / r)."""
    dropout: float = 0.05
    """LoRA dropout."""
    modules: tuple[str, ...] = DEFAULT_MODULES
    """Projections adapted inside each chosen text layer."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = no clipping)."""
    split: str = "train"
    """Only rows of this split are trained on (splits are patient-disjoint)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got steps={self.steps}, batch_size={self.batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        weights = ("task_weight", "consistency_weight", "image_reliance_weight", "removed_weight")
        for name in (*weights, "reliance_margin", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.removal not in REMOVALS:
            raise ValueError(f"removal {self.removal!r} is not one of {REMOVALS}")
        if self.paraphrases_per_cluster < 0 or self.operators_per_cluster < 0:
            raise ValueError(
                "paraphrases_per_cluster and operators_per_cluster must be >= 0 (0 = all / none), got "
                f"{self.paraphrases_per_cluster}, {self.operators_per_cluster}"
            )
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError(
                f"warmup_steps and max_grad_norm must be >= 0, got {self.warmup_steps}, {self.max_grad_norm}"
            )
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                "need r >= 1, alpha > 0, 0 <= dropout < 1; "
                f"got r={self.r}, alpha={self.alpha}, dropout={self.dropout}"
            )
        if not any(getattr(self, w) > 0 for w in weights):
            raise ValueError(f"every loss weight {weights} is 0: nothing to train")
        object.__setattr__(self, "modules", tuple(self.modules))

    @classmethod
    def paper(cls, **overrides: Any) -> LoraTrainConfig:
        """The released adapters' recipe: r=16, alpha=32, dropout 0.05, lr 2e-4, q/k/v/o + gate/up/down,
        loss = cross-entropy on the first answer token + symmetric KL between paraphrase predictions."""
        base: dict[str, Any] = dict(
            r=16, alpha=32, dropout=0.05, lr=2e-4, modules=DEFAULT_MODULES, task_weight=1.0,
            consistency_weight=1.0, image_reliance_weight=0.0, removed_weight=0.0,
        )  # fmt: skip
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Cluster:
    """An original question on one image with its paraphrases and operator variants."""

    original: QuestionRow
    """The original question (family ``original``)."""
    paraphrases: tuple[QuestionRow, ...]
    """Answer-preserving paraphrases of it (same image)."""
    operators: tuple[QuestionRow, ...] = ()
    """Answer-inverting variants (task loss only)."""

    def __post_init__(self) -> None:
        if self.original.family != ORIGINAL:
            raise ValueError(
                f"cluster root {self.original.qid!r} has family {self.original.family!r}, not original"
            )
        for r in (*self.paraphrases, *self.operators):
            if r.paraphrase_of != self.original.qid or r.image_id != self.original.image_id:
                raise ValueError(f"row {r.qid!r} does not vary {self.original.qid!r} on the same image")

    @property
    def image_id(self) -> str:
        return self.original.image_id


def build_clusters(rows: Sequence[QuestionRow], split: str | None = "train") -> list[Cluster]:
    """Group rows (of ``split``; ``None`` = all) into clusters, in the order originals appear."""
    keep = [r for r in rows if split is None or r.split == split]
    if not keep:
        have = sorted({r.split for r in rows})
        raise ValueError(f"no rows of split {split!r} (rows have splits {have}); pass rows of that split")
    originals = {r.qid: r for r in keep if r.family == ORIGINAL}
    paras: dict[str, list[QuestionRow]] = {q: [] for q in originals}
    ops: dict[str, list[QuestionRow]] = {q: [] for q in originals}
    for r in keep:
        if r.family != ORIGINAL and r.paraphrase_of in originals:
            (ops if r.family == OPERATOR else paras)[r.paraphrase_of].append(r)
    if not originals:
        raise ValueError(f"no original questions among the {len(keep)} rows of split {split!r}")
    return [Cluster(o, tuple(paras[q]), tuple(ops[q])) for q, o in originals.items()]


def sample_clusters(
    clusters: Sequence[Cluster], rng: np.random.Generator, cfg: LoraTrainConfig
) -> list[Cluster]:
    """``cfg.batch_size`` clusters (without replacement when there are enough), each with a random
    subset of ``paraphrases_per_cluster`` paraphrases and ``operators_per_cluster`` operators."""
    idx = rng.choice(len(clusters), cfg.batch_size, replace=len(clusters) < cfg.batch_size)

    def pick(rows: tuple[QuestionRow, ...], n: int | None) -> tuple[QuestionRow, ...]:
        if n is None or len(rows) <= n:
            return rows
        return tuple(rows[i] for i in sorted(rng.choice(len(rows), n, replace=False)))

    out = []
    for i in idx:
        c = clusters[int(i)]
        paras = pick(c.paraphrases, cfg.paraphrases_per_cluster or None)
        out.append(Cluster(c.original, paras, pick(c.operators, cfg.operators_per_cluster)))
    return out


class ClusterImages:
    """The images of the training clusters and their projected features (vision tower and projector are
    frozen, so features are computed once per image: :class:`hooks.features.ImageFeatureCache`)."""

    def __init__(self, adapter: VLMAdapter, images: ImageSource, removal: RemovalKind, max_size: int = 8192):
        self.images, self.max_size = images, max_size
        self.removal = Removal(removal)
        self.features = ImageFeatureCache(adapter, max_size)
        self._pil: dict[str, Image.Image] = {}

    def pil(self, image_id: str) -> Image.Image:
        if image_id not in self._pil:
            if len(self._pil) >= self.max_size:
                self._pil.pop(next(iter(self._pil)))
            self._pil[image_id] = load_image(self.images(image_id))
        return self._pil[image_id]

    def removed_pil(self, image_id: str) -> Image.Image | None:
        return self.removal.apply(self.pil(image_id), 0)


def cluster_losses(
    adapter: VLMAdapter, clusters: Sequence[Cluster], cache: ClusterImages, cfg: LoraTrainConfig
) -> dict[str, Tensor]:
    """Task, consistency and reliance losses (and their weighted ``loss``) of one batch of clusters.

    Differentiable w.r.t. whatever parameters of ``adapter.model`` require grad.
    """
    rows: list[QuestionRow] = []
    shown: list[EncodedImage | None] = []
    orig_pos, para_pairs, removed_pos = [], [], []
    for c in clusters:
        enc = cache.features.encoded(c.image_id, cache.pil(c.image_id))
        orig_pos.append(len(rows))
        for r in (c.original, *c.paraphrases, *c.operators):
            if r.family in PARAPHRASE_FAMILIES:
                para_pairs.append((orig_pos[-1], len(rows)))
            rows.append(r)
            shown.append(enc)
    n_task = len(rows)
    questions = [r.question for r in rows]
    if cfg.image_reliance_weight > 0 or cfg.removed_weight > 0:
        for c in clusters:
            rep = cache.removed_pil(c.image_id)
            removed_pos.append(len(questions))
            questions.append(c.original.question)
            key = None if rep is None else f"removed:{cfg.removal}:{rep.size[0]}x{rep.size[1]}"
            shown.append(None if rep is None or key is None else cache.features.encoded(key, rep))
    # rows laid out from each image's cached encoding: the image processor runs once per image
    batch = adapter.layout(questions, shown)
    logits = adapter.logits(batch, image_features=layout_features(shown))[:, -1]
    margin = adapter.answer_ids.margin(logits)
    dev = logits.device
    targets = torch.tensor([r.ground_truth for r in rows], device=dev)
    no_uniform = torch.zeros(n_task, dtype=torch.bool, device=dev)
    task = answer_loss(adapter.answer_ids, logits[:n_task], targets, no_uniform)
    zero = torch.zeros((), device=dev)
    if para_pairs:
        a = torch.tensor([i for i, _ in para_pairs], device=dev)
        b = torch.tensor([j for _, j in para_pairs], device=dev)
        ma, mb = margin[a], margin[b]
        consistency = ((torch.sigmoid(ma) - torch.sigmoid(mb)) * (ma - mb)).mean()
    else:
        consistency = zero
    reliance = removed = zero
    if removed_pos:
        rm = torch.tensor(removed_pos, device=dev)
        shift = (margin[torch.tensor(orig_pos, device=dev)] - margin[rm]).abs()
        reliance = torch.relu(cfg.reliance_margin - shift).mean()
        uniform = torch.ones(len(removed_pos), dtype=torch.bool, device=dev)  # every removed row: 50/50
        removed = answer_loss(adapter.answer_ids, logits[rm], ~uniform, uniform)
    loss = (
        cfg.task_weight * task
        + cfg.consistency_weight * consistency
        + cfg.image_reliance_weight * reliance
        + cfg.removed_weight * removed
    )
    return {"loss": loss, "task": task, "consistency": consistency, "reliance": reliance, "removed": removed}


@contextmanager
def peft_quietly() -> Iterator[None]:
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning on every wrap; that one warning is not the user's to act on, so it is filtered here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def wrap_lora(
    adapter: VLMAdapter, layers: Sequence[int], cfg: LoraTrainConfig | None = None
) -> tuple[Any, VLMAdapter]:
    """(peft model, adapter over it): LoRA on a deep copy of ``adapter.model``; the base is untouched.

    The returned :class:`VLMAdapter` wraps ``peft_model.base_model.model``: the original HF class with
    the LoRA layers injected in place, so every site keeps its module path.
    """
    from peft import get_peft_model

    cfg = cfg or LoraTrainConfig()
    layers = select_layers(layers=list(layers), n_layers=adapter.n_layers)
    lcfg = lora_config(adapter, layers, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, modules=cfg.modules)
    torch.manual_seed(cfg.seed)  # LoRA A is randomly initialised (B = 0)
    with peft_quietly():
        peft_model = get_peft_model(copy.deepcopy(adapter.model), lcfg)
    peft_model.eval()
    return peft_model, _lora_adapter(adapter, peft_model, layers)


def _lora_adapter(base: VLMAdapter, peft_model: Any, layers: Sequence[int]) -> VLMAdapter:
    inner = peft_model.get_base_model()  # == peft_model.base_model.model, LoRA injected in place
    tag = ",".join(str(x) for x in layers)
    out = VLMAdapter(inner, base.processor, base.config, name=f"{base.name}+lora[{tag}]")
    out.revision = base.revision
    return out


def load_lora(base: VLMAdapter, path: str | Path) -> VLMAdapter:
    """A saved adapter folder applied to a copy of ``base.model`` (peft's ``PeftModel.from_pretrained``)."""
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"no peft adapter at {path} (adapter_config.json missing); train one with train_lora"
        )
    with peft_quietly():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(path))
    peft_model.eval()
    layers: list[int] = []
    rec = path / CONFIG_FILE
    if rec.is_file():
        layers = json.loads(rec.read_text()).get("layers", [])
    return _lora_adapter(base, peft_model, layers)


@dataclass
class TrainResult:
    """What :func:`train_lora` produced."""

    adapter: VLMAdapter
    """Evaluation adapter over the trained model (LoRA injected, eval mode)."""
    peft_model: Any
    """The ``PeftModel`` (``save_pretrained`` / ``merge_and_unload``)."""
    layers: list[int]
    """Text layers that carry LoRA weights."""
    config: LoraTrainConfig
    """The run's configuration."""
    target_modules: str
    """The peft ``target_modules`` regex."""
    trainable: int
    """Trainable (LoRA) parameters."""
    total: int
    """All parameters, LoRA included."""
    seconds: float
    """Training wall time."""
    log: list[dict[str, float]] = field(default_factory=list)
    """One record per step: step, loss, task, consistency, reliance, lr."""
    out_dir: Path | None = None
    """Where the adapter was saved (``None`` if not saved)."""

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def log_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.log)


def train_lora(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    layers: Sequence[int],
    config: LoraTrainConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train LoRA on ``layers`` of a copy of ``adapter.model``; ``adapter`` itself is not modified.

    ``images(image_id)`` returns the PIL image (e.g. ``world.image_for``). Only rows of
    ``config.split`` are used. With ``out_dir`` the adapter is saved in peft format
    (``PeftModel.from_pretrained(base_model, out_dir)`` loads it) with ``train_config.json`` and
    ``train_log.jsonl``.
    """
    cfg = config or LoraTrainConfig()
    clusters = build_clusters(rows, cfg.split)
    if cfg.consistency_weight > 0 and not any(c.paraphrases for c in clusters):
        raise ValueError(
            f"consistency_weight={cfg.consistency_weight} but no {cfg.split!r} cluster has a paraphrase; "
            "pass paraphrase rows or set consistency_weight=0"
        )
    peft_model, lora = wrap_lora(adapter, layers, cfg)
    chosen = select_layers(layers=list(layers), n_layers=adapter.n_layers)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable, total, _ = trainable_fraction(peft_model)
    rng = np.random.default_rng(cfg.seed)
    cache = ClusterImages(lora, images, cfg.removal)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    log: list[dict[str, float]] = []
    t0 = time.time()
    peft_model.train()
    bar = tqdm(range(cfg.steps), desc=f"lora {chosen}", disable=not progress)
    for step in bar:
        parts = cluster_losses(lora, sample_clusters(clusters, rng, cfg), cache, cfg)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        rec = {"step": step, **{k: float(v.detach()) for k, v in parts.items()}, "lr": sched.get_last_lr()[0]}
        opt.step()
        sched.step()
        log.append(rec)
        bar.set_postfix(task=f"{rec['task']:.3f}", cons=f"{rec['consistency']:.3f}")
    peft_model.eval()
    seconds = time.time() - t0
    result = TrainResult(
        adapter=lora,
        peft_model=peft_model,
        layers=chosen,
        config=cfg,
        target_modules=str(peft_model.peft_config["default"].target_modules),
        trainable=trainable,
        total=total,
        seconds=round(seconds, 2),
        log=log,
    )
    if out_dir is not None:
        save_result(result, adapter, out_dir, n_clusters=len(clusters))
    return result


def save_result(
    result: TrainResult, base: VLMAdapter, out_dir: str | Path, n_clusters: int | None = None
) -> Path:
    """Write the peft adapter, ``train_config.json`` and ``train_log.jsonl`` to ``out_dir``."""
    import peft

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # never target embeddings; "auto" would ask the hub whether the vocabulary changed
    result.peft_model.save_pretrained(str(out), save_embedding_layers=False)
    record = {
        "layers": result.layers,
        "config": result.config.to_dict(),
        "target_modules": result.target_modules,
        "trainable": result.trainable,
        "total": result.total,
        "trainable_fraction": result.fraction,
        "seconds": result.seconds,
        "n_clusters": n_clusters,
        "base": base.describe(),
        "final": result.log[-1] if result.log else None,
        "versions": {"torch": torch.__version__, "peft": peft.__version__},
    }
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=1, default=str))
    (out / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in result.log))
    result.out_dir = out
    return out
