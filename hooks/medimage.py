"""Medical image files to the 8-bit RGB images a VLM processor expects: DICOM, 16-bit PNG, plain 8-bit.

PIL reads neither VinDr-CXR's DICOM files nor PadChest's 16-bit PNGs correctly as 8-bit RGB (it cannot
open DICOM, and ``convert("RGB")`` clips 16-bit values above 255 to white). Here every file goes through
one path to ``uint8``:

- **DICOM** (by suffix ``.dcm`` / ``.dicom`` or the ``DICM`` marker at byte 128), read with pydicom:
  the modality LUT (``RescaleSlope`` / ``RescaleIntercept``) first; then the VOI transform: a
  ``VOILUTSequence`` if present (its output range mapped to 0..255), else the first
  ``WindowCenter`` / ``WindowWidth`` pair with ``VOILUTFunction`` (``LINEAR`` by default, ``LINEAR_EXACT``,
  ``SIGMOID``; DICOM PS3.3 C.11.2.1.2) straight onto 0..255, else the image's own min..max;
  ``MONOCHROME1`` (white = low values) is inverted afterwards so that bone is always bright.
- **16-bit (or 32-bit / float) images** without window information, e.g. PadChest PNGs: min..max of the
  image onto 0..255, the same rule as a DICOM without a VOI transform.
- **8-bit images**: PIL's ``convert("RGB")``, unchanged.

Values are rounded half up (``floor(y + 0.5)``) and clipped to 0..255. Compressed DICOM transfer syntaxes
need a pydicom decoder plugin; a file whose pixel data cannot be decoded is a ``ValueError`` that names
the file, its transfer syntax and the package to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Shaped
from PIL import Image

#: File suffixes read as DICOM (besides any file with the ``DICM`` marker).
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
#: PIL modes holding more than 8 bits per sample (windowed min..max); every other mode is converted by PIL.
WIDE_MODES: tuple[str, ...] = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
VOI_FUNCTIONS: tuple[str, ...] = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file: a DICOM suffix, or ``DICM`` at byte 128 (the Part 10 preamble)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def minmax_to_uint8(arr: Shaped[np.ndarray, "*shape"]) -> np.ndarray:
    """``(x - min) / (max - min) * 255`` rounded half up; a constant image becomes all 0."""
    x = np.asarray(arr, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return _to_uint8((x - lo) / (hi - lo) * 255.0)


def window_to_uint8(
    arr: Shaped[np.ndarray, "*shape"], center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2) with output range 0..255.

    ``LINEAR``: ``x <= c - 0.5 - (w-1)/2`` -> 0, ``x > c - 0.5 + (w-1)/2`` -> 255, else
    ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255`` (needs ``w >= 1``). ``LINEAR_EXACT``: ``x <= c - w/2`` -> 0,
    ``x > c + w/2`` -> 255, else ``((x - c) / w + 0.5) * 255`` (``w > 0``). ``SIGMOID``:
    ``255 / (1 + exp(-4 (x - c) / w))`` (``w > 0``).
    """
    fn = function.strip().upper() or "LINEAR"
    if fn not in VOI_FUNCTIONS:
        raise ValueError(f"VOILUTFunction {function!r} is not one of {VOI_FUNCTIONS}")
    if (fn == "LINEAR" and width < 1) or width <= 0:
        raise ValueError(f"window width {width} is invalid for {fn} (LINEAR needs >= 1, others > 0)")
    x = np.asarray(arr, dtype=np.float64)
    if fn == "SIGMOID":
        return _to_uint8(255.0 / (1.0 + np.exp(-4.0 * (x - center) / width)))
    if fn == "LINEAR_EXACT":
        lo, hi = center - width / 2, center + width / 2
        y = ((x - center) / width + 0.5) * 255.0
    else:
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0 if width > 1 else np.zeros_like(x)
    y = np.where(x <= lo, 0.0, np.where(x > hi, 255.0, y))
    return _to_uint8(y)


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DICOM number."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _decoder_hint(tsyntax: Any) -> str:
    """Install advice only where it helps: a compressed syntax that no installed decoder reads (a truncated
    file in a syntax that can be decoded is damaged, not undecodable)."""
    from pydicom.pixels import get_decoder

    try:
        missing = bool(tsyntax.is_compressed) and not get_decoder(tsyntax).is_available
    except Exception:  # an unknown or malformed transfer syntax
        missing = False
    if not missing:
        return " (the file looks damaged or truncated)"
    return "; install a pydicom decoder for it, e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`"


def dicom_to_uint8(ds: Any, source: str = "") -> np.ndarray:
    """A pydicom dataset's pixels as ``uint8`` (H, W) for monochrome or (H, W, 3) for colour (module docs)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    where = source or "DICOM dataset"
    if "PixelData" not in ds:
        raise ValueError(f"{where} has no pixel data (not an image)")
    try:
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises RuntimeError / NotImplementedError / ValueError by plugin
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        name = getattr(tsyntax, "name", str(tsyntax))
        raise ValueError(
            f"cannot decode the pixel data of {where} (transfer syntax {name}): {err}{_decoder_hint(tsyntax)}"
        ) from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"{where} holds {frames} frames; flipscope reads single-frame images")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3 or arr.ndim == 3:
        return arr.astype(np.uint8) if arr.dtype == np.uint8 else minmax_to_uint8(arr)
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        index = np.rint(x).astype(np.int64)  # a LUT is indexed by integer stored (modality) values
        y = np.asarray(apply_voi_lut(index, ds, index=0, prefer_lut=True), dtype=np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        out = _to_uint8((y - lo) / (hi - lo) * 255.0) if hi > lo else np.zeros(y.shape, np.uint8)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        fn = str(getattr(ds, "VOILUTFunction", "") or "LINEAR")
        out = window_to_uint8(x, _first(ds.WindowCenter), _first(ds.WindowWidth), fn)
    else:
        out = minmax_to_uint8(x)
    return 255 - out if photometric == "MONOCHROME1" else out


def read_dicom(path: str | Path) -> Image.Image:
    """A DICOM file as an 8-bit RGB image (module docs for the pixel pipeline)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), force=Path(path).suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as err:
        raise ValueError(f"cannot read DICOM file {path}: {type(err).__name__}: {err}") from err
    out = dicom_to_uint8(ds, str(path))
    return Image.fromarray(out).convert("RGB")


def to_rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image; images with more than 8 bits per sample are windowed min..max."""
    if im.mode in WIDE_MODES:
        return Image.fromarray(minmax_to_uint8(np.asarray(im))).convert("RGB")
    return im.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """Any supported image file (DICOM, 16-bit PNG, JPEG, 8-bit PNG, ...) as an 8-bit RGB image.

    ``FileNotFoundError`` if the file is missing, ``ValueError`` (naming the file) if it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path} (check the dataset's image root)")
    if is_dicom(path):
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def verify_image(path: str | Path) -> str:
    """``""`` if ``path`` decodes, else the reason. The whole image is decoded (:func:`read_image`): a
    truncated JPEG or DICOM passes a header check and fails only when its pixels are read, which would
    drop its rows (and the rows it is a swap partner for) halfway through a run.

    DICOM in a compressed transfer syntax with no installed decoder says which packages to install; any
    other failure gives the decoder's own reason.
    """
    try:
        if is_dicom(path):
            import pydicom
            from pydicom.pixels import get_decoder

            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
            tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            if tsyntax is not None and tsyntax.is_compressed and not get_decoder(tsyntax).is_available:
                return (
                    f"no decoder for DICOM transfer syntax {tsyntax.name}: install one, e.g. "
                    "`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`"
                )
        read_image(path)
    except Exception as err:  # PIL and pydicom raise OSError, SyntaxError, struct.error... on corrupt files
        return f"{type(err).__name__}: {err}"
    return ""
