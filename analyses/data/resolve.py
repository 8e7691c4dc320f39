"""The one resolver of ``--model`` and ``--data``: every CLI command turns its arguments into a model and
question rows here, so ``--split`` and ``--n-images`` mean the same thing for every source.

``--model``: a name from :data:`NAMED_MODELS` (``organism``: the shipped checkpoint), a local model
folder, or a hub id (e.g. ``google/medgemma-4b-it``; needs the network or a filled HF cache).

``--data``: a name from :data:`NAMED_DATA` (``synthcxr``: the SynthCXR world the model was trained on)
or a question file in the PSF-Med layout (``.jsonl``, ``.json``, ``.csv``, ``.parquet``; see
:mod:`analyses.data.psf`), whose images are found under ``image_root`` (default: the file's folder).

Named entries are ``"module:function"`` strings imported when used: this module sits in
``analyses.data`` and must not import the packages above it (the organism, which knows its world),
so the table names them instead. Adding a data source = a loader module in ``analyses/data`` (or a
function elsewhere) + one row here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.data.psf import FORMATS, load_psf_rows
from analyses.data.schema import SPLITS, ImageSource, QuestionRow, first_images

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

#: Named ``--model`` values: name -> ``"module:function"``; the function takes no argument and returns
#: ``(adapter, model folder)``.
NAMED_MODELS: dict[str, str] = {"organism": "analyses.organism.model:load_shipped_organism"}
#: Named ``--data`` values: name -> ``"module:function"``; the function takes ``(split, model_dir)`` and
#: returns a :class:`Dataset` of that split (``model_dir`` is ``None`` for a hub model).
NAMED_DATA: dict[str, str] = {"synthcxr": "analyses.organism.model:organism_dataset"}


@dataclass(frozen=True)
class Dataset:
    """Question rows ready for the evaluator, with their image source and where they came from."""

    rows: list[QuestionRow]
    """The rows of the requested split (and first ``n_images`` images)."""
    images: ImageSource
    """``images(row_or_image_id)`` -> PIL image."""
    source: str
    """What was loaded (a name and model folder, or a file path), for run records."""
    report: str = ""
    """The loader's account of what it read and skipped (printed by the CLI)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source-specific objects (e.g. ``world`` for SynthCXR)."""


def _entry(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def check_split(split: str) -> str:
    """``split`` if it is train, val or test; else a ``ValueError`` naming the choices."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r} is not a split; choose one of {', '.join(SPLITS)}")
    return split


def check_n_images(n_images: int) -> int:
    """``n_images`` if it is >= 0 (0 = every image); else a ``ValueError``."""
    if n_images < 0:
        raise ValueError(f"--n-images {n_images}: use a number of images >= 0 (0 = all)")
    return n_images


def resolve_model(spec: str, **load_kwargs: Any) -> tuple[VLMAdapter, Path | None]:
    """``--model`` -> (adapter, local model folder or ``None`` for a hub model)."""
    if spec in NAMED_MODELS:
        load: Callable[[], tuple[VLMAdapter, Path | None]] = _entry(NAMED_MODELS[spec])
        return load()
    from hooks.adapter import VLMAdapter

    path = Path(spec)
    if path.exists():
        return VLMAdapter.from_pretrained(path, **load_kwargs), path
    return VLMAdapter.from_pretrained(spec, **load_kwargs), None


def resolve_data(
    spec: str,
    split: str,
    n_images: int = 0,
    model_dir: Path | None = None,
    image_root: str | Path | None = None,
) -> Dataset:
    """``--data`` -> the :class:`Dataset` of ``split``, limited to the first ``n_images`` images (0 = all).

    Refuses a bad split, a negative ``n_images``, an unknown name, a missing file and a split with no
    rows, before any model work is done.
    """
    check_split(split)
    check_n_images(n_images)
    if spec in NAMED_DATA:
        data: Dataset = _entry(NAMED_DATA[spec])(split, model_dir)
    else:
        path = Path(spec)
        if path.suffix.lower() not in FORMATS:
            raise ValueError(
                f"--data {spec!r} is neither a named source ({', '.join(NAMED_DATA)}) nor a question file "
                f"({', '.join(sorted(FORMATS))})"
            )
        loaded = load_psf_rows(path, image_root=image_root, split=split)
        data = Dataset(loaded.rows, loaded.image_for, str(path), loaded.report(), {"loaded": loaded})
    rows = first_images(data.rows, n_images)
    if not rows:
        raise ValueError(f"--data {spec}: no rows of split {split!r}")
    return Dataset(rows, data.images, data.source, data.report, data.extra)
