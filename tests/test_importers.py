"""Importers under the one ``--data`` resolver: PSF-Med pairs (file and hub), nested paraphrases, the VinDR-CXR-PSF
flip bank, CheXpert / MIMIC label tables, and line-by-line reading (a bad line is skipped with its number).

Every file is written here in the layout it imitates; images are tiny files at the paths the real datasets use.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analyses.data.labels import HASH_SPLITS, label_rows
from analyses.data.psf import load_psf_rows
from analyses.data.psfmed import psfmed_rows
from analyses.data.questions import make_rows
from analyses.data.records import read_records
from analyses.data.resolve import DataOptions, load_table, resolve_data
from tests.test_medimage import PIXELS, write_dicom

PAIR_COLUMNS = ["dicom_id", "subject_id", "study_id", "question_id", "original_question", "paraphrase",
                "phenomenon", "answer", "is_yesno", "is_yesno_claude"]  # fmt: skip
MIMIC = {"d1": ("10000032", "50414267"), "d2": ("10000764", "57375967"), "d3": ("19999987", "58971208")}


def mimic_jpg(root: Path, dicom: str, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    subject, study = MIMIC[dicom]
    path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random(size[::-1]) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert("RGB").save(path)
    return path


def pair(
    dicom: str, qid: str, question: str, para: str, phen: str, answer: str, yn: str = "True"
) -> list[str]:
    subject, study = MIMIC[dicom]
    return [dicom, subject, study, qid, question, para, phen, answer, yn, yn]


#: A PSF-Med MIMIC-style pair table: line numbers in the CSV are index + 2 (the header is line 1).
PAIRS = [
    pair("d1", "q1", "Is there cardiomegaly?", "Is the heart enlarged?", "lexical_substitution", "yes"),
    pair("d1", "q1", "Is there cardiomegaly?", "Does the image show cardiomegaly?", "syntactic_restructuring", "yes"),
    pair("d1", "q1", "Is there cardiomegaly?", "Is the heart size normal?", "negation_pattern", "yes"),
    pair("d1", "q1", "Is there cardiomegaly?", "Is there any cardiomegaly?", "specificity", "Yes."),
    pair("d1", "q1", "Is there cardiomegaly?", "Is there cardiomegaly of any severity?", "scope", "yes"),
    pair("d1", "q1", "Is there cardiomegaly?", "Is the heart enlarged?", "lexical_substitution", "yes"),  # dup
    pair("d1", "q7", "Where is the opacity?", "In which lobe is the opacity?", "syntactic_restructuring",
         "left lower lobe", "False"),
    pair("d2", "q2", "Is there a pleural effusion?", "Is there fluid in the pleural space?",
         "lexical_substitution", "No."),
    pair("d2", "q2", "Is there a pleural effusion?", "Pleural effusion: present?", "register_shiftx", "no"),
    pair("d3", "q3", "Is there a pneumothorax?", "Is there air in the pleural space?", "lexical_substitution", "no"),
]  # fmt: skip


@pytest.fixture
def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    mimic_jpg(root, "d1", seed=1)
    mimic_jpg(root, "d2", seed=2)  # d3 is not downloaded
    return root


def write_table(rows: list[list[str]], columns: list[str], path: Path) -> Path:
    df = pd.DataFrame(rows, columns=columns)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    else:
        df.to_parquet(path, index=False)
    return path


def test_psfmed_pairs_become_clusters(tmp_path: Path, mimic_root: Path) -> None:
    loaded = load_table(
        read_records(write_table(PAIRS, PAIR_COLUMNS, tmp_path / "mimic.csv")), mimic_root, "test"
    )
    by = {r.qid: r for r in loaded.rows}
    q1 = by["d1/q1"]
    assert (q1.family, q1.ground_truth, q1.finding, q1.split, q1.patient_id) == (
        "original",
        True,
        "cardiomegaly",
        "test",
        "10000032",
    )
    assert q1.image_path == str(mimic_root / "files/p10/p10000032/s50414267/d1.jpg")
    variants = [r for r in loaded.rows if r.paraphrase_of == "d1/q1"]
    assert sorted((r.family, r.polarity, r.ground_truth) for r in variants) == [
        ("lexical", 1, True), ("operator", -1, False), ("scope", 1, True), ("scope", 1, True), ("syntactic", 1, True)
    ]  # fmt: skip
    assert {r.meta["phenomenon"] for r in variants} >= {"negation_pattern", "specificity"}
    q2 = by["d2/q2"]
    assert (q2.ground_truth, q2.finding) == (False, "pleural_effusion")
    assert [r.family for r in loaded.rows if r.paraphrase_of == "d2/q2"] == ["lexical"]
    # every record left out is recorded with its reason and CSV line (header = line 1)
    assert {(p.reason, p.line) for p in loaded.problems} == {
        ("duplicate paraphrase", 7),
        ("not a yes/no question", 8),
        ("unknown phenomenon", 10),
        ("missing image", 11),
    }
    report = loaded.report()
    assert "1 of 3 images not found under" in report and "p19/p19999987/s58971208/d3.jpg" in report
    assert "question <- original_question" in report and "image_id <- dicom_id" in report
    assert "--phenomenon-map register_shiftx=" in report
    for suffix in (".jsonl", ".parquet"):
        other = load_table(
            read_records(write_table(PAIRS, PAIR_COLUMNS, tmp_path / f"m{suffix}")), mimic_root, "test"
        )
        assert other.rows == loaded.rows


def test_phenomenon_map_yesno_filter_and_column_map(tmp_path: Path, mimic_root: Path) -> None:
    rows = [
        *PAIRS,
        pair("d2", "q4", "Is the lung clear?", "Are the lungs clear?", "syntactic_restructuring", "yes", "0"),
    ]
    path = write_table(rows, PAIR_COLUMNS, tmp_path / "m.csv")
    records = read_records(path)
    mapped = psfmed_rows(records, mimic_root, "test", phenomena={"negation_pattern": "syntactic",
                                                                  "register_shiftx": "register"})  # fmt: skip
    fams = {r.question: (r.family, r.ground_truth) for r in mapped.rows}
    assert fams["Is the heart size normal?"] == ("syntactic", True)
    assert fams["Pleural effusion: present?"] == ("register", False)
    assert "unknown phenomenon" not in mapped.skipped
    skipped = psfmed_rows(read_records(path), mimic_root, "test", phenomena={"negation_pattern": "skip"})
    assert len(skipped.skipped["phenomenon mapped to skip"]) == 1
    # flags: auto needs every flag true; 'answer' ignores them (but the answer must still be yes/no)
    auto = {r.question for r in psfmed_rows(read_records(path), mimic_root, "test").rows}
    by_answer = {r.question for r in psfmed_rows(read_records(path), mimic_root, "test", yesno="answer").rows}
    assert "Is the lung clear?" not in auto and "Is the lung clear?" in by_answer
    assert "Where is the opacity?" not in by_answer
    with pytest.raises(ValueError, match="target must be a family"):
        psfmed_rows(read_records(path), mimic_root, "test", phenomena={"negation_pattern": "negation"})
    # a user's own column names, mapped onto roles
    renamed = pd.read_csv(path, dtype=str).rename(
        columns={"original_question": "prompt", "phenomenon": "kind"}
    )
    renamed.to_csv(tmp_path / "r.csv", index=False)
    cmap = {"prompt": "question", "kind": "phenomenon"}
    again = load_table(
        read_records(tmp_path / "r.csv"), mimic_root, "test", options=DataOptions(column_map=cmap)
    )
    assert again.rows == psfmed_rows(read_records(path), mimic_root, "test").rows


def test_yesno_filters_read_each_side_on_its_flags(tmp_path: Path, mimic_root: Path) -> None:
    cols = [*PAIR_COLUMNS, "paraphrase_is_yesno", "paraphrase_is_yesno_claude"]
    base = pair("d1", "q1", "Is there cardiomegaly?", "Is the heart enlarged?", "lexical_substitution", "yes")
    rows = [  # flags: question (regex, claude), paraphrase (regex, claude)
        [*base[:8], "1", "1", "1", "1"],
        [*base[:5], "Is the heart big?", *base[6:8], "1", "0", "1", "1"],
        [*base[:5], "Heart big?", *base[6:8], "1", "1", "0", "1"],
        [*base[:5], "Big heart?", *base[6:8], "1", "1", "0", "0"],
    ]
    path = write_table(rows, cols, tmp_path / "flags.csv")
    kept = {
        mode: {r.question for r in psfmed_rows(read_records(path), mimic_root, "test", yesno=mode).rows}
        for mode in ("auto", "both", "either", "is_yesno", "is_yesno_claude", "answer")
    }
    q = "Is there cardiomegaly?"
    assert kept["auto"] == kept["both"] == {q, "Is the heart enlarged?"}
    assert kept["either"] == {q, "Is the heart enlarged?", "Is the heart big?", "Heart big?"}
    assert kept["is_yesno"] == {q, "Is the heart enlarged?", "Is the heart big?"}
    assert kept["is_yesno_claude"] == {q, "Is the heart enlarged?", "Heart big?"}
    assert kept["answer"] == {q, "Is the heart enlarged?", "Is the heart big?", "Heart big?", "Big heart?"}
    with pytest.raises(ValueError, match="no yes/no flag column"):
        psfmed_rows(read_records(write_table([base[:8]], PAIR_COLUMNS[:8], tmp_path / "n.csv")), mimic_root,
                    "test", yesno="is_yesno")  # fmt: skip


def test_nested_paraphrases(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 90).save(tmp_path / "a.png")
    rec = {"image_id": "a.png", "question": "Is there atelectasis?", "answer": "no", "is_yesno": True,
           "paraphrases": [{"text": "Is there lung collapse?", "phenomenon": "lexical_substitution", "is_yesno": True},
                           {"text": "Is atelectasis seen?", "phenomenon": "voice"},
                           {"text": "Describe the lungs.", "phenomenon": "syntactic", "is_yesno": False}]}  # fmt: skip
    (tmp_path / "n.jsonl").write_text(json.dumps(rec) + "\n")
    loaded = load_table(read_records(tmp_path / "n.jsonl"), tmp_path, "test")
    assert [(r.family, r.ground_truth) for r in loaded.rows] == [
        ("original", False),
        ("lexical", False),
        ("voice", False),
    ]
    assert loaded.skipped == {"not a yes/no question": ["line 1 paraphrase 3"]}
    assert loaded.rows[0].finding == "atelectasis" and loaded.rows[0].image_path == str(tmp_path / "a.png")


def test_vindr_flip_bank_with_dicom_images_in_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "vindr"
    (root / "train").mkdir(parents=True)
    write_dicom(root / "train" / "abc123.dicom", PIXELS, "MONOCHROME1")
    write_dicom(root / "train" / "def456.dicom", PIXELS)
    cols = ["image_id", "original_question", "paraphrase", "phenomenon", "answer", "pathology"]
    bank = [
        ["abc123", "Is there cardiomegaly in this image?", "Is the heart enlarged?", "lexical_substitution", "Yes", "Cardiomegaly"],
        ["abc123", "Is there cardiomegaly in this image?", "Does the image show cardiomegaly?", "syntactic_restructuring", "Yes", "Cardiomegaly"],
        ["def456", "Is there a pleural effusion?", "Is any pleural effusion present?", "scope", "No", "Pleural effusion"],
    ]  # fmt: skip
    path = write_table(bank, cols, tmp_path / "vindr_flip_bank.csv")
    data = resolve_data(str(path), "test", image_root=root)
    assert {r.image_id for r in data.rows} == {"abc123", "def456"} and data.problems == []
    assert {r.finding for r in data.rows} == {"cardiomegaly", "pleural_effusion"}
    assert np.asarray(data.images("abc123"))[..., 0].tolist() == [[255, 193, 130], [99, 68, 0]]
    orig = next(r for r in data.rows if r.image_id == "abc123" and r.family == "original")
    assert [r.family for r in data.rows if r.paraphrase_of == orig.qid] == ["lexical", "syntactic"]


def _fake_hub(monkeypatch: pytest.MonkeyPatch, tables: dict[str, list[dict]]) -> list[tuple]:
    import datasets

    calls: list[tuple] = []

    def load_dataset(repo, name=None, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((repo, name, kwargs.get("data_files")))
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in tables.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_dataset_through_datasets(
    tmp_path: Path, mimic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = pd.DataFrame(PAIRS, columns=PAIR_COLUMNS).to_dict("records")
    calls = _fake_hub(monkeypatch, {"test": records})
    hub = resolve_data("saillab/psf-med:mimic", "test", image_root=mimic_root)
    assert calls == [("saillab/psf-med", "mimic", None)]
    local = resolve_data(
        str(write_table(PAIRS, PAIR_COLUMNS, tmp_path / "m.parquet")), "test", image_root=mimic_root
    )
    assert hub.rows == local.rows and hub.source == "saillab/psf-med[test]"
    with pytest.raises(ValueError, match=r"no split 'train'; it has \['test'\]"):
        resolve_data("saillab/psf-med:mimic", "train", image_root=mimic_root)
    with pytest.raises(ValueError, match="--image-root"):
        resolve_data("saillab/psf-med:mimic", "test")
    # a data file of a hub repository (the flip bank) is loaded as data_files, its rows are the test split
    calls.clear()
    bank = resolve_data("saillab/VinDR-CXR-PSF:vindr_flip_bank.csv", "test", image_root=mimic_root)
    assert calls == [("saillab/VinDR-CXR-PSF", None, "vindr_flip_bank.csv")] and bank.rows == local.rows


def test_hub_unreachable_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    def offline(*a, **k):  # type: ignore[no-untyped-def]
        raise ConnectionError("Couldn't reach 'saillab/psf-med' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"saillab/psf-med:mimic: could not load it .* local parquet"):
        resolve_data("saillab/psf-med:mimic", "test", image_root=tmp_path)


CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Cardiomegaly",
                    "Pleural Effusion", "Pneumothorax", "Consolidation", "Atelectasis", "Edema"]  # fmt: skip


def chexpert_path(patient: int, view: str = "frontal") -> str:
    return f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view1_{view}.jpg"


def test_chexpert_labels_become_presence_questions(tmp_path: Path) -> None:
    # patients whose hash split is 'test' and one that is 'train'
    test_patients = [
        p for p in range(1, 200) if HASH_SPLITS[zlib.crc32(f"patient{p:05d}".encode()) % 10] == "test"
    ]
    a, b, c = test_patients[:3]
    other = next(
        p for p in range(1, 200) if HASH_SPLITS[zlib.crc32(f"patient{p:05d}".encode()) % 10] == "train"
    )
    table = [
        [chexpert_path(a), "F", "60", "Frontal", "AP", "", "1.0", "-1.0", "", "0.0", "", "1.0"],
        [chexpert_path(a, "lateral"), "F", "60", "Lateral", "", "", "1.0", "", "", "", "", ""],
        [chexpert_path(b), "M", "70", "Frontal", "PA", "", "0", "", "", "", "-1", ""],
        [chexpert_path(c), "M", "50", "Frontal", "PA", "", "", "-1.0", "", "", "", ""],  # nothing usable
        [chexpert_path(other), "M", "40", "Frontal", "PA", "", "1.0", "", "", "", "", ""],
    ]
    path = write_table(table, CHEXPERT_COLUMNS, tmp_path / "train.csv")
    for p in (a, b, c, other):
        full = tmp_path / chexpert_path(p)
        full.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (20, 16), p % 255).save(full)
    loaded = label_rows(read_records(path), tmp_path, "test")
    ida, idb = (chexpert_path(p).removesuffix(".jpg") for p in (a, b))
    originals = {(r.image_id, r.finding): r.ground_truth for r in loaded.rows if r.family == "original"}
    assert originals == {
        (ida, "cardiomegaly"): True,
        (ida, "consolidation"): False,
        (idb, "cardiomegaly"): False,
    }
    case_rows = [r for r in loaded.rows if r.image_id == ida and r.finding == "cardiomegaly"]

    class Case:
        image_id, patient_id, split, findings = ida, f"patient{a:05d}", "test", {"cardiomegaly": True}

    assert [r.qid for r in case_rows] == [
        r.qid for r in make_rows(Case(), "test", 0, findings=("cardiomegaly",))
    ]
    assert {(p.qid, p.reason, p.line) for p in loaded.problems} == {
        (f"{ida}/pleural_effusion", "uncertain label", 2),
        (chexpert_path(a, "lateral").removesuffix(".jpg"), "not a frontal view", 3),  # recorded, not lost
        (f"{idb}/atelectasis", "uncertain label", 4),
        (f"{chexpert_path(c).removesuffix('.jpg')}/pleural_effusion", "uncertain label", 5),
    }
    report = loaded.report()
    assert (
        "patient hash" in report
        and "(ignored): No Finding, Edema" in report
        and "'Pneumothorax': 3" in report
    )
    assert loaded.n_other_split == 1
    first = label_rows(read_records(path), tmp_path, "test", n_images=1)
    assert {r.image_id for r in first.rows} == {min(ida, idb)}


def test_mimic_labels_with_metadata_and_split_files(tmp_path: Path) -> None:
    root = tmp_path / "mimic-cxr-jpg"
    for i, d in enumerate(MIMIC):
        mimic_jpg(root, d, seed=i)
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    labels.write_text(
        "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion,Pneumothorax\n"
        "10000032,50414267,,1.0,,,0.0,\n10000764,57375967,-1.0,0.0,,,,\n19999987,58971208,,1.0,,,,\n"
    )
    with pytest.raises(ValueError, match="--metadata"):
        label_rows(read_records(labels), root, "test")
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nd1,10000032,50414267,PA\nlat1,10000032,50414267,LATERAL\n"
        "d2,10000764,57375967,AP\nd3,19999987,58971208,PA\n"
    )
    (tmp_path / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\nd1,50414267,10000032,test\nd2,57375967,10000764,validate\n"
        "d3,58971208,19999987,train\nlat1,50414267,10000032,test\n"
    )
    test = label_rows(read_records(labels), root, "test")
    assert {(r.image_id, r.finding, r.ground_truth) for r in test.rows if r.family == "original"} == {
        ("d1", "cardiomegaly", True), ("d1", "pleural_effusion", False)
    }  # fmt: skip
    assert test.rows[0].image_path == str(root / "files/p10/p10000032/s50414267/d1.jpg")
    val = label_rows(read_records(labels), root, "val")
    assert {r.image_id for r in val.rows} == {"d2"} and val.skipped == {"uncertain label": ["d2/atelectasis"]}
    assert "mimic-cxr-2.0.0-split.csv" in test.report()


def test_label_tables_record_every_study_and_view_left_out(tmp_path: Path) -> None:
    import codecs

    root = tmp_path / "mimic-cxr-jpg"
    for i, d in enumerate(MIMIC):
        mimic_jpg(root, d, seed=i)
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"  # written by a tool that puts a BOM first
    labels.write_bytes(codecs.BOM_UTF8 + (
        b"subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion,Pneumothorax\n"
        b"10000032,50414267,,1.0,,,0.0,\n10000764,57375967,,0.0,,,,\n19999987,58971208,,1.0,,,,\n"
    ))  # fmt: skip
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text(  # study 58971208 is not in it
        "dicom_id,subject_id,study_id,ViewPosition\nd1,10000032,50414267,PA\nlat1,10000032,50414267,LATERAL\n"
        "d2,10000764,57375967,LL\n"
    )
    loaded = load_table(read_records(labels), root, "test", default_split="test")
    assert loaded.layout == "labels"
    every = label_rows(read_records(labels), root, None)
    assert {r.image_id for r in every.rows} == {"d1"}
    got = {p.qid: (p.reason, p.line, p.detail) for p in every.problems}
    assert got["lat1"][:2] == ("not a frontal view", 2) and "ViewPosition LATERAL" in got["lat1"][2]
    assert got["p10000764/s57375967"][:2] == ("no frontal view", 3)  # only a lateral view: a record, not lost
    assert "LL (d2)" in got["p10000764/s57375967"][2] and "--all-views" in got["p10000764/s57375967"][2]
    assert got["p19999987/s58971208"][:2] == ("study not in metadata", 4)
    assert len(got) == 3
    views = label_rows(read_records(labels), root, None, frontal_only=False)
    assert {r.image_id for r in views.rows} == {"d1", "d2"}  # lat1 has no file: missing image
    assert {p.qid: p.reason for p in views.problems} == {
        "lat1": "missing image", "p19999987/s58971208": "study not in metadata"
    }  # fmt: skip


def test_unknown_layout_names_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"cannot tell its layout .*flipscope.*labels.*psf-med"):
        resolve_data(str(tmp_path / "x.csv"), "test")


# ----------------------------------------------------------------- line-by-line reading
NATIVE = {"image_id": "a", "question": "Is there cardiomegaly?", "family": "original", "paraphrase_of": None,
          "polarity": 1, "ground_truth": "yes", "finding": "cardiomegaly", "split": "test", "image_path": "a.png"}  # fmt: skip


def test_a_malformed_line_is_skipped_with_its_line_number(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    lines = [json.dumps({**NATIVE, "qid": f"q{i}", "image_id": "a"}).encode() for i in range(5)]
    lines[2] = b'{"qid": "q2", "image_id": '  # torn
    lines[3] = (
        json.dumps({**NATIVE, "qid": "q3", "question": "Is there cardiomegal\xff?"})
        .encode()
        .replace(b"\\u00ff", b"\xff")
    )  # one byte that is not UTF-8
    (tmp_path / "q.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    loaded = load_psf_rows(tmp_path / "q.jsonl")
    assert [r.qid for r in loaded.rows] == ["q0", "q1", "q4"]
    assert [(p.reason, p.line) for p in loaded.problems] == [("malformed line", 3), ("malformed line", 4)]
    assert "not UTF-8" in loaded.problems[1].detail and "not valid JSON" in loaded.problems[0].detail
    assert loaded.n_read == 5


def test_csv_bad_bytes_and_field_counts_name_their_lines(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    head = ",".join(["qid", *NATIVE]) + "\n"
    good = [",".join([f"q{i}", *("" if v is None else str(v) for v in NATIVE.values())]) for i in range(4)]
    body = [good[0], good[1].replace("cardiomegaly?", "cardiomegal\udcff?"), good[2] + ",extra", good[3]]
    data = (head + "\n".join(body) + "\n").encode("utf-8", errors="surrogateescape")
    (tmp_path / "q.csv").write_bytes(data)
    loaded = load_psf_rows(tmp_path / "q.csv")
    assert [r.qid for r in loaded.rows] == ["q0", "q3"]
    assert [(p.qid, p.line) for p in loaded.problems] == [("line 3", 3), ("line 4", 4)]
    assert "not UTF-8 (column 'question')" in loaded.problems[0].detail
    assert "11 fields, the header has 10" in loaded.problems[1].detail


def test_duplicate_qid_names_its_line(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    recs = [{**NATIVE, "qid": "q"}, {**NATIVE, "qid": "r"}, {**NATIVE, "qid": "q"}]
    (tmp_path / "q.jsonl").write_text(
        "\n" + "".join(json.dumps(r) + "\n" for r in recs)
    )  # a blank first line
    loaded = load_psf_rows(tmp_path / "q.jsonl")
    assert [(p.reason, p.line) for p in loaded.problems] == [("duplicate qid", 4)]
    assert loaded.problems[0].detail.startswith("line 4 repeats")
