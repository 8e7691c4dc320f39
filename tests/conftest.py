"""Shared fixtures: tiny models of both supported architectures, built from config (random weights)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.tiny import build_word_tokenizer, tiny_gemma3, tiny_llava

WORDS = ["is", "there", "cardiomegaly", "an", "enlarged", "heart", "effusion", "can", "be", "ruled", "out"]
IMAGE_SIZES = {"gemma3": 64, "llava": 32}

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _weights_hash_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run folders cache weight hashes in ~/.cache/flipscope; tests use a folder of their own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLIPSCOPE_CACHE", str(tmp_path_factory.mktemp("flipscope-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models run faster on one thread, and on the shared 2-core machine two intra-op threads made
    backward passes about 10x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_adapter(arch: str, seed: int = 0) -> VLMAdapter:
    tok = build_word_tokenizer(WORDS, arch)  # type: ignore[arg-type]
    model, proc = tiny_gemma3(tok, seed=seed) if arch == "gemma3" else tiny_llava(tok, seed=seed)
    return VLMAdapter(model, proc, AdapterConfig(expected_image_size=IMAGE_SIZES[arch]), name=f"tiny-{arch}")


@pytest.fixture(scope="session", params=["gemma3", "llava"])
def adapter(request: pytest.FixtureRequest) -> VLMAdapter:
    return make_adapter(request.param)


@pytest.fixture(scope="session")
def gemma3_adapter() -> VLMAdapter:
    return make_adapter("gemma3")


def random_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).convert("RGB") for _ in range(n)
    ]


@pytest.fixture
def images(adapter: VLMAdapter) -> list[Image.Image]:
    return random_images(3, adapter.config.expected_image_size or 64)


QUESTIONS = ["Is there cardiomegaly?", "Is there an enlarged heart?", "Can cardiomegaly be ruled out?"]
