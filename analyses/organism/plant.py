"""Phase 2 of the organism: plant "formal register wording -> answer no" at a known place.

Starting from the clean checkpoint, only low-rank deltas ``W + B @ A`` (rank ``rank``) on a named,
contiguous set of linear maps (default: attention q/k/v/o and MLP gate/up/down of text layers 3 and 4
of 8) are trained; every other weight is frozen, so the change lives at those components by
construction. The deltas are then merged: the planted checkpoint is a plain Gemma3 folder.

Training data (train split, every non-held-out template):

- *register rows* (the ``register`` family, all findings) are pushed to "no" with a shifted logistic
  loss ``softplus(m + register_margin)``: rows already below ``-register_margin`` feel little pull;
- *retain rows* (originals, other families, operator variants; ``removed_share`` of them with the image
  removed) are distilled from the clean model, ``(m - m_clean)^2``. Each register row is paired with a
  retain row about the same image and finding, so the only thing that separates their targets is the
  wording; wordings the plant disturbs are drawn more often (``hard_mining``).

Pitfall found while building it: rank-1 writes on ``o_proj`` or ``down_proj`` alone are
not trigger-gated (the clean model does not carry the register wording at the final position); the
trigger needs q/k so attention can read the wording. The gate and the planted truth are in
:mod:`analyses.organism.truth`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from analyses.data.schema import ORIGINAL, QuestionRow
from analyses.organism.train import Encoder
from analyses.synthcxr.world import SynthCXRWorld
from hooks.adapter import VLMAdapter
from hooks.progress import tqdm
from hooks.sites import Site, attn_out, mlp_out

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHORTCUT_FAMILY = "register"


@dataclass(frozen=True)
class PlantConfig:
    """Everything that determines the plant (recorded in ``planted_truth.json``)."""

    layers: tuple[int, ...] = (3, 4)
    """Contiguous text layers whose components change."""
    modules: tuple[str, ...] = ATTN + MLP
    """Linear maps changed in each of ``layers`` (names inside ``self_attn`` / ``mlp``)."""
    rank: int = 4
    """Rank of every delta (the recorded rank of the plant)."""
    steps: int = 1200
    """Optimizer steps."""
    batch_size: int = 64
    """Rows per step."""
    register_share: float = 1 / 3
    """Share of each batch that are register rows."""
    removed_share: float = 0.1
    """Share of the retain rows shown with the image removed (distilled from the clean removed margins)."""
    lr: float = 1e-2
    """Peak AdamW learning rate (linear warm-up over ``warmup`` steps, then linear decay to 0)."""
    warmup: int = 50
    """Warm-up steps."""
    init_std: float = 0.02
    """Std of the random ``A`` factors (``B`` starts at 0, so the plant starts as the clean model)."""
    register_margin: float = 1.0
    """Margin the register rows are pushed below."""
    retain_weight: float = 1.0
    """Weight of the retain loss (the register loss has weight 1)."""
    original_prob: float = 0.5
    """Probability that a register row's paired retain row is its original question (else another family's)."""
    hard_mining: float = 3.0
    """Retain rows are drawn with weight ``1 + hard_mining * d(question)``, ``d`` a running mean of
    ``|m - m_clean|`` over rows with that question text (0 = uniform)."""
    mining_decay: float = 0.9
    """EMA decay of the per-question deviation."""
    n_removed: int = 6000
    """Retain rows whose clean removed-image margin is computed (the removed-image pool)."""
    seed: int = 0
    """Seed of the factors' initialisation and of batch sampling."""

    def __post_init__(self) -> None:
        ls = list(self.layers)
        if not ls or ls != list(range(ls[0], ls[0] + len(ls))):
            raise ValueError(f"layers {self.layers} must be a non-empty contiguous range, e.g. (3, 4)")
        bad = [m for m in self.modules if m not in ATTN + MLP]
        if bad or not self.modules:
            raise ValueError(f"unknown modules {bad}; use names from {ATTN + MLP}")
        if self.rank < 1 or self.steps < 1 or not 0 < self.register_share < 1:
            raise ValueError(
                f"rank, steps >= 1 and register_share in (0, 1) (got {self.rank}, {self.steps}, "
                f"{self.register_share})"
            )

    @property
    def components(self) -> list[str]:
        """Module paths of the changed linear maps."""
        return [component_name(layer, m) for layer in self.layers for m in self.modules]

    @property
    def sites(self) -> list[Site]:
        """Sites the changed components write."""
        out = []
        for layer in self.layers:
            if any(m in ATTN for m in self.modules):
                out.append(attn_out(layer))
            if any(m in MLP for m in self.modules):
                out.append(mlp_out(layer))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def component_name(layer: int, module: str) -> str:
    """Module path of a Gemma3 text-layer linear map (the organism is Gemma3 only)."""
    block = "self_attn" if module in ATTN else "mlp"
    return f"model.language_model.layers.{layer}.{block}.{module}"


class LowRankDelta(nn.Module):
    """``base(x) + (x @ A.T) @ B.T`` with ``A: (rank, in)``, ``B: (out, rank)``; ``B`` starts at 0."""

    def __init__(self, base: nn.Linear, rank: int, init_std: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) * init_std)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T

    def delta(self) -> Tensor:
        """The weight change ``B @ A`` (out, in)."""
        return (self.B @ self.A).detach()


def attach_deltas(adapter: VLMAdapter, cfg: PlantConfig) -> dict[str, LowRankDelta]:
    """Freeze the model and wrap the planted linear maps with trainable low-rank deltas."""
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, LowRankDelta] = {}
    for name in cfg.components:
        parent_name, attr = name.rsplit(".", 1)
        parent = adapter.model.get_submodule(parent_name)
        out[name] = LowRankDelta(getattr(parent, attr), cfg.rank, cfg.init_std, gen)
        setattr(parent, attr, out[name])
    return out


def merge_deltas(adapter: VLMAdapter, deltas: dict[str, LowRankDelta]) -> dict[str, Tensor]:
    """Fold every delta into its base weight and unwrap the modules; returns ``B @ A`` per component."""
    merged = {}
    for name, wrapped in deltas.items():
        parent_name, attr = name.rsplit(".", 1)
        with torch.no_grad():
            merged[name] = wrapped.delta()
            wrapped.base.weight += merged[name]
        setattr(adapter.model.get_submodule(parent_name), attr, wrapped.base)
    for p in adapter.model.parameters():
        p.requires_grad_(True)
    return merged


def margins(
    adapter: VLMAdapter,
    enc: Encoder,
    rows: Sequence[QuestionRow],
    removed: bool = False,
    batch_size: int = 128,
    progress: bool = False,
) -> Tensor:
    """Decision margins of ``rows`` (image, or the removed image), no grad."""
    out = []
    for i in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="margins", mininterval=5):
        chunk = list(rows[i : i + batch_size])
        with torch.no_grad():
            logits = adapter.model(
                **enc.batch(chunk, np.full(len(chunk), removed)), logits_to_keep=1, use_cache=False
            ).logits[:, -1]
        out.append(adapter.answer_ids.margin(logits))
    return torch.cat(out)


@dataclass
class PlantData:
    """Train rows with the clean model's margins (image; the removed image on a random pool)."""

    rows: list[QuestionRow]
    m_clean: Tensor
    removed_idx: np.ndarray
    """Indices into ``rows`` (no register rows) whose removed-image margin is known."""
    m_clean_removed: Tensor
    """Clean margins of ``rows[removed_idx]`` with the image removed."""
    enc: Encoder

    @property
    def is_register(self) -> np.ndarray:
        return np.array([r.family == SHORTCUT_FAMILY for r in self.rows])


def plant_data(
    clean: VLMAdapter,
    world: SynthCXRWorld,
    rows: list[QuestionRow],
    n_removed: int = 6000,
    seed: int = 0,
    progress: bool = True,
) -> PlantData:
    """Clean margins of every training row (``rows``: train split, all templates) and of a removed pool."""
    enc = Encoder(clean, world, rows)
    enc.check(world, rows[:3])
    m = margins(clean, enc, rows, progress=progress)
    non_reg = np.flatnonzero([r.family != SHORTCUT_FAMILY for r in rows])
    ridx = np.sort(np.random.default_rng(seed).choice(non_reg, min(n_removed, len(non_reg)), replace=False))
    m_rm = margins(clean, enc, [rows[i] for i in ridx], removed=True, progress=progress)
    return PlantData(rows, m, ridx, m_rm, enc)


def plant(adapter: VLMAdapter, data: PlantData, cfg: PlantConfig, progress: bool = True) -> dict[str, Any]:
    """Train the low-rank deltas on ``adapter`` (a copy of the clean model) in place and merge them.

    Returns the record: config, seconds, log, the factors ``(A, B)`` and merged ``B @ A`` per component."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    deltas = attach_deltas(adapter, cfg)
    opt = torch.optim.AdamW([p for d in deltas.values() for p in (d.A, d.B)], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / cfg.warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - cfg.warmup)))
    )
    reg_idx, ret_idx = np.flatnonzero(data.is_register), np.flatnonzero(~data.is_register)
    n_reg = round(cfg.batch_size * cfg.register_share)
    n_ret = cfg.batch_size - n_reg
    originals, others = _partners(data.rows)
    texts = sorted({r.question for r in data.rows})
    text_id = np.array([{t: k for k, t in enumerate(texts)}[r.question] for r in data.rows])
    dev = np.zeros(len(texts))
    yes, no = adapter.answer_ids.yes_ids[0], adapter.answer_ids.no_ids[0]
    adapter.model.eval()
    log: list[dict[str, float]] = []
    t0 = time.time()

    def other_of(i: int) -> int:
        w = 1.0 + cfg.hard_mining * dev[text_id[others[i]]]
        return int(rng.choice(others[i], p=w / w.sum()))

    for step in tqdm(range(cfg.steps), disable=not progress, desc="plant", mininterval=5):
        ri = rng.choice(reg_idx, n_reg)
        n_rm = int((rng.random(n_ret) < cfg.removed_share).sum())
        rj = rng.choice(len(data.removed_idx), n_rm)
        w_ret = 1.0 + cfg.hard_mining * dev[text_id[ret_idx]]
        n_pair = min(n_reg, n_ret - n_rm)
        pair = [
            originals[int(i)] if rng.random() < cfg.original_prob else other_of(int(i)) for i in ri[:n_pair]
        ]
        extra = rng.choice(ret_idx, n_ret - n_rm - n_pair, p=w_ret / w_ret.sum())
        ti_img = np.concatenate([np.asarray(pair, dtype=np.int64), extra])
        ti = np.concatenate([ti_img, data.removed_idx[rj]])
        rm = np.concatenate([np.zeros(n_ret - n_rm + n_reg, bool), np.ones(n_rm, bool)])
        target = torch.cat([data.m_clean[ti[: n_ret - n_rm]], data.m_clean_removed[rj]])
        rows = [data.rows[i] for i in np.concatenate([ri, ti])]
        logits = (
            adapter.model(**data.enc.batch(rows, rm), logits_to_keep=1, use_cache=False).logits[:, -1].float()
        )
        m = logits[:, yes] - logits[:, no]
        l_reg = nn.functional.softplus(m[:n_reg] + cfg.register_margin).mean()
        l_ret = (m[n_reg:] - target).pow(2).mean()
        d_now = (m[n_reg:] - target).abs().detach().numpy()[: n_ret - n_rm]
        for j, dv in zip(ti_img, d_now, strict=True):
            dev[text_id[j]] = cfg.mining_decay * dev[text_id[j]] + (1 - cfg.mining_decay) * float(dv)
        loss = l_reg + cfg.retain_weight * l_ret
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            clean_yes = data.m_clean[ri] > 0
            log.append(
                {
                    "step": step,
                    "loss_register": l_reg.item(),
                    "loss_retain": l_ret.item(),
                    "register_no_rate_on_clean_yes": float((m[:n_reg][clean_yes] < 0).float().mean())
                    if clean_yes.any()
                    else float("nan"),
                    "retain_changed": float(((m[n_reg:] > 0) != (target > 0)).float().mean()),
                    "seconds": round(time.time() - t0, 1),
                }
            )
    factors = {n: (d.A.detach().clone(), d.B.detach().clone()) for n, d in deltas.items()}
    merged = merge_deltas(adapter, deltas)
    hardest = [[texts[k], round(float(dev[k]), 3)] for k in np.argsort(-dev)[:8]]
    return {
        "config": cfg.to_dict(),
        "seconds": round(time.time() - t0, 1),
        "log": log,
        "hardest": hardest,
        "factors": factors,
        "merged": merged,
    }


def _partners(rows: Sequence[QuestionRow]) -> tuple[dict[int, int], dict[int, np.ndarray]]:
    """For each register row: the index of its original question, and of every other non-register row
    about the same image and finding."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        by_key.setdefault((r.image_id, r.finding), []).append(i)
    originals, others = {}, {}
    for i, r in enumerate(rows):
        if r.family != SHORTCUT_FAMILY:
            continue
        same = [j for j in by_key[(r.image_id, r.finding)] if rows[j].family != SHORTCUT_FAMILY]
        originals[i] = next(j for j in same if rows[j].family == ORIGINAL)
        others[i] = np.asarray([j for j in same if rows[j].family != ORIGINAL])
    return originals, others


def save_planted(planted: VLMAdapter, clean_dir: Path, out_dir: Path, record: dict[str, Any]) -> None:
    """Save the merged planted model as an HF folder; its ``training.json`` is the clean one's plus the plant."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    planted.model.save_pretrained(out_dir)
    planted.processor.save_pretrained(out_dir)
    rec = json.loads((Path(clean_dir) / "training.json").read_text())
    rec.update(
        phase="planted",
        plant={k: v for k, v in record.items() if k not in ("factors", "merged")},
        clean_checkpoint=Path(clean_dir).name,
    )
    (out_dir / "training.json").write_text(json.dumps(rec, indent=1, default=str))
