"""Loading models from folders: released layouts (Qwen2.5-VL with its real processor class, without
torchvision), one-line errors naming the folder and what is missing, configs without ``architectures``,
chat templates that ignore ``image_position``, and the organism's image size from the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analyses.cli import main
from analyses.synthcxr.world import SynthCXRConfig, SynthCXRWorld
from hooks.adapter import VLMAdapter
from hooks.loading import LoadError
from hooks.tiny import tiny_vlm
from tests.conftest import WORDS
from tests.test_families import GEMMA3_CHAT_TEMPLATE, chat_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

#: A Qwen2.5-VL-style chat template (written for this test; the tiny vocabulary has no ``<|im_start|>``).
QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}user: {% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} assistant:{% endif %}"
)
#: The llava-hf LLaVA 1.5 template's structure: every image first, then the text, whatever the order given.
IMAGES_FIRST_TEMPLATE = (
    "{% for message in messages %}USER: {% for c in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "<image>\n{% endfor %}{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ c['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def released_qwen(folder: Path) -> Path:
    """A tiny Qwen2.5-VL in the released folder layout: weights, tokenizer files, ``preprocessor_config.json``
    naming transformers' ``Qwen2_5_VLProcessor`` (not the in-memory image-text class), ``chat_template.json``."""
    model, proc = tiny_vlm("qwen2_5_vl", [*WORDS, "user", "assistant"])
    model.save_pretrained(folder)
    proc.tokenizer.save_pretrained(folder)
    image = {**proc.image_processor.to_dict(), "image_processor_type": "Qwen2VLImageProcessor"}
    image["processor_class"] = "Qwen2_5_VLProcessor"
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_STYLE_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def world_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SynthCXR world on disk at the organism's 64 px."""
    folder = tmp_path_factory.mktemp("world64")
    SynthCXRWorld(SynthCXRConfig(n_patients=12, seed=3)).save(folder)
    return folder / "questions.jsonl"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a refused command (progress bars of model loading aside), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flipscope")]
    assert len(lines) == 1 and lines[0].startswith("flipscope: error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------- case 10: Qwen2.5-VL released layout
def test_released_qwen_loads_with_its_real_processor_class(tmp_path: Path) -> None:
    folder = released_qwen(tmp_path / "qwen")
    assert "processor_class" in (folder / "preprocessor_config.json").read_text()
    a = VLMAdapter.from_pretrained(folder)
    assert a.spec.name == "Qwen2_5_VLForConditionalGeneration"
    assert "Qwen2_5_VLProcessor" in [c.__name__ for c in type(a.processor).__mro__]
    assert a.prompt_mode == "chat" and "<|vision_start|>" in a.describe("Is there cardiomegaly?")["prompt_example"]["text"]
    # the same processor as the in-memory one: equal image tensors and margins
    ref_model, ref_proc = tiny_vlm("qwen2_5_vl", [*WORDS, "user", "assistant"])
    ref_proc.chat_template = QWEN_STYLE_TEMPLATE
    ref = VLMAdapter(ref_model, ref_proc)
    from tests.conftest import random_images

    ims = random_images(2, 48)
    b, rb = a.prepare(ims, ["Is there cardiomegaly?"] * 2), ref.prepare(ims, ["Is there cardiomegaly?"] * 2)
    assert b.input_ids.tolist() == rb.input_ids.tolist()
    assert (a.margins(b) - ref.margins(rb)).abs().max() < 1e-5


def test_tiny_qwen_saved_with_its_own_processor_loads_back(tmp_path: Path) -> None:
    model, proc = tiny_vlm("qwen2_5_vl", WORDS)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    a = VLMAdapter.from_pretrained(tmp_path)
    assert a.processor.image_processor is not None and a.processor.tokenizer is not None


def test_cli_evaluates_a_released_qwen_folder(
    tmp_path: Path, world_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = released_qwen(tmp_path / "qwen")
    out = tmp_path / "run"
    argv = ["eval", "--model", str(folder), "--data", str(world_file), "--n-images", "2", "--n-boot", "10"]
    assert main([*argv, "--conditions", "image,removed", "--quiet", "--out", str(out)]) == 0
    preds = pd.read_json(out / "predictions.jsonl", lines=True)
    assert len(preds) > 0 and set(preds["condition"]) == {"image", "removed"}
    assert json.loads((out / "meta.json").read_text())["architecture"] == "Qwen2_5_VLForConditionalGeneration"


def test_an_import_error_while_loading_is_one_line_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    import hooks.loading

    folder = released_qwen(tmp_path / "qwen")

    def missing(*_a: Any, **_k: Any) -> Any:
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing)
    monkeypatch.setattr(hooks.loading, "_processor_class", lambda _t: None)  # no image-text fallback
    with pytest.raises(LoadError, match=r"qwen: its processor needs a package that is missing \(ImportError"):
        VLMAdapter.from_pretrained(folder)
    assert main(["eval", "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "Torchvision" in one_line_error(capsys) and not (tmp_path / "o" / "predictions.jsonl").exists()


# ---------------------------------------------------------------------- case 11: clear library errors
def test_folders_that_are_not_models_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match=r"empty has no config.json, so it is not a saved Hugging Face model"):
        VLMAdapter.from_pretrained(empty)
    source = released_qwen(tmp_path / "qwen")
    no_type = tmp_path / "no_type"
    shutil.copytree(source, no_type)
    cfg = json.loads((no_type / "config.json").read_text())
    (no_type / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "model_type"}))
    with pytest.raises(LoadError, match=r"no_type/config.json has no model_type"):
        VLMAdapter.from_pretrained(no_type)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(source, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"no_weights has config.json but no weights"):
        VLMAdapter.from_pretrained(no_weights)
    own_class = tmp_path / "own_class"  # Qwen: the family's image-text processor from the folder's files
    shutil.copytree(source, own_class)
    pre = json.loads((own_class / "preprocessor_config.json").read_text())
    (own_class / "preprocessor_config.json").write_text(json.dumps({**pre, "processor_class": "MyOwnProcessor"}))
    assert VLMAdapter.from_pretrained(own_class).processor.image_processor is not None
    bare = tmp_path / "bare"  # LLaVA has no such fallback: refused, named
    model, proc = tiny_vlm("llava", WORDS)
    model.save_pretrained(bare)
    proc.save_pretrained(bare)
    pre = json.loads((bare / "processor_config.json").read_text())
    (bare / "processor_config.json").write_text(json.dumps({**pre, "processor_class": "MyOwnProcessor"}))
    with pytest.raises(LoadError, match=r"bare: its processor loaded as a bare"):
        VLMAdapter.from_pretrained(bare)
    for folder, what in [(no_weights, "no weights"), (bare, "bare")]:
        assert main(["eval", "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        assert what in one_line_error(capsys)


def test_a_config_without_architectures_loads_by_model_type(tmp_path: Path) -> None:
    model, proc = tiny_vlm("llava", WORDS)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg.pop("architectures") == ["LlavaForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = VLMAdapter.from_pretrained(tmp_path)
    assert a.spec.name == "LlavaForConditionalGeneration" == type(a.model).__name__


def test_a_template_that_ignores_image_position_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image_position='after', but .* puts the image before .* --prompt plain"):
        chat_adapter("llava", IMAGES_FIRST_TEMPLATE, image_position="after")
    a = chat_adapter("llava", IMAGES_FIRST_TEMPLATE)  # before: what it renders
    with pytest.raises(ValueError, match="--image-position before"):
        a.set_prompt(image_position="after")
    assert a.config.image_position == "before"  # the refused setting is not kept
    a.set_prompt("plain", "after")  # a plain prompt honours it
    assert a.describe()["image_position"] == "after"
    honoured = chat_adapter("gemma3", GEMMA3_CHAT_TEMPLATE, image_position="after")
    assert honoured.prompt_mode == "chat" and honoured.describe()["image_position"] == "after"


# ---------------------------------------------------------------------- case 9: the organism's image size
def test_organism_refuses_other_sizes_up_front_or_resizes_them(
    tmp_path: Path, world_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "world96"
    SynthCXRWorld(SynthCXRConfig(n_patients=12, seed=3, image_size=96)).save(big)
    out = tmp_path / "run96"
    argv = ["eval", "--model", "organism", "--n-images", "3", "--n-boot", "10", "--quiet", "--out", str(out)]
    assert main([*argv, "--data", str(big / "questions.jsonl")]) == 2
    err = one_line_error(capsys)
    assert "is 96x96 but this model takes only 64x64 images: pass --resize" in err
    assert not (out / "predictions.jsonl").exists() and not (out / "meta.json").exists()
    assert main([*argv, "--data", str(big / "questions.jsonl"), "--resize"]) == 0
    assert json.loads((out / "meta.json").read_text())["image_size"] == "resized to 64x64"
    assert len(pd.read_json(out / "predictions.jsonl", lines=True)) > 0
    cache = ["cache", "--model", "organism", "--data", str(big / "questions.jsonl"), "--n-images", "2", "--quiet"]
    cache += ["--sites", "resid_post(3)", "--out", str(tmp_path / "cache")]
    assert main(cache) == 2
    assert "pass --resize" in one_line_error(capsys) and not (tmp_path / "cache").exists()
    assert main([*cache, "--resize"]) == 0
    # a resume with the other choice is refused, naming it
    out64 = tmp_path / "run64"
    argv64 = [*argv[:-1], str(out64), "--data", str(world_file)]
    assert main([*argv64, "--resize"]) == 0
    capsys.readouterr()
    assert main(argv64) == 2
    assert "image_size" in one_line_error(capsys)


def test_a_torchvision_built_for_another_torch_is_named_in_one_line(tmp_path: Path) -> None:
    """PyPI's torchvision 0.28.0 beside the CPU torch 2.13.0 fails in its op registrations, and then every
    transformers model class fails to import: the CLI names torchvision in one line, exit 2."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    (fake / "torchvision-0.28.0.dist-info").mkdir()
    (fake / "torchvision-0.28.0.dist-info" / "METADATA").write_text("Name: torchvision\nVersion: 0.28.0\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(root)]), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "analyses.cli", "eval", "--quiet", "--out", str(tmp_path / "o")]
    got = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in got.stderr.splitlines() if line.strip() and "%|" not in line]
    assert got.returncode == 2 and len(lines) == 1, got.stderr[-2000:]
    assert "torchvision is installed but does not import" in lines[0] and "uninstall it" in lines[0]
