"""The one --model / --data resolver: split and n_images apply to every source, bad values fail first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses.cli import main
from analyses.data.resolve import NAMED_DATA, NAMED_MODELS, resolve_data, resolve_model
from analyses.eval.pairs import Pair, flip_pairs, pair_batches, paraphrase_pairs
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    SynthCXRWorld(SynthCXRConfig(n_patients=12, seed=3)).save(folder)
    return folder / "questions.jsonl"


def test_file_source_applies_split_and_n_images(world_file: Path) -> None:
    every = [json.loads(line) for line in world_file.read_text().splitlines()]
    for split in ("train", "test"):
        data = resolve_data(str(world_file), split)
        assert {r.split for r in data.rows} == {split}
        assert len(data.rows) == sum(r["split"] == split for r in every)
        assert "read" in data.report and data.source == str(world_file)
    one = resolve_data(str(world_file), "train", n_images=1)
    assert len({r.image_id for r in one.rows}) == 1
    first = sorted({r.image_id for r in resolve_data(str(world_file), "train").rows})[0]
    assert {r.image_id for r in one.rows} == {first}
    assert np.asarray(one.images(one.rows[0])).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "foo"}, "--split 'foo' is not a split; choose one of train, val, test"),
        ({"split": "test", "n_images": -1}, "--n-images -1"),
    ],
)
def test_bad_arguments_fail_before_loading(world_file: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_data(str(world_file), **kwargs)


def test_unknown_source_and_missing_world(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a named source"):
        resolve_data("psf_med", "test")
    with pytest.raises(FileNotFoundError, match=r"no such file|not found"):
        resolve_data(str(tmp_path / "missing.jsonl"), "test")
    with pytest.raises(FileNotFoundError, match=r"training\.json"):
        resolve_data("synthcxr", "test", model_dir=None)  # a hub model has no SynthCXR world


def test_named_entries_resolve() -> None:
    import importlib

    for ref in (*NAMED_MODELS.values(), *NAMED_DATA.values()):
        module, _, name = ref.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), ref


@pytest.mark.slow
def test_organism_model_and_world() -> None:
    adapter, model_dir = resolve_model("organism")
    assert model_dir is not None and (model_dir / "training.json").is_file()
    data = resolve_data("synthcxr", "val", n_images=3, model_dir=model_dir)
    assert len({r.image_id for r in data.rows}) == 3 and {r.split for r in data.rows} == {"val"}
    assert data.extra["world"].config.image_size == adapter.config.expected_image_size


def test_cli_refuses_a_bad_split_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["eval", "--split", "foo", "--out", str(out), "--quiet"]) == 2
    assert "--split 'foo'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["eval", "--n-images", "-1", "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


# ---------------------------------------------------------------------- pairs
def test_paraphrase_and_flip_pairs(world_file: Path) -> None:
    rows = resolve_data(str(world_file), "train").rows
    pairs = paraphrase_pairs(rows, "register", ground_truth=True)
    assert pairs and all(
        p.original.family == "original" and p.paraphrase.family == "register" and p.original.ground_truth
        for p in pairs
    )
    assert all(p.paraphrase.paraphrase_of == p.original.qid for p in pairs)
    n_all = sum(r.family not in ("original", "operator") for r in rows)
    assert len(paraphrase_pairs(rows)) == n_all
    with pytest.raises(ValueError, match="not a paraphrase family"):
        paraphrase_pairs(rows, "operator")
    # a hand-made predictions table: the original says yes, two paraphrases say no, one says yes
    orig = pairs[0].original
    variants = [r for r in rows if r.paraphrase_of == orig.qid and r.family != "operator"][:3]
    table = pd.DataFrame(
        [
            {**r.to_dict(), "condition": "image", "margin": m, "pred": m > 0}
            for r, m in zip([orig, *variants], [2.0, -1.0, -0.5, 0.7], strict=True)
        ]
    )
    flips = flip_pairs(table, rows)
    assert flips == [Pair(orig, variants[0]), Pair(orig, variants[1])]
    assert flip_pairs(table, rows, ground_truth=not orig.ground_truth) == []
    with pytest.raises(ValueError, match="not in `rows`"):
        flip_pairs(table, [orig])


def test_pair_batches_share_images(world_file: Path) -> None:
    from analyses.data.questions import vocabulary
    from hooks.adapter import AdapterConfig, VLMAdapter
    from hooks.tiny import TinyGemma3Config, build_word_tokenizer, tiny_gemma3

    data = resolve_data(str(world_file), "train")
    model, processor = tiny_gemma3(build_word_tokenizer(vocabulary()), TinyGemma3Config())
    adapter = VLMAdapter(model, processor, AdapterConfig())
    pairs = paraphrase_pairs(data.rows, "lexical")[:3]
    clean, corrupt = pair_batches(adapter, pairs, data.images)
    assert clean.questions == [p.original.question for p in pairs]
    assert corrupt.questions == [p.paraphrase.question for p in pairs]
    assert np.array_equal(clean.inputs["pixel_values"].numpy(), corrupt.inputs["pixel_values"].numpy())
    with pytest.raises(ValueError, match="no pairs"):
        pair_batches(adapter, [], data.images)
