"""``flipscope audit``: the flag rule on hand-made sweeps, the image split, stage resume / refusal / overwrite,
and the audit of the shipped organism (flags the planted layers, resumes without recomputing, refuses a
changed input, report renders)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.audit import AuditConfig, AuditFolder, StageChanged, flag_sites, flagged_layers, split_pairs
from analyses.audit.localize import FLAG_MIN_PAIRS, LocalizeConfig
from analyses.eval.evaluate import EvalConfig
from interp.patching import PatchingResult


def _result(kind: str, recovery: np.ndarray, floor: float = 0.0) -> PatchingResult:
    """A result whose per-pair recovery is ``recovery`` (layer, position, pair): clean 1, corrupt 0."""
    n = recovery.shape[-1]
    return PatchingResult(kind, list(range(recovery.shape[0])), ["final", "question"][: recovery.shape[1]],
                          torch.tensor(recovery, dtype=torch.float32), torch.ones(n), torch.zeros(n),
                          noise_floor_per_pair=torch.full((n,), floor))  # fmt: skip


def test_flag_rule_on_hand_made_sweeps() -> None:
    n = 20
    rec = np.zeros((4, 2, n))
    rec[1, 0] = 0.9  # layer 1 attn at final: flagged
    rec[2, 0] = np.where(np.arange(n) % 2 == 0, 1.2, -0.2)  # mean 0.5, interval reaches below 0.5 but above 0
    rec[3, 0] = 0.45  # just below the bar: not flagged
    rec[:, 1] = np.nan
    rec[0, 1, : FLAG_MIN_PAIRS - 1] = 1.0  # strong, but on too few aligned pairs: not flagged
    mlp = np.zeros((4, 2, n))
    mlp[:, 1] = np.nan
    mlp[2, 0] = 0.7
    table, flagged, weak = flag_sites({"attn_out": _result("attn_out", rec), "mlp_out": _result("mlp_out", mlp),
                                       "resid_post": _result("resid_post", np.ones((4, 2, n)))}, n_boot=200)  # fmt: skip
    assert not weak
    assert list(flagged["site"]) == [
        "attn_out(1)",
        "attn_out(2)",
        "mlp_out(2)",
    ]  # by layer, resid never flagged
    assert flagged_layers(flagged) == [1, 2]
    q = table[(table["site"] == "attn_out(0)") & (table["position"] == "question")].iloc[0]
    assert q["recovery"] == pytest.approx(1.0) and q["n"] == FLAG_MIN_PAIRS - 1 and not q["passes"]
    # a floor above the interval's lower end un-flags the noisy site (0.5 mean, low ~0.3)
    _, flagged2, _ = flag_sites({"attn_out": _result("attn_out", rec, floor=0.4),
                                 "mlp_out": _result("mlp_out", mlp, floor=0.4)}, n_boot=200)  # fmt: skip
    assert "attn_out(2)" not in set(flagged2["site"]) and "attn_out(1)" in set(flagged2["site"])
    # nothing passes: the top final-position site stands in, marked weak
    weak_rec = np.full((4, 1, n), 0.1)
    weak_rec[2] = 0.3
    _, flagged3, weak3 = flag_sites({"attn_out": _result("attn_out", weak_rec)}, n_boot=50)
    assert weak3 and list(flagged3["site"]) == ["attn_out(2)"]


def _preds(rows: list, margins: np.ndarray) -> pd.DataFrame:
    from analyses.organism.truth import predictions_frame

    return predictions_frame(rows, torch.tensor(margins))


def test_split_pairs_is_by_image_seeded_and_picks_the_family_with_most_flips() -> None:
    from analyses.data.schema import first_images
    from analyses.organism.model import organism_rows

    _, rows = organism_rows("test")
    rows = first_images(rows, 30)
    rng = np.random.default_rng(0)
    m = np.where([r.family == "register" for r in rows], -1.0, 1.0) * rng.uniform(0.5, 2, len(rows))
    m = np.where([r.family == "original" for r in rows], 1.0, m)  # every register paraphrase flips
    preds = _preds(rows, m)
    split = split_pairs(preds, rows, seed=3, max_pairs=10, max_others=20)
    assert split.family == "register" and split.flips_by_family["register"] == max(
        split.flips_by_family.values()
    )
    sel_img = {p.original.image_id for p in split.selection}
    assert sel_img.isdisjoint({p.original.image_id for p in split.scoring})
    assert sel_img <= set(split.selection_images) and set(split.selection_images).isdisjoint(
        split.scoring_images
    )
    assert len(split.selection) == 10 and len(split.scoring) == 10 and len(split.others) == 20
    assert all(
        p.paraphrase.family != "register" and p.original.image_id in split.scoring_images
        for p in split.others
    )
    again = split_pairs(preds, rows, seed=3, max_pairs=10, max_others=20)
    assert again.selection == split.selection and again.others == split.others
    assert split_pairs(preds, rows, seed=4, max_pairs=10).selection_images != split.selection_images
    with pytest.raises(ValueError, match="no flip pairs"):
        split_pairs(preds, rows, family="voice")


def test_stage_resumes_refuses_a_changed_key_and_overwrites_later_stages(tmp_path: Path) -> None:
    calls: list[str] = []

    def writer(name: str):
        def compute(folder: Path) -> dict:
            calls.append(name)
            (folder / "x.txt").write_text(name)
            return {"n": len(calls)}

        return compute

    f = AuditFolder(tmp_path, progress=False)
    with f.hold():
        a = f.run("pairs", {"seed": 0}, writer("pairs"))
        f.run("localize", {"pairs": a.digest}, writer("localize"))
        assert f.run("pairs", {"seed": 0}, writer("pairs")).digest == a.digest and calls == [
            "pairs",
            "localize",
        ]
        with pytest.raises(StageChanged, match=r"seed: 0 -> 1.*--overwrite"):
            f.run("pairs", {"seed": 1}, writer("pairs"))
        assert (tmp_path / "localize" / "x.txt").exists()  # a refusal deletes nothing
    g = AuditFolder(tmp_path, overwrite=True, progress=False)
    with g.hold():
        g.run("pairs", {"seed": 1}, writer("pairs"))
    assert calls == ["pairs", "localize", "pairs"]
    assert not (tmp_path / "localize").exists()  # the stages after an overwritten one are recomputed
    assert json.loads((tmp_path / "pairs" / "stage.json").read_text())["key"] == {"seed": 1}


@pytest.fixture(scope="module")
def organism_audit(tmp_path_factory: pytest.TempPathFactory):
    from analyses.audit import run_audit
    from analyses.data.resolve import resolve_data, resolve_model

    torch.set_num_threads(1)
    adapter, model_dir = resolve_model("organism")
    data = resolve_data("synthcxr", "test", 64, model_dir)
    out = tmp_path_factory.mktemp("audit") / "organism"
    cfg = AuditConfig(eval=EvalConfig(conditions=("image", "removed"), batch_size=256), max_pairs=32,
                      localize=LocalizeConfig(n_boot=200), n_boot=200)  # fmt: skip
    res = run_audit(adapter, data.rows, data.images, out, cfg, progress=False, data_name=data.source)
    return adapter, data, out, cfg, res


@pytest.mark.slow
def test_organism_audit_flags_the_planted_layers(organism_audit) -> None:
    from analyses.organism.model import MODEL_DIR
    from analyses.organism.truth import load_planted_truth

    _, _, out, _, res = organism_audit
    loc = res.localization
    truth = load_planted_truth(MODEL_DIR)  # read only to compare with what the rule flagged blind
    assert res.split.family == truth.family
    assert not loc.weak and loc.layers == sorted(truth.layers)
    assert {str(s) for s in loc.sites} <= {str(s) for s in truth.sites}
    assert str(loc.residual_site) == str(truth.direction_site)
    scored = loc.scoring.set_index("site")
    for site in loc.sites:  # held-out pairs confirm each flagged site, outside the noise floor
        assert scored.loc[str(site), "low"] > 0.3 and not scored.loc[str(site), "within_floor"]
    html = (out / "audit.html").read_text()
    for anchor in (
        "id='localization'",
        "id='audit-flagged'",
        "id='audit-lora'",
        f"LoRA on text layers {loc.layers}",
    ):
        assert anchor in html
    from interp.scores import LayerScores

    scores = LayerScores.from_json(
        out / "localize" / "layer_scores.json"
    )  # what `flipscope lora train --scores` reads
    assert sorted(scores.top_k(len(loc.layers))) == loc.layers
    payload = json.loads((out / "audit.json").read_text())
    assert payload["stages"]["localize"]["summary"]["flagged_layers"] == loc.layers


@pytest.mark.slow
def test_organism_audit_resumes_and_refuses_changed_inputs(organism_audit) -> None:
    from analyses.audit import run_audit

    adapter, data, out, cfg, res = organism_audit
    again = run_audit(adapter, data.rows, data.images, out, cfg, progress=False, data_name=data.source)
    assert {k: r.finished for k, r in again.records.items()} == {
        k: r.finished for k, r in res.records.items()
    }
    assert again.localization.layers == res.localization.layers
    changed = AuditConfig(eval=cfg.eval, max_pairs=16, localize=cfg.localize, n_boot=cfg.n_boot)
    with pytest.raises(StageChanged, match=r"max_pairs: 32 -> 16"):
        run_audit(adapter, data.rows, data.images, out, changed, progress=False)
    with pytest.raises(ValueError, match="holds a different run"):  # other rows: the eval stage refuses
        run_audit(adapter, data.rows[: len(data.rows) // 2], data.images, out, cfg, progress=False)
    assert (out / "localize" / "stage.json").exists()  # refusals delete nothing


@pytest.mark.slow
def test_audit_report_renders_in_chromium(organism_audit) -> None:
    from analyses.eval.browser import find_chromium, probe_page

    path, how = find_chromium(install=True, timeout_s=600)
    if path is None:
        pytest.skip(f"no headless browser: {how}")
    got = probe_page(organism_audit[2] / "audit.html", path)
    assert got["errors"] == [] and got["has_plotly"]
    assert len(got["figures"]) >= 4 and all(
        f["rendered"] and 100 <= f["height"] <= 700 for f in got["figures"]
    )


@pytest.mark.slow
def test_overwrite_recomputes_the_changed_stage_and_those_after(organism_audit, tmp_path: Path) -> None:
    """Features (an SAE trained here) and a LoRA check are added to a finished audit: the first stages are
    reused, the LoRA stage is recomputed, and the report states whether targeted beat the control."""
    import shutil

    from analyses.audit import FeaturesConfig, LoraCheckConfig, run_audit
    from analyses.data.resolve import resolve_data

    adapter, data, out, cfg, res = organism_audit
    copy = tmp_path / "audit"
    shutil.copytree(out, copy)
    from analyses.organism.model import MODEL_DIR

    train = resolve_data("synthcxr", "train", 24, MODEL_DIR).rows
    feats = AuditConfig(eval=cfg.eval, max_pairs=cfg.max_pairs, localize=cfg.localize, n_boot=cfg.n_boot,
                        features=FeaturesConfig(n_rows=512, steps=150, ig_steps=2, n_boot=100))  # fmt: skip
    added = run_audit(adapter, data.rows, data.images, copy, feats, train_rows=train, progress=False)
    assert (
        added.records["lora"].finished == res.records["lora"].finished
    )  # a new stage leaves the others alone
    assert added.records["report"].key != res.records["report"].key  # the report shows it
    more = dataclasses.replace(
        feats, lora_check=LoraCheckConfig(seeds=(0,), steps=2, batch_size=4, n_boot=100)
    )
    with pytest.raises(StageChanged, match="check"):  # the LoRA stage's inputs changed: refused by default
        run_audit(adapter, data.rows, data.images, copy, more, train_rows=train, progress=False)
    got = run_audit(
        adapter, data.rows, data.images, copy, more, train_rows=train, overwrite=True, progress=False
    )
    for stage in ("eval", "pairs", "localize"):
        assert got.records[stage].finished == res.records[stage].finished, stage
    assert got.records["features"].finished == added.records["features"].finished
    assert got.records["lora"].finished >= res.records["lora"].finished and got.check is not None
    f = got.features
    assert f.sae["source"] == "trained" and f.sae["site"] == str(res.localization.residual_site)
    assert 0 <= f.sae["fvu"] < 1 and f.score["n_pairs"] == len(got.split.scoring)
    t = got.check.table
    assert list(t.index) == ["base", "targeted", "control", "all_layers"]
    beats = t.loc["targeted", "register_flip_high"] < t.loc["control", "register_flip_low"]
    assert got.check.beats == beats and ("did NOT beat" in got.check.verdict()) == (not beats)
    html = (copy / "audit.html").read_text()
    assert "id='audit-features'" in html and got.check.verdict().split(":")[0] in html


@pytest.mark.slow
def test_cli_audit_from_an_eval_run(
    organism_audit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from analyses.cli import main

    _, _, out, _, res = organism_audit
    argv = ["audit", "--n-images", "64", "--conditions", "image,removed", "--max-pairs", "32", "--n-boot", "200",
            "--from-run", str(out / "eval"), "--until", "localize", "--out", str(tmp_path / "cli"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"layers {res.localization.layers}" in printed
    assert not (tmp_path / "cli" / "eval" / "predictions.jsonl").exists()  # read from --from-run, not redone
    assert main([*argv[:2], "32", *argv[3:]]) != 0  # other rows than the eval run's: refused
    assert "evaluated other rows" in capsys.readouterr().err


def test_reuse_features_encodes_each_image_once_and_changes_no_margin() -> None:
    from analyses.data.resolve import resolve_data, resolve_model
    from analyses.eval.pairs import pair_batches, paraphrase_pairs
    from hooks.batch_features import batch_features, reuse_features

    adapter, model_dir = resolve_model("organism")
    data = resolve_data("synthcxr", "test", 3, model_dir)
    every = paraphrase_pairs(data.rows)
    images = sorted({p.original.image_id for p in every})
    pairs = [p for img in images for p in [q for q in every if q.original.image_id == img][:4]]  # 3 images x 4
    clean, corrupt = pair_batches(adapter, pairs, data.images)
    calls: list[int] = []
    encode = adapter.image_features

    def counted(inputs):  # type: ignore[no-untyped-def]
        out = encode(inputs)
        calls.append(len(out))
        return out

    adapter.image_features = counted  # type: ignore[method-assign]
    try:
        plain = [adapter.margins(b, image_features=batch_features(adapter, b)) for b in (clean, corrupt)]
        n_plain = sum(calls)
        calls.clear()
        with reuse_features(adapter) as cache:
            shared = [adapter.margins(b, image_features=batch_features(adapter, b)) for b in (clean, corrupt)]
            again = batch_features(adapter, corrupt.select([3, 0]))
        after = batch_features(adapter, clean)  # the scope is closed: encoded again
    finally:
        del adapter.image_features
    assert len(images) == 3 and n_plain == 24  # without the scope: every row's image, in each batch
    assert calls[0] == 3 and len(cache) == 3 and sum(calls[1:]) == 12  # inside: 3 images once; after: all 12
    assert all(torch.equal(a, b) for a, b in zip(plain, shared, strict=True))
    assert again is not None and torch.equal(again[1], batch_features(adapter, corrupt)[0])
    assert after is not None and len(after) == 12
