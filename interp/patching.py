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
as the reference implementation). The machinery itself lives in :mod:`interp.sweep`; the resumed
sweep runs the text stack on eager attention (switched for the call, :mod:`hooks.attn`).

Noise floor (:mod:`interp.floor`): every result also records its compute dtype and the largest margin
change that null patches (each run patched into itself, same machinery, same dtype) produce; cells
within it are rounding, not localization (:meth:`PatchingResult.within_floor`).

Position alignment (:func:`interp.align.align_pairs`): ``image`` tokens map by their index within the image block
and ``final`` is the last position of each prompt, so these two classes patch across prompts of
different lengths. ``question``, ``text``, ``all`` and ``each`` (every single position) map position
by position (offset from the end of the prompt) and need the same token layout in both runs: a
paraphrase with another number of tokens has no token-by-token correspondence, so they raise
``ValueError`` then.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooks.attn import text_attn_implementation
from hooks.batch import Batch
from hooks.batch_features import batch_features
from hooks.progress import tqdm
from hooks.sites import Site
from interp.align import (
    EACH,
    PATCH_CLASSES,
    PositionPlan,
    check_pairs,
    plan_positions,
)
from interp.floor import NullFloor, floor_layer_subset, largest_change, margin_resolution, null_floor
from interp.stack import ResumeUnsupported, capture_stack
from interp.sweep import capture, sweep_attention, sweep_resumed, sweep_stacked

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
    floor_layers: int | None = 1
    """Layers (of the swept ones, evenly spaced, first and last included; one: the middle one) that get
    null patches to measure the result's noise floor (:mod:`interp.floor`); ``None``: every swept layer;
    0: no floor (NaN). Each costs about one swept layer's passes twice over (clean and corrupt runs): with
    3 of the organism's 8 layers a sweep took 1.9x as long, so one is the default."""

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
        if self.floor_layers is not None and self.floor_layers < 0:
            raise ValueError(f"floor_layers must be >= 0 or None, got {self.floor_layers}")

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
    ``m_corrupt + sum((a_clean - a_corrupt) * grad)`` and ``method="attribution_patching"``. Every
    result records its compute ``dtype`` and a noise floor measured in the same run (:mod:`interp.floor`):
    cells whose recovery is within it (:meth:`within_floor`) cannot be told from rounding.
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
    """Forward passes of the sweep (clean + corrupt + patched); the floor's are in ``meta["floor_forwards"]``."""
    n_backwards: int = 0
    """Backward passes used (attribution patching only)."""
    method: str = "activation_patching"
    """``activation_patching``, ``attribution_patching`` or ``cross_model_patching``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Provenance (model name, position spec, sweep method, how the floor was measured)."""
    dtype: str = ""
    """Compute dtype of the (target) model's weights: ``float32``, ``bfloat16``, ...; ``""`` = not recorded
    (results made before it was)."""
    noise_floor_per_pair: Float[Tensor, " pair"] | None = None
    """Per pair, the largest |margin change| of the null patches of the same run (clean into clean and
    corrupt into corrupt through the same machinery, :mod:`interp.floor`; for attribution patching, see
    :func:`interp.attribution.attribution_patching`); ``None`` = not measured."""
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

    @property
    def noise_floor(self) -> float:
        """The largest |margin change| any null patch produced (margin units); NaN if not measured."""
        f = self.noise_floor_per_pair
        return float("nan") if f is None or f.isnan().all() else float(f.nan_to_num(nan=0.0).max())

    @property
    def recovery_floor(self) -> float:
        """The floor in recovery units: mean over pairs of ``noise_floor / |clean - corrupt|`` (pairs below
        ``min_gap`` left out), the most rounding can move a cell's mean recovery; NaN if not measured."""
        gap = (self.clean_margins - self.corrupt_margins).abs()
        ok = gap >= self.min_gap
        if math.isnan(self.noise_floor) or not ok.any():
            return float("nan")
        return float((self.noise_floor / gap[ok]).mean())

    def within_floor(self, floor: float | None = None) -> Bool[Tensor, "layer position"]:
        """Cells whose |mean recovery| is at most ``floor`` (default :attr:`recovery_floor`): not told apart
        from "no effect" at this dtype. All False when no floor was measured; NaN cells are never in it."""
        floor = self.recovery_floor if floor is None else floor
        if math.isnan(floor):
            return torch.zeros(self.recovery.shape, dtype=torch.bool)
        return self.recovery.abs() <= floor

    def save(self, path: str | Path) -> Path:
        """Write the result to a safetensors file (tensors + the other fields as JSON metadata)."""
        tensors = {
            "patched_margins": self.patched_margins.float().contiguous(),
            "clean_margins": self.clean_margins.float().contiguous(),
            "corrupt_margins": self.corrupt_margins.float().contiguous(),
        }
        if self.noise_floor_per_pair is not None:
            tensors["noise_floor_per_pair"] = self.noise_floor_per_pair.float().contiguous()
        fields = {
            k: getattr(self, k)
            for k in ("site_kind", "layers", "positions", "min_gap", "n_forwards", "n_backwards", "method")
        }
        record = {**fields, "meta": self.meta, "dtype": self.dtype, "format": RESULT_FORMAT}
        from safetensors.torch import save_file

        path = Path(path)
        save_file(tensors, str(path), metadata={"patching_result": json.dumps(record, default=str)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchingResult:
        """Read a file written by :meth:`save`; files written before ``dtype`` and the noise floor were
        recorded load with ``dtype=""`` and ``noise_floor_per_pair=None``."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {})["patching_result"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        record.pop("format", None)
        return cls(
            **record,
            patched_margins=tensors["patched_margins"],
            clean_margins=tensors["clean_margins"],
            corrupt_margins=tensors["corrupt_margins"],
            noise_floor_per_pair=tensors.get("noise_floor_per_pair"),
        )

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


#: Version of :meth:`PatchingResult.save`'s file layout.
RESULT_FORMAT = 1


def dtype_name(adapter: VLMAdapter) -> str:
    """``float32``, ``bfloat16``, ...: the dtype of the model's weights (its compute dtype)."""
    return str(adapter.dtype).removeprefix("torch.")


def _nanmean(x: Tensor) -> Tensor:
    n = (~x.isnan()).sum(-1)
    s = torch.nan_to_num(x, nan=0.0).sum(-1)
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


def patching_sweep(
    adapter: VLMAdapter, clean: Batch, corrupt: Batch, config: PatchingConfig | None = None
) -> PatchingResult:
    """Batched activation patching over ``config.layers`` x ``config.positions`` for every pair.

    The result carries its noise floor: null patches of the corrupted runs (in :func:`sweep_from`) and
    of the clean runs (here), through the method the sweep used (:mod:`interp.floor`).
    """
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
    with sweep_attention(adapter.model, config.method):
        clean_acts, m_clean = capture(adapter, clean, sites, image_features=batch_features(adapter, clean))
        meta: dict[str, Any] = {"model": adapter.name, "positions": config.positions}
        result = sweep_from(adapter, corrupt, plan, layers, clean_acts, m_clean, config, meta)
        floor = null_floor(adapter, clean, layers, config, m_clean, result.meta["method"], clean_acts)
    add_floor(result, floor)
    return result


def add_floor(result: PatchingResult, floor: NullFloor) -> None:
    """Fold one run's floor into ``result``: per pair the larger of the two runs; ``meta`` keeps the
    largest null-patch change (``floor_null``) and margin resolution (``floor_resolution``) apart."""
    mine = result.noise_floor_per_pair
    result.noise_floor_per_pair = floor.per_pair if mine is None else torch.fmax(mine, floor.per_pair)
    meta = result.meta
    meta["floor_forwards"] = meta.get("floor_forwards", 0) + floor.n_passes
    for key, value in (("floor_null", floor.null), ("floor_resolution", floor.resolution)):
        if not math.isnan(value):
            meta[key] = max(meta.get(key, value), value)


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
    :func:`interp.crossmodel.cross_model_patching` from another model on the same batch. The corrupted
    images are encoded once (no vision tower per stacked row); unless ``config.method == "stack"`` the
    text stack runs on eager attention (:func:`interp.sweep.sweep_attention`). The result's floor holds
    the corrupt-into-corrupt null patches (:func:`interp.floor.null_floor`), same method and dtype.
    """
    sites = [Site(config.site_kind, layer) for layer in layers]
    feats = batch_features(adapter, corrupt)
    state = None
    with sweep_attention(adapter.model, config.method):
        if config.method != "stack":
            try:
                state = capture_stack(adapter, corrupt, image_features=feats)
            except ResumeUnsupported as e:
                if config.method == "resume":
                    raise
                meta["resume_unsupported"] = str(e)
        if state is None:
            patched, m_corrupt, n_forwards = sweep_stacked(
                adapter, corrupt, plan, layers, sites, clean_acts, config, feats
            )
            meta["method"] = "stack"
        else:
            patched, n_forwards, n_skipped = sweep_resumed(adapter, state, plan, layers, clean_acts, config)
            m_corrupt = state.margins
            meta.update(method="resume", skipped_noop=n_skipped)
        meta["attn_implementation"] = text_attn_implementation(adapter.model)
        floor = null_floor(adapter, corrupt, layers, config, m_corrupt, meta["method"], state=state)
    result = PatchingResult(
        config.site_kind,
        layers,
        plan.labels,
        patched,
        m_clean,
        m_corrupt,
        config.min_gap,
        n_forwards,
        meta=meta,
        dtype=dtype_name(adapter),
    )
    add_floor(result, floor)
    return result


def concat_pairs(parts: list[PatchingResult]) -> PatchingResult:
    """Results of consecutive blocks of pairs as one result (the method and metadata of the first)."""
    first = parts[0]
    meta = dict(first.meta)
    for key in ("skipped_noop", "floor_forwards"):
        if key in meta:
            meta[key] = sum(p.meta.get(key, 0) for p in parts)
    meta["pair_blocks"] = len(parts)
    floors = [p.noise_floor_per_pair for p in parts]
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
        dtype=first.dtype,
        noise_floor_per_pair=None if any(f is None for f in floors) else torch.cat(floors),  # type: ignore[arg-type]
    )


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
    patched = _reference_loop(adapter, clean, corrupt, sites, masks, clean_acts, config.progress)
    chosen = floor_layer_subset(layers, config.floor_layers)
    floors = [
        _reference_floor(adapter, b, chosen, masks, config, m)
        for b, m in ((clean, m_clean), (corrupt, m_corrupt))
    ]
    floor = torch.fmax(floors[0], floors[1])
    n_floor = 2 * (1 + len(chosen) * len(plan.labels)) if chosen else 0
    return PatchingResult(
        config.site_kind,
        layers,
        plan.labels,
        patched,
        m_clean,
        m_corrupt,
        config.min_gap,
        2 + len(layers) * len(plan.labels),
        meta={"model": adapter.name, "reference": True, "floor_forwards": n_floor},
        dtype=dtype_name(adapter),
        noise_floor_per_pair=floor,
    )


def _reference_floor(
    adapter: VLMAdapter,
    batch: Batch,
    layers: list[int],
    masks: Bool[Tensor, "position batch pos"],
    config: PatchingConfig,
    m_ref: Float[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """:func:`interp.floor.null_floor` by the reference loop: ``batch`` patched into itself at ``layers``."""
    if not layers:
        return torch.full((len(batch),), float("nan"))
    sites = [Site(config.site_kind, layer) for layer in layers]
    last = Site("resid_post", adapter.n_layers - 1)
    acts, _ = capture(adapter, batch, [*sites, last])
    null = _reference_loop(adapter, batch, batch, sites, masks, acts, False)
    return torch.fmax(largest_change(null, m_ref), margin_resolution(adapter, acts[last][:, -1]))


def _reference_loop(
    adapter: VLMAdapter,
    clean: Batch,
    corrupt: Batch,
    sites: list[Site],
    masks: Bool[Tensor, "position batch pos"],
    clean_acts: dict[Site, Tensor],
    progress: bool,
) -> Float[Tensor, "layer position pair"]:
    """One :func:`patch_one` per (site, position class); NaN where a mask has nothing to patch."""
    empty = ~masks.any(-1)  # (position, pair): nothing to patch -> NaN, as in the batched sweep
    patched = torch.empty(len(sites), len(masks), len(corrupt))
    for li, site in enumerate(tqdm(sites, disable=not progress, desc="patching (reference)")):
        for p in range(len(masks)):
            m = patch_one(adapter, clean, corrupt, site, masks[p], clean_act=clean_acts[site])
            patched[li, p] = torch.where(empty[p], torch.full_like(m, float("nan")), m)
    return patched
