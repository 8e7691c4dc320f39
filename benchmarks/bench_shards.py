"""One process vs two (torchrun, gloo), one thread each, on the same organism rows; prints the time ratio and
checks that the merged run is the single-process run line for line.

one: ``evaluate`` in one process (what ``flipscope eval`` runs without a launcher);
two: ``torchrun --nproc_per_node 2``: ``evaluate_sharded``, each rank its half of the images, rank 0 merges.

The timed span is the evaluation (image hashes, plan, encode, score, write; for two processes also the
merge), from a barrier after the model and data are loaded to the merged ``predictions.jsonl``; the wall
time of each command, start-up included, is printed too. On a machine with fewer free cores than processes
the ratio is a lower bound (the load average is printed with it).

    python benchmarks/bench_shards.py --n-images 40
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def worker(n_images: int, batch_size: int, out: Path, timing: Path) -> None:
    """Load, wait for every rank, evaluate this rank's share (or everything), record the span on rank 0."""
    torch.set_num_threads(1)
    from analyses.data.schema import first_images
    from analyses.eval.evaluate import EvalConfig
    from analyses.eval.shard import evaluate_sharded, init_dist
    from analyses.organism.model import load_organism, organism_rows

    dist = init_dist()
    adapter = load_organism()
    world, rows = organism_rows("test")
    rows = first_images(rows, n_images)
    dist.gather(None)  # every rank loaded: start together
    start = time.perf_counter()
    evaluate_sharded(
        adapter, rows, world.image_for, out, EvalConfig(batch_size=batch_size), dist, progress=False
    )
    dist.gather(None)
    if dist.is_main:
        timing.write_text(
            json.dumps({"seconds": time.perf_counter() - start, "rows": len(rows), "procs": dist.world_size})
        )


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(n_procs: int, n_images: int, batch_size: int, tmp: Path) -> tuple[dict[str, float], float, Path]:
    out, timing = tmp / f"run{n_procs}", tmp / f"timing{n_procs}.json"
    args = [__file__, "--worker", "--n-images", str(n_images), "--batch-size", str(batch_size)]
    args += ["--out", str(out), "--timing", str(timing)]
    launch = [sys.executable]
    if n_procs > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(n_procs)]
        launch += ["--master_addr", "127.0.0.1", "--master_port", str(_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([*launch, *args], check=True, env=env, cwd=ROOT, capture_output=True)
    return json.loads(timing.read_text()), time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n-images", type=int, default=40, help="organism test images (16 rows x 4 conditions each)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--timing", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.n_images, args.batch_size, args.out, args.timing)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        load_before = os.getloadavg()
        one, wall_one, out_one = run(1, args.n_images, args.batch_size, tmp)
        two, wall_two, out_two = run(2, args.n_images, args.batch_size, tmp)
        load_after = os.getloadavg()
        a, b = ((o / "predictions.jsonl").read_text().splitlines() for o in (out_one, out_two))
        same = sum(x == y for x, y in zip(a, b, strict=False))
    print(
        f"{args.n_images} images, {one['rows']} rows, {len(a)} predictions, batch {args.batch_size}, 1 thread a process"
    )
    print(
        f"one process : evaluation {one['seconds']:7.2f} s   (command, start-up included: {wall_one:6.2f} s)"
    )
    print(
        f"two processes: evaluation {two['seconds']:7.2f} s   (command, start-up included: {wall_two:6.2f} s)"
    )
    print(
        f"ratio (evaluation) {one['seconds'] / two['seconds']:.2f}x   (commands) {wall_one / wall_two:.2f}x"
    )
    print(f"identical lines: {same}/{len(a)} (merged run has {len(b)}); byte-identical: {a == b}")
    print(
        f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}, on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
