"""The evaluator and the localization tools at MedGemma-4B width: two ways on the same rows, ratios printed.

A Gemma3ForConditionalGeneration with MedGemma-4B's dimensions (text 2560 wide, 8 heads / 4 KV heads of
256, MLP 10240, vocab 262,208; SigLIP 1152 wide, MLP 4304, 16 heads, 896 px, patch 14; 256 image tokens),
random weights, the organism's word tokenizer and SynthCXR rows (~278 tokens each, image first). On a GPU
build it at full depth (34 text layers, 27 vision layers); on a CPU the same widths with fewer layers
(printed). Measured, on the same rows in one run:

- evaluator rows/s (``evaluate``, all four conditions), prefix path and full path;
- (a) the full-sequence bare forward with cached image features and prebuilt batches (no I/O, no
  planning: what a hand-written loop at best does), and (b) the suffix-only forward against stored
  prefixes; ratios evaluator / (a) and max |margin| difference evaluator vs (a);
- on a GPU, model FLOP utilisation (2 x text-layer parameters x tokens of the full sequence, per row,
  over the bf16 dense peak; the prefix path does less work, so its figure can exceed what the
  arithmetic it ran would give);
- the exact patching sweep vs the one-forward-per-patch loop, and attribution patching's peak memory
  at 8 and 32 pairs (GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS growth);
- a PSF-Med wall-time projection (~112k rows x 4 conditions) from the measured evaluator rows/s,
  scaled by text depth (34 / layers built) where the model was built shallower.

    python benchmarks/bench_scale.py                        # CPU: 2 text layers, 1 vision layer, fp32
    python benchmarks/bench_scale.py --device cuda --dtype bfloat16 --layers 34 --vision-layers 27
    python benchmarks/bench_scale.py --organism             # the shipped organism: evaluator / bare forward
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from analyses.data.questions import vocabulary
from analyses.data.schema import first_images
from analyses.eval.evaluate import EvalConfig, ImageInputs, WorkItem, evaluate, plan
from analyses.organism.model import load_organism, organism_rows
from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.inputs import Removal
from hooks.layout import layout_features
from hooks.prefix import prefix_margins
from hooks.tiny import build_word_tokenizer

PSF_MED_ROWS = 112_000 * 4
H200_BF16_PEAK = 790e12


def medgemma_shape(layers: int, vision_layers: int, device: str, dtype: torch.dtype) -> VLMAdapter:
    """A random-weight Gemma3 with MedGemma-4B's widths, built directly on ``device`` in ``dtype``."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = build_word_tokenizer(vocabulary(), "gemma3")
    conv = tok.convert_tokens_to_ids
    config = Gemma3Config(  # type: ignore[call-arg]
        text_config=dict(
            vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
            sliding_window=1024, pad_token_id=conv("<pad>"), bos_token_id=conv("<bos>"),
            eos_token_id=conv("<eos>"),
        ),
        vision_config=dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers,
            num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False,
        ),
        mm_tokens_per_image=256, image_token_id=conv("<image_soft_token>"),
        boi_token_id=conv("<start_of_image>"), eoi_token_id=conv("<end_of_image>"), pad_token_id=conv("<pad>"),
    )  # fmt: skip
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(config)
            with torch.no_grad():  # HF initialises the projector to 0: the image would be ignored
                model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    finally:
        torch.set_default_dtype(before)
    model.eval()
    model.set_attn_implementation("sdpa")
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=False),
        tokenizer=tok,
        image_seq_length=256,
    )
    return VLMAdapter(model, proc, AdapterConfig(), name=f"medgemma-shape-{layers}L")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def prebuilt(adapter: VLMAdapter, rows: list, world: Any, cfg: EvalConfig) -> tuple[list, ImageInputs]:
    """The evaluator's batches, laid out and encoded ahead (so (a) and (b) time forwards only), each with
    its (qid, condition) order."""
    inputs = ImageInputs(adapter, world.image_for, Removal(cfg.removal, seed=cfg.seed))
    work: list[WorkItem] = plan(rows, cfg, set())
    batches = []
    for start in range(0, len(work), cfg.batch_size):
        got = [inputs.inputs(w) for w in work[start : start + cfg.batch_size]]
        shown = [g[1] for g in got if g is not None]
        keys = [g[0] for g in got if g is not None and g[0] is not None]
        chunk = work[start : start + cfg.batch_size]
        batch = adapter.layout([w.row.question for w in chunk], shown, [w.condition for w in chunk])
        batches.append((batch, layout_features(shown), keys, [(w.row.qid, w.condition) for w in chunk]))
    return batches, inputs


def bench_eval(adapter: VLMAdapter, rows: list, world: Any, args: argparse.Namespace) -> float:
    """Evaluator (both paths) vs (a) bare full forward and (b) suffix-only forward; returns rows/s."""
    dev = args.device
    cfg = EvalConfig(batch_size=args.batch_size, forward="prefix")
    with tempfile.TemporaryDirectory() as tmp:
        evaluate(
            adapter, rows[: max(1, len(rows) // 8)], world.image_for, tmp, cfg, progress=False
        )  # warm-up
    results = {}
    for path in ("prefix", "full") if args.eval_full or dev.startswith("cuda") else ("prefix",):
        with tempfile.TemporaryDirectory() as tmp:
            c = EvalConfig(batch_size=args.batch_size, forward=path)  # type: ignore[arg-type]
            t, df = timed(
                lambda c=c, tmp=tmp: evaluate(adapter, rows, world.image_for, tmp, c, progress=False), dev
            )
        results[path] = (t, df)
    n = len(results["prefix"][1])
    batches, inputs = prebuilt(adapter, rows, world, cfg)
    with torch.no_grad():
        t_a, full = timed(
            lambda: [adapter.margins(b, image_features=f).float().cpu() for b, f, _, _ in batches], dev
        )
        for b, f, k, _ in batches:  # fill the prefix store, then time suffix forwards alone
            prefix_margins(adapter, b, f, k, inputs.prefixes)
        t_b, _ = timed(
            lambda: [prefix_margins(adapter, b, f, k, inputs.prefixes) for b, f, k, _ in batches], dev
        )
    ref = torch.cat(full)
    tokens = float(batches[0][0].attention_mask.sum(-1).float().mean())
    conds = sorted(set(results["prefix"][1]["condition"]))
    print(f"rows: {n} ({len(rows)} questions x conditions {', '.join(conds)}), ~{tokens:.0f} tokens each")
    for path, (t, df) in results.items():
        got = torch.tensor(df.set_index(["qid", "condition"]).loc[_order(batches)]["margin"].to_numpy())
        diff = (got - ref).abs().max().item()
        print(f"evaluator, {path:6s} path : {n / t:9.1f} rows/s   max |margin - (a)| {diff:.2e}")
    print(f"(a) bare full forward    : {n / t_a:9.1f} rows/s   (cached features, prebuilt batches)")
    print(f"(b) suffix-only forward  : {n / t_b:9.1f} rows/s   (stored prefixes)")
    r_eval = n / results["prefix"][0]
    print(
        f"ratio evaluator / (a)    : {r_eval / (n / t_a):9.2f}x   ({inputs.prefixes.computed} prefixes for {n} rows)"
    )
    if dev.startswith("cuda"):
        flops = 2 * _text_params(adapter) * tokens
        print(
            f"MFU (full-sequence FLOPs): evaluator {r_eval * flops / H200_BF16_PEAK:.1%}, (a) {n / t_a * flops / H200_BF16_PEAK:.1%}"
        )
    return r_eval


def _order(batches: list) -> list[tuple[str, str]]:
    return [key for *_, order in batches for key in order]


def _text_params(adapter: VLMAdapter) -> int:
    return sum(p.numel() for p in adapter.get_module(adapter.spec.text_layers).parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--layers", type=int, default=None, help="text layers (CPU default 2, GPU 34)")
    ap.add_argument("--vision-layers", type=int, default=None, help="SigLIP layers (CPU default 1, GPU 27)")
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--pairs", type=int, nargs="*", default=None, help="attribution pair counts (default 8 32; CPU 8)"
    )
    ap.add_argument("--questions", type=int, default=None, help="questions per image (default: all ~80)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="each row k times (new qids): SynthCXR has ~12-24 questions an image, PSF-Med ~90",
    )
    ap.add_argument(
        "--eval-full", action="store_true", help="also time the evaluator's full path (GPU: always)"
    )
    ap.add_argument("--skip-interp", action="store_true", help="evaluator figures only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--organism", action="store_true", help="the shipped organism instead of the MedGemma shape"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    world, test = organism_rows("test")
    rows = first_images(test, args.n_images)
    if args.questions:
        by: dict[str, list] = {}
        for r in rows:
            by.setdefault(r.image_id, []).append(r)
        rows = [r for group in by.values() for r in group[: args.questions]]
    if args.repeat > 1:
        rows = [dataclasses.replace(r, qid=f"{r.qid}#{k}") for k in range(args.repeat) for r in rows]
    print(f"{len(rows)} questions about {len({r.image_id for r in rows})} images (repeat {args.repeat})")
    if args.organism:
        adapter = load_organism()
        print(f"organism ({adapter.n_layers} text layers), {args.n_images} images")
        bench_eval(adapter, rows, world, args)
        return
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    layers = args.layers or (34 if gpu else 2)
    vlayers = args.vision_layers or (27 if gpu else 1)
    adapter = medgemma_shape(layers, vlayers, args.device, dtype)
    print(
        f"MedGemma-4B widths, {layers} of 34 text layers, {vlayers} of 27 vision layers, {dtype}, {args.device}"
    )
    r = bench_eval(adapter, rows, world, args)
    if not args.skip_interp:
        bench_interp(adapter, rows, world, args, gpu)
    scaled = r * layers / 34
    print(
        f"PSF-Med projection ({PSF_MED_ROWS:,} rows): {PSF_MED_ROWS / scaled / 60:.1f} min at {scaled:.1f} rows/s"
        f"{'' if layers == 34 else f' (measured {r:.1f} rows/s x {layers}/34 layers)'}"
    )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[float, float]:
    """(seconds, peak resident memory above the start in MiB) of ``fn()``, sampled every 5 ms."""
    import threading

    start, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    done.set()
    t.join()
    return elapsed, max(peak[0], rss_mb()) - start


def pairs_of(adapter: VLMAdapter, rows: list, world: Any, n: int) -> tuple[Any, Any]:
    """Clean (original question, own image) vs corrupt (same question, gray image) batches of ``n`` pairs."""
    originals = [r for r in rows if r.family == "original"]
    originals = (originals * (n // max(1, len(originals)) + 1))[:n]
    imgs = [world.image(r.image_id) for r in originals]
    qs = [r.question for r in originals]
    return adapter.prepare(imgs, qs), adapter.prepare([Removal("gray").apply(i) for i in imgs], qs)


def bench_interp(adapter: VLMAdapter, rows: list, world: Any, args: argparse.Namespace, gpu: bool) -> None:
    """Exact sweep vs the per-patch loop (position classes), and attribution's peak memory by pair count."""
    from interp import PatchingConfig, attribution_patching, patching_sweep, sweep_reference

    dev = args.device
    clean, corrupt = pairs_of(adapter, rows, world, 8 if gpu else 2)
    cfg = PatchingConfig(
        site_kind="resid_post", positions=("image", "question", "final"), max_rows_per_forward=64
    )
    patching_sweep(adapter, clean.select([0]), corrupt.select([0]), cfg)  # warm-up
    t_x, exact = timed(lambda: patching_sweep(adapter, clean, corrupt, cfg), dev)
    t_r, ref = timed(lambda: sweep_reference(adapter, clean, corrupt, cfg), dev)
    diff = (exact.patched_margins - ref.patched_margins).nan_to_num().abs().max().item()
    print(
        f"exact sweep ({exact.meta.get('method')}) {t_x:7.2f} s vs per-patch loop {t_r:7.2f} s: "
        f"{t_r / t_x:5.1f}x ({len(clean)} pairs, {adapter.n_layers} layers x 3 classes; max |diff| {diff:.1e})"
    )
    for n in args.pairs or ([8, 32] if gpu else [8]):
        c, k = pairs_of(adapter, rows, world, n)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        acfg = PatchingConfig(max_rows_per_forward=n)
        t, grew = peak_rss_growth(lambda c=c, k=k, acfg=acfg: attribution_patching(adapter, c, k, acfg))
        if gpu:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            print(f"attribution, {n:3d} pairs: {t:6.2f} s, peak {peak:6.2f} GiB above the weights")
        else:
            print(f"attribution, {n:3d} pairs: {t:6.2f} s, peak resident memory +{grew:8.0f} MiB")


if __name__ == "__main__":
    main()
