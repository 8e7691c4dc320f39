"""Logit lens on the decision margin: what the yes/no margin would be if the model stopped at layer L.

The residual stream after layer L at the final position goes through the model's own final norm and
unembedding (:meth:`hooks.adapter.VLMAdapter.unembed`, soft-cap included); at the last layer this is
exactly the model's margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hooks.batch import Batch
from hooks.batch_features import batch_features
from hooks.sites import resid_post

if TYPE_CHECKING:
    from hooks.adapter import ImageFeatures, VLMAdapter


@dataclass
class LensResult:
    """Lens margins per layer and row, with the model's real margins."""

    layers: list[int]
    margins: Float[Tensor, "layer batch"]
    """Margin read from ``resid_post(layer)`` at the final position."""
    model_margins: Float[Tensor, " batch"]
    """The model's own margin (equal to the lens at the last layer)."""

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (layer, row)."""
        n_l, n_b = self.margins.shape
        return pd.DataFrame(
            {
                "layer": [layer for layer in self.layers for _ in range(n_b)],
                "row": list(range(n_b)) * n_l,
                "lens_margin": self.margins.reshape(-1).numpy(),
                "model_margin": self.model_margins.repeat(n_l).numpy(),
            }
        )


def logit_lens(
    adapter: VLMAdapter,
    batch: Batch,
    layers: Sequence[int] | None = None,
    image_features: ImageFeatures | None = None,
) -> LensResult:
    """Decision margin read from ``unembed(resid_post(L)[:, -1])`` for every layer in one forward.

    ``image_features``: features of ``batch``'s rows with an image (e.g. from a
    :class:`hooks.features.ImageFeatureCache`); by default they are encoded here, a few images per
    vision pass (:func:`hooks.batch_features.batch_features`), and the text forward reuses them.
    """
    n = adapter.n_layers
    chosen = list(range(n)) if layers is None else [x + n if x < 0 else x for x in layers]
    bad = [x for x in chosen if not 0 <= x < n]
    if bad:
        raise IndexError(f"layers {bad} out of range; this model has {n} text layers (0..{n - 1})")
    finals: dict[int, Tensor] = {}

    def grab(layer: int):
        def fn(x: Tensor) -> None:
            finals[layer] = x[:, -1].detach()

        return fn

    with torch.no_grad():
        with adapter.hooks({resid_post(layer): grab(layer) for layer in chosen}):
            feats = batch_features(adapter, batch) if image_features is None else image_features
            model_margins = adapter.margins(batch, image_features=feats).float().cpu()
        lens = torch.stack(
            [adapter.answer_ids.margin(adapter.unembed(finals[layer])).float().cpu() for layer in chosen]
        )
    return LensResult(chosen, lens, model_margins)
