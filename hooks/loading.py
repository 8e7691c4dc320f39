"""Loading a model folder or hub id into (config, model, processor), every failure one line.

transformers' own messages name what *it* looked for ("Should have a `model_type` key" for a folder with
no config.json at all) and an ImportError can come from deep inside it. Here each step says which folder
(or hub id) failed, what is missing or wrong, and the fix: :class:`LoadError`, a ``ValueError``, so the
CLI prints it in one line with exit 2.

Qwen2.5-VL's processor needs torchvision in transformers 5.23 only for its *video* processor. Without
torchvision (or with a build that does not import against this torch, such as PyPI's CUDA wheel beside a
CPU torch) the processor is built for images and text alone (:func:`image_text_processor`): the image
processor (its PIL implementation), tokenizer and chat template are the folder's own.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

#: Weight files of a saved HF model, one of which a local folder must hold.
WEIGHT_GLOBS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


class LoadError(ValueError):
    """A model that cannot be loaded: one line naming the folder (or hub id), what is missing and the fix."""


def short_error(err: BaseException, limit: int = 200) -> str:
    """``Type: first sentence`` of an exception, on one line."""
    text = " ".join(str(err).split())
    first = text.split(". ")[0]
    return f"{type(err).__name__}: {first[:limit]}{'...' if len(first) > limit else ''}"


def torchvision_problem() -> str | None:
    """Why an installed torchvision cannot be imported (a build for another torch), or ``None``."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        importlib.import_module("torchvision")
    except Exception as err:  # a wheel built for another torch fails in its op registrations
        import torch

        return (
            f"torchvision is installed but does not import against torch {torch.__version__} ({short_error(err, 80)}): "
            "uninstall it (pip uninstall torchvision) or install the build made for this torch"
        )
    return None


def check_folder(path: Path) -> None:
    """Refuse a local folder that is not a saved HF model: no config.json, or not valid JSON."""
    if not path.is_dir():
        raise LoadError(f"{path}: not a folder; pass the folder of a saved Hugging Face model")
    config = path / "config.json"
    if not config.is_file():
        raise LoadError(
            f"{path} has no config.json, so it is not a saved Hugging Face model: pass the folder that "
            "save_pretrained wrote (config.json, *.safetensors, processor and tokenizer files)"
        )
    try:
        raw = json.loads(config.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        raise LoadError(f"{config} is not valid JSON ({short_error(err)}); restore the model's config.json") from None
    if not isinstance(raw, dict):
        raise LoadError(f"{config} is not a JSON object; restore the model's config.json")


def check_model_files(path: Path) -> None:
    """Refuse a local model folder (already through :func:`check_folder`) whose config.json has no
    ``model_type`` or that holds no weight files."""
    config = path / "config.json"
    if not json.loads(config.read_text(encoding="utf-8-sig")).get("model_type"):
        raise LoadError(
            f"{config} has no model_type, so transformers cannot tell the model class: add the model_type "
            "of its family (gemma3, llava, llava_next or qwen2_5_vl) or restore the original config.json"
        )
    if not any(next(path.glob(g), None) for g in WEIGHT_GLOBS):
        raise LoadError(
            f"{path} has config.json but no weights ({', '.join(WEIGHT_GLOBS)}): copy the model's weight "
            "files into it"
        )


def load_config(name: str | Path, **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained`` with a one-line :class:`LoadError` for a config it cannot read.

    A hub id's errors (``OSError`` when it cannot be fetched, ``ValueError`` for a malformed id) pass
    through for the caller to explain."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (ValueError, KeyError) as err:
        import transformers

        if not Path(name).exists():
            raise
        raise LoadError(
            f"{name}: transformers {transformers.__version__} cannot read its config.json ({short_error(err)}); "
            "flipscope needs an HF-format image-text-to-text model (model_type gemma3, llava, llava_next "
            "or qwen2_5_vl)"
        ) from None


def load_model(name: str | Path, arch: str, **kwargs: Any) -> Any:
    """``AutoModelForImageTextToText.from_pretrained``; missing or mismatched weights are a :class:`LoadError`."""
    try:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    except ImportError as err:
        raise LoadError(f"{name}: transformers cannot import {arch} ({torchvision_problem() or short_error(err)})") from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LoadError(
            f"{name}: the {arch} weights could not be loaded ({short_error(err)}); check that the folder holds "
            "the model's complete weight files and the config.json they were saved with"
        ) from None


def image_text_processor(cls: Any) -> Any:
    """``cls`` (a processor with a video processor, e.g. ``Qwen2_5_VLProcessor``) for images and text only.

    Its ``from_pretrained`` loads the image processor, tokenizer and chat template of a folder, no video
    processor (which needs torchvision); it saves itself under ``cls``'s name, so the folder loads back
    as ``cls`` (with torchvision) or through :func:`load_processor` (without)."""

    def __init__(
        self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any
    ) -> None:
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kw)

    def to_dict(self: Any) -> dict[str, Any]:
        return {**cls.to_dict(self), "processor_class": cls.__name__}

    doc = f"{cls.__name__} for images and text only (no video processor: that one needs torchvision)."
    return type(f"ImageText{cls.__name__}", (cls,), {"__init__": __init__, "to_dict": to_dict, "__doc__": doc})


def _processor_class(model_type: str) -> Any:
    """transformers' processor class for ``model_type``, if it has a video processor to leave out."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if not name:
        return None
    cls = getattr(importlib.import_module("transformers"), name, None)
    return cls if cls is not None and "video_processor" in cls.get_attributes() else None


def load_processor(name: str | Path, model_type: str, **kwargs: Any) -> Any:
    """The folder's processor (``AutoProcessor``); without a working torchvision, or when ``processor_class``
    is not a transformers class (it then loads as a bare tokenizer), the family's image-text processor
    (:func:`image_text_processor`) where only its video processor needs torchvision; otherwise a bare
    tokenizer is a :class:`LoadError`."""
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(name, **kwargs)
    except (ImportError, OSError, ValueError, KeyError, RuntimeError) as err:
        processor = _without_video(name, model_type, err, **kwargs)
    if _bare(processor) and _processor_class(model_type) is not None:  # e.g. saved as ImageTextQwen2_5_VLProcessor
        processor = _without_video(name, model_type, ValueError(f"bare {type(processor).__name__}"), **kwargs)
    if _bare(processor):
        raise LoadError(
            f"{name}: its processor loaded as a bare {type(processor).__name__}, not an image-text processor: "
            "its processor_class is not a transformers class; write the processor with its transformers "
            "class (e.g. Qwen2_5_VLProcessor) into preprocessor_config.json / processor_config.json"
        )
    return processor


def _bare(processor: Any) -> bool:
    """Whether a loaded processor lacks its image processor or tokenizer (e.g. a bare tokenizer)."""
    return getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None


def _without_video(name: str | Path, model_type: str, err: Exception, **kwargs: Any) -> Any:
    """:func:`load_processor`'s fallback after ``err``: the image-text processor where the family has a
    video processor to leave out (it needs torchvision), else a :class:`LoadError` naming ``err``."""
    broken = torchvision_problem()
    try:
        cls = None if broken else _processor_class(model_type)
    except ImportError:
        cls = None
    if cls is not None:
        try:
            return image_text_processor(cls).from_pretrained(name, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as again:
            err = again
    if broken or isinstance(err, ImportError):
        raise LoadError(f"{name}: its processor needs a package that is missing ({broken or short_error(err)})") from None
    raise LoadError(
        f"{name}: its processor could not be loaded ({short_error(err)}); the folder needs the processor files "
        "save_pretrained writes (preprocessor_config.json or processor_config.json, tokenizer files)"
    ) from None
