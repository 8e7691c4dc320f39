"""Which attention implementation runs, switched only where a computation needs it.

``sdpa`` is the default everywhere (:meth:`hooks.adapter.VLMAdapter.from_pretrained`): it never
materialises attention weights, which for SigLIP at 896 px are 16 heads x 4096^2 fp32 = 1 GiB per image
in ``eager``. Two computations need ``eager`` in the *text* stack:

- reading attention weights (:func:`interp.attention.final_attention_to_image`): SDPA returns none;
- the resumed sweep (:mod:`interp.stack`), which slices each layer's materialised 4-D mask.

:func:`attention_implementation` switches the text stack only (the vision tower keeps its own
implementation unless ``vision=True``), and restores every sub-config's implementation on exit, even
if the body raises. transformers 5 takes a per-sub-config dict in ``set_attn_implementation``
(``{"text_config": "eager"}``); the model's top-level entry is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")


def attn_state(config: Any) -> dict[str, Any]:
    """The implementation of ``config`` and of each of its sub-configs, nested as ``set_attn_implementation``
    takes it (``{"": "sdpa", "text_config": {"": "eager"}, ...}``)."""
    state: dict[str, Any] = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            state[key] = attn_state(sub)
    return state


def text_attn_implementation(model: nn.Module) -> str:
    """The implementation the text decoder runs with."""
    return str(model.config.get_text_config()._attn_implementation)  # type: ignore[union-attr,operator]


def _text_key(config: Any) -> str | None:
    """The sub-config key of the text decoder (``text_config`` for every family here)."""
    text = config.get_text_config()
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is text:
            return key
    return None


@contextmanager
def attention_implementation(model: nn.Module, impl: str, vision: bool = False) -> Iterator[None]:
    """Run the body with the text stack (and the vision tower if ``vision``) on ``impl``; restore after.

    >>> with attention_implementation(adapter.model, "eager"):   # text weights, vision stays sdpa
    ...     out = adapter.model(**batch.inputs, output_attentions=True)
    """
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not one of {ATTN_IMPLEMENTATIONS}")
    config: Any = model.config
    before = attn_state(config)
    key = _text_key(config)
    if vision or key is None:
        request: Any = impl
    else:
        request = {key: impl}
    if attn_state(config) == _applied(before, request):
        yield
        return
    model.set_attn_implementation(request)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_attn_implementation(before)  # type: ignore[operator]


def _applied(state: dict[str, Any], request: Any) -> dict[str, Any]:
    """``state`` as it would be after ``set_attn_implementation(request)`` (used to skip no-op switches)."""
    if isinstance(request, str):
        return {k: (request if k == "" else _applied(v, request)) for k, v in state.items()}
    return {k: (_applied(v, request[k]) if k in request else v) for k, v in state.items()}
