"""Bounding-box tables in the VinDr-CXR layout: reading them, and the boxes of one image.

A box table has one row per box with columns :data:`BOX_COLUMNS` (pixel coordinates of the original
image, ``x_max``/``y_max`` exclusive); SynthCXR writes the same layout (``SynthCXRWorld.boxes()``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from hooks.inputs import Box

log = logging.getLogger(__name__)

#: Columns of a VinDr-CXR box table, in order (the fields of :class:`hooks.inputs.Box`).
BOX_COLUMNS: tuple[str, ...] = ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max")
#: VinDr-CXR class name of each flipscope finding key.
VINDR_CLASS_NAMES: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "atelectasis": "Atelectasis",
}


def load_vindr_boxes(path: str | Path, class_map: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A VinDr-CXR annotations CSV as a box table with columns :data:`BOX_COLUMNS` (+ ``rad_id`` if present).

    Drops and counts "No finding" rows, rows with missing coordinates and invalid boxes (need
    0 <= x_min < x_max and 0 <= y_min < y_max); the counts are in ``df.attrs["dropped"]``.
    ``class_map`` renames class names (default: VinDr name -> flipscope finding key, e.g.
    ``"Pleural effusion" -> "pleural_effusion"``); unmapped classes keep their VinDr name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"box file not found: {path}")
    raw = pd.read_csv(path, dtype={"image_id": str, "class_name": str, "rad_id": str})
    missing = [c for c in BOX_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; a VinDr-CXR box table has {list(BOX_COLUMNS)}")
    cols = [*BOX_COLUMNS, *(["rad_id"] if "rad_id" in raw.columns else [])]
    df = raw[cols].copy()
    coords = list(BOX_COLUMNS[2:])
    for c in coords:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    no_finding = df["class_name"].fillna("").str.strip().str.lower().eq("no finding")
    no_coords = ~no_finding & df[coords].isna().any(axis=1)
    ok = ~no_finding & ~no_coords
    invalid = ok & ~(
        (df["x_min"] >= 0) & (df["y_min"] >= 0) & (df["x_min"] < df["x_max"]) & (df["y_min"] < df["y_max"])
    )
    out = df[ok & ~invalid].reset_index(drop=True)
    cmap = dict(class_map) if class_map is not None else {v: k for k, v in VINDR_CLASS_NAMES.items()}
    out["class_name"] = out["class_name"].map(lambda c: cmap.get(c, c))
    dropped = {"no finding": no_finding, "missing coordinates": no_coords, "invalid box": invalid}
    out.attrs["dropped"] = {k: int(v.sum()) for k, v in dropped.items()}
    out.attrs["invalid_image_ids"] = df.loc[invalid, "image_id"].tolist()
    log.info("%s: kept %d boxes, dropped %s", path, len(out), out.attrs["dropped"])
    return out


def boxes_for(image_id: str, boxes_df: pd.DataFrame, class_name: str | None = None) -> list[Box]:
    """The boxes of one image (optionally of one class), in table order."""
    sel = boxes_df[boxes_df["image_id"].astype(str) == str(image_id)]
    if class_name is not None:
        sel = sel[sel["class_name"] == class_name]
    return [
        Box(
            str(r.image_id), str(r.class_name), float(r.x_min), float(r.y_min), float(r.x_max), float(r.y_max)
        )
        for r in sel.itertuples(index=False)
    ]
