"""Models spread over several devices (``device_map``), through accelerate's dispatch.

A model too large for one GPU (MedGemma-27B) is loaded with ``device_map="auto"`` (optionally a
``max_memory`` per device): accelerate places whole decoder layers on devices and wraps each placed
module in an ``AlignDevicesHook`` that moves its inputs to its device. flipscope's hooks, activation
cache, patching and SAE attribution read and write activations on whatever device they sit and move
their own tensors there (``x.to(site_activation.device)``); inputs go to the input embeddings' device
(:func:`input_device`).

- :func:`parse_max_memory`: ``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: bytes, 1: bytes, "cpu": bytes}``;
- :func:`rank_max_memory`: the GPUs of one process when several processes of a node each spread a model
  over their own GPUs (8 GPUs, 4 processes: 2 each);
- :func:`dispatch`: spread an already loaded model (the shipped organism, a model built in memory);
  a model loaded from a folder or the hub gets its map from ``from_pretrained`` instead;
- :func:`device_map_of`: the placement of a dispatched model (``None`` for a model on one device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: ``--device-map`` values that ask accelerate to compute the placement.
DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
MaxMemory = dict[int | str, int]


def parse_max_memory(text: str | Mapping[Any, Any] | None) -> MaxMemory | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` (or a mapping) -> ``{0: bytes, 1: bytes, "cpu": bytes}``.

    Keys are GPU indices, ``cpu`` or ``disk``; sizes are bytes or strings such as ``70GiB``, ``500MB``.
    """
    if text is None or text == "":
        return None
    from accelerate.utils import convert_file_size_to_int

    pairs = text.items() if isinstance(text, Mapping) else (p.partition("=")[::2] for p in text.split(","))
    out: MaxMemory = {}
    for key, size in pairs:
        k = str(key).strip()
        if not (k.isdigit() or k in ("cpu", "disk")) or not str(size).strip():
            raise ValueError(
                f"--max-memory {text!r}: each entry is DEVICE=SIZE with DEVICE a GPU index, cpu or disk, "
                "e.g. --max-memory 0=70GiB,1=70GiB,cpu=200GiB"
            )
        try:
            text_size = str(size).strip()
            n = int(text_size) if text_size.isdigit() else convert_file_size_to_int(text_size)
        except ValueError as err:
            raise ValueError(f"--max-memory {k}={size}: not a size (use e.g. 70GiB, 500MB)") from err
        out[int(k) if k.isdigit() else k] = int(n)
    return out


def rank_max_memory(
    max_memory: MaxMemory | None, local_rank: int, local_world_size: int, n_gpus: int
) -> MaxMemory | None:
    """The devices one process may spread its model over when ``local_world_size`` processes share a node.

    The node's ``n_gpus`` GPUs are cut into equal consecutive groups, one per process; ``cpu`` / ``disk``
    entries of ``max_memory`` are kept. GPUs missing from ``max_memory`` get their free memory (read by
    accelerate). A single process, or a node without GPUs, keeps ``max_memory`` as given.
    """
    if local_world_size <= 1 or n_gpus == 0:
        return max_memory
    per = n_gpus // local_world_size
    if per < 1:
        raise ValueError(
            f"{local_world_size} processes on a node with {n_gpus} GPU(s): a model spread with --device-map "
            f"needs at least one GPU per process; launch at most {n_gpus} processes per node "
            "(torchrun --nproc_per_node), or drop --device-map to put one whole model on each GPU"
        )
    mine = range(local_rank * per, (local_rank + 1) * per)
    given = max_memory or {}
    free: MaxMemory = {}
    if any(g not in given for g in mine):
        from accelerate.utils import get_max_memory

        free = {k: int(v) for k, v in get_max_memory().items()}
    out: MaxMemory = {g: given.get(g, free.get(g, 0)) for g in mine}
    out.update({k: v for k, v in given.items() if k in ("cpu", "disk")})
    return out


def _no_split(model: nn.Module) -> list[str]:
    """Module classes accelerate must keep on one device (decoder and vision layers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return sorted(names)


def dispatch(
    model: nn.Module,
    device_map: str | Mapping[str, Any],
    max_memory: MaxMemory | None = None,
    *,
    offload_dir: str | None = None,
    force_hooks: bool = False,
) -> nn.Module:
    """Spread a loaded model over devices with accelerate (``device_map``: a strategy or module -> device).

    ``force_hooks`` attaches accelerate's hooks even when every module lands on one device (used to test
    that everything works through them on a CPU-only machine).
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"--device-map {device_map!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} or a "
                "module -> device mapping"
            )
        no_split = _no_split(model)
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory, no_split, low_zero=device_map == "balanced_low_0"
            )
        placed = dict(infer_auto_device_map(model, max_memory, no_split))
    else:
        placed = dict(device_map)
    dispatch_model(model, placed, offload_dir=offload_dir, force_hooks=force_hooks)
    model.hf_device_map = placed  # type: ignore[assignment]
    return model


def device_map_of(model: nn.Module) -> dict[str, Any] | None:
    """The module -> device placement of a model spread with a device map, else ``None``."""
    placed = getattr(model, "hf_device_map", None)
    return dict(placed) if placed else None


def _as_device(dev: Any) -> torch.device:
    if isinstance(dev, int):
        return torch.device("cuda", dev)
    return torch.device("cpu" if dev in ("disk", "meta") else dev)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first of a spread model).

    Embeddings offloaded by accelerate (weights on ``meta`` until used) run on their device-map entry.
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    placed = device_map_of(model)
    if placed and emb is not None:
        name = next((n for n, m in model.named_modules() if m is emb), "")
        keys = [k for k in placed if k == "" or name == k or name.startswith(k + ".")]
        if keys:
            return _as_device(placed[max(keys, key=len)])
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def place(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: MaxMemory | None = None,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Put an already loaded model where ``from_pretrained`` would have: ``dtype``, then one device or a map."""
    if dtype is not None:
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device_map is not None:
        return dispatch(model, device_map, max_memory)
    if device is not None:
        model.to(device)
    return model


def execution_devices(model: nn.Module) -> set[torch.device]:
    """The devices a model computes on: one, unless a device map spreads it over several GPUs.

    Modules mapped to ``cpu`` or ``disk`` next to GPUs are offloaded: they run on the main GPU.
    """
    placed = device_map_of(model)
    if not placed:
        return {input_device(model)}
    gpus = {_as_device(v) for v in placed.values() if v not in ("cpu", "disk", "meta")}
    return gpus or {torch.device("cpu")}
