"""Image features computed once and reused: every question and condition about an image shares them.

The vision tower and projector of a VLM do not depend on the question, so an evaluator (many
questions per image), the LoRA trainer (frozen vision side) and the organism's analyses encode each
image once with :meth:`hooks.adapter.VLMAdapter.encode` and pass the features to
``adapter.margins(batch, image_features=...)``, which skips the vision tower. The cache keeps the whole
:class:`hooks.layout.EncodedImage`, so rows about a cached image are laid out by the tokenizer alone
(:meth:`hooks.adapter.VLMAdapter.layout`): the image processor runs once per image, not once per row.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from jaxtyping import Float
from PIL import Image
from torch import Tensor

from hooks.layout import EncodedImage

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter


class ImageFeatureCache:
    """Projected features by key (an image id, or e.g. ``removed:gray`` for a replacement image).

    Features are computed one image at a time, so a cached value equals the single-image encoding
    exactly. At most ``max_items`` are kept; the oldest is dropped first.
    """

    def __init__(self, adapter: VLMAdapter, max_items: int = 8192) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.adapter = adapter
        self.max_items = max_items
        self._feats: OrderedDict[str, EncodedImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._feats)

    def __contains__(self, key: object) -> bool:
        return key in self._feats

    def get(
        self, key: str, image: Image.Image | Callable[[], Image.Image]
    ) -> Float[Tensor, "tokens d_model"]:
        """The features stored under ``key``; ``image`` (or ``image()``) is encoded only if it is new."""
        return self.encoded(key, image).features

    def encoded(self, key: str, image: Image.Image | Callable[[], Image.Image]) -> EncodedImage:
        """The :class:`~hooks.layout.EncodedImage` stored under ``key`` (encoded only if it is new)."""
        if key not in self._feats:
            im = image() if callable(image) else image
            if len(self._feats) >= self.max_items:
                self._feats.popitem(last=False)
            self._feats[key] = self.adapter.encode([im])[0]
        return self._feats[key]
