"""Audit stage 4: which SAE features carry the flip, chosen on the selection half and scored on the scoring half.

The SAE reads the localization's residual site (``resid_post`` of the last flagged layer) and is either a
folder (a Gemma Scope 2 folder or a sae-lens folder, :func:`interp.sae.load_sae`) or trained here on
final-position activations of training rows (:func:`interp.sae_train.train_sae`, TopK; its held-out FVU,
L0 and dead share are reported). A folder SAE at another site than the residual site is used where it
reads (its site is reported beside the flagged one).

The feature is chosen blind on the selection pairs (top mean aligned integrated-gradients attribution to
the margin shift, :func:`interp.sae_score.choose_and_score`) and scored on the scoring pairs: its rank
there, feature-patching recovery, flips undone when clamped (to its original-question value, and to 0),
and the collateral on the other families' pairs, each with a 95% bootstrap interval.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analyses.data.schema import ImageSource, QuestionRow
from hooks.sites import Site

if TYPE_CHECKING:
    from torch import Tensor

    from hooks.adapter import VLMAdapter
    from hooks.batch import Batch
    from interp.sae import LoadedSAE

TRAIN = "train"


@dataclass(frozen=True)
class FeaturesConfig:
    """Which SAE stage 4 uses and how features are scored."""

    sae: str = TRAIN
    """``train`` (an SAE trained here) or the path of an SAE folder (Gemma Scope 2 or sae-lens)."""
    width: int = 0
    """Trained SAE: features; 0 = 2 x d_model."""
    k: int = 8
    """Trained SAE: active features per input (TopK)."""
    steps: int = 600
    """Trained SAE: Adam steps."""
    n_rows: int = 4096
    """Trained SAE: training rows (final position), a seeded subset of the training rows given."""
    ig_steps: int = 16
    """Integrated-gradients points of the feature attribution."""
    n_boot: int = 1000
    """Bootstrap resamples of the intervals."""
    seed: int = 0
    """Seed of the row subset, the SAE's training and the bootstrap."""
    batch_size: int = 64
    """Rows per forward while caching activations."""

    def __post_init__(self) -> None:
        if self.sae != TRAIN and not Path(self.sae).is_dir():
            raise ValueError(
                f"--sae {self.sae!r}: give 'train' or an existing SAE folder (Gemma Scope 2 or sae-lens)"
            )
        if self.width < 0 or self.k < 1 or self.steps < 1 or self.n_rows < 16 or self.ig_steps < 1:
            raise ValueError(f"bad SAE settings: width {self.width}, k {self.k}, steps {self.steps}, "
                             f"n_rows {self.n_rows}, ig_steps {self.ig_steps}")  # fmt: skip


def training_activations(
    adapter: VLMAdapter,
    rows: Sequence[QuestionRow],
    images: ImageSource,
    site: Site,
    n_rows: int,
    seed: int,
    batch_size: int = 64,
) -> Any:
    """Final-position activations at ``site`` of a seeded subset of ``rows`` (each with its image), float32."""
    import numpy as np

    from interp.cache import cache_activations

    if not rows:
        raise ValueError(
            "no training rows to train the SAE on: pass the data's train split (or --sae FOLDER)"
        )
    pick = sorted(np.random.default_rng(seed).permutation(len(rows))[:n_rows].tolist())
    chosen = [rows[i] for i in pick]
    batches = (adapter.prepare([images(r) for r in chosen[i : i + batch_size]], [r.question for r in chosen[i : i + batch_size]])
               for i in range(0, len(chosen), batch_size))  # fmt: skip
    cache = cache_activations(adapter, batches, [site], positions="final", progress=False)
    return cache[site].float()


def get_sae(
    adapter: VLMAdapter,
    cfg: FeaturesConfig,
    site: Site,
    train_rows: Sequence[QuestionRow],
    images: ImageSource,
    out: Path,
    progress: bool = False,
) -> tuple[LoadedSAE, dict[str, Any]]:
    """The stage's SAE and its record (loaded from ``cfg.sae``, or trained and saved under ``out/sae``)."""
    from interp.sae import load_sae, save_sae
    from interp.sae_train import SAETrainConfig, train_sae

    if cfg.sae != TRAIN:
        sae = load_sae(cfg.sae)
        return sae, {"source": "folder", "path": str(cfg.sae), "release": sae.release, "width": sae.width,
                     "site": str(sae.site), "flagged_site": str(site)}  # fmt: skip
    x = training_activations(adapter, train_rows, images, site, cfg.n_rows, cfg.seed, cfg.batch_size)
    width = cfg.width or 2 * adapter.d_model
    n = int(x.shape[0])  # train_sae holds out val_fraction and needs a batch of the rest
    batch = min(SAETrainConfig.batch_size, n - max(1, round(n * SAETrainConfig.val_fraction)))
    tc = SAETrainConfig(site=site, width=width, k=cfg.k, steps=cfg.steps, batch_size=batch, lr=3e-3, seed=cfg.seed,
                        release="flipscope-audit", progress=progress)  # fmt: skip
    sae, report = train_sae(x, tc)
    save_sae(sae, out / "sae")
    return sae, {"source": "trained", "site": str(site), "flagged_site": str(site), "width": width, "k": cfg.k,
                 "steps": cfg.steps, "n_activations": int(x.shape[0]), "fvu": report.fvu, "l0": report.l0,
                 "dead_fraction": report.dead_fraction}  # fmt: skip


@dataclass
class FeatureResult:
    """Stage 4's result."""

    sae: dict[str, Any]
    """Where the SAE came from, its site, and for a trained one FVU / L0 / dead share."""
    feature: int
    """The feature chosen on the selection pairs."""
    selection_table: pd.DataFrame
    """The selection pairs' top features by attribution (:func:`interp.sae_attr.top_features`)."""
    score: dict[str, Any]
    """The feature's score on the scoring pairs (:class:`interp.sae_score.FeatureScore` as a dict)."""

    def summary(self) -> dict[str, Any]:
        return {"sae": self.sae, "feature": self.feature, "score": self.score,
                "selection_top": self.selection_table.drop(columns="feature", errors="ignore").head(10).to_dict("records")}  # fmt: skip

    def save(self, folder: Path) -> None:
        self.selection_table.drop(columns="feature", errors="ignore").to_csv(
            Path(folder) / "selection_features.csv", index=False
        )
        (Path(folder) / "features.json").write_text(json.dumps(self.summary(), indent=1, default=float))

    @classmethod
    def load(cls, folder: Path) -> FeatureResult:
        rec = json.loads((Path(folder) / "features.json").read_text())
        table = pd.read_csv(Path(folder) / "selection_features.csv")
        return cls(rec["sae"], int(rec["feature"]), table, rec["score"])


def score_features(
    adapter: VLMAdapter,
    sae: LoadedSAE,
    selection: tuple[Batch, Batch],
    scoring: tuple[Batch, Batch],
    others: tuple[Batch, Batch] | None,
    record: dict[str, Any],
    cfg: FeaturesConfig,
    direction: Tensor | None = None,
) -> FeatureResult:
    """Choose on ``selection``, score on ``scoring`` with ``others`` for collateral (module doc).

    ``direction``: a known direction at the SAE's site (e.g. a planted one); the score then carries the
    chosen feature's decoder cosine with it (NaN without one, as in an audit, where none is known)."""
    from interp.sae_score import choose_and_score

    feature, table, sc = choose_and_score(adapter, sae, selection, scoring, others, direction, steps=cfg.ig_steps,
                                          n_boot=cfg.n_boot, seed=cfg.seed)  # fmt: skip
    return FeatureResult(record, feature, table, asdict(sc))
