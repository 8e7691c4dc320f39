"""Checkpoints that are not HF image-text-to-text models, refused before any weight is loaded.

LLaVA-Rad, the original LLaVA / LLaVA-Med v1.x releases and many of their fine-tunes ship in the
original LLaVA code layout: a ``...ForCausalLM`` language model whose ``config.json`` carries ``mm_*``
keys (``mm_vision_tower``, ``mm_projector_type``, ...) and whose vision tower is loaded by the LLaVA
repository's own code (for LLaVA-Rad a BiomedCLIP tower through open_clip). transformers cannot build
them as a VLM (it would load a text-only model, or fail on an unknown ``model_type``), so flipscope
says what is needed instead: an HF-format conversion (see the README, "Models not in HF format").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: config.json keys of the original LLaVA code layout (absent from HF's LlavaConfig and its relatives).
LLAVA_CODE_KEYS: tuple[str, ...] = (
    "mm_vision_tower",
    "mm_projector_type",
    "mm_hidden_size",
    "mm_vision_select_layer",
)


class NotHFFormat(ValueError):
    """The checkpoint is not an HF-format image-text-to-text model (e.g. LLaVA-Rad)."""


def raw_config(
    name_or_path: str | Path, revision: str | None = None, local_files_only: bool = False
) -> dict[str, Any] | None:
    """``config.json`` as a plain dict (no model-type resolution), or ``None`` if it cannot be read."""
    path = Path(name_or_path)
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text(encoding="utf-8-sig")) if file.is_file() else None
    try:
        from transformers import PretrainedConfig

        cfg, _ = PretrainedConfig.get_config_dict(
            str(name_or_path), revision=revision, local_files_only=local_files_only
        )
    except (OSError, ValueError):
        return None  # transformers' own loader will raise its (network / not-found) error
    return cfg


def not_hf_reason(cfg: dict[str, Any]) -> str | None:
    """Why a config describes a checkpoint in the original LLaVA code layout, or ``None``."""
    archs = [str(a) for a in cfg.get("architectures") or []]
    keys = [k for k in LLAVA_CODE_KEYS if k in cfg]
    code_archs = [a for a in archs if a.startswith("Llava") and a.endswith("ForCausalLM")]
    if not keys and not code_archs:
        return None
    tower = cfg.get("mm_vision_tower")
    what = "/".join(code_archs or archs) or str(cfg.get("model_type", "?"))
    return f"{what}{f' with vision tower {tower!r}' if tower else ''} in the original LLaVA code layout ({', '.join(keys or code_archs)})"


def check_hf_format(
    name_or_path: str | Path, revision: str | None = None, local_files_only: bool = False
) -> None:
    """Raise :class:`NotHFFormat` (one line, naming what is needed) for a non-HF checkpoint."""
    cfg = raw_config(name_or_path, revision, local_files_only)
    reason = not_hf_reason(cfg) if cfg is not None else None
    if reason:
        raise NotHFFormat(
            f"{name_or_path} is {reason}, not an HF-format model: flipscope needs an HF-format conversion "
            "(e.g. to LlavaForConditionalGeneration with a vision tower transformers can build); see the "
            "README section 'Models not in HF format'"
        )
