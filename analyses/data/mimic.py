"""MIMIC-CXR-JPG: image paths from the metadata table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def mimic_image_paths(
    metadata_csv: str | Path, root: str | Path, views: Sequence[str] | None = None
) -> pd.DataFrame:
    """Image paths of MIMIC-CXR-JPG from ``mimic-cxr-2.0.0-metadata.csv``.

    Path: ``root/files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg``. Columns:
    ``image_id`` (dicom_id), ``patient_id`` (subject_id), ``study_id``, ``view`` (ViewPosition, ``""``
    if missing), ``image_path``, ``exists``. ``views`` (e.g. ``("PA", "AP")``) keeps only those views.
    """
    meta = pd.read_csv(metadata_csv, dtype=str, keep_default_na=False)
    need = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
    missing = [c for c in need if c not in meta.columns]
    if missing:
        raise ValueError(f"{metadata_csv} lacks columns {missing}; MIMIC-CXR-JPG metadata has {need}")
    meta = meta.apply(lambda s: s.str.strip())
    if views is not None:
        meta = meta[meta["ViewPosition"].isin(list(views))]
    base = Path(root).expanduser()
    paths = [
        str(base / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
        for d, s, st in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"], strict=True)
    ]
    out = meta[["dicom_id", "subject_id", "study_id", "ViewPosition"]].reset_index(drop=True)
    out.columns = pd.Index(["image_id", "patient_id", "study_id", "view"])
    return out.assign(image_path=paths, exists=[Path(p).is_file() for p in paths])
