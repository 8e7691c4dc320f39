"""Attention from the answer (final) position to the image tokens, and how much of it falls in a box.

Pipeline (``docs/metrics.md``, "Attention in box"):

1. attention weights of the final position over the image tokens, averaged over chosen layers and
   heads (read from the text attention modules; eager attention is switched on for the forward pass
   and switched back afterwards, since SDPA does not return weights);
2. reshaped to the image-token grid of the family (:attr:`hooks.families.FamilyInputs.token_grid`):
   ``sqrt(n_image_tokens)`` per side, row-major, for Gemma3's pooled patches and LLaVA's patches (token
   k sits at row ``k // side``, column ``k % side``); LLaVA-NeXT's base tile; Qwen2.5-VL's merged
   patches (``rows x cols`` from ``image_grid_thw``, not square for a non-square image);
3. upsampled to the image size: ``nearest`` (default: every pixel gets its token's weight, so the map
   stays an honest piecewise-constant picture of token attention) or ``bilinear`` (smoother, spreads
   weight over token borders);
4. thresholded at the 90th percentile: A = pixels whose value is >= that quantile (ties are kept, so
   with nearest upsampling A can be larger than 10% of the image).

With B the box, coverage = |A and B| / |B| and precision = |A and B| / |A|.
Boxes are :class:`hooks.inputs.Box` in pixels of an image of ``image_size`` (height, width); a pixel
(x, y) is inside when its centre (x + 0.5, y + 0.5) is, so an integer box is half-open.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from hooks.attn import attention_implementation
from hooks.batch import Batch
from hooks.inputs import Box

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

Upsample = Literal["nearest", "bilinear"]


@contextmanager
def eager_attention(adapter: VLMAdapter) -> Iterator[None]:
    """Switch the text stack to eager attention (which returns weights) and restore it on exit; the
    vision tower keeps its own implementation (:func:`hooks.attn.attention_implementation`)."""
    with attention_implementation(adapter.model, "eager"):
        yield


def final_attention_to_image(
    adapter: VLMAdapter,
    batch: Batch,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Float[Tensor, "batch n_image"]:
    """Attention of the final position to each image token, mean over ``layers`` x ``heads``.

    Each row sums to the share of the final position's attention that goes to the image (<= 1).
    """
    counts = batch.image_mask.sum(-1)
    if (counts == 0).any() or (counts != counts[0]).any():
        raise ValueError(
            f"every row needs the same number of image tokens (got {counts.tolist()}): attention to the "
            "image is undefined for rows without an image"
        )
    n = adapter.n_layers
    chosen = list(range(n)) if layers is None else [x + n if x < 0 else x for x in layers]
    if not chosen or any(not 0 <= x < n for x in chosen):
        raise IndexError(f"layers {list(layers or [])} out of range; this model has {n} text layers")
    weights: dict[int, Tensor] = {}

    def grab(layer: int):
        def hook(_mod: torch.nn.Module, _args: Any, out: Any) -> None:
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if w is None:
                raise RuntimeError("the attention module returned no weights; eager attention is required")
            weights[layer] = w[:, :, -1].detach().float()  # (batch, heads, key)

        return hook

    handles = []
    try:
        with eager_attention(adapter), torch.no_grad():
            for layer in chosen:
                mod = adapter.text_layer(layer).get_submodule(adapter.spec.self_attn)
                handles.append(mod.register_forward_hook(grab(layer)))
            adapter.margins(batch)
    finally:
        for h in handles:
            h.remove()
    w = torch.stack([weights[layer] for layer in chosen])  # (layer, batch, head, key)
    n_heads = w.shape[2]
    head_idx = list(range(n_heads)) if heads is None else list(heads)
    if not head_idx or any(not 0 <= h < n_heads for h in head_idx):
        raise IndexError(f"heads {head_idx} out of range; this model has {n_heads} heads (0..{n_heads - 1})")
    mean = w[:, :, head_idx].mean(dim=(0, 2)).cpu()  # (batch, key)
    return mean[batch.image_mask].reshape(len(batch), int(counts[0]))


def attention_grid(weights: Float[Tensor, "batch n_image"]) -> Float[Tensor, "batch side side"]:
    """Image-token weights on their square grid (row-major)."""
    n = weights.shape[-1]
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(
            f"{n} image tokens do not form a square grid; this model's image tokens are not a grid"
        )
    return weights.reshape(*weights.shape[:-1], side, side)


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (
        (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    )


def upsample(
    grid: Float[Tensor, "*batch h w"], image_size: int | tuple[int, int], mode: Upsample = "nearest"
) -> Float[Tensor, "*batch H W"]:
    """Grid -> image resolution (``image_size`` = side or (height, width))."""
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode {mode!r}: use 'nearest' or 'bilinear'")
    lead = grid.shape[:-2]
    x = grid.reshape(-1, 1, *grid.shape[-2:]).float()
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(x, size=_hw(image_size), mode=mode, **kw)
    return out.reshape(*lead, *out.shape[-2:])


def threshold_map(attn_map: Float[Tensor, "H W"], quantile: float = 0.9) -> Bool[Tensor, "H W"]:
    """A = pixels at or above the ``quantile`` of the map's values (ties included)."""
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return attn_map >= torch.quantile(attn_map.float().reshape(-1), quantile)


def box_mask(box: Box, image_size: int | tuple[int, int]) -> Bool[Tensor, "H W"]:
    """Pixels whose centre lies inside ``box``."""
    x0, y0, x1, y1 = box.coords
    h, w = _hw(image_size)
    ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


class BoxOverlap(NamedTuple):
    """Coverage = |A and B| / |B|; precision = |A and B| / |A| (NaN when the denominator is empty)."""

    coverage: float
    precision: float


def box_coverage_precision(
    attn_map: Float[Tensor, "h w"],
    box: Box,
    image_size: int | tuple[int, int],
    quantile: float = 0.9,
    mode: Upsample = "nearest",
) -> BoxOverlap:
    """Coverage and precision of the thresholded map A against box B.

    ``attn_map`` is either already at ``image_size`` or a token grid that is upsampled to it (``mode``).
    """
    if attn_map.ndim != 2:
        raise ValueError(f"attn_map must be 2-D (h, w), got shape {tuple(attn_map.shape)}")
    hw = _hw(image_size)
    if tuple(attn_map.shape) != hw:
        attn_map = upsample(attn_map, hw, mode)
    a = threshold_map(attn_map, quantile)
    b = box_mask(box, hw)
    inter = float((a & b).sum())
    n_b, n_a = float(b.sum()), float(a.sum())
    return BoxOverlap(inter / n_b if n_b else float("nan"), inter / n_a if n_a else float("nan"))


def token_grids(adapter: VLMAdapter, batch: Batch, weights: Float[Tensor, "batch n_image"]) -> list[Tensor]:
    """Each row's image-token weights on its token grid (``rows x cols``, row-major; the family's
    :meth:`hooks.families.FamilyInputs.grid`)."""
    parts = batch.image_parts()
    out = []
    for i in range(len(batch)):
        first, rows, cols = adapter.spec.inputs.grid(adapter.model, parts[i], weights.shape[-1])
        out.append(weights[i, first : first + rows * cols].reshape(rows, cols))
    return out


def attention_maps(
    adapter: VLMAdapter,
    batch: Batch,
    image_size: int | tuple[int, int],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    mode: Upsample = "nearest",
) -> Float[Tensor, "batch H W"]:
    """Final-position attention to the image, on the token grid, upsampled to ``image_size``."""
    weights = final_attention_to_image(adapter, batch, layers, heads)
    return _maps(adapter, batch, weights, image_size, mode)


def _maps(
    adapter: VLMAdapter, batch: Batch, weights: Tensor, image_size: int | tuple[int, int], mode: Upsample
) -> Tensor:
    return torch.stack([upsample(g, image_size, mode) for g in token_grids(adapter, batch, weights)])


def attention_in_box(
    adapter: VLMAdapter,
    batch: Batch,
    boxes: Sequence[Box | None],
    image_size: int | tuple[int, int],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    quantile: float = 0.9,
    mode: Upsample = "nearest",
) -> pd.DataFrame:
    """Coverage and precision per row (``boxes[i] = None``: no box, NaN), plus the image-attention share."""
    if len(boxes) != len(batch):
        raise ValueError(f"{len(boxes)} boxes for {len(batch)} rows: pass one box (or None) per row")
    weights = final_attention_to_image(adapter, batch, layers, heads)
    maps = _maps(adapter, batch, weights, image_size, mode)
    rows = []
    for i, box in enumerate(boxes):
        cov = prec = float("nan")
        if box is not None:
            cov, prec = box_coverage_precision(maps[i], box, image_size, quantile, mode)
        rows.append(
            {"row": i, "coverage": cov, "precision": prec, "image_attention": float(weights[i].sum())}
        )
    return pd.DataFrame(rows)
