"""Tokenized, left-padded batches with position classes (image / question / final tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Int
from PIL import Image
from torch import Tensor

from hooks.inputs import check_images, format_prompt

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

PositionClass = Literal["image", "question", "final", "text", "all"]
POSITION_CLASSES: tuple[str, ...] = ("image", "question", "final", "text", "all")


@dataclass
class Batch:
    """Model inputs for a batch of (image, question) pairs, all ending at the last position."""

    inputs: dict[str, Tensor]
    """Keyword arguments of the HF forward: input_ids, attention_mask, position_ids, pixel_values
    (absent when no row has an image), token_type_ids (Gemma3)."""
    image_mask: Bool[Tensor, "batch pos"]
    """Image (soft) token positions."""
    question_mask: Bool[Tensor, "batch pos"]
    """Positions of the question's own tokens (not the template's)."""
    questions: list[str]
    conditions: list[str]
    """Image condition of each row: ``image``, ``removed:<kind>``, ``swap``, ... (caller's label)."""
    texts: list[str] = field(default_factory=list)
    """The full prompt strings given to the processor."""

    def __len__(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def input_ids(self) -> Int[Tensor, "batch pos"]:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> Bool[Tensor, "batch pos"]:
        return self.inputs["attention_mask"].bool()

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def position_mask(self, cls: PositionClass) -> Bool[Tensor, "batch pos"]:
        """Boolean mask of a position class. ``text`` = real non-image tokens except the final one."""
        final = torch.zeros_like(self.image_mask)
        final[:, -1] = True
        if cls == "image":
            return self.image_mask
        if cls == "question":
            return self.question_mask
        if cls == "final":
            return final
        if cls == "text":
            return self.attention_mask & ~self.image_mask & ~final
        if cls == "all":
            return self.attention_mask
        raise ValueError(f"unknown position class {cls!r}; choose one of {POSITION_CLASSES}")

    def select(self, rows: list[int] | slice) -> Batch:
        """A sub-batch (same padding length)."""
        idx = list(range(len(self)))[rows] if isinstance(rows, slice) else rows
        inputs = {k: v[idx] for k, v in self.inputs.items() if k != "pixel_values"}
        if "pixel_values" in self.inputs:
            has = self.image_mask.any(-1)
            img_row = torch.cumsum(has.long(), 0) - 1  # row -> index into pixel_values
            keep = [int(img_row[i]) for i in idx if has[i]]
            if keep:
                inputs["pixel_values"] = self.inputs["pixel_values"][keep]
        return Batch(
            inputs,
            self.image_mask[idx],
            self.question_mask[idx],
            [self.questions[i] for i in idx],
            [self.conditions[i] for i in idx],
            [self.texts[i] for i in idx] if self.texts else [],
        )


def _placeholder(processor: Any) -> str:
    return getattr(processor, "boi_token", None) or processor.image_token


def _prompt_text(adapter: VLMAdapter, question: str, has_image: bool) -> str:
    prompt = format_prompt(question, adapter.config.prompt_template)
    if adapter.config.use_chat_template:
        content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": prompt})
        return adapter.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    return f"{_placeholder(adapter.processor)} {prompt}" if has_image else prompt


def _left_pad_merge(
    parts: list[tuple[list[int], dict[str, Tensor]]], pad_id: int, n: int
) -> dict[str, Tensor]:
    """Merge processor outputs of row groups into one left-padded batch in the original row order."""
    length = max(enc["input_ids"].shape[1] for _, enc in parts)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    out = {k: torch.full((n, length), fill[k], dtype=torch.long) for k in keys}
    pixels = []
    has_tt = False
    for rows, enc in parts:
        width = enc["input_ids"].shape[1]
        for k in keys:
            if k in enc:
                out[k][rows, length - width :] = enc[k].long()
                has_tt |= k == "token_type_ids"
        if "pixel_values" in enc:
            pixels.append((rows, enc["pixel_values"]))
    if not has_tt:
        del out["token_type_ids"]
    if pixels:
        # pixel_values rows follow the order of rows that have an image
        order = sorted((r, pv[i]) for rows, pv in pixels for i, r in enumerate(rows))
        out["pixel_values"] = torch.stack([p for _, p in order])
    return out


def _question_mask(tokenizer: Any, input_ids: Tensor, questions: list[str]) -> Tensor:
    """Mark the last occurrence of the question's tokens in each row (tries with/without a space)."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, q in enumerate(questions):
        row = input_ids[i].tolist()
        for variant in (q.strip(), " " + q.strip()):
            toks = tokenizer.encode(variant, add_special_tokens=False)
            k = len(toks)
            hit = (
                next((s for s in range(len(row) - k, -1, -1) if row[s : s + k] == toks), None) if k else None
            )
            if hit is not None:
                mask[i, hit : hit + k] = True
                break
        else:
            raise ValueError(
                f"could not locate the tokens of question {q!r} in its prompt; check the template"
            )
    return mask


def build_batch(
    adapter: VLMAdapter, images: list[Image.Image | None], questions: list[str], conditions: list[str]
) -> Batch:
    """Tokenize with the model's own processor; rows with and without images may be mixed."""
    check_images(images, adapter.config.expected_image_size)
    texts = [_prompt_text(adapter, q, im is not None) for q, im in zip(questions, images, strict=True)]
    proc = adapter.processor
    nested = adapter.spec.name == "Gemma3ForConditionalGeneration"
    with_img = [i for i, im in enumerate(images) if im is not None]
    without = [i for i, im in enumerate(images) if im is None]
    parts = []
    if with_img:
        imgs = [[images[i]] if nested else images[i] for i in with_img]
        enc = proc(text=[texts[i] for i in with_img], images=imgs, padding=True, return_tensors="pt")
        parts.append((with_img, dict(enc)))
    if without:
        enc = proc(text=[texts[i] for i in without], padding=True, return_tensors="pt")
        parts.append((without, dict(enc)))
    inputs = _left_pad_merge(parts, adapter.tokenizer.pad_token_id, len(texts))
    if nested and "token_type_ids" not in inputs:
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    am = inputs["attention_mask"]
    inputs["position_ids"] = (am.cumsum(-1) - 1).clamp(min=0)
    image_mask = inputs["input_ids"] == adapter.image_token_id
    n_img_tokens = image_mask.sum(-1)
    expected = n_img_tokens[with_img]
    if len(with_img) and (expected != expected[0]).any():
        raise ValueError(f"rows have different image-token counts {expected.tolist()}")
    return Batch(
        inputs=inputs,
        image_mask=image_mask,
        question_mask=_question_mask(adapter.tokenizer, inputs["input_ids"], questions),
        questions=questions,
        conditions=conditions,
        texts=texts,
    )
