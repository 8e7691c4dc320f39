"""Audit stage 3: where the flip happens, chosen on the selection half and re-measured on the scoring half.

On the selection pairs (clean run = the original question, corrupted run = its paraphrase, same image):

- the exact component sweep (:func:`interp.patching.patching_sweep`): ``attn_out``, ``mlp_out`` and
  ``resid_post`` at every text layer, position classes ``image``, ``question`` and ``final``. Image and
  final positions align by class in every pair. Question tokens align only position by position, which a
  paraphrase of another token length does not allow: that column is measured on the pairs whose
  question has the same token layout in both runs (their number is recorded, ``aligned_pairs``) and is
  NaN for the others;
- attribution patching of the same cells (:func:`interp.attribution.attribution_patching`) with its rank
  agreement (:func:`interp.attribution.agreement`).

**The flag rule** (:func:`flag_sites`, fixed here, no count read from anywhere): a component site
(``attn_out(L)`` or ``mlp_out(L)``) is flagged when, at some position class measured on at least
:data:`FLAG_MIN_PAIRS` pairs, its mean recovery is at least :data:`FLAG_MIN_RECOVERY` (patching that one
component restores at least half of the paraphrase's margin shift) and the lower end of its 95% bootstrap
interval is above the sweep's noise floor. When no site passes, the single top site at ``final`` is
flagged and the result marked ``weak``. The flagged layers are the layers of the flagged sites; the
*residual site* for features is ``resid_post`` of the last flagged layer (where the flagged components
have all written). The residual stream is swept for the profile but never flagged: at the final position
it recovers ~1 from the first layer where the answer state forms, which says "by here", not "here".

Every flagged site (and the residual site) is then patched again on the scoring pairs, which chose
nothing: mean recovery with its 95% interval, and the noise floor measured in that run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from hooks.sites import Site, resid_post
from interp.patching import PatchingConfig, PatchingResult, patching_sweep
from interp.scores import COMPONENT_KINDS, site_ranking
from interp.stats import mean_bootstrap

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter
    from hooks.batch import Batch
    from interp.scores import LayerScores

#: A flagged component restores at least this share of the margin shift on its own.
FLAG_MIN_RECOVERY = 0.5
#: A position class counts for flagging only if measured on at least this many selection pairs.
FLAG_MIN_PAIRS = 8
#: Position classes patched by class in every pair; the others need the same token layout.
CLASS_ALIGNED = ("image", "final")
SITE_KINDS: tuple[str, ...] = ("attn_out", "mlp_out", "resid_post")
POSITIONS: tuple[str, ...] = ("image", "question", "final")
RULE_TEXT = (
    f"a component site (attn_out or mlp_out of a layer) is flagged when, at a position class measured on >= "
    f"{FLAG_MIN_PAIRS} selection pairs, its mean recovery is >= {FLAG_MIN_RECOVERY} and the lower end of its "
    "95% interval is above the noise floor; none passing: the top site at the final position, marked weak"
)

SweepFn = Callable[["VLMAdapter", "Batch", "Batch", PatchingConfig], PatchingResult]


@dataclass(frozen=True)
class LocalizeConfig:
    """What stage 3 sweeps."""

    kinds: tuple[str, ...] = SITE_KINDS
    """Site kinds swept at every layer (the flag rule reads ``attn_out`` / ``mlp_out`` among them)."""
    positions: tuple[str, ...] = POSITIONS
    """Position classes; ``final`` is required (the fallback flag is read there)."""
    attribution: bool = True
    """Also run attribution patching of the same cells, with its rank agreement."""
    max_rows_per_forward: int = 64
    """Rows of one patched forward (bounds memory)."""
    n_boot: int = 1000
    """Bootstrap resamples of the intervals."""
    seed: int = 0
    """Bootstrap seed."""
    progress: bool = False
    """Progress bars over the sweeps' forwards."""

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in SITE_KINDS]
        if bad or not any(k in COMPONENT_KINDS for k in self.kinds):
            raise ValueError(
                f"kinds {self.kinds}: use some of {SITE_KINDS}, with attn_out or mlp_out among them"
            )
        if "final" not in self.positions or any(p not in POSITIONS for p in self.positions):
            raise ValueError(f"positions {self.positions}: use some of {POSITIONS}, 'final' included")
        if self.max_rows_per_forward < 1 or self.n_boot < 1:
            raise ValueError("max_rows_per_forward and n_boot must be >= 1")


def aligned_pairs(clean: Batch, corrupt: Batch, cls: str) -> list[int]:
    """Pairs whose ``cls`` tokens sit at the same offsets from the end of the prompt in both runs."""
    lk, lc = clean.seq_len, corrupt.seq_len
    src_m, dst_m = clean.position_mask(cls), corrupt.position_mask(cls)  # type: ignore[arg-type]
    out = []
    for i in range(len(corrupt)):
        src, dst = src_m[i].nonzero()[:, 0], dst_m[i].nonzero()[:, 0]
        if len(src) and len(src) == len(dst) and torch.equal(src - lk, dst - lc):
            out.append(i)
    return out


def class_sweep(
    adapter: VLMAdapter, clean: Batch, corrupt: Batch, config: PatchingConfig, sweep: SweepFn = patching_sweep
) -> PatchingResult:
    """``sweep`` over ``config.positions`` where per-token classes (``question``) are measured only on the
    pairs whose layout allows it (:func:`aligned_pairs`) and are NaN for the others; the noise floor is
    the class-aligned sweep's."""
    pos = tuple(config.positions)
    by_class = tuple(p for p in pos if p in CLASS_ALIGNED)
    per_token = tuple(p for p in pos if p not in CLASS_ALIGNED)
    if not by_class:
        raise ValueError(f"positions {pos}: include 'final' (or 'image'), which align in every pair")
    main = sweep(adapter, clean, corrupt, dataclasses.replace(config, positions=by_class))
    if not per_token:
        return main
    n_l, n = len(main.layers), len(corrupt)
    patched = torch.full((n_l, len(pos), n), float("nan"))
    for j, p in enumerate(by_class):
        patched[:, pos.index(p)] = main.patched_margins[:, j]
    n_fwd, n_bwd, counts = main.n_forwards, main.n_backwards, {}
    for p in per_token:
        ok = aligned_pairs(clean, corrupt, p)
        counts[p] = len(ok)
        if ok:
            sub = sweep(adapter, clean.select(ok), corrupt.select(ok),
                        dataclasses.replace(config, positions=(p,), floor_layers=0))  # fmt: skip
            patched[:, pos.index(p), ok] = sub.patched_margins[:, 0]
            n_fwd, n_bwd = n_fwd + sub.n_forwards, n_bwd + sub.n_backwards
    return PatchingResult(
        main.site_kind, main.layers, list(pos), patched, main.clean_margins, main.corrupt_margins,
        main.min_gap, n_fwd, n_bwd, main.method, {**main.meta, "positions": list(pos), "aligned_pairs": counts},
        main.dtype, main.noise_floor_per_pair,
    )  # fmt: skip


def _floor(results: Sequence[PatchingResult]) -> float:
    floors = [r.recovery_floor for r in results if not math.isnan(r.recovery_floor)]
    return max(floors) if floors else 0.0


def flag_sites(
    sweeps: dict[str, PatchingResult], n_boot: int = 1000, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """The flag rule (module doc): (every component site's row at every position, the flagged sites, weak).

    Each flagged site appears once, at the position where its recovery is largest among those passing."""
    comps = {k: r for k, r in sweeps.items() if k in COMPONENT_KINDS}
    if not comps:
        raise ValueError(f"no component sweep among {list(sweeps)}: the rule reads attn_out / mlp_out")
    positions = [
        p for p in next(iter(comps.values())).positions if all(p in r.positions for r in comps.values())
    ]
    floor = _floor(list(comps.values()))
    parts = []
    for pos in positions:
        rk = site_ranking(comps, pos, n_boot=n_boot, seed=seed)
        parts.append(rk.assign(position=pos))
    table = pd.concat(parts, ignore_index=True)
    table["floor"] = floor
    table["passes"] = (
        (table["recovery"] >= FLAG_MIN_RECOVERY) & (table["low"] > floor) & (table["n"] >= FLAG_MIN_PAIRS)
    )
    passed = table[table["passes"]].sort_values("recovery", ascending=False, kind="mergesort")
    flagged = passed.drop_duplicates("site").sort_values(["layer", "kind"], kind="mergesort")
    weak = flagged.empty
    if weak:
        flagged = table[table["position"] == "final"].head(1)
    return table, flagged.reset_index(drop=True), weak


def flagged_layers(flagged: pd.DataFrame) -> list[int]:
    """The layers of the flagged sites, ascending."""
    return sorted({int(x) for x in flagged["layer"]})


def _per_site(result: PatchingResult, layer: int, position: str, n_boot: int, seed: int) -> dict[str, Any]:
    per = result.recovery_per_pair[result.layers.index(layer), result.positions.index(position)]
    v, lo, hi = mean_bootstrap(per.numpy().astype(float)[None], n_boot, seed)
    floor = result.recovery_floor
    return {"recovery": float(v[0]), "low": float(lo[0]), "high": float(hi[0]), "n": int((~per.isnan()).sum()),
            "floor": floor, "within_floor": bool(not math.isnan(floor) and abs(float(v[0])) <= floor)}  # fmt: skip


def remeasure(
    adapter: VLMAdapter,
    clean: Batch,
    corrupt: Batch,
    sites: pd.DataFrame,
    residual: Site,
    config: LocalizeConfig,
) -> tuple[pd.DataFrame, dict[str, PatchingResult]]:
    """Patch each flagged site (at its flagged position) and ``residual`` (at ``final``) on other pairs:
    one row per site with mean recovery, 95% interval, pairs and the noise floor of that run."""
    wanted = [(str(r.kind), int(r.layer), str(r.position)) for r in sites.itertuples()]
    wanted.append((residual.kind, int(residual.layer or 0), "final"))
    results: dict[str, PatchingResult] = {}
    rows = []
    for kind in dict.fromkeys(k for k, _, _ in wanted):
        mine = [(layer, pos) for k, layer, pos in wanted if k == kind]
        cfg = PatchingConfig(site_kind=kind, layers=tuple(sorted({lay for lay, _ in mine})),
                             positions=tuple(p for p in POSITIONS if p in {q for _, q in mine}),
                             max_rows_per_forward=config.max_rows_per_forward)  # fmt: skip
        results[kind] = res = class_sweep(adapter, clean, corrupt, cfg)
        for layer, pos in mine:
            rows.append({"site": str(Site(kind, layer)), "kind": kind, "layer": layer, "position": pos,
                         **_per_site(res, layer, pos, config.n_boot, config.seed)})  # fmt: skip
    return pd.DataFrame(rows).drop_duplicates(["site", "position"]).reset_index(drop=True), results


@dataclass
class Localization:
    """Stage 3's result (see the module doc)."""

    sweeps: dict[str, PatchingResult]
    """Exact sweeps on the selection pairs, by site kind."""
    attribution: dict[str, PatchingResult]
    """Attribution patching of the same cells, by site kind (empty when not run)."""
    table: pd.DataFrame
    """Every component site at every position: recovery, interval, n, floor, whether it passes the rule."""
    flagged: pd.DataFrame
    """The flagged sites (one row each: site, kind, layer, position, recovery, low, high, n)."""
    weak: bool
    """No site passed the rule; the top final-position site stands in."""
    scoring: pd.DataFrame
    """Flagged sites and the residual site re-measured on the scoring pairs."""
    agreement: pd.DataFrame = field(default_factory=pd.DataFrame)
    """Rank agreement of attribution with the exact sweep, per kind (overall and layer profile)."""
    scoring_results: dict[str, PatchingResult] = field(default_factory=dict)
    """The scoring half's patching results, by site kind."""

    @property
    def layers(self) -> list[int]:
        """The flagged layers (:func:`flagged_layers`)."""
        return flagged_layers(self.flagged)

    @property
    def sites(self) -> list[Site]:
        return [
            Site(str(k), int(v)) for k, v in zip(self.flagged["kind"], self.flagged["layer"], strict=True)
        ]

    @property
    def residual_site(self) -> Site:
        """``resid_post`` of the last flagged layer."""
        return resid_post(max(self.layers))

    def layer_scores(self, source: str = "") -> LayerScores:
        """Per layer, the best component's mean recovery at ``final`` (:func:`lora_targeted.arms.component_scores`)."""
        from lora_targeted.arms import component_scores

        return component_scores([r for k, r in self.sweeps.items() if k in COMPONENT_KINDS], "final", source)

    def summary(self) -> dict[str, Any]:
        return {
            "rule": RULE_TEXT, "weak": self.weak, "flagged_sites": [str(s) for s in self.sites],
            "flagged_layers": self.layers, "residual_site": str(self.residual_site),
            "flagged": self.flagged[["site", "position", "recovery", "low", "high", "n"]].to_dict("records"),
            "scoring": self.scoring.to_dict("records"),
            "noise_floor": {k: r.noise_floor for k, r in self.sweeps.items()},
            "dtype": next(iter(self.sweeps.values())).dtype,
            "n_pairs": int(next(iter(self.sweeps.values())).clean_margins.shape[0]),
            "aligned_pairs": next(iter(self.sweeps.values())).meta.get("aligned_pairs", {}),
            "agreement": self.agreement.to_dict("records"),
        }  # fmt: skip

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        for prefix, group in (("selection", self.sweeps), ("attribution", self.attribution),
                              ("scoring", self.scoring_results)):  # fmt: skip
            for kind, r in group.items():
                r.save(folder / f"{prefix}_{kind}.safetensors")
        self.table.to_csv(folder / "sites.csv", index=False)
        self.flagged.to_csv(folder / "flagged.csv", index=False)
        self.scoring.to_csv(folder / "scoring.csv", index=False)
        self.agreement.to_csv(folder / "agreement.csv", index=False)
        self.layer_scores("audit: selection flip pairs").to_json(
            folder / "layer_scores.json"
        )  # for `lora train --scores`
        (folder / "localize.json").write_text(json.dumps(self.summary(), indent=1, default=float))

    @classmethod
    def load(cls, folder: Path) -> Localization:
        folder = Path(folder)
        group = lambda prefix: {
            p.stem.removeprefix(prefix + "_"): PatchingResult.load(p)
            for p in sorted(folder.glob(f"{prefix}_*.safetensors"))
        }
        agreement = (
            pd.read_csv(folder / "agreement.csv")
            if (folder / "agreement.csv").stat().st_size > 1
            else pd.DataFrame()
        )
        weak = bool(json.loads((folder / "localize.json").read_text())["weak"])
        return cls(group("selection"), group("attribution"), pd.read_csv(folder / "sites.csv"),
                   pd.read_csv(folder / "flagged.csv"), weak, pd.read_csv(folder / "scoring.csv"), agreement,
                   group("scoring"))  # fmt: skip


def localize(
    adapter: VLMAdapter,
    selection: tuple[Batch, Batch],
    scoring: tuple[Batch, Batch],
    config: LocalizeConfig | None = None,
) -> Localization:
    """Stage 3 on (clean, corrupt) batches of the selection and scoring pairs (module doc)."""
    from interp.attribution import agreement, attribution_patching

    cfg = config or LocalizeConfig()
    if selection is None or scoring is None or len(selection[0]) == 0 or len(scoring[0]) == 0:
        raise ValueError(
            "localize needs flip pairs in both halves (selection and scoring): audit more images"
        )
    base = PatchingConfig(
        positions=cfg.positions, max_rows_per_forward=cfg.max_rows_per_forward, progress=cfg.progress
    )
    sweeps, approx, agree = {}, {}, []
    for kind in cfg.kinds:
        pc = dataclasses.replace(base, site_kind=kind)
        sweeps[kind] = class_sweep(adapter, *selection, pc)
        if cfg.attribution:
            approx[kind] = class_sweep(adapter, *selection, pc, attribution_patching)
            a = agreement(sweeps[kind], approx[kind])
            agree.append(a[a["scope"] != "layer"].assign(kind=kind))
    table, flagged, weak = flag_sites(sweeps, cfg.n_boot, cfg.seed)
    residual = resid_post(max(flagged_layers(flagged)))
    scored, results = remeasure(adapter, *scoring, flagged, residual, cfg)
    agreement_table = pd.concat(agree, ignore_index=True) if agree else pd.DataFrame()
    return Localization(sweeps, approx, table, flagged, weak, scored, agreement_table, results)


def check_flagged_layers(flagged: Sequence[int], truth_layers: Sequence[int]) -> None:
    """Notebook 04's check: the layers the rule flagged are exactly the planted ones (read from the
    organism's record only here, to compare). Raises ``AssertionError`` naming both."""
    if sorted(int(x) for x in flagged) != sorted(int(x) for x in truth_layers):
        raise AssertionError(
            f"flagged layers {sorted(flagged)} are not the planted layers {sorted(truth_layers)}"
        )
