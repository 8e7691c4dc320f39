"""``flipscope audit`` at MedGemma-4B width: each stage's wall time and work, and a full-model projection.

The model is :func:`benchmarks.bench_scale.medgemma_shape` (random weights, MedGemma-4B's widths: text
2560, vocab 262,208, SigLIP 1152 at 896 px, 256 image tokens; fewer layers on a CPU) on SynthCXR test
rows. A random model's margins sit on one side of 0, shifted per image and spread a little by the
question, so it would make no flip pair: :func:`centered` gives the unembedding a bias of ``-threshold``
on the "yes" logit (the margin moves by exactly that), and the defaults (images ``p00003_0`` and
``p00013_0``, threshold 0.28) were read off a one-off evaluation of this seeded model so that one family
(``reorder``) flips three times on each image, no margin within 0.004 of the threshold.

The audit runs eval -> pairs -> localize (exact sweeps of attn_out / mlp_out / resid_post at every layer,
attribution patching, the scoring re-measure) -> features (an SAE trained here) -> LoRA recommendation
-> report. Printed per stage: wall time (the stage records) and work (rows evaluated, pairs, patched
forwards = ``PatchingResult.n_forwards`` summed over sweeps, backward passes, SAE steps), and a projection
to MedGemma-4B (34 text layers, 27 vision layers) under the assumptions printed with it; with
``--gpu-rows-per-s`` (the evaluator's rows/s at full depth on a GPU, e.g. from ``bench_scale.py --device
cuda``) also a GPU projection.

    python benchmarks/bench_audit.py                        # CPU: 2 text layers, 1 vision layer, fp32
    python benchmarks/bench_audit.py --gpu-rows-per-s 900   # also project from a GPU evaluator rate
    python benchmarks/bench_audit.py --device cuda --dtype bfloat16 --layers 34 --vision-layers 27
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from bench_scale import PSF_MED_ROWS, medgemma_shape  # benchmarks/ is on the path when run as a script

from analyses.audit import AuditConfig, AuditResult, FeaturesConfig, LocalizeConfig, run_audit
from analyses.eval.evaluate import EvalConfig
from analyses.organism.model import organism_rows
from hooks.adapter import VLMAdapter

FULL_LAYERS, FULL_VISION_LAYERS = 34, 27
#: Test images of the seeded model on which one family flips across the threshold (module doc).
IMAGES = ("p00003_0", "p00013_0")
THRESHOLD = 0.28


def centered(adapter: VLMAdapter, threshold: float) -> VLMAdapter:
    """Give the unembedding a bias of ``-threshold`` on the "yes" logit(s): every margin (the evaluator's,
    the logit lens', the sweeps') moves by exactly ``-threshold``; the bias is part of the weights'
    fingerprint."""
    head = adapter.get_module(adapter.spec.lm_head)
    if getattr(head, "bias", None) is not None:
        raise ValueError("the unembedding has a bias already")
    bias = torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device)
    bias[list(adapter.answer_ids.yes_ids)] = -threshold
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    return adapter


def audit_model(layers: int = 2, vision_layers: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32,
                threshold: float = THRESHOLD) -> VLMAdapter:  # fmt: skip
    """The MedGemma-width model the audit bench (and ``tests/test_audit_medgemma.py``) runs."""
    return centered(medgemma_shape(layers, vision_layers, device, dtype), threshold)


def audit_rows(images: Sequence[str] = IMAGES, n_train: int = 16) -> tuple[Any, list, list]:
    """(world, test rows about ``images``, ``n_train`` training rows about the first training image)."""
    world, test = organism_rows("test")
    rows = [r for r in test if r.image_id in set(images)]
    missing = set(images) - {r.image_id for r in rows}
    if missing:
        raise ValueError(f"images {sorted(missing)} are not among the SynthCXR test images")
    _, train = organism_rows("train")
    first = min(r.image_id for r in train)
    return world, rows, [r for r in train if r.image_id == first][:n_train]


def audit_config(batch_size: int = 64, max_pairs: int = 2, max_others: int = 2, sae_rows: int = 16,
                 sae_steps: int = 20, sae_width: int = 512, ig_steps: int = 2, n_boot: int = 100,
                 positions: tuple[str, ...] = ("image", "question", "final")) -> AuditConfig:  # fmt: skip
    """The audit's settings, kept small (the bench and the test share them)."""
    return AuditConfig(
        eval=EvalConfig(conditions=("image",), batch_size=batch_size),
        max_pairs=max_pairs,
        max_others=max_others,
        localize=LocalizeConfig(positions=positions, n_boot=n_boot, attribution=True),
        features=FeaturesConfig(
            n_rows=sae_rows,
            steps=sae_steps,
            width=sae_width,
            ig_steps=ig_steps,
            n_boot=n_boot,
            batch_size=batch_size,
        ),
        n_boot=n_boot,
    )


@contextmanager
def timed_calls(targets: Sequence[tuple[Any, str]]) -> Iterator[list[dict[str, Any]]]:
    """Wrap ``getattr(module, name)`` for each target: every call is logged (name, seconds, result)."""
    log: list[dict[str, Any]] = []
    saved = []
    for module, name in targets:
        fn = getattr(module, name)

        def wrapper(*a: Any, _fn: Callable[..., Any] = fn, _name: str = name, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = _fn(*a, **k)
            log.append({"fn": _name, "seconds": time.perf_counter() - t0, "args": a, "kwargs": k, "out": out})
            return out

        saved.append((module, name, fn))
        setattr(module, name, wrapper)
    try:
        yield log
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def run_timed(adapter: VLMAdapter, rows: list, train: list, images: Any, out: Path, cfg: AuditConfig,
              progress: bool = False) -> tuple[AuditResult, list]:  # fmt: skip
    """``run_audit`` with the localize sweeps, the SAE's activations / training and the feature scoring timed."""
    from importlib import import_module

    mod = import_module  # the module, not `analyses.audit.localize` the function the package exports
    targets = [(mod("analyses.audit.localize"), "class_sweep"), (mod("analyses.audit.features"), "training_activations"),
               (mod("interp.sae_train"), "train_sae"), (mod("interp.sae_score"), "choose_and_score")]  # fmt: skip
    with timed_calls(targets) as log:
        res = run_audit(adapter, rows, images, out, cfg, train_rows=train, progress=progress)
    return res, log


def work(res: AuditResult, log: list, cfg: AuditConfig) -> dict[str, dict[str, Any]]:
    """Per stage: seconds and work units (see the module doc)."""
    from interp.attribution import attribution_patching

    assert res.split is not None and res.localization is not None
    sweeps = [e for e in log if e["fn"] == "class_sweep"]
    is_attr = lambda e: (e["args"][4:5] or [e["kwargs"].get("sweep")])[0] is attribution_patching
    exact = [e for e in sweeps if not is_attr(e)]
    n_sel = len(res.split.selection)
    sel_exact, remeasure = (
        exact[: len(cfg.localize.kinds)],
        exact[len(cfg.localize.kinds) :],
    )  # localize's order
    attr = [e for e in sweeps if is_attr(e)]
    fwd = lambda es: sum(e["out"].n_forwards + e["out"].meta.get("floor_forwards", 0) for e in es)
    sec = lambda fn: sum(e["seconds"] for e in log if e["fn"] == fn)
    f = cfg.features
    assert f is not None
    n_sco, n_oth = len(res.split.scoring), len(res.split.others)
    return {
        "eval": {"seconds": res.seconds["eval"], "rows": len(res.predictions),
                 "images": int(res.predictions["image_id"].nunique())},
        "pairs": {"seconds": res.seconds["pairs"], "selection": n_sel, "scoring": n_sco, "others": n_oth},
        "localize": {"seconds": res.seconds["localize"],
                     "sweep_s": sum(e["seconds"] for e in sel_exact), "sweep_forwards": fwd(sel_exact),
                     "attribution_s": sum(e["seconds"] for e in attr), "attribution_forwards": fwd(attr),
                     "attribution_backwards": sum(e["out"].n_backwards for e in attr),
                     "remeasure_s": sum(e["seconds"] for e in remeasure), "remeasure_forwards": fwd(remeasure),
                     "kinds": len(sel_exact), "layers": len(sel_exact[0]["out"].layers)},
        "features": {"seconds": res.seconds.get("features", 0.0),
                     "activations_s": sec("training_activations"), "activation_rows": f.n_rows,
                     "sae_train_s": sec("train_sae"), "sae_steps": f.steps,
                     "scoring_s": sec("choose_and_score"),
                     "ig_backwards": f.ig_steps * 2, "ig_rows": f.ig_steps * (n_sel + n_sco), "other_pairs": n_oth},
        "lora": {"seconds": res.seconds["lora"]},
        "report": {"seconds": res.seconds["report"]},
    }  # fmt: skip


def tri(n: int) -> int:
    """Layer-forwards of one exact sweep position over ``n`` layers: the patch at layer L runs L..n-1."""
    return n * (n + 1) // 2


def project(w: dict[str, dict[str, Any]], layers: int, vision_layers: int, rows: int, speedup: float = 1.0) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """Seconds of each stage for MedGemma-4B on ``rows`` evaluated rows, from the measured ``w``, and the
    assumptions (each line printed). ``speedup``: measured-device seconds per projected second."""
    d, v = FULL_LAYERS / layers, FULL_VISION_LAYERS / vision_layers
    q = tri(FULL_LAYERS) / tri(layers)
    loc, fe = w["localize"], w["features"]
    rest = loc["seconds"] - loc["sweep_s"] - loc["attribution_s"] - loc["remeasure_s"]
    p = {
        "eval": w["eval"]["seconds"] * d * rows / w["eval"]["rows"],
        "pairs": w["pairs"]["seconds"],
        "localize": loc["sweep_s"] * q + (loc["attribution_s"] + loc["remeasure_s"]) * d + max(rest, 0.0),
        "features": (fe["activations_s"] + fe["scoring_s"]) * d + fe["sae_train_s"]
                    + max(fe["seconds"] - fe["activations_s"] - fe["scoring_s"] - fe["sae_train_s"], 0.0),
        "lora": w["lora"]["seconds"],
        "report": w["report"]["seconds"] * rows / w["eval"]["rows"],
    }  # fmt: skip
    p = {k: s / speedup for k, s in p.items()}
    notes = [
        f"eval: x {d:.1f} (text depth {FULL_LAYERS}/{layers}, as bench_scale's PSF-Med projection) x rows "
        f"({rows:,}/{w['eval']['rows']}); the vision tower ({vision_layers} -> {FULL_VISION_LAYERS} layers, "
        f"x {v:.0f}) is inside that factor, not scaled on its own",
        f"localize, exact sweeps: x {q:.0f} = layer-forwards {tri(FULL_LAYERS)}/{tri(layers)} (every layer swept, "
        "each patched forward runs the rest of the stack: n(n+1)/2 layer-forwards per position class and pair); "
        "same pairs",
        f"localize, attribution and the scoring re-measure: x {d:.1f} (depth; same pairs, same flagged sites)",
        f"features: cached activations and the feature scoring (IG forwards + backwards, clamps) x {d:.1f}; "
        "SAE training independent of depth (same rows, width and steps)",
        "pairs, lora (recommendation only): as measured; report: x rows",
    ]
    return p, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--layers", type=int, default=None, help="text layers (CPU default 2, GPU 34)")
    ap.add_argument("--vision-layers", type=int, default=None, help="SigLIP layers (CPU default 1, GPU 27)")
    ap.add_argument("--images", nargs="+", default=list(IMAGES), help="SynthCXR test image ids audited")
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="margin shift (module doc)")
    ap.add_argument("--max-pairs", type=int, default=2)
    ap.add_argument("--max-others", type=int, default=2)
    ap.add_argument("--sae-rows", type=int, default=16)
    ap.add_argument("--sae-steps", type=int, default=20)
    ap.add_argument("--ig-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=PSF_MED_ROWS // 4,
                    help="evaluated rows of the projected audit (default: PSF-Med's ~112k, image condition)")  # fmt: skip
    ap.add_argument("--gpu-rows-per-s", type=float, default=None,
                    help="evaluator rows/s of MedGemma-4B at full depth on a GPU: adds a GPU projection")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true", help="the audit's progress lines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    layers = args.layers or (FULL_LAYERS if gpu else 2)
    vlayers = args.vision_layers or (FULL_VISION_LAYERS if gpu else 1)
    world, rows, train = audit_rows(args.images, args.sae_rows)
    t0 = time.perf_counter()
    adapter = audit_model(layers, vlayers, args.device, dtype, args.threshold)
    print(f"MedGemma-4B widths, {layers} of {FULL_LAYERS} text layers, {vlayers} of {FULL_VISION_LAYERS} vision "
          f"layers, {dtype}, {args.device}; built in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    print(
        f"{len(rows)} test rows about {len(args.images)} images, {len(train)} training rows; threshold {args.threshold}"
    )
    cfg = audit_config(args.batch_size, args.max_pairs, args.max_others, args.sae_rows, args.sae_steps,
                       ig_steps=args.ig_steps)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res, log = run_timed(adapter, rows, train, world.image_for, Path(tmp) / "audit", cfg, args.progress)
        total = time.perf_counter() - t0
    w = work(res, log, cfg)
    loc = res.localization
    assert loc is not None and res.split is not None
    print(f"family {res.split.family}; flagged {[str(s) for s in loc.sites]} (weak {loc.weak}); run_audit {total:.1f} s "
          f"(stages {sum(res.seconds.values()):.1f} s; the rest: weight hashes, pair batches)\n")  # fmt: skip
    print(f"{'stage':9s} {'seconds':>8s}  work")
    for stage, d in w.items():
        units = ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items() if k != "seconds"
        )
        print(f"{stage:9s} {d['seconds']:8.1f}  {units}")
    for label, speedup in [("this device", 1.0)] + (
        [("GPU", _gpu_speedup(w, layers, args.gpu_rows_per_s))] if args.gpu_rows_per_s else []
    ):
        p, notes = project(w, layers, vlayers, args.rows, speedup)
        head = f"\nprojection, MedGemma-4B ({FULL_LAYERS} text / {FULL_VISION_LAYERS} vision layers), {args.rows:,} rows, {label}"
        if speedup != 1.0:
            head += f" (every stage {speedup:.0f}x faster than here: --gpu-rows-per-s {args.gpu_rows_per_s:g} over the evaluator's projected rate here)"
        print(head + ":")
        for stage, s in p.items():
            print(f"  {stage:9s} {_human(s):>10s}")
        print(f"  {'total':9s} {_human(sum(p.values())):>10s}")
        if speedup == 1.0:
            print("assumptions:\n" + "\n".join(f"  - {n}" for n in notes))


def _gpu_speedup(w: dict[str, dict[str, Any]], layers: int, gpu_rows_per_s: float) -> float:
    here = w["eval"]["rows"] / w["eval"]["seconds"] * layers / FULL_LAYERS  # projected full-depth rows/s here
    return gpu_rows_per_s / here


def _human(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


if __name__ == "__main__":
    main()
