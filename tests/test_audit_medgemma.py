"""The audit end to end at MedGemma-4B width (random weights, 2 text layers, 1 vision layer, fp32, CPU).

eval -> pairs -> localize (exact sweeps + attribution + the scoring re-measure) -> features (an SAE trained
here on text-only training rows) -> LoRA recommendation -> report, swept at the final position, on two
SynthCXR test images at 896 px (the processor resizes the
64 px images), then a second ``run_audit`` on the same folder, which must reuse every stage. The model and
settings are ``benchmarks/bench_audit.py``'s (which prints the per-stage costs): a bias on the "yes" logit
centres the random model's margins so that one family flips three times on each image. A few minutes on
two CPU cores (the 262k x 2560 embedding alone is 2.7 GB; its weights are hashed for each stage key).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from analyses.audit import STAGES, run_audit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_audit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    world, rows, train = bench_audit.audit_rows()
    adapter = bench_audit.audit_model(layers=2, vision_layers=1, device="cpu", dtype=torch.float32)
    # The SAE's training rows go without their image (one 896 px vision pass per row otherwise); the
    # audited rows keep theirs.
    images = lambda r: None if r.split == "train" else world.image_for(r)
    out = tmp_path_factory.mktemp("audit") / "run"
    # one flip pair per half and one other pair: every stage's code path at the real widths, in ~2 min
    cfg = bench_audit.audit_config(positions=("final",), max_pairs=1, max_others=1, ig_steps=1)
    res = run_audit(adapter, rows, images, out, cfg, train_rows=train, progress=False)
    return adapter, rows, train, images, out, cfg, res


def test_shape_and_pairs(audited: tuple) -> None:
    adapter, rows, *_, res = audited
    assert (adapter.d_model, adapter.n_layers) == (2560, 2)
    assert adapter.model.config.text_config.vocab_size == 262_208
    assert adapter.model.config.vision_config.image_size == 896
    assert len(res.predictions) == len(rows)
    s = res.split
    assert len(s.selection) == len(s.scoring) == 1 and s.flips_by_family[s.family] >= 4, s.summary()
    assert not {p.original.image_id for p in s.selection} & {p.original.image_id for p in s.scoring}


def test_stage_records(audited: tuple) -> None:
    *_, out, _, res = audited
    assert list(res.records) == list(STAGES)
    for name, rec in res.records.items():
        assert rec.seconds >= 0 and rec.finished, name
        on_disk = json.loads((out / name / "stage.json").read_text())
        assert on_disk["seconds"] == rec.seconds and on_disk["finished"] == rec.finished


def test_localization(audited: tuple) -> None:
    adapter, *_, res = audited
    loc = res.localization
    layers = list(range(adapter.n_layers))
    for kind in ("attn_out", "mlp_out", "resid_post"):
        sweep = loc.sweeps[kind]
        assert sweep.layers == layers, kind
        final = sweep.patched_margins[:, sweep.positions.index("final")]
        assert final.shape == (len(layers), len(res.split.selection)) and not final.isnan().any(), kind
        assert loc.attribution[kind].layers == layers and loc.attribution[kind].n_backwards > 0, kind
    assert loc.layers and all(0 <= x < adapter.n_layers for x in loc.layers)
    assert set(loc.flagged["kind"]) <= {"attn_out", "mlp_out"}
    scored = set(zip(loc.scoring["site"], loc.scoring["position"], strict=True))
    for site, pos in zip(loc.flagged["site"], loc.flagged["position"], strict=True):
        assert (site, pos) in scored, (site, pos)
    assert (str(loc.residual_site), "final") in scored
    assert (loc.scoring["n"] == len(res.split.scoring)).all()


def test_features_and_lora(audited: tuple) -> None:
    adapter, *_, cfg, res = audited
    f = res.features
    assert f.sae["source"] == "trained" and f.sae["site"] == str(res.localization.residual_site)
    assert f.sae["width"] == cfg.features.width and f.sae["n_activations"] == cfg.features.n_rows
    assert 0 <= f.feature < cfg.features.width
    assert f.score["n_pairs"] == len(res.split.scoring)
    arms = res.recommendation["arms"]
    assert arms["targeted"] == res.localization.layers
    assert all(0 <= x < adapter.n_layers for x in arms["targeted"] + arms["control"])
    assert res.check is None


def test_report(audited: tuple) -> None:
    *_, out, _, res = audited
    assert res.report == out / "audit.html"
    html = res.report.read_text()
    for section in ("localization", "audit-flagged", "audit-features", "audit-lora"):
        assert re.search(rf"id=['\"]{section}['\"]", html), section
    payload = json.loads((out / "audit.json").read_text())
    assert set(payload["stages"]) == set(STAGES) - {"report"}  # written by the report stage itself


def test_second_run_reuses_every_stage(audited: tuple) -> None:
    adapter, rows, train, images, out, cfg, res = audited
    preds = out / "eval" / "predictions.jsonl"
    before = preds.stat().st_mtime_ns
    again = run_audit(adapter, rows, images, out, cfg, train_rows=train, progress=False)
    assert list(again.records) == list(STAGES)
    for name in STAGES:
        a, b = res.records[name], again.records[name]
        if name == "eval":  # re-recorded after evaluate() finds every row done: nothing evaluated again
            assert b.digest == a.digest and b.key == a.key and preds.stat().st_mtime_ns == before
        else:
            assert (b.finished, b.seconds, b.digest) == (a.finished, a.seconds, a.digest), name
    assert again.localization.layers == res.localization.layers
    assert again.features.feature == res.features.feature
