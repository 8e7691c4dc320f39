"""Image-prefix reuse (hooks.prefix) and layouts without the image processor (hooks.layout), on every family.

The reference is always the plain HF forward of a batch the processor built (``adapter.prepare``), in
fp32: mixed image sizes and modes, left padding, rows without an image, plain and chat prompts.
"""

from __future__ import annotations

import pytest
import torch

from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.attn import attention_implementation, attn_state
from hooks.layout import layout_features
from hooks.prefix import PrefixStore, PrefixUnsupported, prefix_margins, reusable
from tests.conftest import FAMILIES, make_adapter
from tests.test_families import (
    CHAT_WORDS,
    GEMMA3_CHAT_TEMPLATE,
    LLAVA_STYLE_TEMPLATE,
    chat_adapter,
    mixed_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QS = [
    "is there cardiomegaly",
    "is there an enlarged heart",
    "can effusion be ruled out",
    "is there effusion",
    "is there an effusion",
    "can cardiomegaly be ruled out",
]
#: Which image each row shows (index into mixed_images(); None: no image tokens at all).
SHOWN = [0, 1, 0, None, 2, 1]


@pytest.fixture(scope="module", params=FAMILIES)
def free(request: pytest.FixtureRequest) -> VLMAdapter:
    """A tiny model of each family, sdpa attention, no image-size guard (images of three sizes)."""
    a = make_adapter(str(request.param), seed=2, config=AdapterConfig())
    a.model.set_attn_implementation("sdpa")
    return a


def _rows(adapter: VLMAdapter) -> tuple[list, list, list]:
    ims = mixed_images(seed=4)
    enc = adapter.encode(ims)
    pil = [None if s is None else ims[s] for s in SHOWN]
    shown = [None if s is None else enc[s] for s in SHOWN]
    return pil, shown, [s for s in SHOWN if s is not None]


def test_layout_equals_the_processors_batch(free: VLMAdapter) -> None:
    pil, shown, _ = _rows(free)
    full = free.prepare(pil, QS)
    lay = free.layout(QS, shown)
    for key, value in lay.inputs.items():
        assert torch.equal(value, full.inputs[key]), key
    assert set(full.inputs) - set(lay.inputs) == set(full.family.image_keys) & set(full.inputs)
    assert torch.equal(lay.image_mask, full.image_mask) and torch.equal(lay.question_mask, full.question_mask)


def test_prefix_margins_equal_the_full_forward(free: VLMAdapter) -> None:
    pil, shown, keys = _rows(free)
    full = free.margins(free.prepare(pil, QS)).float()
    lay = free.layout(QS, shown)
    assert reusable(lay)
    store = PrefixStore()
    got = prefix_margins(free, lay, layout_features(shown), keys, store)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-4)
    assert store.computed == 3  # three images, each prefix once
    # a second batch of the same images reuses the stored prefixes and still agrees
    again = prefix_margins(free, lay.select([5, 0]), layout_features([shown[5], shown[0]]), [1, 0], store)
    assert store.computed == 3
    torch.testing.assert_close(again, full[[5, 0]], atol=1e-5, rtol=1e-4)
    # margins_for: the same through the public call, and forced full forwards agree
    torch.testing.assert_close(free.margins_for(pil, QS, batch_size=4), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(free.margins_for(pil, QS, reuse_prefix=False), full, atol=1e-5, rtol=1e-4)


def test_a_wrong_prefix_changes_the_answer(free: VLMAdapter) -> None:
    """The check has teeth: keying two different images of one size alike reuses the wrong keys/values."""
    shown = free.encode([mixed_images(seed=4)[0], mixed_images(seed=7)[0]]) * 2
    lay = free.layout(QS[:4], shown)
    right = prefix_margins(free, lay, layout_features(shown), [0, 1, 0, 1])
    wrong = prefix_margins(free, lay, layout_features(shown), [0, 0, 0, 0])
    assert (right - wrong).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("family", "template"), [("gemma3", GEMMA3_CHAT_TEMPLATE), ("llava", LLAVA_STYLE_TEMPLATE)]
)
def test_chat_prompts(family: str, template: str) -> None:
    a = chat_adapter(family, template)
    assert a.prompt_mode == "chat" and CHAT_WORDS
    ims = mixed_images(seed=5)[:2]
    a.config = AdapterConfig(prompt="chat")  # no size guard
    a.configure(a.config)
    pil = [ims[0], ims[1], ims[0], None]
    enc = a.encode(ims)
    shown = [enc[0], enc[1], enc[0], None]
    full = a.prepare(pil, QS[:4])
    lay = a.layout(QS[:4], shown)
    for key, value in lay.inputs.items():
        assert torch.equal(value, full.inputs[key]), key
    got = prefix_margins(a, lay, layout_features(shown), [0, 1, 0])
    torch.testing.assert_close(got, a.margins(full).float(), atol=1e-5, rtol=1e-4)


def test_question_before_the_image_falls_back() -> None:
    a = chat_adapter("gemma3", GEMMA3_CHAT_TEMPLATE, image_position="after")
    ims = mixed_images(seed=6)[:1]
    a.configure(AdapterConfig(image_position="after"))
    enc = a.encode(ims)
    lay = a.layout(QS[:2], [enc[0], enc[0]])
    assert not reusable(lay)
    with pytest.raises(PrefixUnsupported, match="precedes its image"):
        prefix_margins(a, lay, layout_features([enc[0], enc[0]]), [0, 0])
    full = a.margins(a.prepare([ims[0], ims[0]], QS[:2])).float()
    torch.testing.assert_close(a.margins_for([ims[0], ims[0]], QS[:2]), full, atol=1e-5, rtol=1e-4)


def test_a_layout_without_features_is_refused() -> None:
    a = make_adapter("gemma3", config=AdapterConfig())
    enc = a.encode(mixed_images(seed=1)[:1])
    with pytest.raises(ValueError, match="no pixels"):
        a.margins(a.layout(QS[:1], enc))


def test_eager_switch_is_text_only_and_restored() -> None:
    a = make_adapter("gemma3")
    a.model.set_attn_implementation("sdpa")
    before = attn_state(a.model.config)
    with pytest.raises(RuntimeError), attention_implementation(a.model, "eager"):
        inside = attn_state(a.model.config)
        raise RuntimeError
    assert inside["text_config"][""] == "eager" and inside["vision_config"][""] == "sdpa"
    assert attn_state(a.model.config) == before
