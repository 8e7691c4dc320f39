"""A batch's image features, encoded once and reused by every forward an analysis runs on its rows.

The vision tower and projector do not depend on the question or on anything patched in the text stack,
so an analysis that runs many forwards of the same rows (stacked patching rows, gradient passes, SAE
integrated-gradient steps) encodes the batch's images once, without gradients, and passes the features
to :meth:`hooks.adapter.VLMAdapter.margins` (``image_features=...``): no vision tower per forward, and
no autograd graph through it. Only a patch *at* a vision site (``vision_resid`` / ``image_embeds``)
needs the tower in the forward (:func:`needs_vision`).

Across batches, :func:`reuse_features` goes further: inside it, every image is encoded once whatever batch
it comes in (the clean and the corrupted batch of the same pairs hold the same images; an audit sweeps
three site kinds, exactly and by attribution, then re-measures, all on the same pairs). Images are keyed
by the bytes of their processed tensors, so equal pixels share features and different ones never do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
#: The active :func:`reuse_features` scope: (adapter id, image key -> features).
_SHARED: ContextVar[tuple[int, dict[str, Tensor]] | None] = ContextVar(
    "flipscope_shared_features", default=None
)


@contextmanager
def reuse_features(adapter: VLMAdapter) -> Iterator[dict[str, Tensor]]:
    """Inside the block, :func:`batch_features` of ``adapter`` encodes each distinct image once and reuses
    its features in every later batch (yields the cache: image key -> features). The vision tower and the
    projector must not change inside the block (they do not under patching, attribution or SAE work,
    which touch text sites only). The cache is dropped on exit, also on an exception."""
    token = _SHARED.set((id(adapter), {}))
    try:
        shared = _SHARED.get()
        assert shared is not None
        yield shared[1]
    finally:
        _SHARED.reset(token)


def image_key(part: dict[str, Tensor]) -> str:
    """SHA-1 over one image's processed tensors (names, shapes, dtypes and bytes)."""
    h = hashlib.sha1()
    for name in sorted(part):
        t = part[name].detach().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.flatten().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


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
    shared = _SHARED.get()
    if shared is None or shared[0] != id(adapter):
        return _encode(adapter, batch, parts, chunk)
    cache = shared[1]
    keys = [image_key(p) for p in parts]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    if todo:
        first = {k: parts[keys.index(k)] for k in todo}
        cache.update(zip(todo, _encode(adapter, batch, list(first.values()), chunk), strict=True))
    return [cache[k] for k in keys]


def _encode(
    adapter: VLMAdapter, batch: Batch, parts: list[dict[str, Tensor]], chunk: int
) -> list[Float[Tensor, "tokens d_model"]]:
    out: list[Tensor] = []
    for i in range(0, len(parts), chunk):
        with torch.no_grad():
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
