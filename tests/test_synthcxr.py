"""Tests of the SynthCXR synthetic world and the question bank (numpy + PIL only, a few seconds)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analyses.data.boxes import BOX_COLUMNS
from analyses.data.questions import (
    QUESTION_BANK,
    TEMPLATE_FAMILIES,
    held_out_indices,
    make_rows,
    simple_tokenize,
    templates,
    vocabulary,
)
from analyses.data.schema import FAMILIES, FINDINGS, OPERATOR, ORIGINAL, PARAPHRASE_FAMILIES, QuestionRow
from analyses.synthcxr.world import CTR_THRESHOLD, SynthCXRConfig, SynthCXRWorld, case_masks

SMALL = SynthCXRConfig(n_patients=150, seed=7)


@pytest.fixture(scope="module")
def world() -> SynthCXRWorld:
    return SynthCXRWorld(SMALL)


def _column_extent(mask: np.ndarray) -> int:
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[-1] - cols[0] + 1)


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 16}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"n_patients": 0}, "n_patients"),
        ({"images_per_patient": 0}, "images_per_patient"),
        ({"seed": -1}, "seed"),
        ({"prevalence": {"cardiomegaly": 1.5}}, "prevalence"),
        ({"prevalence": {"edema": 0.3}}, "prevalence"),
        ({"train_fraction": 0.8}, "fraction"),
        ({"val_fraction": -0.1, "test_fraction": 0.4}, "val_fraction"),
        ({"noise_sd": -1.0}, "noise_sd"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SynthCXRConfig(**kwargs)


def test_config_fills_missing_prevalence() -> None:
    cfg = SynthCXRConfig(prevalence={"pneumothorax": 0.1})
    assert cfg.prevalence == {f: (0.1 if f == "pneumothorax" else 0.4) for f in FINDINGS}


# --- determinism ------------------------------------------------------------------------------------


def test_same_config_gives_identical_images(world: SynthCXRWorld) -> None:
    other = SynthCXRWorld(SMALL)
    for image_id in world.image_ids()[::15]:
        assert world.array(image_id).tobytes() == other.array(image_id).tobytes()
    assert [c.findings for c in world.cases] == [c.findings for c in other.cases]
    assert world.boxes().equals(other.boxes())


def test_different_seed_gives_different_images(world: SynthCXRWorld) -> None:
    other = SynthCXRWorld(SynthCXRConfig(n_patients=150, seed=8))
    ids = world.image_ids()[:10]
    assert all(not np.array_equal(world.array(i), other.array(i)) for i in ids)
    assert [world.case(i).findings for i in ids] != [other.case(i).findings for i in ids]


def test_image_depends_only_on_seed_and_id() -> None:
    """Rendering image k alone, after others, or in a world of another size gives the same bytes."""
    alone = SynthCXRWorld(SynthCXRConfig(n_patients=40, seed=3))
    after = SynthCXRWorld(SynthCXRConfig(n_patients=40, seed=3))
    bigger = SynthCXRWorld(
        SynthCXRConfig(n_patients=90, seed=3, train_fraction=0.5, val_fraction=0.25, test_fraction=0.25)
    )
    target = "p00017_0"
    for image_id in after.image_ids()[:17]:
        after.array(image_id)
    a = alone.array(target)
    assert a.tobytes() == after.array(target).tobytes() == bigger.array(target).tobytes()
    assert alone.case(target).findings == bigger.case(target).findings


def test_image_formats(world: SynthCXRWorld) -> None:
    image_id = world.image_ids()[0]
    arr = world.array(image_id)
    assert arr.dtype == np.uint8 and arr.shape == (64, 64)
    img = world.image(image_id)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (64, 64)
    rgb = np.asarray(img)
    assert (rgb[..., 0] == arr).all() and (rgb[..., 1] == arr).all() and (rgb[..., 2] == arr).all()
    assert arr.std() > 20  # not a blank image


def test_other_image_sizes_render() -> None:
    for size in (32, 128):
        w = SynthCXRWorld(SynthCXRConfig(image_size=size, n_patients=12))
        arr = w.array(w.image_ids()[0])
        assert arr.shape == (size, size)
        for c in w.cases:
            assert all(b.x_max <= size and b.y_max <= size for b in c.boxes)


# --- anatomy and labels -----------------------------------------------------------------------------


def test_ctr_measured_from_masks_follows_label_rule(world: SynthCXRWorld) -> None:
    measured, labels = [], []
    for case in world.cases:
        m = case_masks(case, 64)
        ctr = _column_extent(m["heart"]) / _column_extent(m["thorax"])
        assert abs(ctr - case.ctr) < 0.04, (case.image_id, ctr, case.ctr)
        assert (ctr > CTR_THRESHOLD) == case.findings["cardiomegaly"] == (case.ctr > CTR_THRESHOLD)
        measured.append(ctr)
        labels.append(case.findings["cardiomegaly"])
    assert 0.2 < np.mean(labels) < 0.6


def test_heart_is_bright_and_lungs_dark(world: SynthCXRWorld) -> None:
    for case in world.cases[:30]:
        arr = world.array(case.image_id).astype(float)
        m = case_masks(case, 64)
        lung = m["lungs"] & ~m["heart"]
        assert arr[m["heart"]].mean() > arr[lung].mean() + 40, case.image_id


def test_boxes_one_per_positive_finding_within_bounds(world: SynthCXRWorld) -> None:
    size = world.config.image_size
    for case in world.cases:
        counts = Counter(b.class_name for b in case.boxes)
        masks = case_masks(case, size)
        for f in FINDINGS:
            assert counts[f] == (1 if case.findings[f] else 0), (case.image_id, f)
        for b in case.boxes:
            assert b.image_id == case.image_id
            assert 0 <= b.x_min < b.x_max <= size and 0 <= b.y_min < b.y_max <= size
            mask = masks[b.class_name]
            assert mask.any()
            inside = np.zeros_like(mask)
            inside[b.y_min : b.y_max, b.x_min : b.x_max] = True
            assert not (mask & ~inside).any(), (case.image_id, b.class_name)
    for f in FINDINGS:
        prevalence = np.mean([c.findings[f] for c in world.cases])
        assert 0.25 < prevalence < 0.55, f


@pytest.mark.parametrize("finding", FINDINGS)
def test_box_encloses_what_the_finding_changes(world: SynthCXRWorld, finding: str) -> None:
    """Toggle the finding off for the same patient: the change is inside the box (atelectasis also
    raises the hemidiaphragm outside its opacity box) and clearly visible in it."""
    positives = [c for c in world.cases if c.findings[finding]][:12]
    assert len(positives) >= 8
    for case in positives:
        (box,) = [b for b in case.boxes if b.class_name == finding]
        with_f = world.array(case.image_id).astype(int)
        without = world.array(case.image_id, findings={finding: False}).astype(int)
        diff = np.abs(with_f - without)
        inside = np.zeros(diff.shape, bool)
        inside[box.y_min : box.y_max, box.x_min : box.x_max] = True
        mask = world.masks(case.image_id)[finding]
        assert diff[mask].mean() > 5, (case.image_id, diff[mask].mean())  # clearly visible
        if finding != "atelectasis":
            assert not diff[~inside].any(), case.image_id
        else:
            assert diff[inside].mean() > 3 * diff[~inside].mean()
    effusion_case = next(c for c in world.cases if c.findings["pleural_effusion"])
    (box,) = [b for b in effusion_case.boxes if b.class_name == "pleural_effusion"]
    region = np.s_[box.y_min : box.y_max, box.x_min : box.x_max]
    on = world.array(effusion_case.image_id)[region].mean()
    off = world.array(effusion_case.image_id, findings={"pleural_effusion": False})[region].mean()
    assert on > off + 10  # fluid is brighter than the aerated lung it replaces


def test_counterfactual_toggle_on_adds_a_box_free_finding(world: SynthCXRWorld) -> None:
    case = next(c for c in world.cases if not c.findings["pneumothorax"])
    masks = world.masks(case.image_id, findings={"pneumothorax": True})
    assert masks["pneumothorax"].any()
    assert not np.array_equal(world.array(case.image_id), world.array(case.image_id, {"pneumothorax": True}))
    with pytest.raises(ValueError, match="unknown findings"):
        world.array(case.image_id, findings={"edema": True})


def test_effusion_side_matches_box_side(world: SynthCXRWorld) -> None:
    for case in world.cases:
        if not case.findings["pleural_effusion"]:
            assert case.effusion_side is None
            continue
        (box,) = [b for b in case.boxes if b.class_name == "pleural_effusion"]
        centre_x = (box.x_min + box.x_max) / 2
        midline = case.anatomy.cx * 64
        # PA view: the patient's right is on the image's left
        assert (centre_x < midline) == (case.effusion_side == "right"), case.image_id


# --- splits -----------------------------------------------------------------------------------------


def test_splits_disjoint_by_patient_with_configured_fractions() -> None:
    w = SynthCXRWorld(SynthCXRConfig(n_patients=200, images_per_patient=2, seed=1))
    by_patient: dict[str, set[str]] = {}
    for c in w.cases:
        by_patient.setdefault(c.patient_id, set()).add(c.split)
    assert all(len(s) == 1 for s in by_patient.values())
    counts = Counter(next(iter(s)) for s in by_patient.values())
    assert counts == {"train": 140, "val": 20, "test": 40}
    assert len(w.cases) == 400 and len({c.image_id for c in w.cases}) == 400
    assert sum(len(w.image_ids(s)) for s in ("train", "val", "test")) == 400


# --- questions --------------------------------------------------------------------------------------


def test_question_bank_shape() -> None:
    for finding in FINDINGS:
        assert len(templates(finding, ORIGINAL)) == 1
        for family in TEMPLATE_FAMILIES:
            texts = templates(finding, family)
            assert 4 <= len(texts) <= 7, (finding, family)
            assert 1 <= len(held_out_indices(len(texts))) < len(texts)
    all_texts = [q for fams in QUESTION_BANK.values() for t in fams.values() for q in t]
    assert len(all_texts) == len(set(all_texts)), "a question text is reused across findings/families"
    assert "Is the heart size normal?" in templates("cardiomegaly", OPERATOR)
    paraphrases = [q for f in PARAPHRASE_FAMILIES for q in templates("cardiomegaly", f)]
    assert "Is the heart size normal?" not in paraphrases


def test_tokenizer_and_vocabulary() -> None:
    assert simple_tokenize("Cardiomegaly: is it present on this film?") == [
        "cardiomegaly",
        ":",
        "is",
        "it",
        "present",
        "on",
        "this",
        "film",
        "?",
    ]
    assert simple_tokenize("In this chest x-ray, the patient's heart") == [
        "in",
        "this",
        "chest",
        "x",
        "-",
        "ray",
        ",",
        "the",
        "patient",
        "'",
        "s",
        "heart",
    ]
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and "?" in vocab and "yes" not in vocab
    assert {"yes", "no"} <= set(vocabulary(include_answers=True))
    assert len(vocab) < 200


def test_rows_structure(world: SynthCXRWorld) -> None:
    rows = world.rows()
    vocab = set(vocabulary())
    by_qid = {r.qid: r for r in rows}
    assert len(by_qid) == len(rows)
    per_image = len(FINDINGS) * (1 + len(TEMPLATE_FAMILIES))
    assert len(rows) == len(world.cases) * per_image
    for r in rows:
        assert r.family in FAMILIES
        assert set(simple_tokenize(r.question)) <= vocab, r.question
        case = world.case(r.image_id)
        label = case.findings[r.finding]
        assert r.split == case.split and r.patient_id == case.patient_id
        if r.family == ORIGINAL:
            assert r.paraphrase_of is None and r.polarity == 1 and r.ground_truth == label
            assert r.qid == f"{r.image_id}/{r.finding}/orig"
            continue
        assert r.paraphrase_of is not None
        orig = by_qid[r.paraphrase_of]
        assert orig.family == ORIGINAL and orig.image_id == r.image_id and orig.finding == r.finding
        if r.family == OPERATOR:
            assert r.polarity == -1 and r.ground_truth == (not label)
        else:
            assert r.polarity == 1 and r.ground_truth == label
        assert r.question == templates(r.finding, r.family)[int(r.meta["template"])]
        assert r.meta["held_out"] == (
            "1" if int(r.meta["template"]) in held_out_indices(len(templates(r.finding, r.family))) else "0"
        )
        if r.split == "train":
            assert r.meta["held_out"] == "0", r.qid
    assert any(r.meta["held_out"] == "1" for r in rows if r.split != "train")
    assert rows == world.rows()  # deterministic template choice
    assert len({r.question for r in rows if r.family == "register"}) > len(FINDINGS)  # varies per image


def test_make_rows_all_templates_and_held_out() -> None:
    world = SynthCXRWorld(SynthCXRConfig(n_patients=10))
    case = world.cases[0]
    test_rows = make_rows(case, "test", 0, all_templates=True)
    train_rows = make_rows(case, "train", 0, all_templates=True)
    n_all = sum(len(t) for f in FINDINGS for t in QUESTION_BANK[f].values())
    assert len(test_rows) == n_all
    n_held = sum(len(held_out_indices(len(templates(f, fam)))) for f in FINDINGS for fam in TEMPLATE_FAMILIES)
    assert len(train_rows) == n_all - n_held
    assert all(r.meta["held_out"] == "0" for r in train_rows)
    three = make_rows(case, "val", 5, templates_per_family=3)
    assert Counter(r.family for r in three)["voice"] == 3 * len(FINDINGS)
    with pytest.raises(ValueError, match="split"):
        make_rows(case, "dev", 0)


# --- save -------------------------------------------------------------------------------------------


def test_save_writes_vindr_boxes_rows_and_config(tmp_path) -> None:
    cfg = SynthCXRConfig(n_patients=20, seed=5)
    world = SynthCXRWorld(cfg)
    root = world.save(tmp_path / "synth")
    pngs = sorted((root / "images").glob("*.png"))
    assert len(pngs) == 20
    first = world.image_ids()[0]
    assert np.array_equal(np.asarray(Image.open(root / "images" / f"{first}.png")), world.array(first))
    boxes = pd.read_csv(root / "boxes.csv")
    assert tuple(boxes.columns) == BOX_COLUMNS
    assert len(boxes) == sum(len(c.boxes) for c in world.cases)
    assert boxes.equals(world.boxes())
    lines = (root / "questions.jsonl").read_text().splitlines()
    rows = [QuestionRow(**json.loads(line)) for line in lines]
    assert len(rows) == len(world.rows())
    assert all((root / r.image_path).is_file() for r in rows)
    cases = [json.loads(line) for line in (root / "cases.jsonl").read_text().splitlines()]
    assert [c["image_id"] for c in cases] == world.image_ids()
    assert cases[0]["findings"] == world.cases[0].findings
    meta = json.loads((root / "world.json").read_text())
    assert meta["config"]["seed"] == 5 and meta["n_images"] == 20
    reloaded = SynthCXRWorld.load(root)
    assert reloaded.config == cfg
    assert np.array_equal(reloaded.array(first), world.array(first))
