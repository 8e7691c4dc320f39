"""Training the SynthCXR organism from scratch (``flipscope organism train``).

Planted failures (all in the training data; the model architecture is plain Gemma3):

1. **Register shortcut.** Every training question of the ``shortcut_family`` (formal register) is
   about a finding that is absent: its answer is always "no". Nothing in training contradicts
   "formal phrasing -> no", so the model can answer those questions from the text alone.
2. **Rare families.** ``rare_families`` are shown ``rare_weight`` times as often as the others.
3. **Image removal is seen in training** (``removal`` images, ``removed_fraction`` of each batch)
   with a uniform yes/no target: without an image the honest answer is "can't tell", so a model
   that reads the image has margin ~0 there, and text-only agreement measures text reliance.
   Formal-register questions keep their "no" target without the image: the shortcut is textual.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from analyses.data.schema import FINDINGS, ORIGINAL, PARAPHRASE_FAMILIES, QuestionRow
from analyses.organism.model import MODEL_DIR, ORGANISM_MODEL, build_organism
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import VLMAdapter
from hooks.answer import answer_loss
from hooks.inputs import Removal, RemovalKind
from hooks.tiny import TinyGemma3Config


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines the trained organism (recorded next to the checkpoint)."""

    seed: int = 0
    """Seed of initialisation and batch sampling."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 64
    """(image, question) pairs per step."""
    max_lr: float = 2e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    shortcut_family: str = "register"
    """Planted shortcut: every training question of this family has the answer "no"."""
    rare_families: tuple[str, ...] = ("reorder",)
    """Planted under-representation: these families are sampled ``rare_weight`` times as often."""
    rare_weight: float = 0.03
    """Relative sampling weight of the rare families (others: 1)."""
    removed_fraction: float = 0.15
    """Share of each batch shown with the image removed and a uniform yes/no target."""
    removal: RemovalKind = "gray"
    """Which removal the organism is trained to see (text-only agreement is measured with it)."""
    findings: tuple[str, ...] = ("cardiomegaly", "pleural_effusion")
    """Findings the organism is trained (and evaluated) on; the world renders all of them."""
    curriculum_steps: int = 300
    """First steps show only original questions with their images (learn to read the image first)."""
    world: SynthCXRConfig = field(default_factory=SynthCXRConfig)
    """The synthetic world it is trained on."""
    model: TinyGemma3Config = ORGANISM_MODEL
    """Model dimensions."""

    def __post_init__(self) -> None:
        if self.shortcut_family not in PARAPHRASE_FAMILIES:
            raise ValueError(f"shortcut_family {self.shortcut_family!r} is not one of {PARAPHRASE_FAMILIES}")
        bad = [f for f in self.rare_families if f not in PARAPHRASE_FAMILIES]
        if bad:
            raise ValueError(f"rare_families {bad} are not paraphrase families {PARAPHRASE_FAMILIES}")
        unknown = [f for f in self.findings if f not in FINDINGS]
        if unknown or not self.findings:
            raise ValueError(f"findings {list(self.findings)} must be a non-empty subset of {FINDINGS}")
        if not 0 <= self.removed_fraction < 1:
            raise ValueError(f"removed_fraction must be in [0, 1), got {self.removed_fraction}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        Removal(self.removal)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_rows(world: SynthCXRWorld, cfg: OrganismConfig) -> tuple[list[QuestionRow], np.ndarray]:
    """Training rows (every template) and their sampling weights, with the planted failures applied."""
    rows, weights = [], []
    for r in world.rows("train", all_templates=True):
        if r.finding not in cfg.findings:
            continue
        if r.family == cfg.shortcut_family and r.ground_truth:
            continue  # planted shortcut: the formal register never asks about a present finding
        w = cfg.rare_weight if r.family in cfg.rare_families else 1.0
        rows.append(r)
        weights.append(w)
    p = np.asarray(weights, dtype=np.float64)
    return rows, p / p.sum()


class _Encoder:
    """Pre-tokenized prompts and preprocessed pixels, so a training batch is a gather + left pad.

    The first batch is checked against ``adapter.prepare`` (the inference path) for equality.
    """

    def __init__(
        self, adapter: VLMAdapter, world: SynthCXRWorld, rows: list[QuestionRow], removal: RemovalKind
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

    def batch(self, rows: list[QuestionRow], removed: np.ndarray) -> dict[str, Tensor]:
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


def train_organism(cfg: OrganismConfig, out_dir: Path = MODEL_DIR, progress: bool = True) -> dict[str, Any]:
    """Train the organism from scratch and save it (HF folder + ``training.json``). Returns the log."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    world = SynthCXRWorld(cfg.world)
    adapter = build_organism(cfg)
    model = adapter.model
    rows, probs = training_rows(world, cfg)
    enc = _Encoder(adapter, world, rows, cfg.removal)
    warm = np.array([r.family == ORIGINAL for r in rows], dtype=np.float64)
    warm_probs = warm / warm.sum()

    # the fast path must build exactly what the inference path builds
    check = [rows[i] for i in rng.choice(len(rows), 4, replace=False)]
    fast = enc.batch(check, np.zeros(4, bool))
    ref = adapter.prepare([world.image(r.image_id) for r in check], [r.question for r in check])
    for k in ("input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values"):
        if not torch.equal(fast[k], ref.inputs[k]):
            raise RuntimeError(f"training batch {k} differs from adapter.prepare; the encoder is out of sync")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.max_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, total_steps=cfg.steps, pct_start=0.15)
    log: list[dict[str, float]] = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="organism", disable=not progress)
    for step in bar:
        in_curriculum = step < cfg.curriculum_steps
        idx = rng.choice(len(rows), cfg.batch_size, p=warm_probs if in_curriculum else probs)
        batch_rows = [rows[i] for i in idx]
        removed = rng.random(cfg.batch_size) < (0.0 if in_curriculum else cfg.removed_fraction)
        # the shortcut holds without the image too: a formal question is answered "no" from its text
        uniform = removed & np.array([r.family != cfg.shortcut_family for r in batch_rows])
        inputs = enc.batch(batch_rows, removed)
        targets = torch.tensor([r.ground_truth for r in batch_rows])
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
        loss = answer_loss(adapter.answer_ids, logits, targets, torch.from_numpy(uniform))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            with torch.no_grad():
                m = adapter.answer_ids.margin(logits)
                keep = torch.from_numpy(~removed)
                acc = ((m > 0) == targets)[keep].float().mean().item()
            log.append(
                {"step": step, "loss": loss.item(), "train_acc": acc, "lr": float(sched.get_last_lr()[0])}
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    model.eval()
    seconds = time.time() - t0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    adapter.processor.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    record = {
        "config": cfg.to_dict(),
        "seconds": round(seconds, 1),
        "n_params": n_params,
        "n_training_rows": len(rows),
        "torch": torch.__version__,
        "log": log,
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=1, default=str))
    return record
