"""The organism's shipped SAE: a TopK SAE on the planted organism's final-token activations at
:data:`SAE_SITE`, the residual stream after the last layer that paraphrase-pair patching flags
(notebook 03 derives the site again and checks it against this record).

``flipscope organism sae`` retrains it (seeded) from final-position activations of train-split
questions (every family, with their images) and saves it in sae-lens format under
``organism/sae/<site>/`` with ``report.json`` (config, held-out FVU, L0, dead fraction, the rows it saw).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.data.schema import QuestionRow
from analyses.eval.pairs import Pair, flip_pairs, pair_batches, paraphrase_pairs
from analyses.organism.model import MODEL_DIR, ORGANISM_DIR, load_organism, organism_rows
from analyses.organism.plant import SHORTCUT_FAMILY
from analyses.organism.truth import predictions_frame
from hooks.sites import Site, resid_post

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter
    from hooks.batch import Batch

SAE_SITE: Site = resid_post(4)
"""Where the shipped SAE reads (notebook 03: the top paraphrase-patching components are attn_out(3) and
attn_out(4); the residual stream after them is resid_post(4))."""
SAE_WIDTH, SAE_K, SAE_STEPS, SAE_ROWS = 128, 8, 600, 8192
"""The shipped SAE's width, k, Adam steps and number of training activations."""


def sae_dir(site: Site = SAE_SITE) -> Path:
    """``organism/sae/<kind>_<layer>``."""
    return ORGANISM_DIR / "sae" / f"{site.kind}_{site.layer}"


SAE_DIR = sae_dir()


def organism_activations(
    site: Site | int = SAE_SITE,
    n_rows: int = SAE_ROWS,
    split: str = "train",
    seed: int = 0,
    model: Path = MODEL_DIR,
) -> Any:
    """Final-token activations at ``site`` (an int = ``resid_post(int)``) of ``n_rows`` questions of
    ``split`` (every family, seeded choice), on the organism at ``model``; float32 ``(n, d_model)``."""
    import numpy as np

    from interp import cache_activations

    site = resid_post(site) if isinstance(site, int) else site
    adapter = load_organism(model)
    world, rows = organism_rows(split, model)
    pick = np.random.default_rng(seed).permutation(len(rows))[:n_rows]
    chosen = [rows[i] for i in sorted(pick)]
    batches = [
        adapter.prepare(
            [world.image(r.image_id) for r in chosen[i : i + 128]], [r.question for r in chosen[i : i + 128]]
        )
        for i in range(0, len(chosen), 128)
    ]
    cache = cache_activations(adapter, batches, [site], positions="final", progress=False)
    return cache[site].float()


def train_organism_sae(
    out_dir: Path | None = None,
    site: Site = SAE_SITE,
    seed: int = 0,
    width: int = SAE_WIDTH,
    k: int = SAE_K,
    steps: int = SAE_STEPS,
    n_rows: int = SAE_ROWS,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and save the organism's SAE (default: the shipped one, into :func:`sae_dir`); returns its
    report (also written to ``report.json``)."""
    from interp import SAETrainConfig, save_sae, train_sae

    out = Path(out_dir) if out_dir is not None else sae_dir(site)
    x = organism_activations(site, n_rows=n_rows, seed=seed)
    cfg = SAETrainConfig(
        site=site, width=width, k=k, steps=steps, batch_size=256, lr=3e-3, seed=seed,
        release="organism-topk", progress=progress,
    )  # fmt: skip
    sae, report = train_sae(x, cfg)
    save_sae(sae, out)
    rec = {
        "site": str(site),
        "model": MODEL_DIR.name,
        "architecture": cfg.architecture,
        "width": width,
        "k": k,
        "steps": steps,
        "lr": cfg.lr,
        "seed": seed,
        "n_activations": int(x.shape[0]),
        "rows": f"{int(x.shape[0])} train-split questions (every family, seeded choice), final position",
        "fvu": float(report.fvu),
        "l0": float(report.l0),
        "dead_fraction": float(report.dead_fraction),
    }
    (out / "report.json").write_text(json.dumps(rec, indent=1))
    return rec


@dataclass
class RegisterPairs:
    """One split's (original, register) flip pairs and (original, other paraphrase) pairs, batched."""

    split: str
    """``val`` (choose a feature) or ``test`` (score it)."""
    rows: list[QuestionRow]
    """Original and register rows of the split (image condition)."""
    margins: Any
    """The planted organism's margins on ``rows``."""
    flips: list[Pair]
    """(original, register) pairs whose predictions differ."""
    flip_batches: tuple[Batch, Batch]
    """(originals, register paraphrases) of ``flips``, each on its pair's image."""
    others: list[Pair]
    """(original, paraphrase) pairs of the other paraphrase families (collateral of an intervention)."""
    other_batches: tuple[Batch, Batch] | None
    """Their batches (``None`` when not asked for)."""


def register_pairs(
    adapter: VLMAdapter,
    split: str,
    model: Path = MODEL_DIR,
    others: bool = True,
    max_others: int = 0,
    seed: int = 0,
) -> RegisterPairs:
    """The register flip pairs of ``split`` on ``adapter`` (flip = the original and its register
    paraphrase get different predictions), and with ``others`` the (original, paraphrase) pairs of
    every other paraphrase family (``max_others`` > 0: a random subset of that many, seeded)."""
    world, rows = organism_rows(split, model)
    images = world.image_for
    reg = [r for r in rows if r.family in ("original", SHORTCUT_FAMILY)]
    m = adapter.margins_for([images(r) for r in reg], [r.question for r in reg], batch_size=128)
    flips = flip_pairs(predictions_frame(reg, m), reg, family=SHORTCUT_FAMILY)
    if not flips:
        raise ValueError(f"no register flip pairs on the {split} split of {model}: is the organism planted?")
    rest: list[Pair] = []
    other_b = None
    if others:
        rest = [p for p in paraphrase_pairs(rows) if p.paraphrase.family != SHORTCUT_FAMILY]
        if 0 < max_others < len(rest):  # seeded random subset (evenly spaced picks could hit one family)
            import numpy as np

            keep = np.random.default_rng(seed).choice(len(rest), max_others, replace=False)
            rest = [rest[i] for i in sorted(keep.tolist())]
        other_b = pair_batches(adapter, rest, images)
    return RegisterPairs(split, reg, m, flips, pair_batches(adapter, flips, images), rest, other_b)


def sae_alternatives(
    settings: list[tuple[str, int, int, str]], out: Path | None = None, steps: int = 16, seed: int = 0
) -> list[dict[str, Any]]:
    """Notebook 03's alternatives, one row per ``(site, width, k, architecture)``: train the SAE on
    :data:`SAE_ROWS` train activations, choose a feature on the val register flip pairs, score it on the
    test ones (:func:`interp.choose_and_score`; cosine with the planted direction at that site). Rows
    are appended to ``out`` (JSON lines) as they finish, so a long sweep survives a crash.

    >>> sae_alternatives([("resid_post(4)", 64, 4, "topk"), ("attn_out(3)", 128, 8, "jumprelu")])
    """
    from analyses.organism.truth import load_planted_truth
    from hooks.sites import parse_site
    from interp import SAETrainConfig, choose_and_score, train_sae

    adapter = load_organism(MODEL_DIR)
    truth = load_planted_truth(MODEL_DIR)
    directions = {truth.direction_site: truth.direction, **truth.site_directions}
    sel, score = (
        register_pairs(adapter, "val", others=False),
        register_pairs(adapter, "test", max_others=1200),
    )
    acts: dict[Site, Any] = {}
    rows = []
    for site_name, width, k, arch in settings:
        site = parse_site(site_name)
        if site not in acts:
            acts[site] = organism_activations(site, SAE_ROWS, seed=seed)
        cfg = SAETrainConfig(
            site=site, width=width, k=k, steps=SAE_STEPS, lr=3e-3, seed=seed, progress=False,
            architecture=arch,  # type: ignore[arg-type]
        )  # fmt: skip
        sae, report = train_sae(acts[site], cfg)
        _, _, sc = choose_and_score(
            adapter,
            sae,
            sel.flip_batches,
            score.flip_batches,
            score.other_batches,
            directions.get(site),
            steps=steps,
        )
        row = {"site": site_name, "width": width, "k": k, "architecture": arch, "fvu": report.fvu,
               "l0": report.l0, "dead_fraction": report.dead_fraction, **sc.as_dict()}  # fmt: skip
        rows.append(row)
        if out is not None:
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return rows
