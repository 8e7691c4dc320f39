"""Image-prefix reuse: the tokens up to an image's last image token run once; each question about that
image is a suffix-only forward against their keys and values.

With the image before the question, every row about an image starts with the same tokens (BOS, chat
turn, image markers, the image tokens: ~258 of MedGemma's ~278), and their keys/values cannot depend
on the question: text is causal, and Gemma3's bidirectional attention stays inside the image block,
which ends before the question. So for a batch (:func:`prefix_margins`):

1. each row is split after its last image token: prefix ``ids[first_real : end]``, suffix ``ids[end:]``;
2. every distinct (image, prefix ids) not yet in the :class:`PrefixStore` runs once, alone (so its
   keys/values do not depend on which batch first needed it: a sharded run gives the same bits), with the
   row's own position ids and per-token keys (the image block's mask);
3. the suffixes run as one left-padded batch against a cache holding each row's prefix keys/values
   (left-padded to the longest prefix), with a 2-D attention mask over ``[prefix pad | prefix | suffix
   pad | suffix]`` and the suffix tokens' position ids from the full layout (so Qwen2.5-VL's 3-D rotary
   positions continue after the image exactly as in the full sequence).

The margins equal the full forward's to float rounding (``tests/test_prefix.py``, every family, fp32).
Rows without an image, and every row when a row's question precedes its image, take the full forward;
:func:`reusable` says which path a prompt layout allows. A sliding-window layer whose window is shorter
than ``prefix + suffix`` (not MedGemma's 1024 at ~280 tokens) would see a different window: such a
batch takes the full forward too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooks.batch import Batch

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter


class PrefixUnsupported(ValueError):
    """A row's question comes before (or inside) its image prefix: the prefix is not shared."""


@dataclass(frozen=True)
class PrefixKV:
    """Keys/values of one image prefix, every text layer, without padding."""

    keys: list[Float[Tensor, "kv_heads pos head_dim"]]
    values: list[Float[Tensor, "kv_heads pos head_dim"]]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixStore:
    """Prefix keys/values by (image key, prefix ids), the oldest dropped past ``max_bytes``.

    An image's rows usually span a few batches (the evaluator sorts work by image), so a prefix is
    kept until its image's rows are done. MedGemma-4B in bf16: ~36 MB per 258-token prefix.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, PrefixKV] = OrderedDict()
        self.computed = 0
        """Prefixes computed so far (a measure of reuse: rows scored / prefixes computed)."""

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> PrefixKV:
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, kv: PrefixKV) -> None:
        self._items[key] = kv
        self.computed += 1
        while len(self._items) > 1 and sum(v.nbytes for v in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)


def prefix_ends(batch: Batch) -> Int[Tensor, " batch"]:
    """Per row, one past its last image token (padded coordinates); 0 for a row without an image."""
    t = batch.seq_len
    idx = torch.arange(t).expand(len(batch), t)
    last = torch.where(batch.image_mask, idx, -1).max(-1).values
    return last + 1


def reusable(batch: Batch) -> bool:
    """Whether every row with an image has its question after the image (the prefix is shared)."""
    ends = prefix_ends(batch)
    t = batch.seq_len
    idx = torch.arange(t).expand(len(batch), t)
    early = batch.question_mask & (idx < ends.unsqueeze(1))
    return not bool(early.any())


def image_order(adapter: VLMAdapter, question: str) -> Literal["before", "after"] | None:
    """Where ``adapter``'s prompt for ``question`` puts the image relative to the question text, read from
    the rendered prompt before tokenization (no image is needed); ``None`` if the image token is not in it."""
    from hooks.batch import render_prompts

    text = render_prompts(adapter, [question], [True])[0].text
    at = text.find(adapter.processor.image_token)
    if at < 0:
        return None
    return "before" if at < text.rfind(question.strip()) else "after"


def image_first(adapter: VLMAdapter, question: str) -> bool:
    """Whether ``adapter``'s prompt for ``question`` puts the image before the question text."""
    return image_order(adapter, question) == "before"


def _window_ok(adapter: VLMAdapter, total: int) -> bool:
    cfg = adapter.model.config.get_text_config()
    window: Any = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    sliding = window is not None and (not types or any("sliding" in x for x in types))
    return not sliding or total <= int(window) - 1


def prefix_margins(
    adapter: VLMAdapter,
    batch: Batch,
    image_features: Sequence[Tensor],
    image_keys: Sequence[Hashable],
    store: PrefixStore | None = None,
) -> Float[Tensor, " batch"]:
    """Margins of ``batch`` reusing image prefixes (module docstring); equal to
    ``adapter.margins(batch, image_features=image_features)`` to float rounding.

    ``image_features[k]`` and ``image_keys[k]`` belong to the k-th row with an image; rows whose keys
    are equal show the same image (the key names the prefix in ``store``, which may outlive the batch).
    """
    if not reusable(batch):
        raise PrefixUnsupported(
            "a row's question precedes its image, so rows do not share an image prefix; use the full "
            "forward (image_position='before' puts the image first)"
        )
    has = batch.image_mask.any(-1)
    if len(image_features) != int(has.sum()) or len(image_keys) != len(image_features):
        raise ValueError(
            f"{len(image_features)} feature sets and {len(image_keys)} keys for {int(has.sum())} image rows"
        )
    out = torch.empty(len(batch), dtype=torch.float32)
    rows_img = has.nonzero().flatten().tolist()
    rows_txt = (~has).nonzero().flatten().tolist()
    with torch.no_grad():
        if rows_txt:
            out[rows_txt] = adapter.margins(batch.select(rows_txt)).float().cpu()
        if rows_img:
            store = store if store is not None else PrefixStore()
            out[rows_img] = _image_rows(adapter, batch, rows_img, image_features, image_keys, store)
    return out


def _image_rows(
    adapter: VLMAdapter,
    batch: Batch,
    rows: list[int],
    feats: Sequence[Tensor],
    keys: Sequence[Hashable],
    store: PrefixStore,
) -> Tensor:
    ends = prefix_ends(batch).tolist()
    first = (batch.attention_mask.long().cumsum(-1) == 0).sum(-1).tolist()  # left padding per row
    ids = batch.input_ids
    row_key = {r: (keys[k], tuple(ids[r, first[r] : ends[r]].tolist())) for k, r in enumerate(rows)}
    longest = max(ends[r] - first[r] for r in rows) + max(batch.seq_len - ends[r] for r in rows)
    if not _window_ok(adapter, longest):
        sub = batch.select(rows)
        return adapter.margins(sub, image_features=list(feats)).float().cpu()
    kvs: dict[Hashable, PrefixKV] = {}  # this batch's prefixes, held here so eviction cannot drop one
    for k, r in enumerate(rows):
        key = row_key[r]
        if key in kvs:
            continue
        if key in store:
            kvs[key] = store.get(key)
        else:  # one at a time: a prefix's keys/values never depend on its neighbours
            kvs[key] = _run_prefix(adapter, batch, r, feats[k], slice(first[r], ends[r]))
            store.put(key, kvs[key])
    return _run_suffixes(adapter, batch, rows, [kvs[row_key[r]] for r in rows], ends).float().cpu()


def _run_prefix(adapter: VLMAdapter, batch: Batch, row: int, feats: Tensor, cols: slice) -> PrefixKV:
    """Row ``row``'s prefix (columns ``cols``: no padding) run alone, with its own position ids and
    per-token keys (Gemma3's image-block mask); its keys/values in every text layer."""
    from transformers import DynamicCache

    sub = batch.select([row])
    emb = adapter.embed(sub, [feats])[:, cols]
    skip = {"input_ids", *adapter.spec.inputs.image_keys}
    kwargs = {k: v[..., cols].to(adapter.device) for k, v in sub.inputs.items() if k not in skip}
    cache = DynamicCache(config=adapter.model.config)
    adapter.model(inputs_embeds=emb, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
    layers: Any = cache.layers  # DynamicLayer / DynamicSlidingWindowLayer: .keys, .values
    return PrefixKV(
        keys=[layer.keys[0].clone() for layer in layers],
        values=[layer.values[0].clone() for layer in layers],
    )


def _run_suffixes(
    adapter: VLMAdapter, batch: Batch, rows: list[int], kvs: list[PrefixKV], ends: list[int]
) -> Tensor:
    """The suffixes of ``rows`` as one batch against their prefixes' keys/values; margins at the end."""
    from transformers import DynamicCache

    t = batch.seq_len
    s = max(t - ends[r] for r in rows)
    p = max(kv.length for kv in kvs)
    dev = adapter.device
    ids = torch.full((len(rows), s), adapter.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(rows), p + s, dtype=torch.long)
    pos = batch.inputs["position_ids"]
    spos = pos.new_zeros((*pos.shape[:-2], len(rows), s))
    for j, r in enumerate(rows):
        n = t - ends[r]
        ids[j, s - n :] = batch.input_ids[r, ends[r] :]
        mask[j, p - kvs[j].length : p] = 1
        mask[j, p + s - n :] = 1
        spos[..., j, s - n :] = pos[..., r, ends[r] :]
    layers = [
        (_stack_left([kv.keys[i] for kv in kvs], p), _stack_left([kv.values[i] for kv in kvs], p))
        for i in range(len(kvs[0].keys))
    ]
    cache = DynamicCache(ddp_cache_data=layers, config=adapter.model.config)
    out = adapter.model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=spos.to(dev),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return adapter.answer_ids.margin(out.logits[:, -1])


def _stack_left(parts: list[Tensor], width: int) -> Tensor:
    """``(kv_heads, len, d)`` blocks stacked into ``(n, kv_heads, width, d)``, each right-aligned."""
    first = parts[0]
    out = first.new_zeros(len(parts), first.shape[0], width, first.shape[2])
    for j, x in enumerate(parts):
        out[j, :, width - x.shape[1] :] = x
    return out
