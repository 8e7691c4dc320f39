"""Content fingerprints of a run's inputs, so a resumed run never mixes predictions of other weights or images.

- **Weights**: the SHA-256 of every ``*.safetensors`` file (else ``*.bin``) of the folder the model was
  loaded from (``VLMAdapter.weights_dir``), cached by (path, size, mtime, ctime, inode) in
  ``~/.cache/flipscope/weights-sha256.json`` (``FLIPSCOPE_CACHE`` moves it), so an unchanged 8 GB
  checkpoint is hashed once. A model without a folder (built in memory, LoRA-wrapped) is hashed from its
  parameters.
- **Images**: the SHA-256 of every image file's bytes (rows with an ``image_path``), or of the decoded
  pixels for generated images (SynthCXR), computed once per run.

:func:`compare_meta` names every item that differs between a run folder's ``meta.json`` and a new run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from analyses.data.schema import ImageSource, QuestionRow

if TYPE_CHECKING:
    import torch

CACHE_FILE = "weights-sha256.json"
_CHUNK = 1 << 24


def cache_dir() -> Path:
    """``$FLIPSCOPE_CACHE`` or ``~/.cache/flipscope``."""
    return Path(os.environ.get("FLIPSCOPE_CACHE", "~/.cache/flipscope")).expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0))
        tmp.replace(path)
    except OSError:  # a read-only home only costs a re-hash next time
        pass


def cached_sha256(files: Sequence[Path]) -> dict[str, str]:
    """File name -> SHA-256, reusing the cache entry of a file whose size, mtime, ctime and inode are unchanged."""
    cache_path = cache_dir() / CACHE_FILE
    cache = _load_cache(cache_path)
    out, dirty = {}, False
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = cache.get(key)
        if not (isinstance(hit, dict) and hit.get("stamp") == stamp):
            hit = {"stamp": stamp, "sha256": sha256_file(f)}
            cache[key], dirty = hit, True
        out[f.name] = str(hit["sha256"])
    if dirty:
        _save_cache(cache_path, cache)
    return out


def parameters_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every (name, dtype, shape, bytes) of ``model.state_dict()``, in name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(adapter: Any) -> dict[str, Any]:
    """``{"source": folder or "parameters", "files": {file name: sha256}}`` (module docs)."""
    folder = getattr(adapter, "weights_dir", None)
    if folder is not None:
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if files:
            return {"source": str(folder), "files": cached_sha256(files)}
    return {"source": "parameters", "files": {"state_dict": parameters_sha256(adapter.model)}}


def image_fingerprints(
    rows: Sequence[QuestionRow], images: ImageSource, progress: bool = False
) -> dict[str, str]:
    """Image id -> SHA-256 (16 hex digits) of the file's bytes, or of the generated image's pixels.

    An image that cannot be read gets ``"unreadable"`` (the evaluator reports it in ``skipped.jsonl``).
    """
    first: dict[str, QuestionRow] = {}
    for r in rows:
        first.setdefault(r.image_id, r)
    out: dict[str, str] = {}
    for image_id, r in tqdm(sorted(first.items()), desc="hash images", disable=not progress, unit="img"):
        try:
            if r.image_path and Path(r.image_path).is_file():
                out[image_id] = sha256_file(Path(r.image_path))[:16]
            else:
                im = images(r)
                head = f"{im.mode}|{im.size}|".encode()
                out[image_id] = hashlib.sha256(head + im.tobytes()).hexdigest()[:16]
        except (OSError, ValueError, KeyError):
            out[image_id] = "unreadable"
    return out


def _ids(ids: Sequence[str], n: int = 5) -> str:
    more = f", ... {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def _short(v: Any, n: int = 60) -> str:
    text = "(not recorded)" if v is None else json.dumps(v, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


def _diff_images(old: Any, new: dict[str, str]) -> str:
    if not isinstance(old, dict):
        return "images: not fingerprinted in the old run"
    changed = sorted(k for k in new if k in old and old[k] != new[k])
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    parts = [f"{len(ids)} {what} ({_ids(ids)})" for what, ids in
             (("changed", changed), ("added", added), ("removed", removed)) if ids]  # fmt: skip
    return "images: " + "; ".join(parts)


def _diff_weights(old: Any, new: dict[str, Any]) -> str:
    old_files = old.get("files", {}) if isinstance(old, dict) else {}
    if not old_files:
        return "weights: not fingerprinted in the old run"
    names = sorted(set(old_files) | set(new["files"]))
    diffs = [
        f"{n} {str(old_files.get(n, 'absent'))[:12]} -> {str(new['files'].get(n, 'absent'))[:12]}"
        for n in names
        if old_files.get(n) != new["files"].get(n)
    ]
    return f"weights ({new['source']}): " + ", ".join(diffs)


def compare_meta(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every differing item between a recorded ``meta.json`` and a new run's meta (``started`` aside)."""
    out = []
    for key, value in new.items():
        if key == "started":
            continue
        now = json.loads(json.dumps(value, default=str))
        was = old.get(key)
        if was == now or (key == "weights" and isinstance(was, dict) and was.get("files") == now["files"]):
            continue  # the same weights moved to another folder are the same weights
        if key == "images":
            out.append(_diff_images(old.get(key), now))
        elif key == "weights":
            out.append(_diff_weights(old.get(key), now))
        else:
            out.append(f"{key}: {_short(old.get(key))} -> {_short(now)}")
    return out
