"""Loaders: PSF-Med-style files (JSONL / CSV / parquet), VinDr-CXR boxes, MIMIC-CXR-JPG paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analyses.data import psf
from analyses.data.boxes import BOX_COLUMNS, boxes_for, load_vindr_boxes
from analyses.data.mimic import mimic_image_paths
from analyses.data.psf import REASONS, LoadedRows, SkippedRow, load_psf_rows
from analyses.data.schema import QuestionRow
from hooks.inputs import Box

COLUMNS = [
    "qid",
    "image_id",
    "question",
    "family",
    "paraphrase_of",
    "polarity",
    "ground_truth",
    "finding",
    "split",
    "image_path",
    "patient_id",
    "source",
]


def _r(  # type: ignore[no-untyped-def]
    qid, image_id, question, family, of, pol, gt, split="test", path=None, finding="cardiomegaly"
):
    return {
        "qid": qid,
        "image_id": image_id,
        "question": question,
        "family": family,
        "paraphrase_of": of,
        "polarity": pol,
        "ground_truth": gt,
        "finding": finding,
        "split": split,
        "image_path": path if path is not None else f"imgs/{image_id}.png",
        "patient_id": f"p-{image_id}",
        "source": "0123",
    }


#: Good rows (string-coded values, identical in every format).
GOOD = [
    _r("q1", "a", "Is there cardiomegaly?", "original", None, "1", "yes"),
    _r("q1l", "a", "Is the heart enlarged?", "lexical", "q1", "preserve", "Yes"),
    _r("q1o", "a", "Can cardiomegaly be ruled out?", "operator", "q1", "invert", "no"),
    _r("q2", "b", "Is there cardiomegaly?", "Original", None, "+1", "0"),
    _r("q2s", "b", "Does the image show cardiomegaly?", "syntactic", "q2", "1", "false"),
    _r("q3", "c", "Is there effusion?", "original", None, "1", "true", "train", finding="pleural_effusion"),
]
GOOD[3]["patient_id"] = "007"  # leading zeros must survive every format (CSV is read as text)
#: One bad row per reason (qid -> reason).
BAD = {
    "dup": (_r("q1", "a", "Duplicate of q1?", "original", None, "1", "no"), "duplicate qid"),
    "noimg": (_r("noimg", "x", "Is there cardiomegaly?", "original", None, "1", "yes"), "missing image"),
    "noimg_v": (_r("noimg_v", "x", "Is the heart big?", "lexical", "noimg", "1", "yes"), "missing image"),
    "broken": (_r("broken", "broken", "Is there X?", "original", None, "1", "yes"), "unreadable image"),
    "fam": (_r("fam", "a", "Is it?", "rhetorical", "q1", "1", "yes"), "unknown family"),
    "empty": (_r("empty", "c", "   ", "original", None, "1", "yes"), "empty question"),
    "empty_v": (_r("empty_v", "c", "Is the heart big?", "lexical", "empty", "1", "yes"), "original skipped"),
    "orphan": (_r("orphan", "a", "Is the heart big?", "lexical", "nope", "1", "yes"), "original missing"),
    "pol": (_r("pol", "a", "Is the heart big?", "lexical", "q1", "sideways", "yes"), "invalid polarity"),
    "gt": (_r("gt", "a", "Is the heart big?", "lexical", "q1", "1", "maybe"), "invalid ground truth"),
    "rej": (_r("rej", "a", "Can it be ruled out?", "operator", "q1", "1", "no"), "rejected by QuestionRow"),
    "incons": (
        _r("incons", "b", "Is the heart big?", "voice", "q2", "1", "yes"),
        "ground truth inconsistent with original",
    ),
    "mism": (_r("mism", "b", "Big heart?", "scope", "q1", "1", "yes"), "original mismatch"),
    "notorig": (_r("notorig", "a", "Big heart?", "register", "q1l", "1", "yes"), "not an original"),
    "conflict": (
        _r("conflict", "a", "Is there X?", "original", None, "1", "yes", path="imgs/b.png"),
        "conflicting image path",
    ),
    "badsplit": (
        _r("badsplit", "a", "Is there cardiomegaly?", "original", None, "1", "yes", split="holdout"),
        "invalid split",
    ),
}


def _frame(records: list[dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def _all_records() -> list[dict[str, object]]:
    bad = [rec for rec, _ in BAD.values()]
    return [*GOOD[:3], bad[0], *GOOD[3:], *bad[1:]]  # the duplicate comes after the first q1


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for name in "abc":
        Image.fromarray((rng.random((12, 10)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png body")
    return tmp_path


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(rec) + "\n" for rec in df.to_dict("records")))
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def test_good_rows_are_parsed(data_dir: Path) -> None:
    loaded = load_psf_rows(_write(_frame(GOOD), data_dir / "psf.jsonl"))
    assert [r.qid for r in loaded.rows] == [g["qid"] for g in GOOD]
    assert loaded.skipped == {} and loaded.n_read == len(GOOD)
    by = {r.qid: r for r in loaded.rows}
    assert [by[q].ground_truth for q in ("q1", "q1l", "q1o", "q2", "q2s", "q3")] == [
        True,
        True,
        False,
        False,
        False,
        True,
    ]
    assert [by[q].polarity for q in ("q1", "q1l", "q1o", "q2", "q2s")] == [1, 1, -1, 1, 1]
    assert by["q2"].family == "original" and by["q1l"].paraphrase_of == "q1"
    assert by["q1"].paraphrase_of is None and by["q1"].patient_id == "p-a" and by["q2"].patient_id == "007"
    assert by["q3"].split == "train" and by["q3"].finding == "pleural_effusion"
    assert by["q1"].image_path == str(data_dir / "imgs" / "a.png") and by["q1"].meta == {"source": "0123"}
    assert loaded.image_paths == {k: str(data_dir / "imgs" / f"{k}.png") for k in "abc"}


def test_every_bad_row_is_reported(data_dir: Path) -> None:
    loaded = load_psf_rows(_write(_frame(_all_records()), data_dir / "psf.jsonl"))
    assert [r.qid for r in loaded.rows] == [g["qid"] for g in GOOD]
    expected: dict[str, list[str]] = {}
    for rec, reason in BAD.values():
        expected.setdefault(reason, []).append(str(rec["qid"]))
    assert loaded.skipped == {reason: expected[reason] for reason in REASONS if reason in expected}
    assert loaded.n_read == len(GOOD) + len(BAD) == len(loaded.rows) + len(loaded.problems)
    rejected = by_reason(loaded, "rejected by QuestionRow").detail
    assert rejected.endswith("operator variants invert the answer (polarity -1)")
    assert "'empty' was skipped" in by_reason(loaded, "original skipped").detail
    assert str(data_dir / "imgs" / "x.png") in by_reason(loaded, "missing image").detail
    report = loaded.report()
    head = f"read {len(GOOD) + len(BAD)} rows, loaded 6 (3 images), skipped {len(BAD)}"
    assert report.splitlines()[0] == f"{data_dir / 'psf.jsonl'}: {head}"
    for rec, reason in BAD.values():
        assert f"  {reason}: " in report and str(rec["qid"]) in report


def by_reason(loaded: LoadedRows, reason: str) -> SkippedRow:
    return next(p for p in loaded.problems if p.reason == reason)


def test_formats_give_identical_rows(data_dir: Path) -> None:
    df = _frame(_all_records())
    results = [load_psf_rows(_write(df, data_dir / f"psf{ext}")) for ext in (".jsonl", ".csv", ".parquet")]
    first = results[0]
    for other in results[1:]:
        assert other.rows == first.rows
        assert [r.meta for r in other.rows] == [r.meta for r in first.rows]
        assert other.skipped == first.skipped and other.image_paths == first.image_paths
    assert first.rows == load_psf_rows(_write(_frame(GOOD), data_dir / "good.csv")).rows


def test_typed_values(data_dir: Path) -> None:
    df = _frame(GOOD)
    df["ground_truth"] = [True, True, False, False, False, True]
    df["polarity"] = [1, 1, -1, 1, 1, 1]
    jsonl = load_psf_rows(_write(df, data_dir / "typed.jsonl"))
    df["ground_truth"] = df["ground_truth"].astype(int)
    parquet = load_psf_rows(_write(df, data_dir / "typed.parquet"))
    mixed = df.astype(object)
    mixed.loc[0, "ground_truth"], mixed.loc[1, "ground_truth"] = True, "yes"
    mixed.loc[2, "polarity"] = "invert"
    mixed_jsonl = load_psf_rows(_write(mixed, data_dir / "mixed.jsonl"))
    strings = load_psf_rows(_write(_frame(GOOD), data_dir / "strings.jsonl"))
    assert jsonl.rows == parquet.rows == mixed_jsonl.rows == strings.rows and len(jsonl.rows) == 6


def test_column_map(data_dir: Path) -> None:
    renames = {"qid": "id", "ground_truth": "label", "image_path": "file", "paraphrase_of": "parent"}
    df = _frame(GOOD).rename(columns=renames)
    cmap = {v: k for k, v in renames.items()}
    loaded = load_psf_rows(_write(df, data_dir / "mine.csv"), column_map=cmap)
    assert loaded.rows == load_psf_rows(_write(_frame(GOOD), data_dir / "psf.csv")).rows
    with pytest.raises(ValueError, match=r"lacks columns.*column_map"):
        load_psf_rows(data_dir / "mine.csv")
    with pytest.raises(ValueError, match="not expected columns"):
        load_psf_rows(data_dir / "mine.csv", column_map={**cmap, "source": "origin"})
    with pytest.raises(ValueError, match="does not have"):
        load_psf_rows(data_dir / "mine.csv", column_map={**cmap, "nonexistent": "patient_id"})


def test_split_filter_and_image_root(data_dir: Path) -> None:
    q3v = _r("q3v", "c", "Is fluid present?", "lexical", "q3", "1", "true", finding="pleural_effusion")
    records = [*GOOD, q3v]
    sub = data_dir / "meta"
    sub.mkdir()
    path = _write(_frame(records), sub / "psf.parquet")
    test = load_psf_rows(path, image_root=data_dir, split="test")
    assert [r.qid for r in test.rows] == ["q1", "q1l", "q1o", "q2", "q2s"]
    assert test.n_other_split == 1 and test.skipped == {"original missing": ["q3v"]}
    assert "split 'train'" in test.problems[0].detail and "1 in other splits" in test.report()
    train = load_psf_rows(path, image_root=data_dir, split="train")
    assert [r.qid for r in train.rows] == ["q3"] and train.n_other_split == 6
    missing = load_psf_rows(path)  # default root is the file's folder: no images there
    assert missing.rows == [] and len(missing.skipped["missing image"]) == len(records)
    with pytest.raises(ValueError, match="split must be"):
        load_psf_rows(path, split="validation")


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_psf_rows(tmp_path / "psf.xlsx")
    with pytest.raises(FileNotFoundError):
        load_psf_rows(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("qid,image_id\n")
    (tmp_path / "torn.jsonl").write_text('{"qid": \n')  # one malformed line and nothing else
    for name, match in [
        ("empty.jsonl", "is empty"),
        ("header.csv", "no data"),
        ("torn.jsonl", "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_psf_rows(tmp_path / name)


def test_image_for_and_checks_once(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    verify = psf.verify_image

    def counting(path: str) -> str:
        calls.append(path)
        return verify(path)

    monkeypatch.setattr(psf, "verify_image", counting)
    before = sorted(p.name for p in data_dir.rglob("*"))
    loaded = load_psf_rows(_write(_frame(_all_records()), data_dir / "psf.jsonl"))
    assert sorted(calls) == sorted(str(data_dir / "imgs" / f"{n}.png") for n in ("a", "b", "c", "broken"))
    assert sorted(p.name for p in data_dir.rglob("*")) == sorted([*before, "psf.jsonl"])  # no cache files
    im = loaded.image_for(loaded.rows[0])
    assert im.mode == "RGB" and im.size == (10, 12)
    expected = np.asarray(Image.open(data_dir / "imgs/b.png").convert("RGB"))
    assert np.array_equal(np.asarray(loaded.image_for("b")), expected)
    with pytest.raises(KeyError, match="broken"):
        loaded.image_for("broken")


def test_loaded_rows_validation() -> None:
    row = QuestionRow("q", "a", "Is there X?", "original", None, 1, True, "cardiomegaly", "test")
    with pytest.raises(ValueError, match="accounted"):
        LoadedRows(rows=[row], problems=[], n_read=2, source="x", image_paths={"a": "a.png"})
    with pytest.raises(ValueError, match="without an image path"):
        LoadedRows(rows=[row], problems=[], n_read=1, source="x", image_paths={})
    with pytest.raises(ValueError, match="reason is empty"):
        SkippedRow("q", " ")
    assert psf.parse_ground_truth(2) is None and psf.parse_polarity(True) is None


VINDR_CSV = """image_id,rad_id,class_name,x_min,y_min,x_max,y_max
img1,R1,No finding,,,,
img1,R2,No finding,,,,
img2,R3,Cardiomegaly,100.5,200,300,400
img2,R4,Pleural effusion,10,20,30,40
img2,R4,Nodule/Mass,1,2,3,4
img3,R5,Pneumothorax,50,60,,80
img3,R5,Atelectasis,90,10,40,30
"""


def test_load_vindr_boxes(tmp_path: Path) -> None:
    path = tmp_path / "annotations_train.csv"
    path.write_text(VINDR_CSV)
    df = load_vindr_boxes(path)
    assert list(df.columns) == [*BOX_COLUMNS, "rad_id"]
    assert df["class_name"].tolist() == ["cardiomegaly", "pleural_effusion", "Nodule/Mass"]
    assert df.loc[0, ["x_min", "y_min", "x_max", "y_max"]].tolist() == [100.5, 200.0, 300.0, 400.0]
    assert df.attrs["dropped"] == {"no finding": 2, "missing coordinates": 1, "invalid box": 1}
    assert df["rad_id"].tolist() == ["R3", "R4", "R4"]
    custom = load_vindr_boxes(path, class_map={"Nodule/Mass": "nodule"})
    assert custom["class_name"].tolist() == ["Cardiomegaly", "Pleural effusion", "nodule"]
    no_rad = tmp_path / "kaggle.csv"
    pd.read_csv(path).drop(columns="rad_id").to_csv(no_rad, index=False)
    assert list(load_vindr_boxes(no_rad).columns) == list(BOX_COLUMNS)
    pd.read_csv(path).drop(columns="x_max").to_csv(no_rad, index=False)
    with pytest.raises(ValueError, match="x_max"):
        load_vindr_boxes(no_rad)
    assert boxes_for("img2", df) == [
        Box("img2", "cardiomegaly", 100.5, 200.0, 300.0, 400.0),
        Box("img2", "pleural_effusion", 10.0, 20.0, 30.0, 40.0),
        Box("img2", "Nodule/Mass", 1.0, 2.0, 3.0, 4.0),
    ]
    assert boxes_for("img2", df, "pleural_effusion") == [
        Box("img2", "pleural_effusion", 10.0, 20.0, 30.0, 40.0)
    ]
    assert boxes_for("img1", df) == []


def test_mimic_image_paths(tmp_path: Path) -> None:
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    meta.write_text(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
        "d-one,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544\n"
        "d-two,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544\n"
        "d-three,19999987,58971208,CHEST (PORTABLE AP),AP,2544,3056\n"
    )
    root = tmp_path / "mimic"
    first = root / "files" / "p10" / "p10000032" / "s50414267" / "d-one.jpg"
    first.parent.mkdir(parents=True)
    Image.new("L", (4, 4)).save(first)
    df = mimic_image_paths(meta, root)
    assert list(df.columns) == ["image_id", "patient_id", "study_id", "view", "image_path", "exists"]
    assert df["image_id"].tolist() == ["d-one", "d-two", "d-three"]
    assert df["image_path"].tolist() == [
        str(first),
        str(root / "files/p10/p10000032/s50414267/d-two.jpg"),
        str(root / "files/p19/p19999987/s58971208/d-three.jpg"),
    ]
    assert df["exists"].tolist() == [True, False, False] and df["view"].tolist() == ["PA", "LATERAL", "AP"]
    assert df["patient_id"].tolist()[2] == "19999987" and df["study_id"].tolist()[2] == "58971208"
    frontal = mimic_image_paths(meta, root, views=("PA", "AP"))
    assert frontal["image_id"].tolist() == ["d-one", "d-three"]


def test_a_utf8_byte_order_mark_is_accepted_in_every_text_layout(data_dir: Path) -> None:
    import argparse
    import codecs
    import gzip

    from analyses.data.records import read_records
    from analyses.data.resolve import model_options

    plain = load_psf_rows(_write(_frame(GOOD), data_dir / "plain.jsonl"))
    records = _frame(GOOD).to_dict("records")
    texts = {
        "bom.jsonl": "".join(json.dumps(rec) + "\n" for rec in records),
        "bom.json": json.dumps(records),
        "bom.csv": _frame(GOOD).to_csv(index=False),
    }
    for name, text in texts.items():
        raw = codecs.BOM_UTF8 + text.encode()
        for path, data in ((data_dir / name, raw), (data_dir / f"{name}.gz", gzip.compress(raw))):
            if path.suffixes[-2:] == [".json", ".gz"]:
                continue  # .json.gz is not a supported suffix
            path.write_bytes(data)
            assert read_records(path).columns[0] == "qid", path
            loaded = load_psf_rows(path)
            assert loaded.rows == plain.rows and loaded.problems == [], (path, loaded.problems)
    device_map = data_dir / "device_map.json"
    device_map.write_bytes(codecs.BOM_UTF8 + b'{"": "cpu"}')
    assert model_options(argparse.Namespace(device_map=str(device_map)))["device_map"] == {"": "cpu"}
