"""Patching sweep, three ways on the same pairs of the organism; prints time ratios and agreement.

Pairs: the original question on a test image (clean) vs the same question on the gray image
(corrupt): the same token layout, so every single token position can be patched.

(a) exact, batched     interp.patching_sweep (method="resume"): variants stacked along the batch, each
                       resumed from its patched layer on the positions that can see the patch
(a') exact, stacked    the same with method="stack": full forwards of stacked variants (for comparison)
(b) exact, per patch   interp.sweep_reference: one forward per (layer, position) over all pairs
                       (the TransformerLens-style loop)
(c) attribution        interp.attribution_patching: two forwards + one backward per chunk of pairs

    python benchmarks/bench_patching.py --n-pairs 200

Times are the best of ``--repeats`` runs after a warm-up on two pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable

import torch

from analyses.organism.model import load_organism, organism_rows
from hooks.inputs import Removal
from interp import (
    PatchingConfig,
    PatchingResult,
    agreement,
    attribution_patching,
    patching_sweep,
    sweep_reference,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-pairs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=128, help="rows per pass in (a) and (a')")
    ap.add_argument("--repeats", type=int, default=2, help="time each method this many times, keep the best")
    ap.add_argument("--skip-stack", action="store_true", help="do not time (a') method='stack'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_organism()
    world, rows = organism_rows("test")
    originals = [r for r in rows if r.family == "original"][: args.n_pairs]
    imgs = [world.image(r.image_id) for r in originals]
    qs = [r.question for r in originals]
    clean = adapter.prepare(imgs, qs)
    corrupt = adapter.prepare([Removal("gray").apply(i) for i in imgs], qs)
    cfg = PatchingConfig(site_kind="resid_post", positions="each", max_rows_per_forward=args.max_rows)
    n_var = adapter.n_layers * corrupt.seq_len
    print(
        f"{len(originals)} pairs, {adapter.n_layers} layers x {corrupt.seq_len} positions = {n_var} patches per pair"
    )

    # Warm-up: one small run of every path, so no timing below pays first-call costs.
    few = list(range(min(2, len(originals))))
    for method in ("resume", "stack"):
        patching_sweep(
            adapter, clean.select(few), corrupt.select(few), dataclasses.replace(cfg, method=method)
        )
    sweep_reference(adapter, clean.select(few), corrupt.select(few), dataclasses.replace(cfg, layers=(0,)))
    attribution_patching(adapter, clean.select(few), corrupt.select(few), cfg)

    def timed(fn: Callable[[], PatchingResult]) -> tuple[float, PatchingResult]:
        """Best wall time of ``--repeats`` runs (the machine is shared; the minimum is the least noisy)."""
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        assert out is not None
        return min(times), out

    t_a, exact = timed(lambda: patching_sweep(adapter, clean, corrupt, cfg))
    assert exact.meta["method"] == "resume", exact.meta
    t_s, stacked = float("nan"), None
    if not args.skip_stack:
        t_s, stacked = timed(
            lambda: patching_sweep(adapter, clean, corrupt, dataclasses.replace(cfg, method="stack"))
        )
    t_b, ref = timed(lambda: sweep_reference(adapter, clean, corrupt, cfg))
    attr_cfg = PatchingConfig(site_kind="resid_post", positions="each", max_rows_per_forward=64)
    t_c, approx = timed(lambda: attribution_patching(adapter, clean, corrupt, attr_cfg))

    same = torch.allclose(exact.patched_margins, ref.patched_margins, atol=1e-4, equal_nan=True)
    max_diff = (exact.patched_margins - ref.patched_margins).nan_to_num().abs().max().item()
    agree = agreement(exact, approx)
    print(
        f"(a) exact, batched      {t_a:8.2f} s  {exact.n_forwards:6d} resumed passes "
        f"({exact.meta['skipped_noop']} no-op patches skipped)"
    )
    if stacked is not None:
        print(f"(a') exact, stacked     {t_s:8.2f} s  {stacked.n_forwards:6d} full forwards")
    print(f"(b) exact, per patch    {t_b:8.2f} s  {ref.n_forwards:6d} forwards")
    print(
        f"(c) attribution         {t_c:8.2f} s  {approx.n_forwards:6d} forwards + {approx.n_backwards} backwards"
    )
    d_rec = (exact.recovery - ref.recovery).nan_to_num().abs().max().item()
    print(
        f"ratio (b)/(a): {t_b / t_a:6.2f}x   identical results: {same} (max |diff| margins {max_diff:.2e}, "
        f"mean recovery {d_rec:.2e})"
    )
    if stacked is not None:
        d_s = (stacked.patched_margins - ref.patched_margins).nan_to_num().abs().max().item()
        print(f"ratio (b)/(a'): {t_b / t_s:5.2f}x   (max |diff| to (b) {d_s:.2e})")
    print(f"ratio (b)/(c): {t_b / t_c:6.2f}x")
    print("agreement of (c) with (a), Spearman per layer:")
    print(agree.to_string())


if __name__ == "__main__":
    main()
