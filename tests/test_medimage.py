"""Medical image files: DICOM (windowing, VOI LUT, rescale, MONOCHROME1) and 16-bit PNG to 8-bit RGB.

Every file is written here (pydicom writes DICOM) and every expected pixel is computed by hand from the
DICOM formulas (PS3.3 C.11.2.1.2), rounded half up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analyses.data.psf import load_psf_rows
from hooks.inputs import load_image
from hooks.medimage import is_dicom, read_image, verify_image, window_to_uint8

PIXELS = np.array([[0, 1000, 2000], [2500, 3000, 4095]], np.uint16)


def write_dicom(
    path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12, **attrs
) -> Path:  # type: ignore[no-untyped-def]
    """A minimal single-frame secondary-capture DICOM file with ``arr`` as its pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import set_pixel_data
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    set_pixel_data(ds, arr, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def gray(path: Path) -> np.ndarray:
    im = read_image(path)
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def test_dicom_linear_window(tmp_path: Path) -> None:
    # c = 2000, w = 1001: x <= 1499.5 -> 0, x > 2499.5 -> 255, else ((x - 1999.5) / 1000 + 0.5) * 255
    path = write_dicom(tmp_path / "a.dcm", PIXELS, WindowCenter=2000, WindowWidth=1001)
    assert gray(path).tolist() == [[0, 0, 128], [255, 255, 255]]  # 2000 -> 127.6275 -> 128
    assert is_dicom(path) and verify_image(path) == ""


def test_monochrome1_is_inverted_and_min_max_without_window(tmp_path: Path) -> None:
    # no window: min..max (0..4095) onto 0..255, then 255 - y (MONOCHROME1: low values are white)
    path = write_dicom(tmp_path / "b.dicom", PIXELS, "MONOCHROME1")
    expected = 255 - np.floor(PIXELS / 4095 * 255 + 0.5)
    assert gray(path).tolist() == expected.astype(int).tolist() == [[255, 193, 130], [99, 68, 0]]


def test_rescale_then_window_and_multi_valued_window(tmp_path: Path) -> None:
    # modality LUT first: y = 2x - 1000 (0 -> -1000, 1000 -> 1000, 2000 -> 3000, ...), then the first of
    # two windows, c = 1000, w = 2001: y <= -0.5 -> 0, y > 1999.5 -> 255, 1000 -> (0.5 / 2000 + 0.5) * 255
    path = write_dicom(
        tmp_path / "c.dcm",
        PIXELS,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=[1000, 40],
        WindowWidth=[2001, 400],
    )
    x = PIXELS.astype(float) * 2 - 1000
    c, w = 1000.0, 2001.0
    y = np.where(
        x <= c - 0.5 - (w - 1) / 2,
        0,
        np.where(x > c - 0.5 + (w - 1) / 2, 255, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255),
    )
    assert gray(path).tolist() == np.floor(y + 0.5).astype(int).tolist() == [[0, 128, 255], [255, 255, 255]]


def test_voi_lut_sequence_wins_over_the_window(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.add_new(0x00283002, "US", [4, 1000, 16])  # LUTDescriptor: 4 entries from input 1000, 16-bit output
    lut.add_new(0x00283006, "US", [100, 200, 300, 500])  # LUTData
    path = write_dicom(tmp_path / "d.dcm", np.array([[0, 1000, 1001], [1002, 1003, 4095]], np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.VOILUTSequence = Sequence([lut])
    ds.WindowCenter, ds.WindowWidth = 0, 1  # ignored: the LUT is preferred
    ds.save_as(path)
    # LUT output 100..500 -> 0..255; inputs below the first entry take the first value, above the last the last
    out = [[100, 100, 200], [300, 500, 500]]
    assert gray(path).tolist() == [[int(np.floor((v - 100) / 400 * 255 + 0.5)) for v in r] for r in out]


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        # LINEAR_EXACT c=2000 w=1000: x <= 1500 -> 0, x > 2500 -> 255, else ((x - 2000) / 1000 + 0.5) * 255
        ("LINEAR_EXACT", [[0, 0, 128], [255, 255, 255]]),
        # SIGMOID c=2000 w=1000: 255 / (1 + exp(-4 (x - 2000) / 1000))
        ("SIGMOID", [[0, 5, 128], [225, 250, 255]]),
    ],
)
def test_other_voi_functions(tmp_path: Path, fn: str, expected: list[list[int]]) -> None:
    path = write_dicom(tmp_path / f"{fn}.dcm", PIXELS, WindowCenter=2000, WindowWidth=1000, VOILUTFunction=fn)
    got = gray(path).tolist()
    assert got == expected
    if fn == "SIGMOID":
        x = PIXELS.astype(float)
        assert got == np.floor(255 / (1 + np.exp(-4 * (x - 2000) / 1000)) + 0.5).astype(int).tolist()
    with pytest.raises(ValueError, match="VOILUTFunction"):
        window_to_uint8(PIXELS, 2000, 1000, "GAMMA")


def test_16bit_png_is_windowed_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[1000, 2000], [3000, 41000]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode.startswith("I")  # PIL sees 16 bits ...
    clipped = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))[..., 0]
    assert clipped.tolist() == [[255, 255], [255, 255]]  # ... and its own convert clips them all to white
    expected = np.floor((arr - 1000) / 40000 * 255 + 0.5).astype(int)  # min..max onto 0..255
    assert gray(tmp_path / "p.png").tolist() == expected.tolist() == [[0, 6], [13, 255]]
    assert np.asarray(load_image(tmp_path / "p.png"))[..., 0].tolist() == expected.tolist()
    assert np.asarray(load_image(Image.open(tmp_path / "p.png")))[..., 0].tolist() == expected.tolist()
    assert np.asarray(load_image(arr))[..., 0].tolist() == expected.tolist()


def test_8bit_images_are_unchanged(tmp_path: Path) -> None:
    arr = np.array([[0, 7, 200], [255, 128, 3]], np.uint8)
    Image.fromarray(arr).save(tmp_path / "e.png")
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "e.jpg", quality=100)
    assert gray(tmp_path / "e.png").tolist() == arr.tolist()
    assert np.asarray(read_image(tmp_path / "e.jpg")).shape == (2, 3, 3)


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image file not found"):
        read_image(tmp_path / "none.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ValueError, match=r"junk\.dcm"):
        read_image(tmp_path / "junk.dcm")
    assert verify_image(tmp_path / "junk.dcm") != ""
    path = write_dicom(tmp_path / "multi.dcm", np.zeros((2, 3, 4), np.uint16), NumberOfFrames=2)
    with pytest.raises(ValueError, match="2 frames"):
        read_image(path)


def test_psf_file_with_dicom_and_16bit_png_images(tmp_path: Path) -> None:
    """A question file whose images are a DICOM and a 16-bit PNG loads both, windowed."""
    (tmp_path / "imgs").mkdir()
    write_dicom(tmp_path / "imgs" / "v1.dicom", PIXELS, "MONOCHROME1")
    Image.fromarray(np.array([[1000, 2000], [3000, 41000]], np.uint16)).save(tmp_path / "imgs" / "pc.png")
    rows = []
    for image_id, path in (("v1", "imgs/v1.dicom"), ("pc", "imgs/pc.png")):
        rows.append(
            {"qid": image_id, "image_id": image_id, "question": "Is there cardiomegaly?", "family": "original",
             "paraphrase_of": None, "polarity": 1, "ground_truth": "yes", "finding": "cardiomegaly",
             "split": "test", "image_path": path}
        )  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_psf_rows(tmp_path / "q.jsonl")
    assert loaded.skipped == {} and [r.qid for r in loaded.rows] == ["v1", "pc"]
    assert np.asarray(loaded.image_for("v1"))[..., 0].tolist() == [[255, 193, 130], [99, 68, 0]]
    assert np.asarray(loaded.image_for("pc"))[..., 0].tolist() == [[0, 6], [13, 255]]


def test_truncated_files_fail_the_load_check(tmp_path: Path) -> None:
    """A truncated JPEG or DICOM passes a header check; the load check decodes, so it fails there and the
    DICOM reason is the decoder's, not a missing-decoder note (issue: 48 rows lost mid-run)."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as im:
        im.verify()  # what the old header-only check did: it passes
    assert verify_image(tmp_path / "full.jpg") == ""
    assert "truncated" in verify_image(tmp_path / "cut.jpg").lower()
    path = write_dicom(tmp_path / "full.dcm", (rng.random((64, 64)) * 4095).astype(np.uint16))
    raw = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) - 2000])
    reason = verify_image(tmp_path / "cut.dcm")
    assert reason != "" and "pylibjpeg" not in reason
