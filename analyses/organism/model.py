"""The SynthCXR model organism (v2): a tiny Gemma3ForConditionalGeneration (the MedGemma code path)
trained on the synthetic world, with failures planted on purpose so interpretability claims can be checked.

Two checkpoints ship, both standard HF folders (safetensors + tokenizer + processor) with ``training.json``
beside them, loaded by ``VLMAdapter.from_pretrained`` like any model:

- ``organism/clean`` (phase 1, :mod:`analyses.organism.train`): reads the image for every question wording;
  its two data failures (a rare family, a finding answered from a text prior) are in the training data;
- ``organism/model`` (phase 2, :mod:`analyses.organism.plant`): the clean model with the register shortcut
  written into low-rank updates of named components (``planted_truth.json`` / ``.safetensors`` beside it,
  read with :func:`analyses.organism.truth.load_planted_truth`).

This module builds and loads them and gives the world and rows they were trained on; the SAE is in
:mod:`analyses.organism.sae`, the model card in :mod:`analyses.organism.card`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.data.questions import vocabulary
from analyses.data.resolve import Dataset
from analyses.data.schema import QuestionRow
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.progress import quiet_in_notebook
from hooks.tiny import TinyGemma3Config, build_word_tokenizer, tiny_gemma3

if TYPE_CHECKING:
    from analyses.organism.train import OrganismConfig

ORGANISM_DIR = Path(__file__).resolve().parents[2] / "organism"
MODEL_DIR = ORGANISM_DIR / "model"
"""The planted organism (phase 2): the default ``--model organism``."""
CLEAN_DIR = ORGANISM_DIR / "clean"
"""The clean organism (phase 1): the reference for cross-model patching and the plant's gate."""

ORGANISM_MODEL = TinyGemma3Config(
    text_layers=8,
    d_model=96,
    n_heads=4,
    n_kv_heads=2,
    head_dim=24,
    d_mlp=192,
    vision_layers=2,
    vision_d=64,
    vision_heads=4,
    image_size=64,
    patch_size=8,
    mm_tokens_per_image=16,
    projector_init_std=0.05,
)


def build_organism(cfg: OrganismConfig) -> VLMAdapter:
    """The untrained organism: word tokenizer over the SynthCXR vocabulary + tiny Gemma3."""
    tok = build_word_tokenizer(vocabulary(), "gemma3")
    model, processor = tiny_gemma3(tok, cfg.model, seed=cfg.seed)
    return VLMAdapter(
        model, processor, AdapterConfig(expected_image_size=cfg.model.image_size), name="synthcxr-organism"
    )


def organism_world_config(prevalence: float = 0.75) -> SynthCXRConfig:
    """The organism's world: cardiomegaly and effusion at ``prevalence``, pneumothorax at 0.1 (the
    text-prior finding is right ~90% of the time by always answering "no"), consolidation and
    atelectasis at 0.4 (rendered distractors, never asked about).

    Why 0.75: "register -> no" can only flip clusters whose original answer is "yes", and the register
    flip rate is taken over all clusters, pneumothorax ones included (always "no", never flippable), so
    its ceiling is (2/3) * prevalence: 0.27 at 0.4, 0.50 at 0.75. The plant's gate asks for 0.30."""
    return SynthCXRConfig(
        prevalence={
            "cardiomegaly": prevalence,
            "pleural_effusion": prevalence,
            "pneumothorax": 0.1,
            "consolidation": 0.4,
            "atelectasis": 0.4,
        }
    )


def load_organism(path: Path | str = MODEL_DIR, config: AdapterConfig | None = None) -> VLMAdapter:
    """The shipped organism (offline), through the same loader as MedGemma."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no organism checkpoint at {path}; train one with `flipscope organism train`"
        )
    quiet_in_notebook()
    return VLMAdapter.from_pretrained(path, config=config or AdapterConfig(expected_image_size=64))


def organism_world(path: Path | str = MODEL_DIR) -> SynthCXRWorld:
    """The SynthCXR world the checkpoint at ``path`` was trained on (from its training record)."""
    rec = json.loads((Path(path) / "training.json").read_text())
    return SynthCXRWorld(SynthCXRConfig(**_tuples(rec["config"]["world"])))


def organism_rows(
    split: str = "test", path: Path | str | None = MODEL_DIR, all_templates: bool = False
) -> tuple[SynthCXRWorld, list[QuestionRow]]:
    """The world of the checkpoint and its ``split`` rows, restricted to the findings it was trained on.

    ``path`` is the model folder (``None``: a hub model, which has no SynthCXR world);
    ``all_templates``: every eligible template per family (training), not one per family.
    """
    if path is None or not (Path(path) / "training.json").is_file():
        raise FileNotFoundError(
            f"--data synthcxr needs the organism's training.json next to the model ({path}); "
            "pass --data <PSF-Med-style file> for other models"
        )
    rec = json.loads((Path(path) / "training.json").read_text())
    world = organism_world(path)
    findings = rec["config"].get("findings")  # records older than the `findings` field: all findings
    rows = world.rows(split, all_templates=all_templates)
    return world, [r for r in rows if not findings or r.finding in findings]


def load_clean_organism() -> VLMAdapter:
    """The shipped clean (phase-1) organism."""
    return load_organism(CLEAN_DIR)


def load_shipped_organism() -> tuple[VLMAdapter, Path]:
    """``--model organism``: the shipped checkpoint and its folder."""
    return load_organism(MODEL_DIR), MODEL_DIR


def organism_dataset(split: str, model_dir: Path | None) -> Dataset:
    """``--data synthcxr``: the ``split`` rows of the world the model at ``model_dir`` was trained on."""
    world, rows = organism_rows(split, model_dir)
    return Dataset(rows, world.image_for, f"synthcxr world of {model_dir}", extra={"world": world})


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
