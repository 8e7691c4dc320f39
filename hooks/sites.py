"""Typed site names and the one table that maps them to module paths per architecture.

A *site* is a place in the forward pass whose activation can be read or overwritten:
``resid_post(17)`` is the residual stream after text decoder layer 17. Callers only ever use
these names; the module path (``model.language_model.layers.17``) is written once, here.

Conventions (all architectures):

- ``resid_pre(L)``: the residual stream entering text layer L (for L = 0: token embeddings with the
  image features already merged in). ``resid_pre(L + 1) == resid_post(L)``.
- ``resid_post(L)``: the output of text layer L.
- ``attn_out(L)`` / ``mlp_out(L)``: what the attention / MLP block adds to the residual stream, so
  ``resid_post(L) == resid_pre(L) + attn_out(L) + mlp_out(L)`` holds exactly. In Gemma3 these are the
  outputs of the post-attention / post-feedforward norms (Gemma3 normalises each block's output
  before the residual add); in Llama-family decoders they are ``self_attn`` / ``mlp`` outputs.
- ``vision_resid(i)``: the output of vision-encoder layer i (one row per image patch; Qwen2.5-VL's
  vision blocks run on the patches of all images of a batch as one sequence, in window order).
- ``image_embeds()``: the projector's output. For Gemma3 and LLaVA these are exactly the features
  written into the image tokens; LLaVA-NeXT then unpads its tiles and adds a newline feature per row,
  and Qwen2.5-VL's merger output is in window order (the model un-permutes it afterwards). The
  features as placed in the sequence: :meth:`hooks.adapter.VLMAdapter.image_features`.
- ``final_norm()``: the final norm's output, the input to the unembedding.

A row of :data:`ARCHITECTURES` is the whole family: its module paths here, and its input handling
(processor keys, image nesting, position ids, image placeholder) in :class:`hooks.families.FamilyInputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hooks.families import FamilyInputs

SiteKind = Literal[
    "resid_pre", "resid_post", "attn_out", "mlp_out", "vision_resid", "image_embeds", "final_norm"
]
LAYERED_KINDS: frozenset[str] = frozenset({"resid_pre", "resid_post", "attn_out", "mlp_out", "vision_resid"})
TEXT_KINDS: frozenset[str] = frozenset({"resid_pre", "resid_post", "attn_out", "mlp_out", "final_norm"})


@dataclass(frozen=True, order=True)
class Site:
    """A named place in the forward pass."""

    kind: str
    """One of :data:`SiteKind`."""
    layer: int | None = None
    """Layer index for layered kinds (negative indices count from the end); ``None`` otherwise."""

    def __post_init__(self) -> None:
        if self.kind not in SiteKind.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"unknown site kind {self.kind!r}; expected one of {SiteKind.__args__}")  # type: ignore[attr-defined]
        if self.kind in LAYERED_KINDS and self.layer is None:
            raise ValueError(f"site {self.kind!r} needs a layer, e.g. {self.kind}(3)")
        if self.kind not in LAYERED_KINDS and self.layer is not None:
            raise ValueError(f"site {self.kind!r} takes no layer (got {self.layer})")

    @property
    def is_text(self) -> bool:
        return self.kind in TEXT_KINDS

    def __str__(self) -> str:
        return f"{self.kind}({'' if self.layer is None else self.layer})"


def resid_pre(layer: int) -> Site:
    """Residual stream entering text decoder layer ``layer``."""
    return Site("resid_pre", layer)


def resid_post(layer: int) -> Site:
    """Residual stream leaving text decoder layer ``layer``."""
    return Site("resid_post", layer)


def attn_out(layer: int) -> Site:
    """What the attention block of text layer ``layer`` adds to the residual stream."""
    return Site("attn_out", layer)


def mlp_out(layer: int) -> Site:
    """What the MLP block of text layer ``layer`` adds to the residual stream."""
    return Site("mlp_out", layer)


def vision_resid(layer: int) -> Site:
    """Output of vision-encoder layer ``layer`` (one row per patch)."""
    return Site("vision_resid", layer)


def vision_layer(layer: int) -> Site:
    """Alias of :func:`vision_resid`."""
    return vision_resid(layer)


def image_embeds() -> Site:
    """Projector output: the image features merged into the text sequence."""
    return Site("image_embeds")


def final_norm() -> Site:
    """Final norm output (input to the unembedding)."""
    return Site("final_norm")


def parse_site(text: str) -> Site:
    """``"resid_post(3)"`` -> ``resid_post(3)``; the inverse of ``str(site)``."""
    text = text.strip()
    if not text.endswith(")") or "(" not in text:
        raise ValueError(f"cannot parse site {text!r}; write it like 'resid_post(3)' or 'image_embeds()'")
    kind, arg = text[:-1].split("(", 1)
    return Site(kind, int(arg) if arg.strip() else None)


@dataclass(frozen=True)
class ModuleRef:
    """Where a site lives: a module path and how to pick the tensor from its input/output."""

    path: str
    """Dotted module path from the top-level HF model (``model.language_model.layers.3``)."""
    io: Literal["input", "output"]
    """Read the module's first positional input or its output."""
    index: int | None
    """Index into a tuple output (``None`` if the output is a tensor)."""


@dataclass(frozen=True)
class ArchSpec:
    """Module layout of one HF image-text-to-text architecture. One row of :data:`ARCHITECTURES`."""

    name: str
    """HF class name, e.g. ``Gemma3ForConditionalGeneration``."""
    model_type: str
    """``model_type`` of its config (``gemma3``): finds the row of a config.json without ``architectures``."""
    text_layers: str
    """Path of the text decoder's layer list."""
    vision_layers: str
    """Path of the vision encoder's layer list."""
    projector: str
    """Path of the multimodal projector (its output is the merged image features)."""
    final_norm: str
    """Path of the final norm of the text model."""
    lm_head: str
    """Path of the unembedding."""
    attn_out: tuple[str, int | None]
    """(submodule of a text layer, tuple index) whose output is the attention block's contribution."""
    mlp_out: tuple[str, int | None]
    """(submodule of a text layer, tuple index) whose output is the MLP block's contribution."""
    vision_layer_index: int | None
    """Tuple index of a vision layer's output (``None`` if it returns a tensor)."""
    self_attn: str = "self_attn"
    """Name of the attention submodule inside a text layer."""
    logit_softcap_attr: str | None = None
    """Text-config attribute holding the final logit soft-cap, if the architecture has one."""
    inputs: FamilyInputs = field(default_factory=FamilyInputs)
    """How images and prompts become this family's model inputs (:class:`hooks.families.FamilyInputs`)."""

    def resolve(self, site: Site, n_text_layers: int, n_vision_layers: int) -> ModuleRef:
        """Map ``site`` to a :class:`ModuleRef`, resolving negative layers and checking ranges."""
        if site.kind == "image_embeds":
            return ModuleRef(self.projector, "output", None)
        if site.kind == "final_norm":
            return ModuleRef(self.final_norm, "output", None)
        assert site.layer is not None
        n = n_vision_layers if site.kind == "vision_resid" else n_text_layers
        layer = site.layer + n if site.layer < 0 else site.layer
        if not 0 <= layer < n:
            what = "vision" if site.kind == "vision_resid" else "text"
            raise IndexError(f"{site}: layer out of range; this model has {n} {what} layers (0..{n - 1})")
        if site.kind == "vision_resid":
            return ModuleRef(f"{self.vision_layers}.{layer}", "output", self.vision_layer_index)
        base = f"{self.text_layers}.{layer}"
        if site.kind == "resid_pre":
            return ModuleRef(base, "input", None)
        if site.kind == "resid_post":
            return ModuleRef(base, "output", None)
        sub, idx = self.attn_out if site.kind == "attn_out" else self.mlp_out
        return ModuleRef(f"{base}.{sub}", "output", idx)


#: The declarative table. Adding an architecture = adding a row (and a tiny model built from config
#: in ``hooks.tiny`` + the family in the tests' adapter fixture).
ARCHITECTURES: dict[str, ArchSpec] = {
    "Gemma3ForConditionalGeneration": ArchSpec(  # MedGemma
        name="Gemma3ForConditionalGeneration",
        model_type="gemma3",
        text_layers="model.language_model.layers",
        vision_layers="model.vision_tower.encoder.layers",
        projector="model.multi_modal_projector",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        attn_out=("post_attention_layernorm", None),
        mlp_out=("post_feedforward_layernorm", None),
        vision_layer_index=None,
        logit_softcap_attr="final_logit_softcapping",
        # token_type_ids mark the image block, which attends bidirectionally
        inputs=FamilyInputs(token_keys=("token_type_ids",), nest_images=True, placeholder="{boi_token}"),
    ),
    "LlavaForConditionalGeneration": ArchSpec(  # LLaVA 1.5, LLaVA-Med HF ports
        name="LlavaForConditionalGeneration",
        model_type="llava",
        text_layers="model.language_model.layers",
        vision_layers="model.vision_tower.encoder.layers",
        projector="model.multi_modal_projector",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        attn_out=("self_attn", 0),
        mlp_out=("mlp", None),
        vision_layer_index=None,
    ),
    "LlavaNextForConditionalGeneration": ArchSpec(  # LLaVA-NeXT (anyres tiles)
        name="LlavaNextForConditionalGeneration",
        model_type="llava_next",
        text_layers="model.language_model.layers",
        vision_layers="model.vision_tower.encoder.layers",
        projector="model.multi_modal_projector",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        attn_out=("self_attn", 0),
        mlp_out=("mlp", None),
        vision_layer_index=None,
        inputs=FamilyInputs(image_keys=("pixel_values", "image_sizes"), token_grid="base_tile"),
    ),
    "Qwen2_5_VLForConditionalGeneration": ArchSpec(  # Qwen2.5-VL (Lingshu, HuatuoGPT-Vision, ...)
        name="Qwen2_5_VLForConditionalGeneration",
        model_type="qwen2_5_vl",
        text_layers="model.language_model.layers",
        vision_layers="model.visual.blocks",
        projector="model.visual.merger",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        attn_out=("self_attn", 0),
        mlp_out=("mlp", None),
        vision_layer_index=None,
        inputs=FamilyInputs(
            image_keys=("pixel_values", "image_grid_thw"),
            token_keys=("mm_token_type_ids",),
            image_layout="grid_patches",
            position_ids="mrope",
            placeholder="<|vision_start|>{image_token}<|vision_end|>",  # as its chat template writes it
            token_grid="merged_patches",
        ),
    ),
}


def config_arch(hf_config: object) -> str:
    """The HF class name an HF config loads as: its ``architectures`` entry, else the class of the
    :data:`ARCHITECTURES` row with its ``model_type`` (transformers loads such a config by its class too),
    else the config's own class name (refused by :func:`arch_spec`)."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return str(archs[0])
    model_type = getattr(hf_config, "model_type", None)
    rows = [name for name, spec in ARCHITECTURES.items() if spec.model_type == model_type]
    return rows[0] if rows else type(hf_config).__name__


def arch_spec(model_or_name: object) -> ArchSpec:
    """The :class:`ArchSpec` of a model (or of an HF class name); a clear error if unsupported."""
    name = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {name!r}; flipscope supports {sorted(ARCHITECTURES)}. "
            "Add a row to hooks.sites.ARCHITECTURES (module paths of its layers) to support it."
        ) from None
