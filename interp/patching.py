"""Activation patching between a clean and a corrupted batch, batched over (layer, position) variants.

Pair ``i`` is (row ``i`` of ``clean``, row ``i`` of ``corrupt``): a question and its paraphrase, or the
same question with and without its image. For every layer L and position class c, the corrupted run
gets the clean run's activation at site ``<kind>(L)`` on the positions of c, and we read

    recovery = (m_patched - m_corrupt) / (m_clean - m_corrupt)      per pair,

1 = the patch restores the clean decision, 0 = it does nothing. Pairs whose margins differ by less
than ``min_gap`` get NaN (the ratio is meaningless there) and are left out of the means.

Batching: variant (L, c, pair) becomes one row of a large batch that repeats corrupted rows.
``method="resume"`` (the default where the model supports it) starts each row at the patched layer,
on the positions that can see the patch, from a record of the corrupted run (:mod:`interp.stack`):
the vision tower, the layers below and the untouched prefix are never recomputed, and variants whose
patch writes exactly the value already there are not run at all. ``method="stack"`` runs full forwards
with one hook per layer that overwrites, row by row, only the positions of that row's variant. Either
way a sweep costs about ``layers * positions * pairs / max_rows_per_forward`` passes instead of the
``layers * positions`` full forwards of :func:`sweep_reference` (the TransformerLens-style loop, kept
as the reference implementation).

Position alignment (:func:`interp.align.align_pairs`): ``image`` tokens map by their index within the image block
and ``final`` is the last position of each prompt, so these two classes patch across prompts of
different lengths. ``question``, ``text``, ``all`` and ``each`` (every single position) map position
by position (offset from the end of the prompt) and need the same token layout in both runs: a
paraphrase with another number of tokens has no token-by-token correspondence, so they raise
``ValueError`` then.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from hooks.batch import Batch
from hooks.sites import Site
from interp.align import (
    EACH,
    PATCH_CLASSES,
    PositionPlan,
    check_pairs,
    plan_positions,
)
from interp.stack import ResumeUnsupported, StackState, capture_stack, resume

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

PATCH_SITE_KINDS: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")
PATCH_METHODS: tuple[str, ...] = ("auto", "resume", "stack")


@dataclass(frozen=True)
class PatchingConfig:
    """What a patching (or attribution-patching) sweep patches."""

    site_kind: str = "resid_post"
    """Site patched at every layer: ``resid_pre``, ``resid_post``, ``attn_out`` or ``mlp_out``."""
    layers: tuple[int, ...] | None = None
    """Text layers to sweep (negative = from the end); ``None`` = every layer."""
    positions: tuple[str, ...] | str = ("image", "question", "final")
    """Position classes (image/question/final/text/all, or one of them as a string), or ``"each"`` for
    every individual position. Use ``("image", "final")`` for paraphrases of different token lengths."""
    max_rows_per_forward: int = 64
    """Rows of one patched forward pass (bounds memory); variants are stacked up to this many."""
    min_gap: float = 1e-6
    """Pairs with |m_clean - m_corrupt| below this get NaN recovery."""
    progress: bool = False
    """Show a tqdm bar over the patched forward passes."""
    pair_block: int | None = None
    """Pairs swept at once (``None``: all). The resumed sweep records every layer's hidden states and
    keys/values of the corrupted runs it holds; on a large model, blocks of pairs bound that memory."""
    method: str = "auto"
    """``resume``: recompute only the layers from the patched one on and the positions that can see the
    patch (:mod:`interp.stack`); ``stack``: one full forward per row of stacked variants; ``auto``:
    ``resume`` where the model supports it, else ``stack``. All give the same margins (to rounding)."""

    def __post_init__(self) -> None:
        if self.method not in PATCH_METHODS:
            raise ValueError(f"method {self.method!r}: use one of {PATCH_METHODS}")
        if self.site_kind not in PATCH_SITE_KINDS:
            raise ValueError(
                f"site_kind {self.site_kind!r} cannot be patched per position; use one of {PATCH_SITE_KINDS}"
            )
        pos = self.positions
        if isinstance(pos, str) and pos != EACH:
            pos = (pos,)
        if not isinstance(pos, str):
            pos = tuple(pos)
            bad = [p for p in pos if p not in PATCH_CLASSES]
            if not pos or bad:
                raise ValueError(
                    f"positions {self.positions!r}: unknown or empty {bad}; use classes from {PATCH_CLASSES} "
                    f"or {EACH!r} for every single position"
                )
            if len(set(pos)) != len(pos):
                raise ValueError(f"positions {pos} has duplicates; list each class once")
        object.__setattr__(self, "positions", pos)
        if self.layers is not None:
            layers = tuple(int(x) for x in self.layers)
            if not layers or len(set(layers)) != len(layers):
                raise ValueError(
                    f"layers {self.layers!r} must be a non-empty list of distinct ints (or None = all)"
                )
            object.__setattr__(self, "layers", layers)
        if self.pair_block is not None and self.pair_block < 1:
            raise ValueError(f"pair_block must be >= 1 or None, got {self.pair_block}")
        if self.max_rows_per_forward < 1:
            raise ValueError(f"max_rows_per_forward must be >= 1, got {self.max_rows_per_forward}")
        if self.min_gap < 0:
            raise ValueError(f"min_gap must be >= 0, got {self.min_gap}")

    def resolve_layers(self, n_layers: int) -> list[int]:
        """Non-negative layer indices, range-checked against the model."""
        layers = range(n_layers) if self.layers is None else self.layers
        out = [x + n_layers if x < 0 else x for x in layers]
        bad = [x for x in out if not 0 <= x < n_layers]
        if bad:
            raise IndexError(
                f"layers {bad} out of range; this model has {n_layers} text layers (0..{n_layers - 1})"
            )
        return out


@dataclass
class PatchingResult:
    """Patched margins of every (layer, position, pair) and the recovery they imply.

    Attribution patching returns the same type with ``patched_margins`` = its linear estimate
    ``m_corrupt + sum((a_clean - a_corrupt) * grad)`` and ``method="attribution_patching"``.
    """

    site_kind: str
    """Site patched at every layer (``resid_post``, ``attn_out``, ...)."""
    layers: list[int]
    """Text layers, in the order of the first axis."""
    positions: list[str]
    """Position classes, or for ``"each"`` the offset from the end of the prompt (``"-1"`` = final)."""
    patched_margins: Float[Tensor, "layer position pair"]
    """NaN where the variant has no position to patch (e.g. ``image`` in a run without image tokens)."""
    clean_margins: Float[Tensor, " pair"]
    """Margins of the clean runs."""
    corrupt_margins: Float[Tensor, " pair"]
    """Margins of the corrupted runs (no patch)."""
    min_gap: float = 1e-6
    """Pairs with |clean - corrupt| below this get NaN recovery."""
    n_forwards: int = 0
    """Forward passes used (clean + corrupt + patched)."""
    n_backwards: int = 0
    """Backward passes used (attribution patching only)."""
    method: str = "activation_patching"
    """``activation_patching`` or ``attribution_patching``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Provenance (model name, position spec)."""
    recovery_per_pair: Float[Tensor, "layer position pair"] = field(init=False)
    """(patched - corrupt) / (clean - corrupt) per pair; NaN for pairs below ``min_gap``."""
    recovery: Float[Tensor, "layer position"] = field(init=False)
    """Mean recovery over pairs (NaN pairs left out)."""

    def __post_init__(self) -> None:
        gap = self.clean_margins - self.corrupt_margins
        ok = gap.abs() >= self.min_gap
        safe = torch.where(ok, gap, torch.ones_like(gap))
        per = (self.patched_margins - self.corrupt_margins) / safe
        self.recovery_per_pair = torch.where(ok, per, torch.full_like(per, float("nan")))
        self.recovery = _nanmean(self.recovery_per_pair)

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (layer, position, pair)."""
        n_l, n_p, n_i = self.patched_margins.shape
        idx = torch.cartesian_prod(torch.arange(n_l), torch.arange(n_p), torch.arange(n_i))
        li, pi, ii = idx.unbind(-1)
        return pd.DataFrame(
            {
                "method": self.method,
                "site_kind": self.site_kind,
                "layer": [self.layers[i] for i in li.tolist()],
                "position": [self.positions[i] for i in pi.tolist()],
                "pair": ii.numpy(),
                "patched_margin": self.patched_margins.reshape(-1).numpy(),
                "clean_margin": self.clean_margins[ii].numpy(),
                "corrupt_margin": self.corrupt_margins[ii].numpy(),
                "recovery": self.recovery_per_pair.reshape(-1).numpy(),
            }
        )


def _nanmean(x: Tensor) -> Tensor:
    n = (~x.isnan()).sum(-1)
    s = torch.nan_to_num(x, nan=0.0).sum(-1)
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


# ---------------------------------------------------------------------- forwards
def capture(
    adapter: VLMAdapter, batch: Batch, sites: Sequence[Site]
) -> tuple[dict[Site, Float[Tensor, "batch pos d_model"]], Float[Tensor, " batch"]]:
    """Full activations of ``sites`` (on the model's device) and the margins, one no-grad forward."""
    acts: dict[Site, Tensor] = {}

    def keep(site: Site):
        def fn(x: Tensor) -> None:
            acts[site] = x.detach()

        return fn

    with torch.no_grad(), adapter.hooks({s: keep(s) for s in sites}):
        m = adapter.margins(batch)
    return acts, m.float().cpu()


def patching_sweep(
    adapter: VLMAdapter, clean: Batch, corrupt: Batch, config: PatchingConfig | None = None
) -> PatchingResult:
    """Batched activation patching over ``config.layers`` x ``config.positions`` for every pair."""
    config = config or PatchingConfig()
    blocks = pair_blocks(len(corrupt), config)
    if len(blocks) > 1:
        check_pairs(clean, corrupt)
        one = dataclasses.replace(config, pair_block=None)
        parts = [
            patching_sweep(adapter, clean.select(b), corrupt.select(b), one)
            for b in tqdm(blocks, disable=not config.progress, desc="pair blocks")
        ]
        return concat_pairs(parts)
    layers = config.resolve_layers(adapter.n_layers)
    plan = plan_positions(clean, corrupt, config.positions)
    sites = [Site(config.site_kind, layer) for layer in layers]
    clean_acts, m_clean = capture(adapter, clean, sites)
    meta: dict[str, Any] = {"model": adapter.name, "positions": config.positions}
    return sweep_from(adapter, corrupt, plan, layers, clean_acts, m_clean, config, meta)


def pair_blocks(n_pairs: int, config: PatchingConfig) -> list[list[int]]:
    """Consecutive blocks of at most ``config.pair_block`` pairs (one block when it is ``None``)."""
    size = config.pair_block or max(n_pairs, 1)
    return [list(range(i, min(i + size, n_pairs))) for i in range(0, n_pairs, size)] or [[]]


def sweep_from(
    adapter: VLMAdapter,
    corrupt: Batch,
    plan: PositionPlan,
    layers: list[int],
    clean_acts: dict[Site, Float[Tensor, "batch pos d_model"]],
    m_clean: Float[Tensor, " batch"],
    config: PatchingConfig,
    meta: dict[str, Any],
) -> PatchingResult:
    """The sweep given the clean activations (read by :func:`capture` from any model with the same layout).

    Patches ``clean_acts[<kind>(L)]`` into ``adapter``'s run of ``corrupt`` for every layer and position
    class of ``plan``; :func:`patching_sweep` reads them from the same model on another batch,
    :func:`interp.crossmodel.cross_model_patching` from another model on the same batch.
    """
    sites = [Site(config.site_kind, layer) for layer in layers]
    state = None
    if config.method != "stack":
        try:
            state = capture_stack(adapter, corrupt)
        except ResumeUnsupported as e:
            if config.method == "resume":
                raise
            meta["resume_unsupported"] = str(e)
    if state is None:
        patched, m_corrupt, n_forwards = _sweep_stacked(
            adapter, corrupt, plan, layers, sites, clean_acts, config
        )
        meta["method"] = "stack"
    else:
        patched, n_forwards, n_skipped = _sweep_resumed(adapter, state, plan, layers, clean_acts, config)
        m_corrupt = state.margins
        meta.update(method="resume", skipped_noop=n_skipped)
    return PatchingResult(
        config.site_kind,
        layers,
        plan.labels,
        patched,
        m_clean,
        m_corrupt,
        config.min_gap,
        n_forwards,
        meta=meta,
    )


def concat_pairs(parts: list[PatchingResult]) -> PatchingResult:
    """Results of consecutive blocks of pairs as one result (the method and metadata of the first)."""
    first = parts[0]
    meta = dict(first.meta)
    if "skipped_noop" in meta:
        meta["skipped_noop"] = sum(p.meta.get("skipped_noop", 0) for p in parts)
    meta["pair_blocks"] = len(parts)
    return PatchingResult(
        first.site_kind,
        first.layers,
        first.positions,
        torch.cat([p.patched_margins for p in parts], dim=-1),
        torch.cat([p.clean_margins for p in parts]),
        torch.cat([p.corrupt_margins for p in parts]),
        first.min_gap,
        sum(p.n_forwards for p in parts),
        method=first.method,
        meta=meta,
    )


def _variants(plan: PositionPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Variant k = (position column var_p[k], pair var_i[k]); entry_k[e] = the variant of entry e."""
    valid = plan.valid
    var_p, var_i = valid.nonzero(as_tuple=True)
    var_of = torch.full(valid.shape, -1, dtype=torch.long)
    var_of[var_p, var_i] = torch.arange(len(var_p))
    return var_p, var_i, var_of[plan.col, plan.pair]


def _sweep_stacked(
    adapter: VLMAdapter,
    corrupt: Batch,
    plan: PositionPlan,
    layers: list[int],
    sites: list[Site],
    clean_acts: dict[Site, Tensor],
    config: PatchingConfig,
) -> tuple[Tensor, Tensor, int]:
    """Full forwards of the corrupted rows, variants stacked along the batch, one hook per layer."""
    with torch.no_grad():
        m_corrupt = adapter.margins(corrupt).float().cpu()
    n_forwards = 2
    var_p, var_i, entry_k = _variants(plan)
    n_var = len(var_p)
    total = len(layers) * n_var
    step = config.max_rows_per_forward
    patched = torch.full((len(layers), len(plan.labels), len(corrupt)), float("nan"))
    for start in tqdm(range(0, total, step), disable=not config.progress, desc="patching"):
        rows = torch.arange(start, min(start + step, total))
        li, k = rows // n_var, rows % n_var
        big = corrupt.select(var_i[k].tolist())
        fns = {}
        for l_idx in li.unique().tolist():
            ks = k[li == l_idx]
            sel = (entry_k >= ks.min()) & (entry_k <= ks.max())
            local = l_idx * n_var + entry_k[sel] - start
            act = clean_acts[sites[l_idx]]
            fns[sites[l_idx]] = _write_fn(
                local, plan.dst[sel], act[plan.pair[sel].to(act.device), plan.src[sel].to(act.device)]
            )
        with torch.no_grad(), adapter.hooks(fns):
            m = adapter.margins(big).float().cpu()
        n_forwards += 1
        patched[li, var_p[k], var_i[k]] = m
    return patched, m_corrupt, n_forwards


def _chunks(
    layer: Tensor, start: Tensor, seq_len: int, size: int, slack: float = 1.25
) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` row ranges (rows sorted by ``(layer, start)``) to run as one pass each.

    A range never mixes resume layers and holds at most ``size`` rows; it runs from its smallest
    start, so it grows only while that costs at most ``slack`` times the positions its rows need.
    """
    if not len(layer):
        return []
    # runs of equal (layer, start), then a greedy merge over runs (whole runs, or pieces of `size`)
    change = (layer[1:] != layer[:-1]) | (start[1:] != start[:-1])
    bounds = [0, *(change.nonzero()[:, 0] + 1).tolist(), len(layer)]
    out: list[tuple[int, int]] = []
    lo, need = 0, 0
    for a, b in itertools.pairwise(bounds):
        width = seq_len - int(start[a])
        while a < b:
            take = min(b - a, size - (a - lo))
            if a > lo:  # extend the open range, or close it and start a new one here
                padded = (a + take - lo) * (seq_len - int(start[lo]))
                if layer[a] != layer[lo] or take <= 0 or padded > slack * (need + take * width):
                    out.append((lo, a))
                    lo, need = a, 0
                    continue
            need += take * width
            a += take
    out.append((lo, len(layer)))
    return out


def _write_fn(rows: Tensor, pos: Tensor, values: Tensor):
    def fn(x: Tensor) -> Tensor:
        x = x.clone()
        x[rows.to(x.device), pos.to(x.device)] = values.to(device=x.device, dtype=x.dtype)
        return x

    return fn


def _sweep_resumed(
    adapter: VLMAdapter,
    state: StackState,
    plan: PositionPlan,
    layers: list[int],
    clean_acts: dict[Site, Tensor],
    config: PatchingConfig,
) -> tuple[Tensor, int, int]:
    """Each variant resumed from its layer on the positions that can see its patch.

    Returns patched margins, passes run (2 records + resumed chunks) and no-op variants skipped.
    """
    kind = config.site_kind
    n, t = state.n_layers, state.seq_len
    var_p, var_i, entry_k = _variants(plan)
    n_var = len(var_p)
    patched = torch.full((len(layers), len(plan.labels), plan.n_pairs), float("nan"))
    if n_var == 0:
        return patched, 2, 0
    # Where each variant's suffix starts: the earliest position any of its patched positions reaches.
    reach = state.suffix_start()[plan.pair, plan.dst]
    s_var = torch.full((n_var,), t, dtype=torch.long).scatter_reduce(0, entry_k, reach, reduce="amin")
    rows_l, rows_k, rows_from, rows_s, skipped = [], [], [], [], 0
    for li, layer in enumerate(layers):
        if kind in ("resid_pre", "resid_post"):
            act = clean_acts[Site(kind, layer)]
            src_vals = act[plan.pair.to(act.device), plan.src.to(act.device)]
            cur = state.hidden[layer + (kind == "resid_post")]
            dst_vals = cur[plan.pair.to(cur.device), plan.dst.to(cur.device)]
            same = (src_vals == dst_vals).all(-1).cpu()
            noop = torch.ones(n_var, dtype=torch.bool).scatter_reduce(0, entry_k, same, reduce="amin")
        else:
            noop = torch.zeros(n_var, dtype=torch.bool)
        from_layer = layer + 1 if kind == "resid_post" else layer
        keep = (~noop).nonzero()[:, 0]
        skipped += int(noop.sum())
        patched[li, var_p[noop], var_i[noop]] = state.margins[var_i[noop]]
        rows_l.append(torch.full((len(keep),), li))
        rows_k.append(keep)
        rows_from.append(torch.full((len(keep),), from_layer))
        # Only the final position reaches the unembedding from the last layer's output (resid_post)
        # or from inside it (attn_out / mlp_out of the last layer: their keys/values are untouched).
        final_only = from_layer == n or (kind in ("attn_out", "mlp_out") and layer == n - 1)
        rows_s.append(torch.full((len(keep),), t - 1) if final_only else s_var[keep])
    all_l, all_k, all_from, all_s = (torch.cat(x) for x in (rows_l, rows_k, rows_from, rows_s))
    order = torch.argsort(all_from * (t + 1) + all_s, stable=True)
    all_l, all_k, all_from, all_s = all_l[order], all_k[order], all_from[order], all_s[order]
    chunks = _chunks(all_from, all_s, t, config.max_rows_per_forward)
    # the entries of variant k are by_variant[first[k] : first[k] + count[k]]
    by_variant = torch.argsort(entry_k, stable=True)
    count = torch.bincount(entry_k, minlength=n_var)
    first = torch.cumsum(count, 0) - count
    n_passes = 2
    for lo, hi in tqdm(chunks, disable=not config.progress, desc="patching"):
        li_c, k_c = all_l[lo:hi], all_k[lo:hi]
        from_layer, start = int(all_from[lo]), int(all_s[lo:hi].min())
        pair_rows = var_i[k_c]
        hidden = state.hidden[from_layer][pair_rows.to(state.hidden[0].device), start:].clone()
        # this chunk's entries: (local row, local position, clean value)
        n_e = count[k_c]
        row_e = torch.repeat_interleave(torch.arange(hi - lo), n_e)
        within = torch.arange(int(n_e.sum())) - torch.repeat_interleave(torch.cumsum(n_e, 0) - n_e, n_e)
        e = by_variant[first[k_c][row_e] + within]
        keep_e = plan.dst[e] >= start  # entries before ``start`` cannot reach the margin
        row_e, e = row_e[keep_e], e[keep_e]
        values = hidden.new_empty(len(e), hidden.shape[-1])
        for li in li_c.unique().tolist():
            sel = li_c[row_e] == li
            act = clean_acts[Site(kind, layers[li])]
            values[sel] = act[plan.pair[e[sel]].to(act.device), plan.src[e[sel]].to(act.device)].to(values)
        er, pos = row_e, plan.dst[e] - start
        if kind in ("resid_pre", "resid_post"):
            hidden[er.to(hidden.device), pos.to(hidden.device)] = values.to(hidden)
            m = resume(adapter, state, pair_rows, start, from_layer, hidden)
        else:  # the patch sits inside layer ``from_layer``: write it from a hook on the site
            with adapter.hooks({Site(kind, from_layer): _write_fn(er, pos, values)}):
                m = resume(adapter, state, pair_rows, start, from_layer, hidden)
        n_passes += 1
        patched[li_c, var_p[k_c], var_i[k_c]] = m
    return patched, n_passes, skipped


# ---------------------------------------------------------------------- reference
def patch_one(
    adapter: VLMAdapter,
    clean: Batch,
    corrupt: Batch,
    site: Site,
    position_mask: Bool[Tensor, "batch pos"],
    *,
    clean_act: Float[Tensor, "batch pos d_model"] | None = None,
) -> Float[Tensor, " batch"]:
    """Margins of ``corrupt`` with ``site`` taken from ``clean`` where ``position_mask`` is set.

    One forward per call (plus one to read ``clean_act`` if it is not given). Both batches must have
    the same layout (same sequence length; the mask addresses the same positions in both).
    """
    check_pairs(clean, corrupt)
    if clean.seq_len != corrupt.seq_len or position_mask.shape != corrupt.image_mask.shape:
        raise ValueError(
            f"patch_one needs batches of the same layout: clean {tuple(clean.image_mask.shape)}, corrupt "
            f"{tuple(corrupt.image_mask.shape)}, mask {tuple(position_mask.shape)}"
        )
    if clean_act is None:
        clean_act = capture(adapter, clean, [site])[0][site]
    mask = position_mask.to(clean_act.device)[..., None]

    def fn(x: Tensor) -> Tensor:
        return torch.where(mask.to(x.device), clean_act.to(device=x.device, dtype=x.dtype), x)

    with torch.no_grad(), adapter.hooks({site: fn}):
        return adapter.margins(corrupt).float().cpu()


def sweep_reference(
    adapter: VLMAdapter, clean: Batch, corrupt: Batch, config: PatchingConfig | None = None
) -> PatchingResult:
    """The one-forward-per-(layer, position) loop with :func:`patch_one` (same-layout pairs only)."""
    config = config or PatchingConfig()
    layers = config.resolve_layers(adapter.n_layers)
    plan = plan_positions(clean, corrupt, config.positions)  # validates alignment
    if clean.seq_len != corrupt.seq_len or not torch.equal(plan.dst, plan.src):
        raise ValueError(
            "sweep_reference needs clean and corrupt batches with the same layout; use patching_sweep"
        )
    masks = torch.zeros(len(plan.labels), *corrupt.image_mask.shape, dtype=torch.bool)
    masks[plan.col, plan.pair, plan.dst] = True
    sites = [Site(config.site_kind, layer) for layer in layers]
    clean_acts, m_clean = capture(adapter, clean, sites)
    with torch.no_grad():
        m_corrupt = adapter.margins(corrupt).float().cpu()
    empty = ~masks.any(-1)  # (position, pair): nothing to patch -> NaN, as in the batched sweep
    patched = torch.empty(len(layers), len(plan.labels), len(corrupt))
    for li, site in enumerate(tqdm(sites, disable=not config.progress, desc="patching (reference)")):
        for p in range(len(plan.labels)):
            m = patch_one(adapter, clean, corrupt, site, masks[p], clean_act=clean_acts[site])
            patched[li, p] = torch.where(empty[p], torch.full_like(m, float("nan")), m)
    return PatchingResult(
        config.site_kind,
        layers,
        plan.labels,
        patched,
        m_clean,
        m_corrupt,
        config.min_gap,
        2 + len(layers) * len(plan.labels),
        meta={"model": adapter.name, "reference": True},
    )
