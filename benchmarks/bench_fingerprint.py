"""What run fingerprints cost: the weights hash uncached vs cached, and image hashes vs image decoding.

(a) weights: ``cached_sha256`` of one safetensors-sized file the first time (full SHA-256) and again (the
    cache hit: a stat and a JSON read); ratio printed.
(b) images: ``image_fingerprints`` (SHA-256 of each file's bytes) vs ``read_image`` (decode + 8-bit RGB) of
    the same MIMIC-sized JPEGs and VinDr-sized DICOMs; ratio printed, since both happen once per image.

    python benchmarks/bench_fingerprint.py --weights-mb 512 --n-images 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from analyses.data.schema import QuestionRow
from analyses.eval.fingerprint import cached_sha256, image_fingerprints
from hooks.medimage import read_image


def _dicom(path: Path, arr: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import set_pixel_data
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        SecondaryCaptureImageStorage,
        generate_uid(),
    )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    set_pixel_data(ds, arr, "MONOCHROME1", 12)
    ds.WindowCenter, ds.WindowWidth = 2048, 3000
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights-mb", type=int, default=512)
    ap.add_argument("--n-images", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FLIPSCOPE_CACHE"] = str(Path(tmp) / "cache")
        weights = Path(tmp) / "model.safetensors"
        with weights.open("wb") as f:
            for _ in range(args.weights_mb):
                f.write(os.urandom(1 << 20))
        t0 = time.perf_counter()
        first = cached_sha256([weights])
        t1 = time.perf_counter()
        again = cached_sha256([weights])
        t2 = time.perf_counter()
        assert first == again
        print(
            f"(a) weights {args.weights_mb} MB: hash {t1 - t0:.3f} s, cached {1e3 * (t2 - t1):.2f} ms, "
            f"ratio {(t1 - t0) / (t2 - t1):.0f}x"
        )
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.n_images):
            jpg, dcm = Path(tmp) / f"m{i}.jpg", Path(tmp) / f"v{i}.dicom"
            Image.fromarray((rng.random((2544, 3056)) * 255).astype(np.uint8)).save(jpg, quality=90)
            _dicom(dcm, (rng.random((2500, 2048)) * 4095).astype(np.uint16))
            for name, path in ((f"m{i}", jpg), (f"v{i}", dcm)):
                rows.append(
                    QuestionRow(
                        name, name, "Is there X?", "original", None, 1, True, "x", "test", "", str(path)
                    )
                )
        t0 = time.perf_counter()
        image_fingerprints(rows, lambda r: read_image(r.image_path))  # type: ignore[union-attr]
        t1 = time.perf_counter()
        for r in rows:
            read_image(r.image_path)
        t2 = time.perf_counter()
        n = len(rows)
        print(
            f"(b) {n} images ({args.n_images} JPEG 3056x2544, {args.n_images} DICOM 2048x2500 16-bit): "
            f"hash {1e3 * (t1 - t0) / n:.1f} ms/image, decode {1e3 * (t2 - t1) / n:.1f} ms/image, "
            f"hashing is {(t1 - t0) / (t2 - t1):.2f}x the decode time"
        )


if __name__ == "__main__":
    main()
