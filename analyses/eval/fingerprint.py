"""Content fingerprints of a run's inputs, so a resumed run never mixes predictions of other weights or images.

- **Weights**: the SHA-256 of every ``*.safetensors`` file (else ``*.bin``) of the folder the model was
  loaded from (``VLMAdapter.weights_dir``), cached by (path, size, mtime, ctime, inode) in
  ``~/.cache/flipscope/weights-sha256.json`` (``FLIPSCOPE_CACHE`` moves it), so an unchanged 8 GB
  checkpoint is hashed once. A model without a folder (built in memory, LoRA-wrapped) is hashed from its
  parameters.
- **Images**: the SHA-256 of every image file's bytes (rows with an ``image_path``), or of the decoded
  pixels for generated images (SynthCXR), computed once per run.

- **Runtime** (:func:`runtime_fingerprint`): what else changes predictions: parameter dtypes, device map,
  attention implementation of the model and of each sub-config (text, vision), the processor's
  configuration (image size, mean, std, ...), the tokenizer (class, size, a hash of its vocabulary and
  rules, its settings) and, in chat mode, a hash of the chat template.

:func:`compare_meta` names every item that differs between a run folder's ``meta.json`` and a new run,
each by its dotted key with the old and the new value; :func:`accepted_changes` lists what differs but
cannot change a prediction (batch size, a model folder moved or copied with equal weight hashes), which a
resume accepts and records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.data.schema import ImageSource, QuestionRow
from hooks.progress import tqdm

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


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from ``meta.json`` (tuples as lists, objects as their ``str``)."""
    return json.loads(json.dumps(value, default=str))


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Tokenizer settings that say where it was loaded from, not how it tokenizes.
_TOKENIZER_LOCATION = ("name_or_path", "is_local", "local_files_only", "cache_dir", "added_tokens_decoder")


def _flat_attention(state: dict[str, Any], prefix: str = "model") -> dict[str, str]:
    """``hooks.attn.attn_state`` nesting as ``{"model": "eager", "text_config": "sdpa", ...}``."""
    out = {prefix: str(state.get(""))}
    for key, sub in state.items():
        if key:
            out.update(_flat_attention(sub, key if prefix == "model" else f"{prefix}.{key}"))
    return out


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Class, size, SHA-256 (16 hex digits) of the vocabulary and rules, and the settings it was made with."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # a fast tokenizer: vocabulary, merges, normalizer, ...; a slow one: its vocabulary
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    init = {
        k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
        if k not in _TOKENIZER_LOCATION and not k.endswith("_file")
    }  # fmt: skip
    return {"class": type(tokenizer).__name__, "size": len(tokenizer), "sha256": _sha16(rules),
            "settings": _jsonable(init)}  # fmt: skip


def runtime_fingerprint(adapter: Any) -> dict[str, Any]:
    """What changes predictions besides weights, images and the evaluator's settings (module docs)."""
    from hooks.attn import attn_state

    model = adapter.model
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    placed = getattr(model, "hf_device_map", None)
    devices = {"": sorted({p.device.type for p in model.parameters()})} if placed is None else placed
    processor = adapter.processor
    proc = dict(processor.to_dict()) if hasattr(processor, "to_dict") else {}
    template = getattr(processor, "chat_template", None) or getattr(adapter.tokenizer, "chat_template", None)
    for key in ("tokenizer", "chat_template", "audio_tokenizer"):
        proc.pop(key, None)
    chat = getattr(adapter, "prompt_mode", None) == "chat"
    return {
        "dtype": ",".join(dtypes),
        "device_map": _jsonable(devices),
        "attention": _flat_attention(attn_state(model.config)),
        "processor": _jsonable(proc),
        "tokenizer": tokenizer_fingerprint(adapter.tokenizer),
        "chat_template": _sha16(json.dumps(template, default=str)) if chat and template else None,
    }


# ----------------------------------------------------------------------------- comparing two runs
#: Dotted ``meta.json`` keys that cannot change a prediction: a resume with other values is accepted.
NEUTRAL_KEYS: tuple[str, ...] = ("eval_config.batch_size", "eval_config.flush_every")
#: Where the model came from: accepted when the weight hashes are equal (a moved or copied folder).
LOCATION_KEYS: tuple[str, ...] = ("model", "revision", "weights.source")
#: Keys a run folder's ``meta.json`` keeps for itself (never compared).
OWN_KEYS: tuple[str, ...] = ("started", "resumes")
#: Leaves longer than this (as JSON) are shown around their first difference instead of whole.
_LONG = 160


def _flat(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value; dicts are opened except ``images`` and ``weights.files`` (diffed as sets)."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in ("images", "weights.files"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _show(old: Any, new: Any) -> str:
    """``old -> new``, whole when short; long strings and lists around their first difference."""
    a, b = ("(not recorded)" if v is None else json.dumps(v, default=str) for v in (old, new))
    if len(a) <= _LONG and len(b) <= _LONG:
        return f"{a} -> {b}"
    i = next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 30)
    return (f"differs at character {i} of {len(a)} / {len(b)}: ...{a[lo : i + 50]}... -> "
            f"...{b[lo : i + 50]}...")  # fmt: skip


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


def _ids(ids: Sequence[str], n: int = 5) -> str:
    more = f", ... {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def _differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) of every leaf that differs, under the keys of ``new`` (``OWN_KEYS`` aside)."""
    now = _jsonable({k: v for k, v in new.items() if k not in OWN_KEYS})
    was = _flat({k: old[k] for k in now if k in old})
    flat_now = _flat(now)
    for key in now:  # a key the old run did not record at all is one difference, not one per leaf
        if key not in old:
            flat_now = {k: v for k, v in flat_now.items() if not k.startswith(key + ".")} | {key: now[key]}
    keys = sorted(set(was) | set(flat_now), key=lambda k: (list(now).index(k.split(".")[0]), k))
    return {k: (was.get(k), flat_now.get(k)) for k in keys if was.get(k) != flat_now.get(k)}


def _same_weights(old: dict[str, Any], new: dict[str, Any]) -> bool:
    was: dict[str, Any] = old["weights"] if isinstance(old.get("weights"), dict) else {}
    now: dict[str, Any] = new["weights"] if isinstance(new.get("weights"), dict) else {}
    return bool(was.get("files")) and was.get("files") == _jsonable(now.get("files"))


def accepted_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Dotted key -> [old, new] of what differs but cannot change a prediction (``NEUTRAL_KEYS``, and
    ``LOCATION_KEYS`` when the weight hashes are equal): a resume accepts these and records them."""
    ok = NEUTRAL_KEYS + (LOCATION_KEYS if _same_weights(old, new) else ())
    return {k: [a, b] for k, (a, b) in _differences(old, new).items() if k in ok}


def compare_meta(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every differing item between a recorded ``meta.json`` and a new run's meta, one string each, naming
    its dotted key with the old and the new value (what :func:`accepted_changes` lists aside)."""
    accepted = accepted_changes(old, new)
    out: list[str] = []
    weights_done = False
    for key, (was, now) in _differences(old, new).items():
        if key in accepted:
            continue
        if key == "images":
            out.append(_diff_images(was, now))
        elif key.startswith("weights.files") or key == "weights":
            if not weights_done:
                out.append(_diff_weights(old.get("weights"), _jsonable(new["weights"])))
            weights_done = True
        elif key == "weights.source":
            continue  # named with the files that differ
        elif key not in old and "." not in key:
            out.append(f"{key}: not recorded in the old run (it predates this fingerprint)")
        else:
            out.append(f"{key}: {_show(was, now)}")
    return out
