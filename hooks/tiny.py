"""Tiny image-text-to-text models built from config, with their own word-level tokenizer.

Used by the unit tests (every supported architecture, random weights) and as the skeleton of the
SynthCXR model organism (same code, larger dims, trained). Everything here is offline: the
tokenizer is built from a word list, the processors use the PIL image backend (no torchvision).

Where HF initialises a multimodal projector to zero (Gemma3) it is re-drawn here: a model that
ignores its image proves nothing in an image test.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from hooks.loading import image_text_processor

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
QWEN_SPECIALS = {
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
}
#: Words every tiny vocabulary contains: the default prompt template and the answers.
BASE_WORDS = ("question", "answer", "with", "only", "yes", "or", "no", "'", ".", ":", "?", ",")
TinyArch = Literal["gemma3", "llava", "llava_next", "qwen2_5_vl"]
TINY_ARCHS: tuple[str, ...] = ("gemma3", "llava", "llava_next", "qwen2_5_vl")


def build_word_tokenizer(
    words: Iterable[str], arch: TinyArch = "gemma3", extra_specials: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """A lowercase word-level fast tokenizer over ``words`` (+ the special tokens of ``arch``).

    Punctuation is split into its own tokens; unknown words map to ``<unk>``. Like the real
    tokenizers: Gemma's and Llama's prepend a ``<bos>`` to every sequence; Qwen's has no BOS at all.
    ``extra_specials`` (e.g. chat-turn markers such as ``<start_of_turn>``) are appended after every
    other token, so the ids of a tokenizer built without them do not move.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    base = [GEMMA3_SPECIALS[k] for k in ("pad", "eos", "bos", "unk")]
    image_specials: dict[str, str]
    if arch == "gemma3":
        image_specials = {
            "boi_token": GEMMA3_SPECIALS["boi"],
            "eoi_token": GEMMA3_SPECIALS["eoi"],
            "image_token": GEMMA3_SPECIALS["image"],
        }
    elif arch == "qwen2_5_vl":
        image_specials = {f"{k}_token": v for k, v in QWEN_SPECIALS.items()}
    else:
        image_specials = {"image_token": LLAVA_IMAGE_TOKEN}
    specials = [*base, *image_specials.values()]
    extra_specials = [t for t in extra_specials if t not in specials]
    vocab: dict[str, int] = {}
    for word in [*specials, *BASE_WORDS, *words, *extra_specials]:
        word = word if word in specials or word in extra_specials else word.lower()
        if word and word not in vocab:
            vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    if arch != "qwen2_5_vl":
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None if arch == "qwen2_5_vl" else "<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=image_specials,
        padding_side="left",
    )
    if extra_specials:  # already in the vocab: registering them only makes the tokenizer match them whole
        tok.add_special_tokens({"additional_special_tokens": list(extra_specials)})
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


def tiny_llava_next(
    tokenizer: PreTrainedTokenizerFast,
    text_layers: int = 3,
    d_model: int = 64,
    tile_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A randomly initialised tiny LLaVA-NeXT (anyres tiles of a CLIP tower + Llama decoder) and its processor.

    Each image becomes a base tile plus the tiles of the best grid among ``image_grid_pinpoints``
    (1x2, 2x1 or 2x2 tiles of ``tile_size`` pixels); the number of image tokens depends on the image's
    aspect ratio (unpadding + one newline per row), so rows of one batch may have different counts.
    """
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    conv = tokenizer.convert_tokens_to_ids
    pinpoints = [[tile_size, 2 * tile_size], [2 * tile_size, tile_size], [2 * tile_size, 2 * tile_size]]
    config = LlavaNextConfig(  # type: ignore[call-arg]
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
            image_size=tile_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        image_token_id=conv(LLAVA_IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=conv("<pad>"),
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        crop_size={"height": tile_size, "width": tile_size},
        do_center_crop=False,
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=LLAVA_IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


#: Qwen2.5-VL's processor for images and text only: transformers 5.23 requires a video processor in
#: ``Qwen2_5_VLProcessor``, and every Qwen video processor imports torchvision; images and text go through
#: the same code either way. It saves itself as ``Qwen2_5_VLProcessor`` (:func:`hooks.loading.image_text_processor`).
ImageTextQwen2_5_VLProcessor: Any = image_text_processor(Qwen2_5_VLProcessor)


def tiny_qwen2_5_vl(
    tokenizer: PreTrainedTokenizerFast,
    text_layers: int = 3,
    d_model: int = 64,
    patch_size: int = 8,
    max_side: int = 96,
    seed: int = 0,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Any]:
    """A randomly initialised tiny Qwen2.5-VL (windowed ViT + patch merger + Qwen2 decoder) and its processor.

    Dynamic resolution: an image is resized to multiples of ``2 * patch_size`` pixels (at most
    ``max_side**2`` pixels in all) and gives ``(h / 2p) * (w / 2p)`` image tokens, placed at 3-D rotary
    positions (temporal, height, width). The vision windows are 2x2 merged tokens, so images larger
    than 32 pixels a side use both window and full attention.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    conv = tokenizer.convert_tokens_to_ids
    ids = {k: int(conv(v)) for k, v in QWEN_SPECIALS.items()}  # type: ignore[arg-type]
    head_dim = d_model // 4
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]  # temporal, height, width frequency sections
    config = Qwen2_5_VLConfig(  # type: ignore[call-arg]
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            pad_token_id=conv("<pad>"),
            bos_token_id=None,
            eos_token_id=conv("<eos>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=patch_size,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=4 * patch_size,
            out_hidden_size=d_model,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        pad_token_id=conv("<pad>"),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": (2 * patch_size) ** 2, "longest_edge": max_side**2},
    )
    return model, ImageTextQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_vlm(
    arch: TinyArch, words: Iterable[str], seed: int = 0, extra_specials: Iterable[str] = ()
) -> tuple[Any, Any]:
    """(model, processor) of a tiny model of ``arch`` with a word tokenizer over ``words``."""
    tok = build_word_tokenizer(words, arch, extra_specials)
    if arch == "gemma3":
        return tiny_gemma3(tok, seed=seed)
    if arch == "llava":
        return tiny_llava(tok, seed=seed)
    if arch == "llava_next":
        return tiny_llava_next(tok, seed=seed)
    return tiny_qwen2_5_vl(tok, seed=seed)
