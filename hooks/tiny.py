"""Tiny image-text-to-text models built from config, with their own word-level tokenizer.

Used by the unit tests (both supported architectures, random weights) and as the skeleton of the
SynthCXR model organism (same code, larger dims, trained). Everything here is offline: the
tokenizer is built from a word list, the processors use the PIL image backend (no torchvision).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

GEMMA3_SPECIALS = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "unk": "<unk>",
    "boi": "<start_of_image>",
    "eoi": "<end_of_image>",
    "image": "<image_soft_token>",
}
LLAVA_IMAGE_TOKEN = "<image>"
#: Words every tiny vocabulary contains: the default prompt template and the answers.
BASE_WORDS = ("question", "answer", "with", "only", "yes", "or", "no", "'", ".", ":", "?", ",")


def build_word_tokenizer(
    words: Iterable[str], arch: Literal["gemma3", "llava"] = "gemma3"
) -> PreTrainedTokenizerFast:
    """A lowercase word-level fast tokenizer over ``words`` (+ the special tokens of ``arch``).

    Punctuation is split into its own tokens; unknown words map to ``<unk>``; a ``<bos>`` is
    prepended to every sequence, as Gemma's tokenizer does.
    """
    specials = list(GEMMA3_SPECIALS.values())
    if arch == "llava":
        specials = [
            s for s in specials if s not in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
        ]
        specials.append(LLAVA_IMAGE_TOKEN)
    vocab: dict[str, int] = {}
    for word in [*specials, *BASE_WORDS, *words]:
        word = word if word in specials else word.lower()
        if word and word not in vocab:
            vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    extra = (
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        if arch == "gemma3"
        else {"image_token": LLAVA_IMAGE_TOKEN}
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        padding_side="left",
    )
    # `add_special_tokens` would append new ids; the specials are already in the vocab.
    return tok


@dataclass(frozen=True)
class TinyGemma3Config:
    """Dimensions of a tiny Gemma3ForConditionalGeneration (the MedGemma code path)."""

    text_layers: int = 4
    """Number of text decoder layers."""
    d_model: int = 64
    """Text hidden size."""
    n_heads: int = 4
    """Attention heads (query)."""
    n_kv_heads: int = 2
    """Key/value heads."""
    head_dim: int = 16
    """Per-head dimension."""
    d_mlp: int = 128
    """MLP intermediate size."""
    vision_layers: int = 2
    """SigLIP encoder layers."""
    vision_d: int = 32
    """SigLIP hidden size."""
    vision_heads: int = 2
    """SigLIP attention heads."""
    image_size: int = 64
    """Input image side in pixels."""
    patch_size: int = 8
    """SigLIP patch side; (image_size / patch_size)^2 patches, pooled to ``mm_tokens_per_image``."""
    mm_tokens_per_image: int = 16
    """Image tokens in the text sequence (a square number)."""
    projector_init_std: float = 0.05
    """Std of the projector weight. HF initialises it to 0, which makes the model ignore the image."""
    extra: dict[str, object] = field(default_factory=dict)
    """Extra Gemma3TextConfig fields."""

    def __post_init__(self) -> None:
        side = self.image_size // self.patch_size
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        per_side = round(self.mm_tokens_per_image**0.5)
        if per_side**2 != self.mm_tokens_per_image or side % per_side:
            raise ValueError(
                f"mm_tokens_per_image={self.mm_tokens_per_image} must be a square whose side divides "
                f"the patch grid side {side}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")


def tiny_gemma3(
    tokenizer: PreTrainedTokenizerFast, cfg: TinyGemma3Config | None = None, seed: int = 0
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A randomly initialised tiny Gemma3 VLM and its processor, with a non-zero projector."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    cfg = cfg or TinyGemma3Config()
    conv = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(  # type: ignore[call-arg]
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_mlp,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            query_pre_attn_scalar=cfg.head_dim,
            max_position_embeddings=512,
            sliding_window=512,
            pad_token_id=conv("<pad>"),
            bos_token_id=conv("<bos>"),
            eos_token_id=conv("<eos>"),
            **cfg.extra,
        ),
        vision_config=dict(
            hidden_size=cfg.vision_d,
            intermediate_size=2 * cfg.vision_d,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            vision_use_head=False,
        ),
        mm_tokens_per_image=cfg.mm_tokens_per_image,
        image_token_id=conv("<image_soft_token>"),
        boi_token_id=conv("<start_of_image>"),
        eoi_token_id=conv("<end_of_image>"),
        pad_token_id=conv("<pad>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, cfg.projector_init_std)
    model.eval()
    image_processor = Gemma3ImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=cfg.mm_tokens_per_image
    )
    return model, processor


def tiny_llava(
    tokenizer: PreTrainedTokenizerFast,
    text_layers: int = 3,
    d_model: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA (CLIP vision tower + Llama decoder) and its processor.

    Eager attention by default, as :meth:`VLMAdapter.from_pretrained` loads models (materialised
    masks, readable attention weights); ``"sdpa"`` for tests of code paths that must not rely on it.
    """
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    conv = tokenizer.convert_tokens_to_ids
    config = LlavaConfig(  # type: ignore[call-arg]
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=conv("<pad>"),
            bos_token_id=conv("<bos>"),
            eos_token_id=conv("<eos>"),
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        image_token_id=conv(LLAVA_IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=conv("<pad>"),
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = LlavaImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor
