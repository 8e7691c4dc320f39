"""Activation cache: run batches through the model, keep chosen sites at chosen position classes.

Positions are *compacted* per row: row ``i`` keeps only the positions of the requested classes, in
order, right-aligned so that the final prompt position (if kept) is always index ``-1``. Rows with
fewer kept positions are left-padded with zeros; :attr:`ActivationCache.valid` says which entries
are real, :meth:`ActivationCache.mask` which entries belong to a class (``image``, ``question``,
``final``, ``text``) and :attr:`ActivationCache.offsets` where each entry came from (offset from the
end of its prompt, ``-1`` = final position).

Small runs live in memory (optionally offloaded with ``device="cpu"``); large runs stream to
``out_dir`` as shards of ``shard_rows`` rows, **one safetensors file per shard and site**
(``shard_00000.resid_post_3.safetensors``) plus one per shard for the masks, offsets and margins
(``shard_00000.index.safetensors``), listed in ``manifest.json``. They are read back lazily, one site of
one shard at a time (:meth:`ActivationCache.iter_shards`) or a whole site at once (``cache[site]``).

A run cached by several processes (``part="rank-0-of-2"``, ...: :mod:`analyses.eval.shard_cache`)
writes each part into its own folder ``out_dir/<part>/`` with a ``part.json``; :func:`merge_parts`
lists the parts in ``manifest.json``, and :meth:`ActivationCache.load` reads them as one dataset,
rows in part order. Caches written before (one file per shard, ``cache.json``) still load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hooks.batch import POSITION_CLASSES, Batch
from hooks.progress import tqdm
from hooks.sites import Site, parse_site

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

#: Classes whose per-entry membership masks every cache stores.
MASK_CLASSES: tuple[str, ...] = ("image", "question", "final", "text")
MANIFEST_FILE, PART_FILE, LEGACY_INDEX_FILE = "manifest.json", "part.json", "cache.json"
#: The file of a shard that holds the masks, offsets and margins (every other file holds one site).
INDEX_KEY = "index"


def normalize_positions(positions: str | Sequence[str]) -> tuple[str, ...]:
    """``"final"`` -> ``("final",)``; checks every name; ``"all"`` absorbs the others."""
    names = (positions,) if isinstance(positions, str) else tuple(positions)
    if not names:
        raise ValueError(
            "positions is empty: pass a position class such as 'final', a list of them, or 'all'"
        )
    bad = [p for p in names if p not in POSITION_CLASSES]
    if bad:
        raise ValueError(
            f"unknown position class(es) {bad}; choose from {POSITION_CLASSES} (or a list of them)"
        )
    return ("all",) if "all" in names else tuple(dict.fromkeys(names))


def keep_mask(batch: Batch, positions: tuple[str, ...]) -> Bool[Tensor, "batch pos"]:
    """Union of the position masks of ``positions`` (real tokens only)."""
    keep = torch.zeros_like(batch.image_mask)
    for cls in positions:
        keep |= batch.position_mask(cls)  # type: ignore[arg-type]
    return keep & batch.attention_mask


def compact(x: Tensor, keep: Bool[Tensor, "batch pos"], width: int | None = None) -> Tensor:
    """Right-align the kept entries of each row of ``x`` (batch, pos, ...) into (batch, width, ...)."""
    counts = keep.sum(-1)
    width = int(counts.max()) if width is None else width
    dest = keep.long().cumsum(-1) - 1 + (width - counts)[:, None]
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)
    out = x.new_zeros((keep.shape[0], width, *x.shape[2:]))
    out[rows[keep], dest[keep]] = x[keep.to(x.device)]
    return out


def _left_pad(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))
    return torch.cat([pad, x], 1)


def _pad_cat(parts: list[Tensor]) -> Tensor:
    width = max(p.shape[1] for p in parts)
    return torch.cat([_left_pad(p, width) for p in parts], 0)


class ActivationCache:
    """Activations of ``sites`` at kept positions, with the masks needed to interpret them.

    ``cache[site]`` is ``(batch, pos, d_model)``; with ``positions="final"`` it is ``(batch, d_model)``.
    Build one with :func:`cache_activations`; reopen a written one with :meth:`load`.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        positions: tuple[str, ...],
        tensors: dict[str, Tensor] | None = None,
        meta: dict[str, Any] | None = None,
        root: Path | None = None,
        device: str | torch.device = "cpu",
        shards: list[dict[str, Any]] | None = None,
    ):
        self.sites = list(sites)
        self.positions = positions
        self.meta: dict[str, Any] = dict(meta or {})
        self.root = root
        self.device = torch.device(device)
        self._tensors: dict[str, Tensor] = dict(tensors or {})
        self._shards: list[dict[str, Any]] = list(shards or [])
        if root is not None and shards is None:
            self._shards = [s for part in _manifest(root)["parts"] for s in part["shards"]]

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, out_dir: str | Path, device: str | torch.device = "cpu") -> ActivationCache:
        """Reopen a cache written with ``out_dir`` (every part of it, as one dataset); nothing is read
        until a site is asked for."""
        manifest = _manifest(Path(out_dir))
        sites = [parse_site(s) for s in manifest["sites"]]
        return cls(
            sites, tuple(manifest["positions"]), meta=manifest["meta"], root=Path(out_dir), device=device
        )

    @property
    def on_disk(self) -> bool:
        return self.root is not None

    @property
    def squeezed(self) -> bool:
        """True when only the final position is kept: ``cache[site]`` is then ``(batch, d_model)``."""
        return self.positions == ("final",)

    def __len__(self) -> int:
        if self.on_disk:
            return sum(s["rows"] for s in self._shards)
        return int(self._tensors["__valid__"].shape[0])

    def __contains__(self, site: object) -> bool:
        return site in self.sites

    def _key(self, site: Site | str) -> str:
        site = parse_site(site) if isinstance(site, str) else site
        if site not in self.sites:
            raise KeyError(f"{site} is not in this cache; cached sites: {[str(s) for s in self.sites]}")
        return str(site)

    def _shard_paths(self, key: str) -> list[Path]:
        """The file holding ``key`` in every shard, in row order."""
        assert self.root is not None
        group = INDEX_KEY if key.startswith("__") else key
        return [self.root / s["files"][group] for s in self._shards]

    def _read(self, key: str) -> Tensor:
        if key in self._tensors:
            return self._tensors[key]
        if not self.on_disk:
            raise KeyError(key)
        parts = []
        for path in self._shard_paths(key):
            with safe_open(str(path), framework="pt", device=str(self.device)) as f:
                parts.append(f.get_tensor(key))
        value = _pad_cat(parts) if parts[0].ndim > 1 else torch.cat(parts)
        if key.startswith("__"):  # masks and margins are small: keep them; sites are re-read
            self._tensors[key] = value
        return value

    def __getitem__(
        self, site: Site | str
    ) -> Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch d_model"]:
        x = self._read(self._key(site))
        return x[:, -1] if self.squeezed else x

    def iter_shards(self, site: Site | str) -> Iterator[Tensor]:
        """One tensor per shard (or the whole site once for an in-memory cache): bounded memory."""
        key = self._key(site)
        if not self.on_disk:
            yield self[site]
            return
        for path in self._shard_paths(key):
            with safe_open(str(path), framework="pt", device=str(self.device)) as f:
                x = f.get_tensor(key)
            yield x[:, -1] if self.squeezed else x

    @property
    def valid(self) -> Bool[Tensor, "batch pos"]:
        """Which compacted entries are real (not left padding)."""
        return self._read("__valid__")

    def mask(self, cls: str) -> Bool[Tensor, "batch pos"]:
        """Entries belonging to position class ``cls`` (one of image/question/final/text, or valid)."""
        if cls in ("valid", "all"):
            return self.valid
        if cls not in MASK_CLASSES:
            raise ValueError(f"unknown position class {cls!r}; choose one of {MASK_CLASSES} or 'valid'")
        return self._read(f"__mask_{cls}__")

    @property
    def offsets(self) -> Int[Tensor, "batch pos"]:
        """Source position of each entry as an offset from the end of the prompt (-1 = final)."""
        return self._read("__offset__")

    @property
    def margins(self) -> Float[Tensor, " batch"]:
        """The decision margin of every row (from the same forward passes)."""
        return self._read("__margin__")

    @property
    def questions(self) -> list[str]:
        return list(self.meta.get("questions", []))

    @property
    def conditions(self) -> list[str]:
        return list(self.meta.get("conditions", []))

    @property
    def keys(self) -> list[str]:
        """The id of every row (e.g. ``qid/condition``), where the writer gave them."""
        return list(self.meta.get("keys", []))

    def __repr__(self) -> str:
        where = f"on disk at {self.root}" if self.on_disk else f"in memory on {self.device}"
        sites = [str(s) for s in self.sites]
        return f"ActivationCache({len(self)} rows, sites={sites}, positions={self.positions}, {where})"


def site_file_name(site: Site | str) -> str:
    """``resid_post(3)`` -> ``resid_post_3``: the site's part of a shard's file name."""
    return str(site).replace("(", "_").replace(")", "").rstrip("_")


def _manifest(root: Path) -> dict[str, Any]:
    """``manifest.json`` of a cache folder, or a legacy ``cache.json`` (one file per shard) in its form."""
    if (root / MANIFEST_FILE).is_file():
        return dict(json.loads((root / MANIFEST_FILE).read_text()))
    if (root / LEGACY_INDEX_FILE).is_file():
        index = json.loads((root / LEGACY_INDEX_FILE).read_text())
        groups = [INDEX_KEY, *index["sites"]]
        shards = [{**s, "files": dict.fromkeys(groups, s["file"])} for s in index["shards"]]
        return {**index, "parts": [{"name": "", "shards": shards}]}
    raise FileNotFoundError(f"no activation cache in {root} (missing {MANIFEST_FILE})")


def merge_parts(out_dir: str | Path, parts: Sequence[str]) -> Path:
    """Write ``manifest.json`` listing the parts ``out_dir/<part>/part.json`` in this order (one dataset)."""
    root = Path(out_dir)
    found = []
    for name in parts:
        path = root / name / PART_FILE
        if not path.is_file():
            raise FileNotFoundError(f"cache part {name!r} is missing ({path}): was it written to completion?")
        found.append(json.loads(path.read_text()))
    if len({json.dumps([p["sites"], p["positions"]]) for p in found}) > 1:
        raise ValueError(
            f"cache parts {list(parts)} hold different sites or positions: they are not one cache"
        )
    meta = {k: [x for p in found for x in p["meta"].get(k, [])] for k in ("questions", "conditions", "keys")}
    manifest = {
        "format": 2,
        "sites": found[0]["sites"],
        "positions": found[0]["positions"],
        "meta": {**found[0]["meta"], **meta},
        "parts": [
            {"name": name, "shards": p["parts"][0]["shards"]} for name, p in zip(parts, found, strict=True)
        ],
    }
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return root / MANIFEST_FILE


class _ShardWriter:
    """Buffers compacted rows and writes ``shard_rows``-row shards: one safetensors file per site, one index."""

    def __init__(self, root: Path, shard_rows: int, prefix: str = ""):
        self.root, self.shard_rows, self.prefix = root, shard_rows, prefix
        self.pending: list[dict[str, Tensor]] = []
        self.n_pending = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, part: dict[str, Tensor]) -> None:
        self.pending.append(part)
        self.n_pending += int(part["__valid__"].shape[0])
        while self.n_pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        merged = {
            k: _pad_cat([p[k] for p in self.pending])
            if self.pending[0][k].ndim > 1
            else torch.cat([p[k] for p in self.pending])
            for k in self.pending[0]
        }
        head = {k: v[:rows].contiguous() for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        stem = f"{self.prefix}shard_{len(self.shards):05d}"
        groups: dict[str, dict[str, Tensor]] = {INDEX_KEY: {}}
        for k, v in head.items():
            groups.setdefault(INDEX_KEY if k.startswith("__") else k, {})[k] = v
        files = {}
        for group, tensors in groups.items():
            files[group] = f"{stem}.{INDEX_KEY if group == INDEX_KEY else site_file_name(group)}.safetensors"
            save_file(tensors, str(self.root / files[group]))
        self.shards.append({"rows": rows, "width": int(head["__valid__"].shape[1]), "files": files})
        self.n_pending -= rows
        self.pending = [rest] if self.n_pending else []

    def close(self) -> None:
        if self.n_pending:
            self._flush(self.n_pending)


def cache_activations(
    adapter: VLMAdapter,
    batch_or_batches: Batch | Iterable[Batch],
    sites: Sequence[Site],
    positions: str | Sequence[str] = "final",
    out_dir: str | Path | None = None,
    *,
    shard_rows: int = 1024,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    part: str | None = None,
    keys: Sequence[str] | None = None,
) -> ActivationCache:
    """Run every batch once with read-only hooks on ``sites``; keep ``positions`` of each row.

    ``positions``: a class (``"final"``, ``"image"``, ``"question"``, ``"text"``), a list of them, or
    ``"all"``. ``device``: where in-memory activations live (``"cpu"`` offloads; default: the model's
    device). ``dtype``: storage dtype (default: the model's). ``out_dir``: stream to safetensors
    shards of ``shard_rows`` rows instead of memory (the returned cache reads them lazily), one file per
    shard and site. ``part``: this process's part of a cache written by several (``out_dir/<part>/``,
    listed by :func:`merge_parts`; the returned cache holds this part only). ``keys``: an id per row,
    kept in the cache's meta. ``progress``: tqdm bar (default: on when there is more than one batch).
    """
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("no sites given: pass e.g. [resid_post(3)]")
    for s in sites:
        if not s.is_text:
            raise ValueError(
                f"{s} is not a text-sequence site: the cache keeps text positions; read vision sites "
                "with adapter.hooks directly"
            )
        adapter.resolve(s)  # range check before any forward
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    if part is not None and (out_dir is None or not part or "/" in part or part.startswith(".")):
        raise ValueError(f"part {part!r}: a part is a plain folder name (e.g. rank-0-of-2) and needs out_dir")
    pos = normalize_positions(positions)
    batches = [batch_or_batches] if isinstance(batch_or_batches, Batch) else batch_or_batches
    total = len(batches) if isinstance(batches, Sequence) else None
    show = progress if progress is not None else (total is None or total > 1)
    store = torch.device(device) if device is not None else adapter.device
    root = Path(out_dir) if out_dir is not None else None
    writer = None
    if root is not None:
        (root / (part or "")).mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(root, shard_rows, f"{part}/" if part else "")
    parts: list[dict[str, Tensor]] = []
    questions: list[str] = []
    conditions: list[str] = []
    for batch in tqdm(batches, total=total, disable=not show, desc="caching activations"):
        rows = _run_batch(adapter, batch, sites, pos, torch.device("cpu") if writer else store, dtype)
        questions += batch.questions
        conditions += batch.conditions
        if writer is not None:
            writer.add(rows)
        else:
            parts.append(rows)
    meta: dict[str, Any] = {"questions": questions, "conditions": conditions, "model": adapter.describe()}
    if keys is not None:
        if len(keys) != len(questions):
            raise ValueError(f"{len(keys)} keys for {len(questions)} rows: pass one key per row")
        meta["keys"] = list(keys)
    if writer is not None:
        assert root is not None
        writer.close()
        sites_pos = {"format": 2, "sites": [str(s) for s in sites], "positions": list(pos), "meta": meta}
        manifest = {**sites_pos, "parts": [{"name": part or "", "shards": writer.shards}]}
        where = root / part / PART_FILE if part else root / MANIFEST_FILE
        where.write_text(json.dumps(manifest, indent=1))
        return ActivationCache(
            sites, pos, meta=meta, root=root, device="cpu" if device is None else device, shards=writer.shards
        )
    if not parts:
        raise ValueError("no batches given")
    merged = {
        k: _pad_cat([p[k] for p in parts]) if parts[0][k].ndim > 1 else torch.cat([p[k] for p in parts])
        for k in parts[0]
    }
    return ActivationCache(sites, pos, merged, meta, device=store)


def _run_batch(
    adapter: VLMAdapter,
    batch: Batch,
    sites: list[Site],
    positions: tuple[str, ...],
    store: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Tensor]:
    keep = keep_mask(batch, positions)
    width = int(keep.sum(-1).max())
    keep_dev = keep.to(adapter.device)
    out: dict[str, Tensor] = {}

    def grab(key: str):
        def fn(x: Tensor) -> None:
            y = compact(x.detach(), keep_dev, width)
            out[key] = y.to(device=store, dtype=dtype or y.dtype)

        return fn

    with torch.no_grad(), adapter.hooks({s: grab(str(s)) for s in sites}):
        out["__margin__"] = adapter.margins(batch).float().to(store)
    out["__valid__"] = compact(keep[..., None], keep, width)[..., 0].to(store)
    for cls in MASK_CLASSES:
        m = batch.position_mask(cls)  # type: ignore[arg-type]
        out[f"__mask_{cls}__"] = compact(m[..., None], keep, width)[..., 0].to(store)
    offset = torch.arange(batch.seq_len)[None].expand_as(keep) - batch.seq_len
    out["__offset__"] = compact(offset[..., None], keep, width)[..., 0].to(store)
    return out
