"""The one resolver of ``--model`` and ``--data``: every CLI command turns its arguments into a model and
question rows here, so ``--split`` and ``--n-images`` mean the same thing for every source.

``--model``: a name from :data:`NAMED_MODELS` (``organism``: the shipped checkpoint), a local model
folder, or a hub id (e.g. ``google/medgemma-4b-it``; needs the network or a filled HF cache). A folder
that does not exist and a hub id that cannot be fetched are one-line errors naming the value and the fix.

``--data``: a name from :data:`NAMED_DATA` (``synthcxr``: the SynthCXR world the model was trained on),
a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, text formats optionally ``.gz``), or a hub dataset
``owner/name[:config]`` (``saillab/psf-med:mimic``) or ``owner/name:file`` (``saillab/VinDR-CXR-PSF:
vindr_flip_bank.csv``), read through ``datasets.load_dataset`` for users who are online. The file layout is
detected from its columns (:data:`LAYOUTS`, first match wins):

- ``flipscope``: one row per question (:mod:`analyses.data.psf`, columns ``qid``, ``family``, ...);
- ``labels``: a CheXpert-style label table (:mod:`analyses.data.labels`), presence questions from the bank;
- ``psf-med``: the PSF-Med release / VinDR-CXR-PSF flip bank (:mod:`analyses.data.psfmed`), original-
  paraphrase pairs into clusters, with the phenomenon map and the yes/no filter of :class:`DataOptions`.

Images are found under ``image_root`` (default: the file's folder; required for hub data). ``--split``
and ``--n-images`` apply to every source, and a bad value fails before anything is loaded.

Named entries are ``"module:function"`` strings imported when used: this module sits in
``analyses.data`` and must not import the packages above it (the organism, which knows its world),
so the table names them instead. Adding a data source = a loader module in ``analyses/data`` (or a
function elsewhere) + one row here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.data.labels import label_rows, looks_like_labels
from analyses.data.loaded import LoadedRows
from analyses.data.psf import EXPECTED_COLUMNS, psf_rows
from analyses.data.psfmed import YESNO_FILTERS, looks_like_psfmed, phenomenon_map, psfmed_rows
from analyses.data.records import FORMATS, Records, file_format, hub_records, read_records
from analyses.data.schema import SPLIT_ALIASES, SPLITS, ImageSource, QuestionRow, SkippedRow, first_images

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

#: Named ``--model`` values: name -> ``"module:function"``; the function takes no argument and returns
#: ``(adapter, model folder)``.
NAMED_MODELS: dict[str, str] = {"organism": "analyses.organism.model:load_shipped_organism"}
#: Named ``--data`` values: name -> ``"module:function"``; the function takes ``(split, model_dir)`` and
#: returns a :class:`Dataset` of that split (``model_dir`` is ``None`` for a hub model).
NAMED_DATA: dict[str, str] = {"synthcxr": "analyses.organism.model:organism_dataset"}
#: File layouts, in detection order: name -> what identifies it.
LAYOUTS: dict[str, str] = {
    "flipscope": f"the columns {', '.join(EXPECTED_COLUMNS)} (after --column-map)",
    "labels": "CheXpert label columns (Cardiomegaly, Pleural Effusion, ...) with Path or subject_id + study_id",
    "psf-med": "a question column (e.g. original_question) with paraphrase(s) and phenomenon columns",
}
#: ``load_kwargs`` of :func:`resolve_model` that also apply to a named (already loaded) model.
PLACEMENT: tuple[str, ...] = ("device", "device_map", "max_memory", "dtype")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+)?$")


@dataclass(frozen=True)
class DataOptions:
    """How a file is read beyond its path: column and phenomenon maps, the yes/no filter, label tables."""

    column_map: Mapping[str, str] = field(default_factory=dict)
    """Their column -> our name: an expected column (flipscope layout), a role of
    :data:`analyses.data.psfmed.KNOWN_COLUMNS` (PSF-Med layout) or a CheXpert label / path column."""
    phenomenon_map: Mapping[str, str] = field(default_factory=dict)
    """PSF-Med phenomenon -> family or ``skip``, over :data:`analyses.data.psfmed.DEFAULT_PHENOMENA`."""
    yesno: str = "auto"
    """Yes/no filter of PSF-Med pairs: one of :data:`analyses.data.psfmed.YESNO_FILTERS`."""
    metadata: str | None = None
    """MIMIC-CXR ``mimic-cxr-2.0.0-metadata.csv`` for a per-study label table (default: found beside it)."""
    frontal_only: bool = True
    """Label tables: frontal images only (CheXpert ``Frontal/Lateral``, MIMIC ``ViewPosition`` PA / AP)."""

    def __post_init__(self) -> None:
        if self.yesno not in YESNO_FILTERS:
            raise ValueError(f"--yesno {self.yesno!r}: choose one of {', '.join(YESNO_FILTERS)}")
        phenomenon_map(self.phenomenon_map)  # validates the targets
        if self.metadata is not None and not Path(self.metadata).is_file():
            raise FileNotFoundError(f"--metadata {self.metadata}: no such file")


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
    problems: list[SkippedRow] = field(default_factory=list)
    """Every record left out while loading (written to the run folder's ``skipped.jsonl``)."""


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
    """``--model`` -> (adapter, local model folder or ``None`` for a hub model).

    ``load_kwargs`` go to :meth:`~hooks.adapter.VLMAdapter.from_pretrained` (``device``, ``device_map``,
    ``max_memory``, ``dtype``, ...); a named model is loaded first and then placed (:func:`hooks.devices.place`).

    A missing folder or an unreachable / unknown hub id is a ``FileNotFoundError`` of one line that
    names the value and the fix (``OSError`` from transformers never escapes as a traceback); a folder or
    model that cannot be loaded is a :class:`hooks.loading.LoadError` (one line). ``resize_images=True``
    (``--resize``) lets a model with a fixed input size (the organism) take images of other sizes, resized.
    """
    from hooks.loading import LoadError, short_error, torchvision_problem

    resize = bool(load_kwargs.pop("resize_images", False))
    try:
        adapter, folder = _load_model(spec, **load_kwargs)
    except ImportError as err:  # e.g. a torchvision built for another torch breaks transformers' imports
        why = torchvision_problem() or short_error(err)
        raise LoadError(f"--model {spec}: a package the model needs does not import ({why})") from None
    if resize:
        adapter.configure(dataclasses.replace(adapter.config, resize_images=True))
    return adapter, folder


def _load_model(spec: str, **load_kwargs: Any) -> tuple[VLMAdapter, Path | None]:
    """:func:`resolve_model` without the image-size option."""
    from hooks.loading import LoadError

    if spec in NAMED_MODELS:
        load: Callable[[], tuple[VLMAdapter, Path | None]] = _entry(NAMED_MODELS[spec])
        adapter, folder = load()
        if load_kwargs:  # device, device_map, max_memory, dtype: applied to the loaded model
            from hooks.devices import place

            place(adapter.model, **{k: v for k, v in load_kwargs.items() if k in PLACEMENT})
        return adapter, folder
    from hooks.adapter import VLMAdapter

    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {spec}: {path.absolute()} has no config.json; pass the folder of a saved "
                "Hugging Face model (config.json, *.safetensors, processor files)"
            )
        return VLMAdapter.from_pretrained(path, **load_kwargs), path
    looks_local = spec.startswith((".", "/", "~")) or not HUB_ID.match(spec)
    if looks_local:
        raise FileNotFoundError(
            f"--model {spec}: model folder not found ({path.absolute()}); pass an existing folder or a hub "
            "id such as google/medgemma-4b-it"
        )
    try:
        return VLMAdapter.from_pretrained(spec, **load_kwargs), None
    except LoadError:
        raise
    except (OSError, ValueError) as err:  # OSError from the hub, HFValidationError is a ValueError
        first = " ".join(str(err).split()).split(". ")[0][:200]
        raise FileNotFoundError(
            f"--model {spec}: no folder {path.absolute()} here, and the hub could not provide it "
            f"({type(err).__name__}: {first}); pass the folder of a downloaded model, or go online "
            f"(unset HF_HUB_OFFLINE, accept the model's terms) or `hf download {spec}` once"
        ) from err


def load_table(
    records: Records,
    image_root: str | Path,
    split: str,
    n_images: int = 0,
    options: DataOptions | None = None,
    default_split: str = "test",
) -> LoadedRows:
    """Records of any supported layout (:data:`LAYOUTS`) -> the loaded rows of ``split``."""
    opts = options or DataOptions()
    cmap = dict(opts.column_map)
    mapped = [cmap.get(c, c) for c in records.columns]
    if all(c in mapped for c in EXPECTED_COLUMNS):
        return psf_rows(records, image_root, split, cmap)
    if looks_like_labels(mapped):
        return label_rows(records, image_root, split, n_images, cmap, opts.metadata, opts.frontal_only)
    if looks_like_psfmed(records.columns, {c: r for c, r in cmap.items() if c in records.columns}):
        return psfmed_rows(records, image_root, split, cmap, opts.phenomenon_map, opts.yesno, default_split)
    layouts = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise ValueError(
        f"{records.source}: cannot tell its layout from the columns {records.columns}. Known layouts: {layouts}. "
        "Name yours with --column-map THEIR_COLUMN=NAME"
    )


def _hub(spec: str, split: str, image_root: str | Path | None) -> tuple[Records, str]:
    """(records, default split) of a hub dataset ``owner/name[:config or file]``."""
    repo, _, sub = spec.partition(":")
    if image_root is None:
        raise ValueError(
            f"--data {spec}: the images of a hub dataset come separately; pass --image-root with the folder "
            "that holds them (for MIMIC-CXR-JPG, the folder with files/)"
        )
    is_file = file_format(Path(sub)) is not None
    splits = hub_records(repo, None if is_file or not sub else sub, sub if is_file else None)
    if is_file:  # a data file has no real split: its rows carry one or are the release's test split
        rows = [r for recs in splits.values() for r in recs.rows]
        cols = list(dict.fromkeys(c for recs in splits.values() for c in recs.columns))
        return Records(rows, [None] * len(rows), cols, spec), "test"
    names = {SPLIT_ALIASES.get(n.lower(), n): n for n in splits}
    if split not in names:
        raise ValueError(f"--data {spec}: no split {split!r}; it has {sorted(splits)}")
    return splits[names[split]], split


def resolve_data(
    spec: str,
    split: str,
    n_images: int = 0,
    model_dir: Path | None = None,
    image_root: str | Path | None = None,
    options: DataOptions | None = None,
) -> Dataset:
    """``--data`` -> the :class:`Dataset` of ``split``, limited to the first ``n_images`` images (0 = all).

    Refuses a bad split, a negative ``n_images``, an unknown name, a missing file, an unreadable hub id
    and a split with no rows, before any model work is done.
    """
    check_split(split)
    check_n_images(n_images)
    if image_root is not None and not Path(image_root).expanduser().is_dir():
        raise FileNotFoundError(
            f"--image-root {image_root}: no such folder; pass the folder that holds the images"
        )
    if spec in NAMED_DATA:
        data: Dataset = _entry(NAMED_DATA[spec])(split, model_dir)
    else:
        path = Path(spec).expanduser()
        if path.exists() or (file_format(path) is not None and ":" not in spec):
            records, default_split = read_records(path), "test"
            root = image_root if image_root is not None else path.parent
        elif HUB_ID.match(spec):
            records, default_split = _hub(spec, split, image_root)
            root = image_root or "."
        else:
            raise ValueError(
                f"--data {spec!r} is neither a named source ({', '.join(NAMED_DATA)}), a question file "
                f"({', '.join(sorted(FORMATS))}, .gz allowed) nor a hub dataset id (owner/name[:config])"
            )
        loaded = load_table(records, root, split, n_images, options, default_split)
        data = Dataset(
            loaded.rows, loaded.image_for, loaded.source, loaded.report(), {"loaded": loaded}, loaded.problems
        )
    rows = first_images(data.rows, n_images)
    if not rows:
        got = data.extra.get("loaded")
        why = ""
        if isinstance(got, LoadedRows):
            counts = [f"{reason}: {len(ids)}" for reason, ids in got.skipped.items()]
            hints = [n for n in got.notes if "--image-root" in n or "--phenomenon-map" in n]
            why = " (" + "; ".join([got.report().splitlines()[0], *counts, *hints]) + ")"
        raise ValueError(f"--data {spec}: no rows of split {split!r} to evaluate{why}")
    return Dataset(rows, data.images, data.source, data.report, data.extra, data.problems)


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """``["a=b", "c=d,e=f"]`` -> ``{"a": "b", "c": "d", "e": "f"}``; a clear error for anything else."""
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(
                    f"{flag} takes NAME=VALUE pairs (e.g. {flag} their_column=question), got {part!r}"
                )
            out[key.strip()] = value.strip()
    return out


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every command that reads ``--data`` shares (besides ``--data``, ``--split``, ``--n-images``)."""
    p.add_argument(
        "--image-root", default=None, help="folder image paths are relative to (default: the file's)"
    )
    p.add_argument(
        "--column-map", action="append", help="THEIR_COLUMN=NAME (repeat or comma-separate): rename columns"
    )
    p.add_argument(
        "--phenomenon-map",
        action="append",
        help="PSF-Med PHENOMENON=FAMILY or =skip, e.g. negation_pattern=syntactic (defaults: docs/data.md)",
    )
    p.add_argument(
        "--yesno",
        default="auto",
        choices=list(YESNO_FILTERS),
        help="PSF-Med yes/no filter: auto = every yes/no flag column present must be true",
    )
    p.add_argument("--metadata", default=None, help="mimic-cxr-2.0.0-metadata.csv for MIMIC label tables")
    p.add_argument("--all-views", action="store_true", help="label tables: lateral views too")


def data_options(args: argparse.Namespace) -> DataOptions:
    """:class:`DataOptions` from the arguments of :func:`add_data_arguments` (absent ones take defaults)."""
    return DataOptions(
        column_map=_pairs(getattr(args, "column_map", None), "--column-map"),
        phenomenon_map=_pairs(getattr(args, "phenomenon_map", None), "--phenomenon-map"),
        yesno=getattr(args, "yesno", "auto"),
        metadata=getattr(args, "metadata", None),
        frontal_only=not getattr(args, "all_views", False),
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Where a model is loaded, for every command that reads ``--model`` (big models over several GPUs)."""
    p.add_argument(
        "--device-map",
        default=None,
        help="spread the model over devices with accelerate: auto, balanced, balanced_low_0, sequential, "
        "or a JSON file mapping module names to devices (default: one device)",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="load the weights in this dtype (default: the checkpoint's own)",
    )
    p.add_argument(
        "--resize",
        action="store_true",
        help="a model trained at one image size (the organism: 64 px) takes images of other sizes, resized to "
        "it by the processor (recorded in meta.json); without it they are refused before anything runs",
    )


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`resolve_model` keyword arguments from :func:`add_model_arguments` (absent ones: defaults)."""
    import json

    from hooks.devices import DEVICE_MAP_STRATEGIES, parse_max_memory

    device_map: Any = getattr(args, "device_map", None)
    if device_map is not None and device_map not in DEVICE_MAP_STRATEGIES:
        path = Path(device_map).expanduser()
        if not path.is_file():
            raise ValueError(
                f"--device-map {device_map!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON file "
                'mapping module names to devices (e.g. {"model.language_model.layers.0": 0, ...})'
            )
        device_map = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is fine
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    if max_memory is not None and device_map is None:
        raise ValueError("--max-memory applies to a model spread with --device-map: add --device-map auto")
    out: dict[str, Any] = {
        "device_map": device_map,
        "max_memory": max_memory,
        "dtype": getattr(args, "dtype", None),
        "resize_images": True if getattr(args, "resize", False) else None,
    }
    return {k: v for k, v in out.items() if v is not None}
