"""Evaluator vs a naive loop on the same organism rows; prints the speed ratio and prediction agreement.

naive: one `model.generate` call per (question, condition), the answer parsed from the decoded text
       (what a first script usually does);
flipscope: `analyses.eval.evaluate.evaluate`: batched margins, each image encoded once and reused.

    python benchmarks/bench_eval.py --n-images 12
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from analyses.data.schema import first_images
from analyses.eval.evaluate import EvalConfig, evaluate, swap_partners
from analyses.organism.model import load_organism, organism_rows
from hooks.inputs import Removal


def parse_answer(text: str) -> bool | None:
    words = text.strip().lower().replace(".", " ").split()
    if not words:
        return None
    return True if words[0] == "yes" else False if words[0] == "no" else None


def naive(adapter, rows, world, cfg):  # type: ignore[no-untyped-def]
    partners = swap_partners(rows, cfg.seed)
    removal = Removal(cfg.removal, seed=cfg.seed)  # type: ignore[arg-type]
    preds = {}
    tok = adapter.tokenizer
    for r in rows:
        img = world.image(r.image_id)
        for cond in cfg.conditions:
            im = img
            if cond == "removed":
                im = removal.apply(img, 0)
            elif cond.startswith("swap"):
                im = world.image(partners[(r.qid, cond)])
            b = adapter.prepare([im], [r.question])
            with torch.no_grad():
                out = adapter.model.generate(
                    **b.inputs, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id
                )
            text = tok.decode(out[0, b.seq_len :], skip_special_tokens=True)
            preds[(r.qid, cond)] = parse_answer(text)
    return preds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-images", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_organism()
    world, test = organism_rows("test")
    rows = first_images(test, args.n_images)
    keep = {r.image_id for r in rows}
    cfg = EvalConfig(batch_size=128)
    n = len(rows) * len(cfg.conditions)

    t0 = time.perf_counter()
    ref = naive(adapter, rows, world, cfg)
    t_naive = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        df = evaluate(adapter, rows, world.image_for, tmp, cfg, progress=False)
        t_fast = time.perf_counter() - t0
    fast = {(q, c): bool(p) for q, c, p in zip(df["qid"], df["condition"], df["pred"], strict=True)}
    unparsed = sum(v is None for v in ref.values())
    same = sum(fast[k] == v for k, v in ref.items() if v is not None)
    print(
        f"rows: {len(rows)} questions x {len(cfg.conditions)} conditions = {n} predictions ({len(keep)} images)"
    )
    print(f"naive generate loop : {t_naive:8.2f} s  ({n / t_naive:7.1f} pred/s)")
    print(f"flipscope evaluator : {t_fast:8.2f} s  ({n / t_fast:7.1f} pred/s)")
    print(f"speed-up            : {t_naive / t_fast:8.1f}x")
    print(f"identical predictions: {same}/{n - unparsed} (unparsed generations: {unparsed})")


if __name__ == "__main__":
    main()
