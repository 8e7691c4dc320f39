"""Tokenized, left-padded batches with position classes (image / question / final tokens).

Every family-specific step (which processor outputs to keep, how images nest, how position ids are
made, how image tensors split per image) comes from the family's :class:`hooks.families.FamilyInputs`
(a row of :data:`hooks.sites.ARCHITECTURES`); nothing here names an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Int
from PIL import Image
from torch import Tensor

from hooks.families import FamilyInputs
from hooks.inputs import check_images
from hooks.prompt import Rendered, check_bos, render

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

PositionClass = Literal["image", "question", "final", "text", "all"]
POSITION_CLASSES: tuple[str, ...] = ("image", "question", "final", "text", "all")


@dataclass
class Batch:
    """Model inputs for a batch of (image, question) pairs, all ending at the last position."""

    inputs: dict[str, Tensor]
    """Keyword arguments of the HF forward: input_ids, attention_mask, position_ids (``(3, batch, pos)``
    for Qwen's 3-D rotary positions), the family's image keys (absent when no row has an image; one
    image per row that has one, in row order) and per-token keys (Gemma3's token_type_ids)."""
    image_mask: Bool[Tensor, "batch pos"]
    """Image (soft) token positions."""
    question_mask: Bool[Tensor, "batch pos"]
    """Positions of the question's own tokens (not the template's)."""
    questions: list[str]
    conditions: list[str]
    """Image condition of each row: ``image``, ``removed:<kind>``, ``swap``, ... (caller's label)."""
    texts: list[str] = field(default_factory=list)
    """The full prompt strings given to the processor."""
    family: FamilyInputs = field(default_factory=FamilyInputs)
    """Input handling of the model's family (how the image tensors split per image)."""

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

    @property
    def image_inputs(self) -> dict[str, Tensor]:
        """The image tensors (the family's image keys), one image per row that has one, in row order."""
        return {k: self.inputs[k] for k in self.family.image_keys if k in self.inputs}

    def image_parts(self) -> list[dict[str, Tensor]]:
        """The image tensors split per image: entry k belongs to the k-th row that has an image."""
        inputs = self.image_inputs
        return self.family.split(inputs) if inputs else []

    def select(self, rows: list[int] | slice) -> Batch:
        """A sub-batch (same padding length); rows may repeat."""
        idx = list(range(len(self)))[rows] if isinstance(rows, slice) else list(rows)
        image_keys = set(self.family.image_keys)
        inputs = {
            k: (v[:, idx] if k == "position_ids" and v.dim() == 3 else v[idx])
            for k, v in self.inputs.items()
            if k not in image_keys
        }
        has = self.image_mask.any(-1)
        img_row = torch.cumsum(has.long(), 0) - 1  # row -> index among the rows with an image
        parts = self.image_parts()  # none in a batch laid out without pixels (hooks.layout)
        if parts:
            inputs.update(self.family.join([parts[int(img_row[i])] for i in idx if has[i]]))
        return Batch(
            inputs,
            self.image_mask[idx],
            self.question_mask[idx],
            [self.questions[i] for i in idx],
            [self.conditions[i] for i in idx],
            [self.texts[i] for i in idx] if self.texts else [],
            self.family,
        )


def _left_pad_merge(
    parts: list[tuple[list[int], dict[str, Tensor]]], pad_id: int, n: int, family: FamilyInputs
) -> dict[str, Tensor]:
    """Merge processor outputs of row groups into one left-padded batch in the original row order.

    Token keys missing from a group (e.g. ``token_type_ids`` of rows without an image) are 0 there.
    """
    length = max(enc["input_ids"].shape[1] for _, enc in parts)
    keys = ("input_ids", "attention_mask", *family.token_keys)
    out = {k: torch.full((n, length), pad_id if k == "input_ids" else 0, dtype=torch.long) for k in keys}
    for rows, enc in parts:
        width = enc["input_ids"].shape[1]
        for k in keys:
            if k in enc:
                out[k][rows, length - width :] = enc[k].long()
    image_parts = [
        (r, piece)
        for rows, enc in parts
        if family.image_keys[0] in enc
        for r, piece in zip(rows, family.split({k: enc[k] for k in family.image_keys}), strict=True)
    ]
    # image tensors follow the order of the rows that have an image
    out.update(family.join([piece for _, piece in sorted(image_parts, key=lambda x: x[0])]))
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


def render_prompts(adapter: VLMAdapter, questions: list[str], has_image: list[bool]) -> list[Rendered]:
    """Each row's prompt as the adapter's prompt settings render it (:mod:`hooks.prompt`)."""
    cfg = adapter.config
    placeholder = adapter.spec.inputs.placeholder_text(adapter.processor)
    return [
        render(
            adapter.processor,
            placeholder,
            q,
            template=cfg.prompt_template,
            mode=adapter.prompt_mode,
            image_position=cfg.image_position,
            has_image=h,
        )
        for q, h in zip(questions, has_image, strict=True)
    ]


def adds_bos(rendered: list[Rendered]) -> bool:
    """Whether the tokenizer adds its special tokens for these prompts (all must agree)."""
    flags = {r.add_special_tokens for r in rendered}
    if len(flags) > 1:
        raise ValueError("prompts of one batch disagree on whether the tokenizer adds BOS; render them alike")
    return flags.pop()


def _encode(proc: Any, rendered: list[Rendered], images: list[Any] | None) -> dict[str, Tensor]:
    kwargs: dict[str, Any] = dict(padding=True, return_tensors="pt", add_special_tokens=adds_bos(rendered))
    if images is not None:
        kwargs["images"] = images
    return dict(proc(text=[r.text for r in rendered], **kwargs))


def build_batch(
    adapter: VLMAdapter, images: list[Image.Image | None], questions: list[str], conditions: list[str]
) -> Batch:
    """Tokenize with the model's own processor; rows with and without images may be mixed, and images
    may differ in size and mode (every processor resizes; ``expected_image_size`` is an opt-in guard)."""
    check_images(images, adapter.size_guard)
    family = adapter.spec.inputs
    rendered = render_prompts(adapter, questions, [im is not None for im in images])
    proc = adapter.processor
    with_img = [i for i, im in enumerate(images) if im is not None]
    without = [i for i, im in enumerate(images) if im is None]
    parts = []
    if with_img:
        imgs = family.processor_images([images[i] for i in with_img])
        parts.append((with_img, _encode(proc, [rendered[i] for i in with_img], imgs)))
    if without:
        parts.append((without, _encode(proc, [rendered[i] for i in without], None)))
    inputs = _left_pad_merge(parts, adapter.tokenizer.pad_token_id, len(questions), family)
    check_bos(inputs["input_ids"], inputs["attention_mask"], adapter.tokenizer.bos_token_id)
    inputs["position_ids"] = family.positions(adapter.model, inputs)
    return Batch(
        inputs=inputs,
        image_mask=inputs["input_ids"] == adapter.image_token_id,
        question_mask=_question_mask(adapter.tokenizer, inputs["input_ids"], questions),
        questions=questions,
        conditions=conditions,
        texts=[r.text for r in rendered],
        family=family,
    )
