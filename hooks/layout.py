"""Prompt layouts without the image processor: an image is processed once, its rows reuse what it gave.

A processor turns (image, prompt) into model inputs in two independent halves (transformers 5,
``ProcessorMixin.__call__``): the image processor makes the pixel tensors and, from them, a
*replacement* string for the image's placeholder (Gemma3: ``\\n\\n<start_of_image>`` + 256 soft tokens +
``<end_of_image>\\n\\n``; LLaVA-NeXT and Qwen2.5-VL: a count that depends on the image size); the text
half substitutes that string into the prompt and tokenizes it. Every question about an image repeats
the first half. :class:`EncodedImage` keeps what the first half gave for one image (its projected
features, the replacement string, the small tensors positions depend on), so :func:`build_layout`
lays out any number of rows with the tokenizer alone: the same ids, masks, per-token keys and position
ids as :meth:`hooks.adapter.VLMAdapter.prepare` (checked for every family in ``tests/test_prefix.py``),
and no pixel tensors: the features go in through ``image_features=``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from hooks.batch import Batch, _question_mask, adds_bos, render_prompts
from hooks.prompt import Rendered, check_bos

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter


@dataclass(frozen=True)
class EncodedImage:
    """One image as the model sees it, computed once (:meth:`hooks.adapter.VLMAdapter.encode`)."""

    features: Float[Tensor, "tokens d_model"]
    """Projected features, as the model writes them into the image tokens."""
    replacement: str
    """The text the processor substitutes for the image's placeholder (its image tokens and markers)."""
    grid: dict[str, Tensor] = field(default_factory=dict)
    """Non-pixel image tensors that positions depend on (Qwen's ``image_grid_thw``), one image each."""


def _tokenize(adapter: VLMAdapter, texts: list[str], rendered: list[Rendered]) -> dict[str, Tensor]:
    enc = adapter.tokenizer(
        texts, padding=True, return_tensors="pt", add_special_tokens=adds_bos(rendered), padding_side="left"
    )
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def build_layout(
    adapter: VLMAdapter,
    questions: list[str],
    images: list[EncodedImage | None],
    conditions: list[str] | None = None,
) -> Batch:
    """A left-padded batch of ``questions`` about ``images`` (``None``: no image tokens), laid out by the
    tokenizer from each image's replacement string: :meth:`~hooks.adapter.VLMAdapter.prepare` without
    re-running the image processor. The batch carries no pixels; pass the images' features as
    ``image_features`` (:func:`layout_features`)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: pass one image per question")
    if not questions:
        raise ValueError("empty batch: pass at least one (image, question) pair")
    family, proc = adapter.spec.inputs, adapter.processor
    rendered = render_prompts(adapter, list(questions), [im is not None for im in images])
    placeholder = proc.image_token
    texts = []
    for r, im in zip(rendered, images, strict=True):
        if im is not None and r.text.count(placeholder) != 1:
            raise ValueError(f"prompt {r.text!r} holds {r.text.count(placeholder)} image placeholders, not 1")
        texts.append(r.text if im is None else r.text.replace(placeholder, im.replacement, 1))
    inputs = _tokenize(adapter, texts, rendered)
    image_mask = inputs["input_ids"] == adapter.image_token_id
    for key in family.token_keys:  # image tokens = 1, as the processor's create_mm_token_type_ids writes
        inputs[key] = (image_mask & inputs["attention_mask"].bool()).long()
    check_bos(inputs["input_ids"], inputs["attention_mask"], adapter.tokenizer.bos_token_id)
    grids = [im.grid for im in images if im is not None]
    extra = {k: torch.cat([g[k] for g in grids]) for k in (grids[0] if grids else {})}
    inputs["position_ids"] = family.positions(adapter.model, {**inputs, **extra})
    return Batch(
        inputs=inputs,
        image_mask=image_mask,
        question_mask=_question_mask(adapter.tokenizer, inputs["input_ids"], list(questions)),
        questions=list(questions),
        conditions=list(conditions) if conditions is not None else [_cond(im) for im in images],
        texts=[r.text for r in rendered],
        family=family,
    )


def _cond(im: EncodedImage | None) -> str:
    return "image" if im is not None else "removed:none"


def layout_features(images: list[EncodedImage | None]) -> list[Tensor]:
    """The ``image_features`` argument for a batch laid out from ``images``."""
    return [im.features for im in images if im is not None]
