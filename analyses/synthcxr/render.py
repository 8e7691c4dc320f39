"""Vectorised rendering of SynthCXR cases: geometry masks and the uint8 image.

All drawing happens on a rotated pixel-centre grid (pose jitter), so every mask and the image share one
frame. Finding layers only change pixels inside their own mask; the final [1, 2, 1] blur spreads a change
by at most 1 px, which is why boxes get a 1 px margin. See :mod:`analyses.synthcxr.world` for the data model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from analyses.data.schema import FINDINGS

if TYPE_CHECKING:
    from analyses.synthcxr.world import Case


@lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float64) + 0.5
    px, py = np.meshgrid(c, c)
    return px, py


def _sign(side: str) -> float:
    """-1 for the patient's right (image left), +1 for the patient's left (image right)."""
    return -1.0 if side == "right" else 1.0


def _layout(case: Case, size: int, findings: Mapping[str, bool]) -> dict[str, np.ndarray]:
    """Masks and coordinate fields of one case at ``size`` px with the given findings switched on."""
    a, s = case.anatomy, float(size)
    px, py = _pixel_centres(size)
    th = math.radians(a.angle_deg)
    c = s / 2
    gx = c + math.cos(th) * (px - c) + math.sin(th) * (py - c)
    gy = c - math.sin(th) * (px - c) + math.cos(th) * (py - c)
    cx, A, ya, yb = a.cx * s, a.half_width * s, a.y_apex * s, a.y_base * s
    dx = gx - cx
    sgn = np.where(dx < 0, -1.0, 1.0)
    xh = cx + sgn * A / 2  # centre of each hemithorax
    hemi = (((gx - xh) / (A / 2)) ** 2 + ((gy - yb) / (yb - ya)) ** 2 <= 1) & (gy <= yb)
    med = a.mediastinum * s * (0.8 + 0.4 * np.clip((gy - ya) / (yb - ya), 0, 1))
    at = case.atelectasis
    elev = np.where(sgn == _sign(at.side), at.elevation * s, 0.0) if findings["atelectasis"] else 0.0
    dome_h = np.where(sgn < 0, a.dome_right, a.dome_left) * s
    dome = yb - elev - dome_h * (1 - np.clip(((gx - xh) / (A / 2)) ** 2, 0, 1))
    ctr = a.ctr_enlarged if findings["cardiomegaly"] else a.ctr_normal
    ah, hb = ctr * A, a.heart_half_height * s
    heart = (((gx - (cx + ah / 4)) / ah) ** 2 + ((gy - a.heart_y * s) / hb) ** 2 <= 1) & (gy <= yb)
    lungs = hemi & (gy < dome) & (np.abs(dx) > med)
    cavity = lungs & ~heart  # visible pleural cavity
    out: dict[str, np.ndarray] = {"gx": gx, "gy": gy, "dx": dx, "dome": dome, "med": med}
    out |= {"thorax": hemi, "heart": heart, "lungs": lungs}
    empty = np.zeros_like(hemi)
    ptx = line = empty
    if findings["pneumothorax"]:
        pt = case.pneumothorax
        g, sg = pt.gap * s, _sign(pt.side)
        ex, ax, ay = cx + sg * (A / 2 - g / 2), A / 2 - g / 2, (yb - ya) - g
        r = np.sqrt(((gx - ex) / ax) ** 2 + ((gy - yb) / ay) ** 2)
        grad = np.hypot((gx - ex) / ax**2, (gy - yb) / ay**2) / np.maximum(r, 1e-9)
        dist = (r - 1) / np.maximum(grad, 1e-9)  # approx. pixel distance outside the collapsed lung
        ptx = cavity & (sgn == sg) & (dist >= 0)
        line = ptx & (dist < 1.0)
    out["pneumothorax"], out["ptx_line"] = ptx, line
    lung_vis = cavity & ~ptx
    med0 = a.mediastinum * s

    def centre(side: str, u: float, v: float) -> tuple[float, float]:
        """Nominal point (u, v) of a hemithorax, moved into that side's visible lung if it is not there."""
        return _anchor(
            gx,
            gy,
            lung_vis & (sgn == _sign(side)),
            cx + _sign(side) * (med0 + u * (A - med0)),
            ya + v * (yb - ya),
        )

    if findings["consolidation"]:
        co = case.consolidation
        x0, y0 = centre(co.side, co.u, co.v)
        rr, sig = co.radius * s, 0.6 * co.radius * s
        fld = np.exp(-((gx - x0) ** 2 + (gy - y0) ** 2) / (2 * sig**2))
        for ox, oy in co.lobes:
            fld = fld + np.exp(-((gx - x0 - ox * rr) ** 2 + (gy - y0 - oy * rr) ** 2) / (2 * sig**2))
        out["consolidation"] = (fld > 0.5) & lung_vis & (sgn == _sign(co.side))
    if findings["atelectasis"]:
        x0, y0 = centre(at.side, at.u, at.v)
        phi, L = math.radians(at.angle_deg), at.half_length * s
        t = np.clip(((gx - x0) * math.cos(phi) + (gy - y0) * math.sin(phi)) / L, -1, 1)
        d = np.hypot(gx - x0 - t * L * math.cos(phi), gy - y0 - t * L * math.sin(phi))
        medial_t = -_sign(at.side) * math.copysign(1.0, math.cos(phi))  # t at the medial end
        width = at.thickness * s * (1.0 + 0.8 * (1 + medial_t * t) / 2)
        out["atelectasis"] = (d <= width) & lung_vis & (sgn == _sign(at.side))
    if findings["pleural_effusion"]:
        ef = case.effusion
        sg = _sign(ef.side)
        raised = at.elevation * s if findings["atelectasis"] and at.side == ef.side else 0.0
        y_f = yb - raised - ef.depth * s - ef.meniscus * s * np.clip(sg * dx / A, 0, 1) ** 2
        out["pleural_effusion"] = cavity & (sgn == sg) & (gy >= y_f)
        out["fluid_top"] = y_f
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour binary erosion (pixels outside the image count as outside)."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _anchor(gx: np.ndarray, gy: np.ndarray, allowed: np.ndarray, x0: float, y0: float) -> tuple[float, float]:
    """(x0, y0) if it lies in ``allowed``, else the nearest pixel at least 2 px inside ``allowed``.

    Keeps lesions from vanishing behind the heart or inside a pneumothorax gap.
    """
    inner = _erode(_erode(allowed))
    target = inner if inner.any() else allowed
    if not target.any():
        return x0, y0
    d2 = np.where(target, (gx - x0) ** 2 + (gy - y0) ** 2, np.inf)
    i = int(np.argmin(d2))
    near = np.where(allowed, (gx - x0) ** 2 + (gy - y0) ** 2, np.inf).min()
    if near <= 0.5:  # the nominal point already falls in an allowed pixel
        return x0, y0
    return float(gx.flat[i]), float(gy.flat[i])


def resolve_findings(case: Case, findings: Mapping[str, bool] | None) -> dict[str, bool]:
    """The case's labels with ``findings`` (a partial finding -> bool mapping) applied on top."""
    if findings is None:
        return dict(case.findings)
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; use {FINDINGS}")
    return {f: bool(findings.get(f, case.findings[f])) for f in FINDINGS}


def case_masks(
    case: Case, image_size: int, findings: Mapping[str, bool] | None = None
) -> dict[str, np.ndarray]:
    """Boolean ``[H, W]`` masks: ``thorax``, ``lungs``, ``heart`` and one per rendered finding.

    ``findings`` overrides some labels (e.g. ``{"pleural_effusion": False}``); cardiomegaly's mask is the
    heart. The CTR measured from the masks is (heart column extent) / (thorax column extent).
    """
    on = resolve_findings(case, findings)
    lay = _layout(case, image_size, on)
    out = {k: lay[k] for k in ("thorax", "lungs", "heart")}
    for f in FINDINGS:
        if on[f]:
            out[f] = lay["heart"] if f == "cardiomegaly" else lay[f]
    return out


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge padding (spreads at most 1 px)."""
    p = np.pad(img, 1, mode="edge")
    h = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (h[:-2] + 2 * h[1:-1] + h[2:]) / 4


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise in [0, 1] (coarse Gaussian field, upsampled 4x and blurred)."""
    n = -(-size // 4) + 1
    tex = np.kron(rng.standard_normal((n, n)), np.ones((4, 4)))[:size, :size]
    tex = _blur(_blur(_blur(tex)))
    return np.clip(0.5 + tex / 2.5, 0, 1)


def render_case(
    case: Case, image_size: int, noise_sd: float = 5.0, findings: Mapping[str, bool] | None = None
) -> np.ndarray:
    """Render one case as a uint8 ``[H, W]`` array.

    ``findings`` toggles findings on/off for a counterfactual image of the same patient (same anatomy,
    texture and noise); by default the case's own labels are drawn.
    """
    on = resolve_findings(case, findings)
    lay = _layout(case, image_size, on)
    a, s = case.anatomy, float(image_size)
    gx, gy, dx, dome = lay["gx"], lay["gy"], lay["dx"], lay["dome"]
    adx = np.abs(dx)
    cx, A, ya, yb = a.cx * s, a.half_width * s, a.y_apex * s, a.y_base * s
    rng = np.random.default_rng(list(case.render_key))
    tex, tex2 = _texture(rng, image_size), _texture(rng, image_size)
    noise = rng.standard_normal((image_size, image_size))

    neck = 0.12 * s
    body_hw = neck + (A + 0.09 * s - neck) / (1 + np.exp(-(gy - (ya - 0.01 * s)) / (0.03 * s)))
    body = adx < body_hw
    img = np.where(body, 100 + 18 * np.clip(1 - adx / body_hw, 0, 1), 10.0)
    img = np.where(body & (gy > dome), 150.0, img)  # abdomen below the diaphragm
    lungs, ptx = lay["lungs"], lay["pneumothorax"]
    sgn = np.where(dx < 0, -1.0, 1.0)
    hx, hy = cx + sgn * (lay["med"] + 0.02 * s), ya + 0.5 * (yb - ya)
    theta = np.arctan2(gy - hy, (gx - hx) * sgn)
    vessels = ((1 + np.cos(a.vessel_count * theta + a.vessel_phase)) / 2) ** 4
    vessels *= np.exp(-np.hypot(gx - hx, gy - hy) / (0.22 * s)) * (0.4 + 1.2 * tex)
    lung_val = 48 + 14 * np.clip((gy - ya) / (yb - ya), 0, 1) + 30 * vessels + 8 * tex
    img = np.where(lungs, np.where(ptx, 24.0, lung_val), img)
    mediastinum = (adx <= lay["med"]) & (gy < dome) & (gy > ya - 0.04 * s)
    img = np.where(mediastinum, 148.0, img)
    img = np.where((adx < 0.02 * s) & (gy < ya + 0.2 * s), 95.0, img)  # trachea
    img = np.where(body & (adx < 0.04 * s), img + 20, img)  # spine
    knob = (gx - (cx + a.mediastinum * s)) ** 2 + (gy - (ya + 0.17 * s)) ** 2 < (0.045 * s) ** 2
    img = np.where(knob | lay["heart"], 165.0, img)
    phase = (gy + 0.14 * s * (adx / A) ** 2) / (a.rib_spacing * s) + a.rib_phase
    ribs = ((1 + np.cos(2 * math.pi * phase)) / 2) ** 8
    img = img + ribs * np.where(mediastinum, 10.0, 28.0 * (lungs & ~lay["heart"]))
    for sg in (-1.0, 1.0):  # clavicles: medial end low, lateral end high
        x0, y0, x1, y1 = cx + sg * 0.05 * s, ya + 0.05 * s, cx + sg * 0.4 * s, ya - 0.04 * s
        t = np.clip(((gx - x0) * (x1 - x0) + (gy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        img = np.where(np.hypot(gx - x0 - t * (x1 - x0), gy - y0 - t * (y1 - y0)) < 0.022 * s, img + 40, img)
    img = np.where(lay["ptx_line"], 130.0, img)
    if "consolidation" in lay:
        img = np.where(lay["consolidation"], img + 45 + 40 * tex2, img)
    if "atelectasis" in lay:
        img = np.where(lay["atelectasis"], img + 70, img)
    if "pleural_effusion" in lay:
        fluid = 115 + 35 * np.clip((gy - lay["fluid_top"]) / (0.06 * s), 0, 1)
        img = np.where(lay["pleural_effusion"], fluid, img)
    img = _blur(img * a.gain + a.offset) + noise_sd * noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
