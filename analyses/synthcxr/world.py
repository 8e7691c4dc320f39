"""SynthCXR: a deterministic synthetic chest X-ray world with findings, boxes and questions.

Each image is a crude frontal (PA) chest radiograph drawn with vectorised numpy on a pixel grid:
body outline, two dark lung fields with vessel markings, faint rib arcs, clavicles, mediastinum,
trachea, spine, a bright heart and two diaphragm domes. Five findings follow a clinical rule:

- cardiomegaly: cardiothoracic ratio (heart width / internal thoracic width) > 0.5;
- pleural effusion: bright fluid at the base of one lung with a concave-up meniscus (blunted angle);
- pneumothorax: a thin bright visceral pleural line with dark, marking-free air lateral/apical to it;
- consolidation: a bright patchy opacity inside one lung field;
- atelectasis: a linear/wedge band opacity plus volume loss (a raised hemidiaphragm on that side).

Sides are the patient's: in a PA view the patient's right is on the image's left.
Boxes are VinDr-CXR style pixel boxes with *exclusive* ``x_max``/``y_max``, so the region is
``array[y_min:y_max, x_min:x_max]``; they enclose every pixel the finding changes (1 px margin for blur).

Every random draw is keyed on ``(seed, patient index, image index)`` only, so an image does not depend
on which other images were drawn, on the world's size or on its split. Every case also carries latent
parameters for the findings it does not have: :func:`render_case` with ``findings={...}`` draws the same
patient with findings toggled on or off (counterfactual pairs).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from analyses.data.boxes import BOX_COLUMNS
from analyses.data.questions import make_rows
from analyses.data.schema import FINDINGS, SPLITS, QuestionRow
from analyses.synthcxr.render import case_masks, render_case
from hooks.inputs import Box

__all__ = [
    "Anatomy",
    "Atelectasis",
    "Case",
    "Consolidation",
    "Effusion",
    "Pneumothorax",
    "SynthCXRConfig",
    "SynthCXRWorld",
    "assign_splits",
    "case_boxes",
    "case_masks",
    "render_case",
    "sample_case",
]

SIDES: tuple[str, ...] = ("right", "left")
CTR_THRESHOLD = 0.5
CTR_NORMAL_RANGE = (0.36, 0.46)
CTR_ENLARGED_RANGE = (0.55, 0.68)


@dataclass(frozen=True)
class SynthCXRConfig:
    """Everything that determines a SynthCXR world (same config -> byte-identical images)."""

    image_size: int = 64
    """Height and width of every image in pixels (32..1024)."""
    n_patients: int = 1200
    """Number of patients."""
    images_per_patient: int = 1
    """Studies per patient; they share the anatomy and draw findings independently."""
    seed: int = 0
    """Root seed (non-negative)."""
    prevalence: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FINDINGS, 0.4))
    """Independent probability of each finding; findings left out get 0.4."""
    train_fraction: float = 0.7
    """Share of patients in the train split."""
    val_fraction: float = 0.1
    """Share of patients in the val split."""
    test_fraction: float = 0.2
    """Share of patients in the test split."""
    noise_sd: float = 5.0
    """Standard deviation of the additive Gaussian pixel noise (uint8 units)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "n_patients", "images_per_patient", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"SynthCXRConfig.{name} must be an int, got {value!r}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"SynthCXRConfig.image_size={self.image_size}: use a size in 32..1024 px")
        if self.n_patients < 1:
            raise ValueError(f"SynthCXRConfig.n_patients={self.n_patients}: need at least 1 patient")
        if self.images_per_patient < 1:
            raise ValueError(f"SynthCXRConfig.images_per_patient={self.images_per_patient}: use >= 1")
        if self.seed < 0:
            raise ValueError(f"SynthCXRConfig.seed={self.seed}: numpy seeds must be >= 0")
        unknown = set(self.prevalence) - set(FINDINGS)
        if unknown:
            raise ValueError(f"SynthCXRConfig.prevalence: unknown findings {sorted(unknown)}; use {FINDINGS}")
        prevalence = {f: float(self.prevalence.get(f, 0.4)) for f in FINDINGS}
        for f, p in prevalence.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"SynthCXRConfig.prevalence[{f!r}]={p}: a probability must be in [0, 1]")
        object.__setattr__(self, "prevalence", prevalence)
        fractions = (self.train_fraction, self.val_fraction, self.test_fraction)
        for name, frac in zip(("train_fraction", "val_fraction", "test_fraction"), fractions, strict=True):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"SynthCXRConfig.{name}={frac}: a fraction must be in [0, 1]")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"SynthCXRConfig split fractions train_fraction/val_fraction/test_fraction={fractions} "
                f"sum to {sum(fractions):.4f}; make them sum to 1"
            )
        if not (math.isfinite(self.noise_sd) and self.noise_sd >= 0):
            raise ValueError(f"SynthCXRConfig.noise_sd={self.noise_sd}: use a finite value >= 0")


@dataclass(frozen=True)
class Anatomy:
    """Per-patient geometry; lengths are fractions of the image size."""

    cx: float
    """Midline x of the thorax."""
    y_apex: float
    """Top of the lung apices."""
    y_base: float
    """Level of the costophrenic angles (lowest lung point)."""
    half_width: float
    """Half the internal thoracic width (the CTR denominator is twice this)."""
    mediastinum: float
    """Half width of the mediastinum at mid height."""
    dome_right: float
    """Height of the right hemidiaphragm dome above ``y_base``."""
    dome_left: float
    """Height of the left hemidiaphragm dome above ``y_base``."""
    heart_y: float
    """Vertical centre of the heart."""
    heart_half_height: float
    """Vertical semi-axis of the heart ellipse."""
    ctr_normal: float
    """Cardiothoracic ratio drawn when the image has no cardiomegaly."""
    ctr_enlarged: float
    """Cardiothoracic ratio drawn when the image has cardiomegaly."""
    angle_deg: float
    """In-plane rotation of the patient (pose jitter), degrees."""
    rib_spacing: float
    """Vertical distance between rib arcs."""
    rib_phase: float
    """Phase of the rib pattern in [0, 1)."""
    vessel_count: int
    """Angular frequency of the vessel markings radiating from each hilum."""
    vessel_phase: float
    """Phase of the vessel markings (radians)."""
    gain: float
    """Brightness gain (exposure jitter)."""
    offset: float
    """Brightness offset in uint8 units."""

    def __post_init__(self) -> None:
        if not 0 < self.y_apex < self.y_base < 1:
            raise ValueError(f"Anatomy: need 0 < y_apex < y_base < 1, got {self.y_apex}, {self.y_base}")


@dataclass(frozen=True)
class Effusion:
    """Pleural fluid at one lung base."""

    side: str
    """Patient side, ``right`` or ``left``."""
    depth: float
    """Height of the fluid level above the lowest point of that lung (``y_base``, or the raised base)."""
    meniscus: float
    """Extra rise of the fluid along the lateral chest wall (concave-up meniscus)."""

    def __post_init__(self) -> None:
        _check_side(self.side)


@dataclass(frozen=True)
class Pneumothorax:
    """Air between the chest wall and a collapsed lung."""

    side: str
    """Patient side, ``right`` or ``left``."""
    gap: float
    """Width of the air gap at the lateral wall and the apex."""

    def __post_init__(self) -> None:
        _check_side(self.side)


@dataclass(frozen=True)
class Consolidation:
    """A patchy airspace opacity made of a few overlapping lobes."""

    side: str
    """Patient side, ``right`` or ``left``."""
    u: float
    """Horizontal position: 0 at the mediastinum, 1 at the lateral wall."""
    v: float
    """Vertical position: 0 at the apex, 1 at the costophrenic level."""
    radius: float
    """Size of each lobe."""
    lobes: tuple[tuple[float, float], ...]
    """Offsets of the extra lobes from the centre, in units of ``radius``."""

    def __post_init__(self) -> None:
        _check_side(self.side)


@dataclass(frozen=True)
class Atelectasis:
    """A plate/wedge band opacity plus an elevated hemidiaphragm on the same side."""

    side: str
    """Patient side, ``right`` or ``left``."""
    u: float
    """Horizontal position of the band centre (0 medial .. 1 lateral)."""
    v: float
    """Vertical position of the band centre (0 apex .. 1 costophrenic level)."""
    angle_deg: float
    """Tilt of the band from horizontal, degrees."""
    half_length: float
    """Half the band length."""
    thickness: float
    """Half thickness of the band at its thin end (the medial end is thicker: a wedge)."""
    elevation: float
    """How far the hemidiaphragm on this side is raised (volume loss)."""

    def __post_init__(self) -> None:
        _check_side(self.side)


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


@dataclass
class Case:
    """One image: labels, boxes, and every parameter needed to render it."""

    image_id: str
    """Image id, ``p<patient>_<study>``."""
    patient_id: str
    """Patient id; splits are disjoint by patient."""
    split: str
    """``train``, ``val`` or ``test``."""
    findings: dict[str, bool]
    """Label of every finding in :data:`FINDINGS`."""
    ctr: float
    """Cardiothoracic ratio of the rendered heart; ``findings['cardiomegaly'] == (ctr > 0.5)``."""
    effusion_side: str | None
    """Patient side of the effusion, ``None`` without effusion."""
    boxes: list[Box]
    """One box per positive finding, none for negatives."""
    anatomy: Anatomy
    """Patient geometry and exposure."""
    effusion: Effusion
    """Effusion parameters (latent when the finding is absent)."""
    pneumothorax: Pneumothorax
    """Pneumothorax parameters (latent when absent)."""
    consolidation: Consolidation
    """Consolidation parameters (latent when absent)."""
    atelectasis: Atelectasis
    """Atelectasis parameters (latent when absent)."""
    render_key: tuple[int, ...]
    """Seed sequence of the texture and noise generator."""

    def __post_init__(self) -> None:
        if set(self.findings) != set(FINDINGS):
            raise ValueError(f"Case {self.image_id}: findings must label exactly {FINDINGS}")
        if self.split not in SPLITS:
            raise ValueError(f"Case {self.image_id}: split must be one of {SPLITS}, got {self.split!r}")
        if self.findings["cardiomegaly"] != (self.ctr > CTR_THRESHOLD):
            raise ValueError(f"Case {self.image_id}: cardiomegaly must equal ctr > {CTR_THRESHOLD}")
        expected_side = self.effusion.side if self.findings["pleural_effusion"] else None
        if self.effusion_side != expected_side:
            raise ValueError(f"Case {self.image_id}: effusion_side must be {expected_side!r}")


def sample_case(cfg: SynthCXRConfig, patient_index: int, image_index: int, split: str) -> Case:
    """Draw one case (without boxes) from ``(cfg.seed, patient_index, image_index)`` alone."""
    p = np.random.default_rng([cfg.seed, 0, patient_index])
    anatomy = Anatomy(
        cx=0.5 + p.uniform(-0.03, 0.03),
        y_apex=0.13 + p.uniform(-0.02, 0.02),
        y_base=0.80 + p.uniform(-0.03, 0.03),
        half_width=0.37 * p.uniform(0.92, 1.05),
        mediastinum=0.075 * p.uniform(0.9, 1.1),
        dome_right=p.uniform(0.065, 0.09),
        dome_left=p.uniform(0.05, 0.075),
        heart_y=0.0,
        heart_half_height=p.uniform(0.11, 0.14),
        ctr_normal=p.uniform(*CTR_NORMAL_RANGE),
        ctr_enlarged=p.uniform(*CTR_ENLARGED_RANGE),
        angle_deg=p.uniform(-3.0, 3.0),
        rib_spacing=p.uniform(0.075, 0.09),
        rib_phase=p.uniform(0, 1),
        vessel_count=int(p.integers(12, 17)),
        vessel_phase=p.uniform(0, 2 * math.pi),
        gain=p.uniform(0.88, 1.12),
        offset=p.uniform(-10, 10),
    )
    anatomy = replace(anatomy, heart_y=anatomy.y_base - p.uniform(0.11, 0.14))
    r = np.random.default_rng([cfg.seed, 1, patient_index, image_index])
    present = {f: bool(r.random() < cfg.prevalence[f]) for f in FINDINGS}

    def side() -> str:
        return SIDES[int(r.integers(2))]

    effusion = Effusion(side(), depth=r.uniform(0.07, 0.18), meniscus=r.uniform(0.06, 0.12))
    pneumothorax = Pneumothorax(side(), gap=r.uniform(0.055, 0.1))
    consolidation = Consolidation(
        side(),
        u=r.uniform(0.4, 0.75),
        v=r.uniform(0.3, 0.6),
        radius=r.uniform(0.06, 0.09),
        lobes=tuple((float(a), float(b)) for a, b in r.uniform(-1.0, 1.0, size=(2, 2))),
    )
    atelectasis = Atelectasis(
        side(),
        u=r.uniform(0.45, 0.7),
        v=r.uniform(0.5, 0.66),
        angle_deg=r.uniform(-20, 20),
        half_length=r.uniform(0.08, 0.13),
        thickness=r.uniform(0.014, 0.024),
        elevation=r.uniform(0.03, 0.06),
    )
    ctr = anatomy.ctr_enlarged if present["cardiomegaly"] else anatomy.ctr_normal
    return Case(
        image_id=f"p{patient_index:05d}_{image_index}",
        patient_id=f"p{patient_index:05d}",
        split=split,
        findings=present,
        ctr=float(ctr),
        boxes=[],
        effusion_side=effusion.side if present["pleural_effusion"] else None,
        anatomy=anatomy,
        effusion=effusion,
        pneumothorax=pneumothorax,
        consolidation=consolidation,
        atelectasis=atelectasis,
        render_key=(cfg.seed, 2, patient_index, image_index),
    )


def _bbox(image_id: str, name: str, mask: np.ndarray, pad: int = 1) -> Box:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise RuntimeError(f"{image_id}: finding {name!r} is labelled present but renders nothing")
    h, w = mask.shape
    return Box(
        image_id,
        name,
        max(int(cols[0]) - pad, 0),
        max(int(rows[0]) - pad, 0),
        min(int(cols[-1]) + 1 + pad, w),
        min(int(rows[-1]) + 1 + pad, h),
    )


def case_boxes(case: Case, image_size: int, findings: Mapping[str, bool] | None = None) -> list[Box]:
    """One box per present finding, enclosing every pixel the finding changes (incl. the 1 px blur)."""
    masks = case_masks(case, image_size, findings)
    return [_bbox(case.image_id, f, masks[f]) for f in FINDINGS if f in masks]


def assign_splits(cfg: SynthCXRConfig) -> list[str]:
    """Split of each patient: a seeded permutation cut at the configured fractions."""
    n = cfg.n_patients
    order = np.random.default_rng([cfg.seed, 3]).permutation(n)
    n_train = round(cfg.train_fraction * n)
    n_val = min(round(cfg.val_fraction * n), n - n_train)
    labels = ["test"] * n
    for rank, patient in enumerate(order):
        labels[patient] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return labels


class SynthCXRWorld:
    """A whole synthetic dataset: cases, lazily rendered images, boxes and question rows."""

    def __init__(self, config: SynthCXRConfig | None = None, cache_size: int = 4096) -> None:
        self.config = config or SynthCXRConfig()
        cfg = self.config
        splits = assign_splits(cfg)
        self.cases: list[Case] = []
        for p in range(cfg.n_patients):
            for k in range(cfg.images_per_patient):
                case = sample_case(cfg, p, k, splits[p])
                case.boxes.extend(case_boxes(case, cfg.image_size))
                self.cases.append(case)
        self._by_id = {c.image_id: c for c in self.cases}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self.cases)

    def case(self, image_id: str) -> Case:
        """The case of one image id."""
        try:
            return self._by_id[image_id]
        except KeyError:
            raise KeyError(f"no image {image_id!r} in this world ({len(self.cases)} images)") from None

    def image_ids(self, split: str | None = None) -> list[str]:
        """Image ids, optionally of one split."""
        return [c.image_id for c in self.cases if split is None or c.split == split]

    def array(self, image_id: str, findings: Mapping[str, bool] | None = None) -> np.ndarray:
        """uint8 ``[H, W]`` grayscale image; ``findings`` renders a counterfactual (not cached)."""
        case = self.case(image_id)
        if findings is not None:
            return render_case(case, self.config.image_size, self.config.noise_sd, findings)
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        arr = render_case(case, self.config.image_size, self.config.noise_sd)
        arr.setflags(write=False)
        self._cache[image_id] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr

    def image(self, image_id: str, findings: Mapping[str, bool] | None = None) -> Image.Image:
        """The image as PIL RGB (grayscale replicated to three channels)."""
        return Image.fromarray(np.ascontiguousarray(self.array(image_id, findings))).convert("RGB")

    def image_for(self, row_or_id: QuestionRow | str) -> Image.Image:
        """Image source for the evaluator: the RGB image of a row's ``image_id`` (or of an id)."""
        return self.image(row_or_id if isinstance(row_or_id, str) else row_or_id.image_id)

    def masks(self, image_id: str, findings: Mapping[str, bool] | None = None) -> dict[str, np.ndarray]:
        """Anatomy and finding masks of one image (see :func:`case_masks`)."""
        return case_masks(self.case(image_id), self.config.image_size, findings)

    def boxes(self) -> pd.DataFrame:
        """All boxes as a VinDr-CXR table (columns :data:`BOX_COLUMNS`, max exclusive)."""
        records = [asdict(b) for c in self.cases for b in c.boxes]
        return pd.DataFrame.from_records(records, columns=list(BOX_COLUMNS))

    def rows(
        self, split: str | None = None, templates_per_family: int = 1, all_templates: bool = False
    ) -> list[QuestionRow]:
        """Question rows for every image (or one split); template choice is seeded by the config."""
        return [
            row
            for c in self.cases
            if split is None or c.split == split
            for row in make_rows(c, None, self.config.seed, templates_per_family, all_templates=all_templates)
        ]

    def save(self, folder: str | Path, templates_per_family: int = 1, all_templates: bool = False) -> Path:
        """Write ``images/<id>.png`` (grayscale), ``boxes.csv``, ``questions.jsonl``, ``cases.jsonl``
        and ``world.json`` under ``folder``; question rows get ``image_path`` relative to ``folder``."""
        root = Path(folder)
        (root / "images").mkdir(parents=True, exist_ok=True)
        for c in self.cases:
            png = root / "images" / f"{c.image_id}.png"
            Image.fromarray(np.ascontiguousarray(self.array(c.image_id))).save(png)
        self.boxes().to_csv(root / "boxes.csv", index=False)
        with open(root / "questions.jsonl", "w") as fh:
            for row in self.rows(None, templates_per_family, all_templates):
                fh.write(json.dumps(replace(row, image_path=f"images/{row.image_id}.png").to_dict()) + "\n")
        with open(root / "cases.jsonl", "w") as fh:
            for c in self.cases:
                fh.write(json.dumps(asdict(c)) + "\n")
        meta = {
            "generator": "analyses.synthcxr",
            "config": asdict(self.config),
            "n_images": len(self.cases),
            "box_format": "VinDr-CXR pixel boxes, x_max/y_max exclusive",
            "sides": "patient sides; PA view, patient right = image left",
        }
        (root / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
        return root

    @classmethod
    def load(cls, folder: str | Path) -> SynthCXRWorld:
        """Rebuild the world saved in ``folder`` from its ``world.json`` (generation is deterministic)."""
        meta = json.loads((Path(folder) / "world.json").read_text())
        names = {f.name for f in fields(SynthCXRConfig)}
        return cls(SynthCXRConfig(**{k: v for k, v in meta["config"].items() if k in names}))
