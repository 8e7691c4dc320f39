"""Images, image conditions and prompts: everything that happens before tokenization.

Image conditions are explicit and recorded: an analysis never says "without the image" without
saying which of :data:`REMOVALS` it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from hooks.medimage import minmax_to_uint8, read_image, to_rgb8

DEFAULT_TEMPLATE = "Question: {q}\nAnswer with only 'yes' or 'no'."
RemovalKind = Literal["gray", "white", "noise", "none"]
REMOVALS: tuple[str, ...] = ("gray", "white", "noise", "none")

ImageLike = Image.Image | np.ndarray | str | Path


@dataclass(frozen=True)
class Removal:
    """How the image is removed for the text-only condition."""

    kind: RemovalKind = "gray"
    """``gray`` (all 128), ``white`` (all 255), ``noise`` (Gaussian, mean/sd below, clipped to
    0..255), or ``none`` (no image tokens at all: the prompt carries no image placeholder)."""
    noise_mean: float = 128.0
    """Mean of the noise image."""
    noise_sd: float = 64.0
    """Standard deviation of the noise image."""
    seed: int = 0
    """Seed of the noise image (each image's noise also depends on its index in the batch)."""

    def __post_init__(self) -> None:
        if self.kind not in REMOVALS:
            raise ValueError(f"unknown removal {self.kind!r}; choose one of {REMOVALS}")
        if self.noise_sd < 0:
            raise ValueError(f"noise_sd must be >= 0, got {self.noise_sd}")

    @property
    def label(self) -> str:
        """Short label recorded with results, e.g. ``removed:gray``."""
        return f"removed:{self.kind}"

    def apply(self, like: Image.Image, index: int = 0) -> Image.Image | None:
        """The replacement for ``like`` (same size and mode), or ``None`` for ``kind="none"``."""
        if self.kind == "none":
            return None
        w, h = like.size
        if self.kind == "gray":
            arr = np.full((h, w), 128, np.uint8)
        elif self.kind == "white":
            arr = np.full((h, w), 255, np.uint8)
        else:
            rng = np.random.default_rng([self.seed, index])
            arr = np.clip(rng.normal(self.noise_mean, self.noise_sd, (h, w)), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert(like.mode)


@dataclass(frozen=True)
class Box:
    """A finding's bounding box on one image (VinDr-CXR convention), in pixels of that image.

    The fields are the columns of a VinDr-CXR box table, in order; ``x_max`` / ``y_max`` are exclusive
    (``x_min <= x < x_max``). Coordinates may be fractional (VinDr annotations are). The one box type:
    SynthCXR renders them, :func:`analyses.data.boxes.boxes_for` reads them from tables, and
    :func:`interp.attention.attention_in_box` scores attention against them.
    """

    image_id: str
    """Image the box belongs to."""
    class_name: str
    """Finding (flipscope key such as ``pleural_effusion``, or the dataset's class name)."""
    x_min: float
    """Left edge (inclusive)."""
    y_min: float
    """Top edge (inclusive)."""
    x_max: float
    """Right edge (exclusive)."""
    y_max: float
    """Bottom edge (exclusive)."""

    def __post_init__(self) -> None:
        if not (0 <= self.x_min < self.x_max and 0 <= self.y_min < self.y_max):
            raise ValueError(f"Box {self}: need 0 <= x_min < x_max and 0 <= y_min < y_max (max exclusive)")

    @property
    def coords(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)``."""
        return (self.x_min, self.y_min, self.x_max, self.y_max)


def load_image(image: ImageLike) -> Image.Image:
    """An 8-bit RGB PIL image from a PIL image, an array, or a file path (DICOM, 16-bit PNG, JPEG, ...).

    Files, 16-bit PIL images and uint16 (H, W) arrays go through :mod:`hooks.medimage` (DICOM windowing,
    MONOCHROME1 inversion, 16-bit scaled min..max to 8-bit); uint8 arrays are (H, W) or (H, W, 3).
    """
    if isinstance(image, str | Path):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16 and image.ndim == 2:
            return Image.fromarray(minmax_to_uint8(image)).convert("RGB")
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"image arrays must be uint8 (H, W) or (H, W, 3), or uint16 (H, W); got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return to_rgb8(image)
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, uint8 array or path")


def check_images(images: list[Image.Image | None], expected_size: int | None) -> None:
    """With ``expected_size`` set (an opt-in guard), refuse images of another size.

    Images of different sizes and modes may share a batch: every supported processor converts to RGB
    and resizes (Qwen2.5-VL and LLaVA-NeXT keep the aspect ratio, so their rows get different numbers
    of image tokens). The guard is for models trained at one size (the SynthCXR organism), where a
    silent resize would change what the model sees.
    """
    if expected_size is None:
        return
    bad = sorted({im.size for im in images if im is not None and im.size != (expected_size, expected_size)})
    if bad:
        raise ValueError(
            f"image size {bad[0]} does not match the model's input size {expected_size}x{expected_size}"
            f"{f' (and {len(bad) - 1} other sizes)' if len(bad) > 1 else ''}; resize it, or let the processor "
            "resize it: --resize on the command line, AdapterConfig(resize_images=True) from Python"
        )


def check_image_size(image_id: str, image: Image.Image, expected_size: int | None) -> None:
    """Refuse one image (named) of another size than ``expected_size`` (``None``: any size), with the fix;
    run over every image before anything runs (the evaluator, ``flipscope cache``)."""
    if expected_size is not None and image.size != (expected_size, expected_size):
        w, h = image.size
        raise ValueError(
            f"image {image_id} is {w}x{h} but this model takes only {expected_size}x{expected_size} images: "
            f"pass --resize (AdapterConfig(resize_images=True)) to resize every image to "
            f"{expected_size}x{expected_size}, recorded in meta.json, or resize the images yourself"
        )


def format_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt text for ``question``; a clear error for an empty question or a bad template."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"empty question {question!r}: every row needs question text")
    if "{q}" not in template:
        raise ValueError(f"prompt template must contain '{{q}}' where the question goes: {template!r}")
    return template.replace("{q}", question.strip())
