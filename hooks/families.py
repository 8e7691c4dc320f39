"""How each model family turns images and prompts into model inputs: the input half of a row of
:data:`hooks.sites.ARCHITECTURES`.

A :class:`FamilyInputs` says, declaratively, everything :mod:`hooks.batch` and
:class:`hooks.adapter.VLMAdapter` need to know about a family's inputs:

- which processor outputs carry the images (``pixel_values`` and, where the family has them,
  ``image_grid_thw`` for Qwen2.5-VL or ``image_sizes`` for LLaVA-NeXT) and how they split per image;
- which per-token outputs the forward needs besides ``input_ids`` and ``attention_mask``
  (Gemma3's ``token_type_ids``, Qwen's ``mm_token_type_ids``);
- whether the processor wants one list of images per prompt (Gemma3);
- the position-id rule (0, 1, 2, ... over each left-padded row, or Qwen's 3-D rotary index);
- the placeholder a plain prompt uses for an image (the processor expands it into image tokens).

Image features are computed the same way for every family: the model's own ``get_image_features``
called with the image keys, one feature block per image, written in order into the image-token
positions (``masked_scatter``, as every HF forward here does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

ImageLayout = Literal["rows", "grid_patches"]
PositionRule = Literal["text", "mrope"]
TokenGrid = Literal["square", "base_tile", "merged_patches"]


class _ProcessorAttrs(dict[str, str]):
    def __init__(self, processor: Any) -> None:
        super().__init__()
        self.processor = processor

    def __missing__(self, key: str) -> str:
        value = getattr(self.processor, key, None) or getattr(
            getattr(self.processor, "tokenizer", None), key, None
        )
        if not isinstance(value, str):
            raise ValueError(
                f"the processor {type(self.processor).__name__} has no {key!r}; the placeholder of this "
                "architecture needs it (check the processor files of the checkpoint)"
            )
        return value


@dataclass(frozen=True)
class FamilyInputs:
    """Input handling of one architecture family (see the module docstring)."""

    image_keys: tuple[str, ...] = ("pixel_values",)
    """Processor outputs that carry the images, named as the model's ``get_image_features`` takes them."""
    token_keys: tuple[str, ...] = ()
    """Per-token processor outputs the forward needs besides ``input_ids`` / ``attention_mask``
    (0 on padding and on rows without an image), e.g. Gemma3's ``token_type_ids``."""
    nest_images: bool = False
    """The processor takes one list of images per prompt (Gemma3), not one flat list."""
    image_layout: ImageLayout = "rows"
    """How :attr:`image_keys` split per image: ``rows`` (dim 0 indexes images; other dims are
    zero-padded to the largest when images are joined, as LLaVA-NeXT's processor pads its tiles) or
    ``grid_patches`` (``pixel_values`` rows are patches, ``image_grid_thw[i].prod()`` of them for image i)."""
    position_ids: PositionRule = "text"
    """``text``: 0, 1, 2, ... over the real tokens of each left-padded row. ``mrope``: the model's own
    3-D rotary index (``model.model.get_rope_index``: image tokens at (t, h, w) grid positions, text after
    them continuing from the largest), shape ``(3, batch, pos)``."""
    placeholder: str = "{image_token}"
    """Text standing for one image in a plain prompt, formatted with the processor's (or its
    tokenizer's) attributes; the processor expands it into the image tokens."""
    token_grid: TokenGrid = "square"
    """How a row's image tokens lie on the image (attention maps): ``square`` (all tokens, row-major,
    ``sqrt(n)`` a side: Gemma3's pooled patches, LLaVA's patches), ``base_tile`` (LLaVA-NeXT: the first
    tokens are the base tile, the whole image resized to one tile, ``(tile / patch)^2`` row-major; the
    high-resolution tiles after it are left out) or ``merged_patches`` (Qwen: ``(h / 2) x (w / 2)`` merged
    patches of ``image_grid_thw``, row-major, over the aspect-preserving resize)."""

    def __post_init__(self) -> None:
        if self.image_layout not in ("rows", "grid_patches"):
            raise ValueError(f"image_layout must be rows or grid_patches, got {self.image_layout!r}")
        if self.position_ids not in ("text", "mrope"):
            raise ValueError(f"position_ids must be text or mrope, got {self.position_ids!r}")
        if self.image_layout == "grid_patches" and "image_grid_thw" not in self.image_keys:
            raise ValueError("image_layout='grid_patches' needs 'image_grid_thw' among image_keys")
        if self.token_grid not in ("square", "base_tile", "merged_patches"):
            raise ValueError(
                f"token_grid must be square, base_tile or merged_patches, got {self.token_grid!r}"
            )

    # ------------------------------------------------------------------ prompts
    def placeholder_text(self, processor: Any) -> str:
        """The image placeholder of a plain prompt for ``processor``."""
        return self.placeholder.format_map(_ProcessorAttrs(processor))

    def processor_images(self, images: list[Any]) -> list[Any]:
        """Images as the processor takes them for a batch of one-image prompts."""
        return [[im] for im in images] if self.nest_images else list(images)

    # ------------------------------------------------------------------ image tensors
    def split(self, image_inputs: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Per-image pieces of the image tensors (each piece is a batch of one image)."""
        if self.image_layout == "grid_patches":
            grid = image_inputs["image_grid_thw"]
            counts = grid.prod(-1).tolist()
            pixels = torch.split(image_inputs["pixel_values"], counts)
            return [{"pixel_values": p, "image_grid_thw": grid[i : i + 1]} for i, p in enumerate(pixels)]
        n = int(image_inputs[self.image_keys[0]].shape[0])
        return [{k: image_inputs[k][i : i + 1] for k in self.image_keys} for i in range(n)]

    def join(self, parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The inverse of :meth:`split` for any list of pieces (repeats and reordering allowed)."""
        if not parts:
            return {}
        if self.image_layout == "grid_patches":
            return {k: torch.cat([p[k] for p in parts]) for k in self.image_keys}
        out = {}
        for k in self.image_keys:
            tensors = [p[k] for p in parts]
            shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
            padded = []
            for t in tensors:
                pad: list[int] = []
                for d in reversed(range(1, t.dim())):
                    pad += [0, shape[d] - t.shape[d]]
                padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
            out[k] = torch.cat(padded)
        return out

    def n_images(self, image_inputs: dict[str, Tensor]) -> int:
        if not image_inputs:
            return 0
        key = "image_grid_thw" if self.image_layout == "grid_patches" else self.image_keys[0]
        return int(image_inputs[key].shape[0])

    # ------------------------------------------------------------------ positions
    def positions(self, model: Any, inputs: dict[str, Tensor]) -> Int[Tensor, "*dims batch pos"]:
        """Position ids of a left-padded batch (``inputs``: the processor outputs of all rows)."""
        am = inputs["attention_mask"]
        if self.position_ids == "text":
            return (am.cumsum(-1) - 1).clamp(min=0)
        types = inputs.get("mm_token_type_ids")
        if types is None:
            raise ValueError("position_ids='mrope' needs the processor's mm_token_type_ids among token_keys")
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=types,
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=am,
        )
        return pos

    # ------------------------------------------------------------------ features
    def features(self, model: Any, image_inputs: dict[str, Tensor]) -> list[Float[Tensor, "tokens d_model"]]:
        """Projected features of each image, as the model writes them into its image tokens."""
        out = model.get_image_features(**image_inputs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, Tensor):
            return list(feats) if feats.dim() == 3 else [feats]
        return [f.reshape(-1, f.shape[-1]) for f in feats]

    # ------------------------------------------------------------------ token grid
    def grid(self, model: Any, image_part: dict[str, Tensor], n_tokens: int) -> tuple[int, int, int]:
        """``(first, rows, cols)``: image tokens ``first .. first + rows * cols`` of a row lie row-major on
        a ``rows x cols`` grid over its image (``image_part``: the row's piece of :meth:`split`)."""
        if self.token_grid == "merged_patches":
            merge = int(model.config.vision_config.spatial_merge_size)
            _, h, w = (int(x) for x in image_part["image_grid_thw"][0])
            rows, cols, first = h // merge, w // merge, 0
        elif self.token_grid == "base_tile":
            vision = model.config.vision_config
            rows = cols = int(vision.image_size) // int(vision.patch_size)
            first = 0 if model.config.vision_feature_select_strategy == "default" else 1  # CLS kept
        else:
            rows = cols = round(n_tokens**0.5)
            first = 0
            if rows * cols != n_tokens:
                raise ValueError(f"{n_tokens} image tokens do not form a square grid")
        if first + rows * cols > n_tokens:
            raise ValueError(f"a {rows}x{cols} token grid does not fit in {n_tokens} image tokens")
        return first, rows, cols
