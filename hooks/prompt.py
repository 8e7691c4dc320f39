"""Prompts as the model expects them: the chat turn format of an instruction-tuned model, or a plain
prompt; the image before or after the question; exactly one BOS.

``chat``: the question (and the image) go into one user turn of the processor's chat template,
followed by the generation prompt (e.g. ``<start_of_turn>model\\n``), so the first answer token is
predicted where the model would start its reply. ``plain``: ``<image placeholder> <prompt>`` (or the
reverse), for models trained without a turn format (the SynthCXR organism).

BOS: a chat template that writes ``{{ bos_token }}`` itself (Gemma 3) is tokenized without the
tokenizer's special tokens; one that does not (LLaVA 1.5 style) is tokenized with them, so the
tokenizer adds its BOS. Either way :func:`check_bos` refuses a row that starts with two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from jaxtyping import Bool, Int
from torch import Tensor

from hooks.inputs import format_prompt

PromptMode = Literal["auto", "chat", "plain"]
PROMPT_MODES: tuple[str, ...] = ("auto", "chat", "plain")
ImagePosition = Literal["before", "after"]
IMAGE_POSITIONS: tuple[str, ...] = ("before", "after")


def has_chat_template(processor: Any) -> bool:
    return bool(getattr(processor, "chat_template", None))


def resolve_mode(mode: str, processor: Any) -> Literal["chat", "plain"]:
    """``auto`` -> ``chat`` if the processor has a chat template, else ``plain``; ``chat`` needs one."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode {mode!r} is not one of {PROMPT_MODES}")
    if mode == "chat" and not has_chat_template(processor):
        raise ValueError(
            "prompt mode 'chat' but this processor has no chat template (chat_template.json / "
            "tokenizer_config.json); use prompt='plain' or give the processor its template"
        )
    if mode == "auto":
        return "chat" if has_chat_template(processor) else "plain"
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class Rendered:
    """One prompt as given to the processor."""

    text: str
    """The prompt text, image placeholder included (the processor expands it into image tokens)."""
    add_special_tokens: bool
    """Whether the tokenizer adds its special tokens (BOS); ``False`` when the text already starts with it."""


def render(
    processor: Any,
    placeholder: str,
    question: str,
    *,
    template: str,
    mode: Literal["chat", "plain"],
    image_position: ImagePosition,
    has_image: bool,
) -> Rendered:
    """The prompt for ``question`` (see the module docstring)."""
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position {image_position!r} is not one of {IMAGE_POSITIONS}")
    prompt = format_prompt(question, template)
    if mode == "chat":
        content: list[dict[str, str]] = [{"type": "text", "text": prompt}]
        if has_image:
            content.insert(0 if image_position == "before" else 1, {"type": "image"})
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        bos = getattr(processor.tokenizer, "bos_token", None)
        return Rendered(text, not (bos and text.startswith(bos)))
    if not has_image:
        return Rendered(prompt, True)
    return Rendered(
        f"{placeholder} {prompt}" if image_position == "before" else f"{prompt} {placeholder}", True
    )


def check_bos(
    input_ids: Int[Tensor, "batch pos"], attention_mask: Bool[Tensor, "batch pos"], bos_id: int | None
) -> None:
    """Refuse rows whose first two real tokens are both BOS (template and tokenizer both added one)."""
    if bos_id is None:
        return
    for i in range(input_ids.shape[0]):
        real = input_ids[i][attention_mask[i].bool()]
        if len(real) >= 2 and int(real[0]) == bos_id and int(real[1]) == bos_id:
            raise ValueError(
                f"row {i} starts with two BOS tokens (id {bos_id}): the prompt text already holds one and "
                "the tokenizer added another; render the chat template and tokenize without special tokens"
            )
