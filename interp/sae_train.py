"""Train a TopK or JumpReLU SAE on one site's cached activations, for models without a published SAE.

The loop is sae-lens' own training SAE (``TopKTrainingSAE``: MSE + the TopK auxiliary loss that revives
dead features; ``JumpReLUTrainingSAE``: MSE + Gemma Scope 2's quadratic L0 penalty around a target L0,
``2 / k * (l0 - k)^2``) driven by a small Adam loop here, so no sae-lens runner (model loading, token
datasets, wandb) is involved:

1. Shuffle the rows with ``seed``; hold out ``val_fraction`` of them.
2. Scale the inputs so the mean row norm is ``sqrt(d)`` (folded back into the weights at the end),
   initialise ``b_dec`` to the mean row, ``W_dec`` rows to norm 0.1 and ``W_enc = W_dec.T`` (sae-lens).
3. ``steps`` Adam steps on random mini-batches (one epoch-wise permutation after another); the learning
   rate decays linearly to 0 over the last ``decay_fraction`` of the steps. Features that have not fired
   for ``dead_after`` steps feed the auxiliary loss.
4. Convert to an inference ``TopKSAE`` / ``JumpReLUSAE`` (decoder norms and the input scale folded into
   the weights, so it reads raw activations) and report FVU and mean L0 on the held-out rows.

>>> cache = cache_activations(adapter, batches, [resid_post(3)], positions=["question", "final"])
>>> x = cache[resid_post(3)][cache.valid]                       # (n, d_model)
>>> sae, report = train_sae(x, SAETrainConfig(site=resid_post(3), width=512, k=16))
>>> save_sae(sae, "saes/organism-L3")                            # sae-lens folder; load_sae reopens it
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.progress import tqdm
from hooks.sites import Site
from interp.sae import LoadedSAE


@dataclass(frozen=True)
class SAETrainConfig:
    """How :func:`train_sae` trains a TopK or JumpReLU SAE."""

    width: int = 1024
    """Number of features (``d_sae``)."""
    k: int = 32
    """TopK: active features per input (the SAE's L0 is at most ``k``). JumpReLU: the target L0 of the
    quadratic sparsity penalty (the L0 reached is measured, not bounded)."""
    steps: int = 3000
    """Adam steps."""
    batch_size: int = 256
    """Rows per step."""
    lr: float = 1e-3
    """Adam learning rate (constant, then linear decay to 0)."""
    decay_fraction: float = 0.2
    """Fraction of the steps, at the end, over which the learning rate decays to 0."""
    aux_coefficient: float = 1.0 / 32
    """Weight of the TopK auxiliary loss on dead features (sae-lens ``aux_loss_coefficient``)."""
    dead_after: int = 200
    """A feature that has not fired for this many steps counts as dead (feeds the auxiliary loss)."""
    val_fraction: float = 0.1
    """Fraction of rows held out for the reported FVU and L0."""
    normalize: bool = True
    """Scale inputs to mean norm ``sqrt(d)`` during training (folded into the weights afterwards)."""
    seed: int = 0
    """Seeds the split, the initialisation and the batches."""
    site: Site | None = None
    """Site the activations were read at, recorded in the SAE (needed by attribution and patching)."""
    release: str = "flipscope-trained"
    """Release name recorded in every FeatureRef of the trained SAE."""
    device: str = "cpu"
    """Where to train."""
    progress: bool = True
    """Show a tqdm bar with the running loss."""
    architecture: Literal["topk", "jumprelu"] = "topk"
    """``topk`` (sae-lens ``TopKTrainingSAE``) or ``jumprelu`` (``JumpReLUTrainingSAE``, Gemma Scope 2's
    quadratic L0 loss around ``k``, learned per-feature thresholds)."""
    l0_coefficient: float = 1.0
    """JumpReLU only: weight of the quadratic L0 penalty."""
    jumprelu_bandwidth: float = 0.5
    """JumpReLU only: bandwidth of the straight-through estimator of the threshold's gradient (sae-lens
    defaults to 0.05, which barely moves the thresholds in a few hundred steps)."""
    jumprelu_init_threshold: float = 0.3
    """JumpReLU only: initial threshold (in the training scale, inputs of mean norm ``sqrt(d)``)."""

    def __post_init__(self) -> None:
        if self.architecture not in ("topk", "jumprelu"):
            raise ValueError(f"architecture must be 'topk' or 'jumprelu', got {self.architecture!r}")
        for name in ("l0_coefficient", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("width", "k", "steps", "batch_size", "dead_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.width:
            raise ValueError(f"k={self.k} exceeds width={self.width}; choose k <= width")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}; e.g. 0.1")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}; e.g. 1e-3")


@dataclass
class SAETrainReport:
    """What :func:`train_sae` measured."""

    fvu: float
    """Fraction of variance unexplained on held-out rows: ``sum |x - x_hat|^2 / sum |x - mean|^2``."""
    l0: float
    """Mean number of active features per held-out row."""
    dead_fraction: float
    """Fraction of features never active on the held-out rows."""
    n_train: int
    """Training rows."""
    n_val: int
    """Held-out rows."""
    scale: float
    """Input scale used in training (folded into the saved weights)."""
    seconds: float
    """Wall time of the loop."""
    losses: list[float] = field(default_factory=list)
    """Training loss (MSE + aux, in scaled units) every 10 steps."""


def evaluate_sae(
    sae: LoadedSAE, activations: Float[Tensor, "n d"]
) -> tuple[float, float, Float[Tensor, " width"]]:
    """(FVU, mean L0, per-feature firing frequency) of ``sae`` on ``activations``."""
    x = activations.to(sae.sae.device, sae.W_dec.dtype)
    with torch.no_grad():
        f = sae.encode(x)
        recon = sae.decode(f)
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    active = f != 0
    return fvu, float(active.sum(-1).float().mean()), active.float().mean(0)


def train_sae(
    activations: Float[Tensor, "n d"], config: SAETrainConfig | None = None
) -> tuple[LoadedSAE, SAETrainReport]:
    """Train a TopK or JumpReLU SAE (``config.architecture``) on ``activations``; returns the inference
    ``TopKSAE`` / ``JumpReLUSAE`` wrapped as a :class:`LoadedSAE` and a :class:`SAETrainReport`
    (held-out FVU, L0)."""
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainStepInput

    config = config or SAETrainConfig()
    if activations.ndim != 2:
        raise ValueError(
            f"activations must be (n, d), got shape {tuple(activations.shape)}; flatten positions"
        )
    n, d = activations.shape
    n_val = max(1, round(n * config.val_fraction))
    if n - n_val < config.batch_size:
        raise ValueError(
            f"{n - n_val} training rows < batch_size={config.batch_size}; cache more or shrink it"
        )
    gen = torch.Generator().manual_seed(config.seed)
    x_all = activations.detach().float()[torch.randperm(n, generator=gen)].to(config.device)
    x_val, x_train = x_all[:n_val], x_all[n_val:]
    scale = float(d**0.5 / x_train.norm(dim=-1).mean().clamp_min(1e-12)) if config.normalize else 1.0
    x_train = x_train * scale

    torch.manual_seed(config.seed)
    trainer = _training_sae(config, d)
    coefficients: dict[str, Any] = {"l0": config.l0_coefficient} if config.architecture == "jumprelu" else {}
    with torch.no_grad():
        trainer.b_dec.copy_(x_train.mean(0))
    opt = torch.optim.Adam(trainer.parameters(), lr=config.lr)
    decay_start = int(config.steps * (1 - config.decay_fraction))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            1.0 if s < decay_start else max(0.0, (config.steps - s) / max(1, config.steps - decay_start))
        ),
    )
    since_fired = torch.zeros(config.width, dtype=torch.long, device=config.device)
    order, cursor, losses = torch.randperm(len(x_train), generator=gen), 0, []
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), disable=not config.progress, desc="training SAE")
    for step in bar:
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(x_train), generator=gen), 0
        batch = x_train[order[cursor : cursor + config.batch_size].to(config.device)]
        cursor += config.batch_size
        out = trainer.training_forward_pass(
            TrainStepInput(
                sae_in=batch,
                coefficients=coefficients,
                dead_neuron_mask=since_fired > config.dead_after,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            fired = (out.feature_acts > 0).any(0)
            since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
        if step % 10 == 0:
            losses.append(float(out.loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    seconds = time.perf_counter() - t0

    # inference TopKSAE reading raw activations: fold decoder norms, then the input scale
    state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
    trainer.process_state_dict_for_saving_inference(state)
    inf_cfg = trainer.cfg.get_inference_sae_cfg_dict()
    if config.architecture == "topk":
        inf_cfg["rescale_acts_by_decoder_norm"] = False  # norms are folded: the decoder rows have norm 1
    sae = SAE.from_dict(inf_cfg)
    sae.load_state_dict(state)
    sae.fold_activation_norm_scaling_factor(scale)
    sae.eval()
    loaded = LoadedSAE(
        sae=sae,
        site=config.site,
        release=config.release,
        layer=config.site.layer if config.site is not None else None,
        width=config.width,
        l0=f"k{config.k}" if config.architecture == "topk" else f"target{config.k}",
        hook_name=str(config.site) if config.site is not None else None,
    )
    fvu, l0, freq = evaluate_sae(loaded, x_val)
    report = SAETrainReport(
        fvu=fvu,
        l0=l0,
        dead_fraction=float((freq == 0).float().mean()),
        n_train=len(x_train),
        n_val=n_val,
        scale=scale,
        seconds=seconds,
        losses=losses,
    )
    return loaded, report


def _training_sae(config: SAETrainConfig, d: int) -> Any:
    """The sae-lens training SAE of ``config.architecture`` for inputs of width ``d``."""
    if config.architecture == "jumprelu":
        from sae_lens.saes import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        return JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(
                d_in=d,
                d_sae=config.width,
                device=config.device,
                decoder_init_norm=0.1,
                jumprelu_sparsity_loss_mode="quadratic",
                target_l0=float(config.k),
                l0_coefficient=config.l0_coefficient,
                jumprelu_bandwidth=config.jumprelu_bandwidth,
                jumprelu_init_threshold=config.jumprelu_init_threshold,
            )
        )
    from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig

    return TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d,
            d_sae=config.width,
            k=config.k,
            device=config.device,
            aux_loss_coefficient=config.aux_coefficient,
            rescale_acts_by_decoder_norm=True,
            decoder_init_norm=0.1,
        )
    )
