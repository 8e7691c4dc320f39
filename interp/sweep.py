"""The batched patching machinery: variants stacked along the batch (``stack``) or resumed (``resume``).

:func:`interp.patching.sweep_from` runs one of these for a sweep; :mod:`interp.floor` runs the same
ones for the null patches that measure a result's noise floor (hence ``skip_noop=False`` there: a
null patch *is* a no-op, and skipping it would measure nothing). Both take the patched values from
``acts`` (``{<kind>(L): (batch, pos, d_model)}``, as :func:`capture` reads them) and
the (layer, position class, pair) cells from a :class:`~interp.align.PositionPlan`. :func:`capture` lives
here (re-exported by :mod:`interp.patching`) so that :mod:`interp.floor` needs no import of
:mod:`interp.patching`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooks.attn import attention_implementation
from hooks.batch import Batch
from hooks.batch_features import select_features
from hooks.devices import execution_devices
from hooks.progress import tqdm
from hooks.sites import Site
from interp.align import PositionPlan
from interp.stack import StackState, resume

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter
    from interp.patching import PatchingConfig


def capture(
    adapter: VLMAdapter,
    batch: Batch,
    sites: Sequence[Site],
    image_features: Sequence[Tensor] | None = None,
) -> tuple[dict[Site, Float[Tensor, "batch pos d_model"]], Float[Tensor, " batch"]]:
    """Full activations of ``sites`` (on the model's device) and the margins, one no-grad forward.

    ``image_features`` (:func:`hooks.batch_features.batch_features` of ``batch``) skip the vision tower;
    pass them only for text sites.
    """
    acts: dict[Site, Tensor] = {}

    def keep(site: Site):
        def fn(x: Tensor) -> None:
            acts[site] = x.detach()

        return fn

    with torch.no_grad(), adapter.hooks({s: keep(s) for s in sites}):
        m = adapter.margins(batch, image_features=image_features)
    return acts, m.float().cpu()


def sweep_attention(model: nn.Module, method: str) -> AbstractContextManager[None]:
    """The text stack on eager attention for a sweep that may resume (:mod:`interp.stack` slices each
    layer's materialised 4-D mask), restored on exit; nothing changes for ``method="stack"`` or for a
    model spread over several devices (it cannot resume: ``auto`` stacks it on its own implementation).
    The clean capture runs inside it too, so both sides of a sweep use one implementation."""
    if method == "stack" or len(execution_devices(model)) > 1:
        return nullcontext()
    return attention_implementation(model, "eager")


def variants(plan: PositionPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Variant k = (position column var_p[k], pair var_i[k]); entry_k[e] = the variant of entry e."""
    valid = plan.valid
    var_p, var_i = valid.nonzero(as_tuple=True)
    var_of = torch.full(valid.shape, -1, dtype=torch.long)
    var_of[var_p, var_i] = torch.arange(len(var_p))
    return var_p, var_i, var_of[plan.col, plan.pair]


def sweep_stacked(
    adapter: VLMAdapter,
    corrupt: Batch,
    plan: PositionPlan,
    layers: list[int],
    sites: list[Site],
    clean_acts: dict[Site, Tensor],
    config: PatchingConfig,
    image_features: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Full forwards of the corrupted rows, variants stacked along the batch, one hook per layer.

    ``image_features`` (of ``corrupt``'s rows, :func:`hooks.batch_features.batch_features`) are reused
    by every stacked row instead of running the vision tower per row. Returns patched margins, the
    unpatched margins and the passes run.
    """
    with torch.no_grad():
        m_corrupt = adapter.margins(corrupt, image_features=image_features).float().cpu()
    n_forwards = 2
    var_p, var_i, entry_k = variants(plan)
    n_var = len(var_p)
    total = len(layers) * n_var
    step = config.max_rows_per_forward
    patched = torch.full((len(layers), len(plan.labels), len(corrupt)), float("nan"))
    for start in tqdm(range(0, total, step), disable=not config.progress, desc="patching"):
        rows = torch.arange(start, min(start + step, total))
        li, k = rows // n_var, rows % n_var
        big = corrupt.select(var_i[k].tolist())
        feats = select_features(corrupt, image_features, var_i[k])
        fns = {}
        for l_idx in li.unique().tolist():
            ks = k[li == l_idx]
            sel = (entry_k >= ks.min()) & (entry_k <= ks.max())
            local = l_idx * n_var + entry_k[sel] - start
            act = clean_acts[sites[l_idx]]
            fns[sites[l_idx]] = write_fn(
                local, plan.dst[sel], act[plan.pair[sel].to(act.device), plan.src[sel].to(act.device)]
            )
        with torch.no_grad(), adapter.hooks(fns):
            m = adapter.margins(big, image_features=feats).float().cpu()
        n_forwards += 1
        patched[li, var_p[k], var_i[k]] = m
    return patched, m_corrupt, n_forwards


def chunks(
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


def write_fn(rows: Tensor, pos: Tensor, values: Tensor):
    def fn(x: Tensor) -> Tensor:
        x = x.clone()
        x[rows.to(x.device), pos.to(x.device)] = values.to(device=x.device, dtype=x.dtype)
        return x

    return fn


def sweep_resumed(
    adapter: VLMAdapter,
    state: StackState,
    plan: PositionPlan,
    layers: list[int],
    clean_acts: dict[Site, Tensor],
    config: PatchingConfig,
    skip_noop: bool = True,
) -> tuple[Tensor, int, int]:
    """Each variant resumed from its layer on the positions that can see its patch.

    Returns patched margins, passes run (2 records + resumed chunks) and no-op variants skipped.
    ``skip_noop=False`` runs variants whose patch writes the value already there too (null patches).
    """
    kind = config.site_kind
    n, t = state.n_layers, state.seq_len
    var_p, var_i, entry_k = variants(plan)
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
            noop &= skip_noop
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
    runs = chunks(all_from, all_s, t, config.max_rows_per_forward)
    # the entries of variant k are by_variant[first[k] : first[k] + count[k]]
    by_variant = torch.argsort(entry_k, stable=True)
    count = torch.bincount(entry_k, minlength=n_var)
    first = torch.cumsum(count, 0) - count
    n_passes = 2
    for lo, hi in tqdm(runs, disable=not config.progress, desc="patching"):
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
            with adapter.hooks({Site(kind, from_layer): write_fn(er, pos, values)}):
                m = resume(adapter, state, pair_rows, start, from_layer, hidden)
        n_passes += 1
        patched[li_c, var_p[k_c], var_i[k_c]] = m
    return patched, n_passes, skipped
