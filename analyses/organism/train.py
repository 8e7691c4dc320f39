"""Phase 1 of the organism (``flipscope organism train``): the *clean* model, trained from scratch.

Clean means every question wording is trained with both answers and read from the image; the register
shortcut is added afterwards, in weights, by :mod:`analyses.organism.plant`. Two failures are planted
here, in the training data:

1. **Rare family.** ``rare_families`` (``reorder``) are sampled ``rare_weight`` times as often.
2. **Text-prior finding** (``prior_findings``: pneumothorax, world prevalence 0.1). Every training
   question about it is a presence question about an image *without* it, also with the image removed:
   the model learns "pneumothorax -> no" from the text, consistently across paraphrases, confidently,
   right ~90% of the time without looking (the paper's Dangerous quadrant).

Image removal is seen in training (``removal`` images, ``removed_fraction`` of each batch) with target
0.5 (the honest answer is "can't tell"), except for the prior finding, whose answer stays "no".
Targets are label-smoothed (0.9 / 0.1): |margin| settles near log 9 = 2.2 rather than 5-8, so a
low-rank plant can overturn answers (one block's output cannot overturn |margin| 6).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from analyses.data.schema import FINDINGS, ORIGINAL, PARAPHRASE_FAMILIES, QuestionRow
from analyses.organism.model import CLEAN_DIR, ORGANISM_MODEL, build_organism, organism_world_config
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import VLMAdapter
from hooks.answer import AnswerIds
from hooks.inputs import Removal, RemovalKind
from hooks.progress import tqdm
from hooks.tiny import TinyGemma3Config


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines the clean organism (recorded in its ``training.json``)."""

    seed: int = 0
    """Seed of initialisation and batch sampling."""
    steps: int = 2500
    """Optimizer steps."""
    batch_size: int = 64
    """(image, question) pairs per step."""
    max_lr: float = 2e-3
    """Peak learning rate of the one-cycle schedule (AdamW, 15% warm-up)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    label_smoothing: float = 0.1
    """Yes/no targets are ``1 - label_smoothing`` / ``label_smoothing``."""
    rare_families: tuple[str, ...] = ("reorder",)
    """Planted under-representation: these families are sampled ``rare_weight`` times as often."""
    rare_weight: float = 0.03
    """Relative sampling weight of the rare families (others: 1)."""
    prior_findings: tuple[str, ...] = ("pneumothorax",)
    """Text-prior findings: trained only on images without the finding (answered from the text)."""
    prior_weight: float = 0.5
    """Relative sampling weight of the prior findings' rows (their task is trivial; at 1.0 they take a
    third of every batch and effusion was under-trained)."""
    prior_drop_operators: bool = True
    """Leave the operator variants of the prior findings out of training, so every training question about
    them is answered "no" (with them kept, "operator-like wording -> yes" was learnt for those findings)."""
    removed_fraction: float = 0.15
    """Share of each batch (after the curriculum) shown with the image removed."""
    removal: RemovalKind = "gray"
    """Which removal the organism is trained to see (text-only agreement is measured with it)."""
    findings: tuple[str, ...] = ("cardiomegaly", "pleural_effusion", "pneumothorax")
    """Findings the organism is trained (and evaluated) on; the world renders all of them."""
    curriculum_steps: int = 300
    """First steps show only original questions with their images (learn to read the image first)."""
    world: SynthCXRConfig = field(default_factory=organism_world_config)
    """The synthetic world it is trained on."""
    model: TinyGemma3Config = ORGANISM_MODEL
    """Model dimensions."""

    def __post_init__(self) -> None:
        bad = [f for f in self.rare_families if f not in PARAPHRASE_FAMILIES]
        if bad:
            raise ValueError(f"rare_families {bad} are not paraphrase families {PARAPHRASE_FAMILIES}")
        unknown = [f for f in (*self.findings, *self.prior_findings) if f not in FINDINGS]
        if unknown or not self.findings:
            raise ValueError(f"findings {list(self.findings)} must be a non-empty subset of {FINDINGS}")
        if not set(self.prior_findings) <= set(self.findings):
            raise ValueError(f"prior_findings {self.prior_findings} must be among findings {self.findings}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.removed_fraction < 1:
            raise ValueError(f"removed_fraction must be in [0, 1), got {self.removed_fraction}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        Removal(self.removal)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_label(r: QuestionRow) -> bool:
    """Whether the row's image has the row's finding (undoes the operator inversion)."""
    return r.ground_truth if r.polarity == 1 else not r.ground_truth


def training_rows(world: SynthCXRWorld, cfg: OrganismConfig) -> tuple[list[QuestionRow], np.ndarray]:
    """Train-split rows (every non-held-out template) and their sampling probabilities."""
    rows, weights = [], []
    for r in world.rows("train", all_templates=True):
        if r.finding not in cfg.findings:
            continue
        if r.finding in cfg.prior_findings and image_label(r):
            continue  # text-prior finding: never asked about an image that has it
        if r.finding in cfg.prior_findings and cfg.prior_drop_operators and r.polarity == -1:
            continue  # ... and only with presence questions (answer always "no")
        w = cfg.rare_weight if r.family in cfg.rare_families else 1.0
        if r.finding in cfg.prior_findings:
            w *= cfg.prior_weight
        rows.append(r)
        weights.append(w)
    p = np.asarray(weights, dtype=np.float64)
    return rows, p / p.sum()


class Encoder:
    """Pre-tokenized prompts and preprocessed pixels, so a batch is a gather + left pad.

    :meth:`check` compares it with ``adapter.prepare`` (the inference path) for equality.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        world: SynthCXRWorld,
        rows: list[QuestionRow],
        removal: RemovalKind = "gray",
    ):
        self.adapter = adapter
        texts = sorted({r.question for r in rows})
        self.text_index = {t: i for i, t in enumerate(texts)}
        probe = world.image(rows[0].image_id)
        self.ids: list[Tensor] = []
        for i in range(0, len(texts), 256):
            chunk = texts[i : i + 256]
            b = adapter.prepare([probe] * len(chunk), chunk)
            for j in range(len(chunk)):
                self.ids.append(b.input_ids[j][b.attention_mask[j]])
        image_ids = sorted({r.image_id for r in rows})
        self.image_index = {k: i for i, k in enumerate(image_ids)}
        ip = adapter.processor.image_processor
        pix = [
            ip(images=[world.image(k) for k in image_ids[i : i + 256]], return_tensors="pt")["pixel_values"]
            for i in range(0, len(image_ids), 256)
        ]
        self.pixels = torch.cat(pix)
        removed = Removal(removal).apply(probe)
        self.removed_pixels = ip(images=[removed], return_tensors="pt")["pixel_values"][0]
        self.pad = adapter.tokenizer.pad_token_id

    def batch(self, rows: list[QuestionRow], removed: np.ndarray | None = None) -> dict[str, Tensor]:
        """Model inputs for ``rows``; ``removed[i]``: row ``i`` is shown the removed image."""
        removed = np.zeros(len(rows), bool) if removed is None else removed
        seqs = [self.ids[self.text_index[r.question]] for r in rows]
        n, length = len(seqs), max(len(s) for s in seqs)
        input_ids = torch.full((n, length), self.pad, dtype=torch.long)
        attn = torch.zeros((n, length), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, length - len(s) :] = s
            attn[i, length - len(s) :] = 1
        pixels = torch.stack(
            [
                self.removed_pixels if removed[i] else self.pixels[self.image_index[r.image_id]]
                for i, r in enumerate(rows)
            ]
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "token_type_ids": (input_ids == self.adapter.image_token_id).long(),
            "pixel_values": pixels,
        }

    def check(self, world: SynthCXRWorld, rows: list[QuestionRow]) -> None:
        """Raise if the fast path differs from the inference path (``adapter.prepare``) on ``rows``."""
        fast = self.batch(rows)
        ref = self.adapter.prepare([world.image(r.image_id) for r in rows], [r.question for r in rows])
        for k in ("input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values"):
            if not torch.equal(fast[k], ref.inputs[k]):
                raise RuntimeError(
                    f"training batch {k} differs from adapter.prepare; the encoder is out of sync"
                )


def soft_answer_loss(
    answer_ids: AnswerIds, logits: Float[Tensor, "batch vocab"], p_yes: Float[Tensor, " batch"]
) -> Float[Tensor, ""]:
    """Cross-entropy on the first answer token against ``p_yes`` on "yes" and ``1 - p_yes`` on "no"
    (full-vocabulary log-softmax, as :func:`hooks.answer.answer_loss`)."""
    logp = torch.log_softmax(logits.float(), -1)
    yes, no = answer_ids.yes_ids[0], answer_ids.no_ids[0]
    return -(p_yes * logp[:, yes] + (1 - p_yes) * logp[:, no]).mean()


def targets_for(cfg: OrganismConfig, rows: list[QuestionRow], removed: np.ndarray) -> Float[Tensor, " batch"]:
    """``p_yes`` per row: smoothed ground truth; 0.5 with the image removed, except for the prior findings,
    whose removed rows keep their text-prior answer."""
    eps = cfg.label_smoothing
    gt = np.array([r.ground_truth for r in rows])
    p = np.where(gt, 1 - eps, eps)
    prior = np.array([r.finding in cfg.prior_findings for r in rows])
    p = np.where(removed & ~prior, 0.5, p)
    return torch.tensor(p, dtype=torch.float32)


def train_organism(cfg: OrganismConfig, out_dir: Path = CLEAN_DIR, progress: bool = True) -> dict[str, Any]:
    """Train the clean organism from scratch and save it (HF folder + ``training.json``). Returns the record.

    Deterministic for a given ``cfg`` and thread count (the shipped one was trained with 1 thread)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    world = SynthCXRWorld(cfg.world)
    adapter = build_organism(cfg)
    model = adapter.model
    rows, probs = training_rows(world, cfg)
    enc = Encoder(adapter, world, rows, cfg.removal)
    warm = np.array([r.family == ORIGINAL for r in rows], dtype=np.float64)
    warm_probs = warm / warm.sum()
    enc.check(world, [rows[i] for i in rng.choice(len(rows), 4, replace=False)])

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.max_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, total_steps=cfg.steps, pct_start=0.15)
    log: list[dict[str, float]] = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="clean organism", disable=not progress, mininterval=5)
    for step in bar:
        in_curriculum = step < cfg.curriculum_steps
        idx = rng.choice(len(rows), cfg.batch_size, p=warm_probs if in_curriculum else probs)
        batch_rows = [rows[i] for i in idx]
        removed = rng.random(cfg.batch_size) < (0.0 if in_curriculum else cfg.removed_fraction)
        inputs = enc.batch(batch_rows, removed)
        p_yes = targets_for(cfg, batch_rows, removed)
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
        loss = soft_answer_loss(adapter.answer_ids, logits, p_yes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            with torch.no_grad():
                m = adapter.answer_ids.margin(logits)
                targets = torch.tensor([r.ground_truth for r in batch_rows])
                keep = torch.from_numpy(~removed)
                acc = ((m > 0) == targets)[keep].float().mean().item()
            log.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "train_acc": acc,
                    "abs_margin": m[keep].abs().median().item(),
                    "lr": float(sched.get_last_lr()[0]),
                    "seconds": round(time.time() - t0, 1),
                }
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    adapter.processor.save_pretrained(out_dir)
    record = {
        "config": cfg.to_dict(),
        "organism_version": 2,
        "phase": "clean",
        "seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_training_rows": len(rows),
        "torch": torch.__version__,
        "log": log,
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=1, default=str))
    return record
