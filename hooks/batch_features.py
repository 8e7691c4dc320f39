"""A batch's image features, encoded once and reused by every forward an analysis runs on its rows.

The vision tower and projector do not depend on the question or on anything patched in the text stack,
so an analysis that runs many forwards of the same rows (stacked patching rows, gradient passes, SAE
integrated-gradient steps) encodes the batch's images once, without gradients, and passes the features
to :meth:`hooks.adapter.VLMAdapter.margins` (``image_features=...``): no vision tower per forward, and
no autograd graph through it. Only a patch *at* a vision site (``vision_resid`` / ``image_embeds``)
needs the tower in the forward (:func:`needs_vision`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooks.batch import Batch
from hooks.sites import Site

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

#: Images encoded per vision-tower pass (bounds the eager SigLIP attention weights: ~1 GiB per image).
ENCODE_CHUNK = 8


def needs_vision(sites: Iterable[Site]) -> bool:
    """Whether any site lies in the vision tower or projector (then features cannot be precomputed)."""
    return any(not s.is_text for s in sites)


def batch_features(
    adapter: VLMAdapter, batch: Batch, chunk: int = ENCODE_CHUNK
) -> list[Float[Tensor, "tokens d_model"]] | None:
    """Features of the rows of ``batch`` that have an image (row order), ``chunk`` images per pass, no
    gradients; ``None`` when no row has one. Exactly what ``image_features=`` of
    :meth:`hooks.adapter.VLMAdapter.margins` takes for ``batch``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    parts = batch.image_parts()
    if not parts:
        return None
    out: list[Tensor] = []
    for i in range(0, len(parts), chunk):
        out += [f.detach() for f in adapter.image_features(batch.family.join(parts[i : i + chunk]))]
    return out


def select_features(
    batch: Batch,
    features: Sequence[Tensor] | None,
    rows: Sequence[int] | Int[Tensor, " n"],
) -> list[Float[Tensor, "tokens d_model"]] | None:
    """The features of ``batch.select(rows)`` taken from ``features`` of ``batch`` (repeats allowed);
    ``None`` when ``features`` is ``None`` or no selected row has an image."""
    if features is None:
        return None
    has = batch.image_mask.any(-1)
    img_row = torch.cumsum(has.long(), 0) - 1  # row -> index among the rows with an image
    picked = [features[int(img_row[i])] for i in torch.as_tensor(rows).tolist() if has[i]]
    return picked or None
