"""The SynthCXR model organism: a tiny Gemma3ForConditionalGeneration (the MedGemma code path) trained
on the synthetic world, with failures planted on purpose so interpretability claims can be checked.

This module builds and loads it and gives the world and rows it was trained on; training is in
:mod:`analyses.organism.train`, its SAE in :mod:`analyses.organism.sae`, its model card in
:mod:`analyses.organism.card`. The checkpoint is a standard HF folder (safetensors + tokenizer +
processor) with ``training.json`` beside it, loaded by ``VLMAdapter.from_pretrained`` like any model.
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
from hooks.tiny import TinyGemma3Config, build_word_tokenizer, tiny_gemma3

if TYPE_CHECKING:
    from analyses.organism.train import OrganismConfig

ORGANISM_DIR = Path(__file__).resolve().parents[2] / "organism"
MODEL_DIR = ORGANISM_DIR / "model"

ORGANISM_MODEL = TinyGemma3Config(
    text_layers=6,
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


def load_organism(path: Path | str = MODEL_DIR, config: AdapterConfig | None = None) -> VLMAdapter:
    """The shipped organism (offline), through the same loader as MedGemma."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no organism checkpoint at {path}; train one with `flipscope organism train`"
        )
    return VLMAdapter.from_pretrained(path, config=config or AdapterConfig(expected_image_size=64))


def organism_world(path: Path | str = MODEL_DIR) -> SynthCXRWorld:
    """The SynthCXR world the checkpoint at ``path`` was trained on (from its training record)."""
    rec = json.loads((Path(path) / "training.json").read_text())
    return SynthCXRWorld(SynthCXRConfig(**_tuples(rec["config"]["world"])))


def organism_rows(
    split: str = "test", path: Path | str | None = MODEL_DIR
) -> tuple[SynthCXRWorld, list[QuestionRow]]:
    """The world of the checkpoint and its ``split`` rows, restricted to the findings it was trained on.

    ``path`` is the model folder (``None``: a hub model, which has no SynthCXR world).
    """
    if path is None or not (Path(path) / "training.json").is_file():
        raise FileNotFoundError(
            f"--data synthcxr needs the organism's training.json next to the model ({path}); "
            "pass --data <PSF-Med-style file> for other models"
        )
    rec = json.loads((Path(path) / "training.json").read_text())
    world = organism_world(path)
    findings = rec["config"].get("findings")  # records older than the `findings` field: all findings
    return world, [r for r in world.rows(split) if not findings or r.finding in findings]


def load_shipped_organism() -> tuple[VLMAdapter, Path]:
    """``--model organism``: the shipped checkpoint and its folder."""
    return load_organism(MODEL_DIR), MODEL_DIR


def organism_dataset(split: str, model_dir: Path | None) -> Dataset:
    """``--data synthcxr``: the ``split`` rows of the world the model at ``model_dir`` was trained on."""
    world, rows = organism_rows(split, model_dir)
    return Dataset(rows, world.image_for, f"synthcxr world of {model_dir}", extra={"world": world})


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
