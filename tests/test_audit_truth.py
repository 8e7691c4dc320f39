"""Integration: the stage-3 flag rule on the shipped planted organism flags exactly the planted layers, and
notebook 04's flagged-layer check (:func:`analyses.audit.check_flagged_layers`) fails when the record is
altered (a planted truth saying "layer 3 only")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analyses.audit import check_flagged_layers, flag_sites, flagged_layers
from analyses.audit.localize import class_sweep
from analyses.data.schema import first_images
from analyses.eval.pairs import flip_pairs, pair_batches
from analyses.organism.model import MODEL_DIR, load_organism, organism_rows
from analyses.organism.truth import TRUTH_JSON, TRUTH_TENSORS, load_planted_truth, predictions_frame
from interp import PatchingConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

#: Val images whose (original, register) rows are scored; enough for >= N_PAIRS register flip pairs.
N_IMAGES = 64
N_PAIRS = 20


@pytest.fixture(scope="module")
def rule_layers() -> list[int]:
    """The layers the flag rule flags from a real sweep (attn_out, mlp_out at the final position) on val
    register flip pairs of the shipped organism; the planted record is not read."""
    adapter = load_organism(MODEL_DIR)
    world, rows = organism_rows("val", MODEL_DIR)
    reg = [r for r in first_images(rows, N_IMAGES) if r.family in ("original", "register")]
    m = adapter.margins_for([world.image_for(r) for r in reg], [r.question for r in reg], batch_size=128)
    pairs = flip_pairs(predictions_frame(reg, m), reg, family="register")
    assert len(pairs) >= N_PAIRS, f"only {len(pairs)} register flip pairs on {N_IMAGES} val images"
    clean, corrupt = pair_batches(adapter, pairs, world.image_for)
    pick = list(range(N_PAIRS))
    clean, corrupt = clean.select(pick), corrupt.select(pick)
    sweeps = {
        kind: class_sweep(adapter, clean, corrupt, PatchingConfig(site_kind=kind, positions=("final",)))
        for kind in ("attn_out", "mlp_out")
    }
    _, flagged, weak = flag_sites(sweeps, n_boot=500)
    assert not weak, "some site passes the rule on the planted organism"
    return flagged_layers(flagged)


def _altered_truth(tmp_path: Path, layers: list[int]) -> Path:
    folder = tmp_path / "altered"
    folder.mkdir()
    rec = json.loads((MODEL_DIR / TRUTH_JSON).read_text())
    rec["layers"] = layers
    (folder / TRUTH_JSON).write_text(json.dumps(rec, indent=1))
    shutil.copy(MODEL_DIR / TRUTH_TENSORS, folder / TRUTH_TENSORS)
    return folder


def test_rule_flags_the_planted_layers(rule_layers: list[int]) -> None:
    truth = load_planted_truth(MODEL_DIR)
    assert rule_layers == sorted(truth.layers)
    check_flagged_layers(rule_layers, truth.layers)  # the unaltered record passes


def test_check_fails_on_an_altered_record(rule_layers: list[int], tmp_path: Path) -> None:
    altered = load_planted_truth(_altered_truth(tmp_path, [3]))
    assert altered.layers == (3,)
    assert sorted(load_planted_truth(MODEL_DIR).layers) != [3], "the shipped plant is not layer 3 only"
    with pytest.raises(AssertionError, match="not the planted layers"):
        check_flagged_layers(rule_layers, altered.layers)
