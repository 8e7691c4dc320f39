"""Resume a forward pass in the middle of the text stack, on a suffix of positions.

A patch at text layer L and position p leaves everything upstream of it untouched: the vision
tower, the embeddings, layers ``< L``, and, in layers ``>= L``, every position that cannot see p.
:func:`capture_stack` records one run of a batch (each text layer's input hidden states, the keyword
arguments it was called with, and its keys/values); :func:`resume` then recomputes only layers
``from_layer..N-1`` on positions ``start..T-1``, taking the keys/values of positions ``< start`` from
the record. The result is the margin the full patched forward would give (to float rounding), at a
fraction of its cost; :func:`interp.patching.patching_sweep` uses it for every sweep it can.

Which positions can see p is read from the attention masks themselves (:meth:`StackState.suffix_start`),
not assumed causal: Gemma3's image block is bidirectional, so patching any image token makes the
suffix start at the first image token.

Supported: text layers called as ``layer(hidden, attention_mask=..., position_embeddings=...,
position_ids=..., past_key_values=...)`` whose attention calls ``past_key_values.update(k, v,
layer_idx)`` (Gemma3, Llama/Mistral in transformers 5: LLaVA and LLaVA-NeXT; Qwen2.5-VL, whose 3-D
rotary positions reach the layers as per-position ``position_embeddings`` (cos, sin) and slice like
any other), with a materialised 4-D attention mask: :func:`capture_stack` and :func:`resume` run the
text stack on eager attention for the call (:func:`hooks.attn.attention_implementation`; an ``sdpa``
model gets its implementation back on exit, the vision tower is never switched). Anything else raises
:class:`ResumeUnsupported`, and callers fall back to full forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hooks.attn import attention_implementation
from hooks.batch import Batch
from hooks.devices import execution_devices

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter


class ResumeUnsupported(RuntimeError):
    """This model's text layers cannot be resumed on a suffix (unknown call signature or no mask)."""


# Keyword arguments a text layer may receive: sliced (see _slice_kwargs) or passed through as they are.
_SLICED_KWARGS = ("attention_mask", "position_embeddings", "position_ids", "cache_position")
_PASS_KWARGS = ("use_cache", "output_attentions", "past_key_values")


@dataclass
class StackState:
    """One batch's run through the text stack, enough to resume it from any layer and position."""

    hidden: list[Float[Tensor, "batch pos d_model"]]
    """``hidden[L]`` = resid_pre(L) for L < N; ``hidden[N]`` = resid_post(N-1) (input of the final norm)."""
    layer_kwargs: list[dict[str, Any]]
    """Keyword arguments each text layer was called with (masks, rotary embeddings, position ids)."""
    keys: list[Tensor]
    """Keys of each layer as its attention stores them: ``(batch, kv_heads, pos, head_dim)``."""
    values: list[Tensor]
    """Values of each layer, same layout as ``keys``."""
    allowed: Bool[Tensor, "batch query key"]
    """Query may attend key in at least one layer (union of the layers' masks)."""
    margins: Float[Tensor, " batch"]
    """The model's own margins on the recorded batch (the layer-by-layer replay reproduced them)."""

    @property
    def n_layers(self) -> int:
        return len(self.layer_kwargs)

    @property
    def seq_len(self) -> int:
        return self.hidden[0].shape[1]

    def suffix_start(self) -> Int[Tensor, "batch pos"]:
        """For a change at position p of row b: the first position whose state can change.

        The smallest s <= p such that no position < s attends to any position >= s in any layer
        (causal masks give s = p; a bidirectional block moves s to the start of the block).
        """
        b, t, _ = self.allowed.shape
        q = torch.arange(t).view(1, t, 1).expand(b, t, t)
        first_q = torch.where(self.allowed, q, t).min(dim=1).values  # (b, key): first query that sees it
        # suffix minimum over keys >= p
        reach = torch.flip(torch.cummin(torch.flip(first_q, [1]), dim=1).values, [1])
        s = torch.minimum(torch.arange(t).expand(b, t), reach)
        while True:  # close under "a position >= s is seen from before s"
            nxt = torch.minimum(s, reach.gather(1, s.clamp(max=t - 1)))
            if torch.equal(nxt, s):
                return s
            s = nxt


class _KeysValuesDone(Exception):
    """Raised by a key/value-only pass once the layer has produced its keys and values."""


class _PrefixKV:
    """Stands in for the HF cache: prepends recorded prefix keys/values, or records them.

    ``prefix=None`` records every layer's keys/values and returns them unchanged. ``stop=True``
    records and then raises :class:`_KeysValuesDone`: the layer's queries, attention, output
    projection and MLP are never run.
    """

    def __init__(self, prefix: dict[int, tuple[Tensor, Tensor]] | None, stop: bool = False) -> None:
        self.prefix = prefix
        self.stop = stop
        self.recorded: dict[int, tuple[Tensor, Tensor]] = {}

    def update(
        self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self.prefix is None or self.stop:
            self.recorded[layer_idx] = (key.detach(), value.detach())
            if self.stop:
                raise _KeysValuesDone
            return key, value
        pk, pv = self.prefix[layer_idx]
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)


def _allowed(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _slice_kwargs(
    kwargs: dict[str, Any],
    rows: Tensor,
    start: int,
    stop: int,
    batch: int,
    memo: dict[int, Any] | None = None,
) -> dict[str, Any]:
    """A layer's keyword arguments for queries ``start..stop-1`` of ``rows`` (keys: all positions).

    ``memo`` (keyed by tensor identity) lets layers that share a mask or rotary table share its slice.
    """
    memo = {} if memo is None else memo

    def cut(v: Tensor, mask: bool = False) -> Tensor:
        key = id(v)
        if key not in memo:
            r = v[rows] if v.shape[0] == batch else v
            memo[key] = r[..., start:stop, :] if mask else r[:, start:stop]
        return memo[key]

    out: dict[str, Any] = {}
    for name, v in kwargs.items():
        if name == "attention_mask":
            out[name] = cut(v, mask=True)
        elif name == "position_embeddings":
            out[name] = tuple(cut(t) for t in v)
        elif name == "cache_position" and isinstance(v, Tensor):
            out[name] = v[start:stop]
        elif name == "position_ids" and isinstance(v, Tensor):
            out[name] = cut(v)
        else:
            out[name] = v
    return out


def _check_kwargs(layer: int, kwargs: dict[str, Any]) -> None:
    known = {*_SLICED_KWARGS, *_PASS_KWARGS}
    odd = [k for k, v in kwargs.items() if k not in known and isinstance(v, Tensor | tuple | list | dict)]
    if odd:
        raise ResumeUnsupported(
            f"text layer {layer} receives keyword arguments {odd} that resume cannot slice"
        )
    if not isinstance(kwargs.get("attention_mask"), Tensor):
        raise ResumeUnsupported(
            f"text layer {layer} got no materialised attention mask, even on eager attention; "
            "this architecture cannot be resumed on a suffix"
        )
    if kwargs.get("past_key_values") is not None:
        raise ResumeUnsupported("the recorded forward used a KV cache; record with use_cache=False")


def capture_stack(
    adapter: VLMAdapter, batch: Batch, image_features: Sequence[Tensor] | Tensor | None = None
) -> StackState:
    """Record ``batch``'s run through the text stack (one HF forward + one resumed full pass).

    The HF forward supplies layer 0's input and each layer's keyword arguments; the stack is then run
    again through :func:`resume`'s path with a recording cache, and its margins are checked against
    the HF forward's (so a model this module does not understand fails loudly, not silently). Both run
    on eager attention in the text stack; ``image_features`` (of ``batch``'s rows with an image, e.g.
    :func:`hooks.batch_features.batch_features`) skip the vision tower.
    """
    with attention_implementation(adapter.model, "eager"):
        return _capture_stack(adapter, batch, image_features)


def _capture_stack(
    adapter: VLMAdapter, batch: Batch, image_features: Sequence[Tensor] | Tensor | None
) -> StackState:
    spread = execution_devices(adapter.model)
    if len(spread) > 1:  # records and indices would sit on one device, the layers on several
        raise ResumeUnsupported(
            f"the model is spread over {len(spread)} devices ({', '.join(sorted(map(str, spread)))}); the resumed "
            "sweep needs the text stack on one device: use method='stack' (method='auto' does)"
        )
    n = adapter.n_layers
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def grab(i: int):
        def fn(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[i] = (args, dict(kwargs))

        return fn

    handles = [adapter.text_layer(i).register_forward_pre_hook(grab(i), with_kwargs=True) for i in range(n)]
    try:
        with torch.no_grad():
            m_model = adapter.margins(batch, image_features=image_features).float().cpu()
    finally:
        for handle in handles:
            handle.remove()
    args0, kw0 = calls[0]
    h0 = args0[0] if args0 else kw0.pop("hidden_states")
    layer_kwargs = []
    for i in range(n):
        kw = {k: v for k, v in calls[i][1].items() if k != "hidden_states"}
        _check_kwargs(i, kw)
        layer_kwargs.append(kw)
    allowed = torch.zeros(h0.shape[0], h0.shape[1], h0.shape[1], dtype=torch.bool)
    for kw in layer_kwargs:
        allowed |= _allowed(kw["attention_mask"]).any(dim=1).cpu()
    rec = _PrefixKV(None)
    hidden = [h0.detach()]
    with torch.no_grad():
        h = h0
        for i in range(n):
            h = _call_layer(adapter, i, h, {**layer_kwargs[i], "past_key_values": rec})
            hidden.append(h.detach())
        margins = adapter.answer_ids.margin(adapter.unembed(h[:, -1])).float().cpu()
    if len(rec.recorded) != n:
        raise ResumeUnsupported(
            f"only layers {sorted(rec.recorded)} of {n} stored keys/values through past_key_values.update"
        )
    tol = 1e-4 if h0.dtype == torch.float32 else 2e-2  # bf16/fp16 margins carry ~3 significant digits
    if not torch.allclose(margins, m_model, atol=tol, rtol=tol):
        raise ResumeUnsupported(
            f"re-running the text stack layer by layer does not reproduce the model's margins "
            f"(max |diff| {(margins - m_model).abs().max().item():.2e}); this architecture is not supported"
        )
    return StackState(
        hidden,
        layer_kwargs,
        [rec.recorded[i][0] for i in range(n)],
        [rec.recorded[i][1] for i in range(n)],
        allowed,
        m_model,
    )


def _call_layer(adapter: VLMAdapter, i: int, h: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = adapter.text_layer(i)(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def resume(
    adapter: VLMAdapter,
    state: StackState,
    rows: Sequence[int] | Int[Tensor, " n"],
    start: int,
    from_layer: int,
    hidden: Float[Tensor, "n suffix d_model"],
) -> Float[Tensor, " n"]:
    """Margins after running layers ``from_layer..N-1`` on positions ``start..T-1`` of ``rows``.

    ``hidden`` is the input of layer ``from_layer`` (``from_layer == N``: of the final norm) on the
    suffix; ``rows`` index the recorded batch (repeats allowed: one row per variant). Keys/values of
    positions ``< start`` come from the record, so the caller must only have changed positions that
    positions ``< start`` cannot see (see :meth:`StackState.suffix_start`). Hooks registered on the
    layers' modules (e.g. :meth:`VLMAdapter.hooks`) fire and see suffix coordinates, except in the
    last layer, which runs its sub-modules on the final position only (see :func:`_last_layer`).
    """
    n, t = state.n_layers, state.seq_len
    if not 0 <= from_layer <= n:
        raise IndexError(f"from_layer {from_layer} out of range 0..{n}")
    if not 0 <= start < t:
        raise IndexError(f"start {start} out of range 0..{t - 1}")
    idx = torch.as_tensor(rows, dtype=torch.long)
    if hidden.shape[:2] != (len(idx), t - start):
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)}; expected ({len(idx)}, {t - start}, d_model) for "
            f"{len(idx)} rows and positions {start}..{t - 1}"
        )
    b = state.hidden[0].shape[0]
    dev = state.hidden[0].device
    idx_d = idx.to(dev)
    h = hidden
    with torch.no_grad(), attention_implementation(adapter.model, "eager"):
        cache = _PrefixKV(
            {
                i: (state.keys[i][idx_d, :, :start], state.values[i][idx_d, :, :start])
                for i in range(from_layer, n)
            }
        )
        memo: dict[int, Any] = {}
        for i in range(from_layer, n - 1):
            kw = _slice_kwargs(state.layer_kwargs[i], idx_d, start, t, b, memo)
            h = _call_layer(adapter, i, h, {**kw, "past_key_values": cache})
        if from_layer < n:
            h = _last_layer(adapter, state, cache, idx_d, start, h)
        return adapter.answer_ids.margin(adapter.unembed(h[:, -1])).float().cpu()


def _last_layer(
    adapter: VLMAdapter, state: StackState, cache: _PrefixKV, rows: Tensor, start: int, h: Tensor
) -> Float[Tensor, "n 1 d_model"]:
    """The last layer, computed in full only at the final position.

    Nothing reads the last layer's other positions except through its keys/values, so positions
    ``start..T-2`` run a key/value-only pass (stopped inside the attention, right after the keys and
    values are made) and the final position attends to them through the cache.
    """
    i, t, b = state.n_layers - 1, state.seq_len, state.hidden[0].shape[0]
    if t - start > 1:
        kv_only = _PrefixKV(None, stop=True)
        kw = _slice_kwargs(state.layer_kwargs[i], rows, start, t - 1, b)
        try:
            _call_layer(adapter, i, h[:, :-1], {**kw, "past_key_values": kv_only})
        except _KeysValuesDone:
            pass
        else:
            raise ResumeUnsupported(f"text layer {i} never called past_key_values.update")
        pk, pv = cache.prefix[i]  # type: ignore[index]
        mk, mv = kv_only.recorded[i]
        cache.prefix[i] = (torch.cat([pk, mk], dim=2), torch.cat([pv, mv], dim=2))  # type: ignore[index]
    kw = _slice_kwargs(state.layer_kwargs[i], rows, t - 1, t, b)
    return _call_layer(adapter, i, h[:, -1:], {**kw, "past_key_values": cache})
