"""Patching sweep, three ways on the same pairs of the organism; prints time ratios and agreement.

Pairs: the original question on a test image (clean) vs the same question on the gray image
(corrupt): the same token layout, so every single token position can be patched.

(a) exact, batched     interp.patching_sweep: patch variants stacked along the batch dimension
(b) exact, per patch   interp.sweep_reference: one forward per (layer, position) over all pairs
                       (the TransformerLens-style loop)
(c) attribution        interp.attribution_patching: two forwards + one backward per chunk of pairs

    python benchmarks/bench_patching.py --n-pairs 200
"""

from __future__ import annotations

import argparse
import time

import torch

from analyses.organism import load_organism, organism_rows
from hooks.inputs import Removal
from interp import PatchingConfig, agreement, attribution_patching, patching_sweep, sweep_reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-pairs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=512, help="rows per forward in (a)")
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

    t0 = time.perf_counter()
    exact = patching_sweep(adapter, clean, corrupt, cfg)
    t_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = sweep_reference(adapter, clean, corrupt, cfg)
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx = attribution_patching(
        adapter,
        clean,
        corrupt,
        PatchingConfig(site_kind="resid_post", positions="each", max_rows_per_forward=64),
    )
    t_c = time.perf_counter() - t0

    same = torch.allclose(exact.patched_margins, ref.patched_margins, atol=1e-4, equal_nan=True)
    max_diff = (exact.patched_margins - ref.patched_margins).nan_to_num().abs().max().item()
    agree = agreement(exact, approx)
    print(f"(a) exact, batched      {t_a:8.2f} s  {exact.n_forwards:6d} forwards")
    print(f"(b) exact, per patch    {t_b:8.2f} s  {ref.n_forwards:6d} forwards")
    print(
        f"(c) attribution         {t_c:8.2f} s  {approx.n_forwards:6d} forwards + {approx.n_backwards} backwards"
    )
    print(f"ratio (b)/(a): {t_b / t_a:6.2f}x   identical results: {same} (max |diff| {max_diff:.2e})")
    print(f"ratio (b)/(c): {t_b / t_c:6.2f}x")
    print("agreement of (c) with (a), Spearman per layer:")
    print(agree.to_string())


if __name__ == "__main__":
    main()
