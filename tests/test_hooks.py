"""The adapter on tiny Gemma3, LLaVA, LLaVA-NeXT and Qwen2.5-VL models: margins, conditions, sites,
traces, errors. Prompt modes, mixed image sizes and non-HF checkpoints: tests/test_families.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from PIL import Image
from torch import Tensor

from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.inputs import Removal
from hooks.sites import (
    ARCHITECTURES,
    Site,
    arch_spec,
    attn_out,
    final_norm,
    image_embeds,
    mlp_out,
    parse_site,
    resid_post,
    resid_pre,
    vision_resid,
)
from hooks.trace import forward_order
from tests.conftest import ARCH_OF, QUESTIONS, random_images


def test_margin_equals_plain_hf_forward(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    batch = adapter.prepare(images, QUESTIONS)
    margins = adapter.margins(batch)
    # the plain HF forward, full logits, no adapter code in between
    with torch.no_grad():
        logits = adapter.model(**batch.inputs).logits[:, -1]
    yes = logits[:, list(adapter.answer_ids.yes_ids)].max(-1).values
    no = logits[:, list(adapter.answer_ids.no_ids)].max(-1).values
    torch.testing.assert_close(margins, yes - no)
    assert adapter.answer_ids.yes_tokens == ("yes",) and adapter.answer_ids.no_tokens == ("no",)


def test_batched_margins_equal_single_rows(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    """Left padding with explicit position ids: a row's margin does not depend on its batch."""
    batched = adapter.margins(adapter.prepare(images, QUESTIONS))
    single = torch.cat(
        [adapter.margins(adapter.prepare([im], [q])) for im, q in zip(images, QUESTIONS, strict=True)]
    )
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert batched.std() > 0  # rows really differ


def test_image_really_matters(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    """The projector is randomised: another image gives another margin."""
    q = [QUESTIONS[0]] * 3
    m = adapter.margins(adapter.prepare(images, q))
    assert (m[0] - m[1]).abs() > 1e-4 and (m[1] - m[2]).abs() > 1e-4


@pytest.mark.parametrize("kind", ["gray", "white", "noise"])
def test_removed_image_changes_image_tokens_only(
    adapter: VLMAdapter, images: list[Image.Image], kind: str
) -> None:
    removed = adapter.removed(images, Removal(kind))  # type: ignore[arg-type]
    a = adapter.prepare(images, QUESTIONS)
    b = adapter.prepare(removed, QUESTIONS, conditions=[Removal(kind).label] * 3)  # type: ignore[arg-type]
    assert torch.equal(a.input_ids, b.input_ids)  # same tokens ...
    assert not torch.allclose(a.inputs["pixel_values"], b.inputs["pixel_values"])  # ... other pixels
    ea, eb = adapter.image_features(a.image_inputs), adapter.image_features(b.image_inputs)
    assert all((x - y).abs().max() > 1e-3 for x, y in zip(ea, eb, strict=True))
    assert not torch.allclose(adapter.margins(a), adapter.margins(b))
    arr = np.asarray(removed[0].convert("L"))
    if kind == "gray":
        assert (arr == 128).all()
    elif kind == "white":
        assert (arr == 255).all()
    else:
        assert abs(arr.mean() - 128) < 8 and 40 < arr.std() < 70


def test_noise_removal_is_seeded() -> None:
    im = random_images(1, 64)[0]
    a, b, c = (
        Removal("noise", seed=1).apply(im),
        Removal("noise", seed=1).apply(im),
        Removal("noise", seed=2).apply(im),
    )
    assert a is not None and b is not None and c is not None
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_no_image_tokens_condition(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    none = adapter.removed(images, Removal("none"))
    assert none == [None, None, None]
    b = adapter.prepare(none, QUESTIONS)
    assert not b.image_mask.any() and "pixel_values" not in b.inputs
    assert b.conditions == ["removed:none"] * 3
    mixed = adapter.prepare([images[0], None, images[2]], QUESTIONS)
    assert mixed.image_mask.sum(-1).tolist()[1] == 0 and mixed.image_mask[0].sum() > 0
    m_mixed = adapter.margins(mixed)
    torch.testing.assert_close(m_mixed[1], adapter.margins(b)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        m_mixed[0], adapter.margins(adapter.prepare(images, QUESTIONS))[0], atol=1e-5, rtol=1e-5
    )


def test_swapped_image_changes_pixels_and_margin(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    q = [QUESTIONS[0]] * 3
    a = adapter.prepare(images, q)
    swapped = adapter.prepare(images[1:] + images[:1], q, conditions=["swap"] * 3)
    assert torch.equal(a.input_ids, swapped.input_ids)
    for key, value in a.image_parts()[1].items():
        assert torch.equal(value, swapped.image_parts()[0][key])
    assert not torch.allclose(adapter.margins(a), adapter.margins(swapped))


def test_position_classes(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    b = adapter.prepare(images, QUESTIONS)
    n_q = [len(adapter.tokenizer.encode(q, add_special_tokens=False)) for q in QUESTIONS]
    assert b.question_mask.sum(-1).tolist() == n_q
    assert (b.image_mask & b.question_mask).sum() == 0
    ids = b.input_ids[0][b.question_mask[0]].tolist()
    assert adapter.tokenizer.decode(ids).replace(" ?", "?") == QUESTIONS[0].lower()
    assert b.position_mask("final")[:, -1].all() and b.position_mask("final").sum() == 3
    assert (b.position_mask("text") & b.image_mask).sum() == 0


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_site_resolves_to_a_module(arch: str) -> None:
    from tests.conftest import make_adapter

    a = make_adapter({v: k for k, v in ARCH_OF.items()}[arch])
    assert a.spec.name == arch
    sites = [s(layer) for s in (resid_pre, resid_post, attn_out, mlp_out) for layer in range(a.n_layers)]
    sites += [vision_resid(i) for i in range(a.n_vision_layers)] + [
        image_embeds(),
        final_norm(),
        resid_post(-1),
    ]
    for s in sites:
        assert isinstance(a.module(s), torch.nn.Module)
    assert a.resolve(resid_post(-1)) == a.resolve(resid_post(a.n_layers - 1))
    with pytest.raises(IndexError, match="layer out of range"):
        a.resolve(resid_post(a.n_layers))


def test_site_names() -> None:
    assert str(resid_post(3)) == "resid_post(3)" and parse_site("resid_post(3)") == resid_post(3)
    assert parse_site("image_embeds()") == image_embeds()
    with pytest.raises(ValueError, match="needs a layer"):
        Site("resid_post")
    with pytest.raises(ValueError, match="unknown site kind"):
        Site("resid_mid", 1)
    order = forward_order([resid_post(1), resid_pre(1), vision_resid(0), final_norm(), attn_out(0)], 4, 2)
    assert order == [vision_resid(0), attn_out(0), resid_pre(1), resid_post(1), final_norm()]


def test_residual_decomposition_and_trace_reads(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    """resid_post(L) == resid_pre(L) + attn_out(L) + mlp_out(L); the traced margin == plain margin."""
    b = adapter.prepare(images, QUESTIONS)
    with torch.no_grad(), adapter.trace(b):
        pre = adapter.sites[resid_pre(1)].save()
        att = adapter.sites[attn_out(1)].save()
        mlp = adapter.sites[mlp_out(1)].save()
        post = adapter.sites[resid_post(1)].save()
        m = adapter.sites.margin().save()
    torch.testing.assert_close(pre + att + mlp, post, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, adapter.margins(b), atol=1e-5, rtol=1e-5)
    check_shape(post, len(b), b.seq_len, adapter.d_model)


@jaxtyped(typechecker=beartype)
def check_shape(x: Float[Tensor, "batch pos d_model"], batch: int, pos: int, d_model: int) -> None:
    assert x.shape == (batch, pos, d_model)


def n_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_trace_overwrite_and_cleanup(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    before = n_hooks(adapter.model)  # transformers itself may keep some (output capturing)
    b = adapter.prepare(images, QUESTIONS)
    clean = adapter.margins(b)
    last = resid_post(adapter.n_layers - 1)
    with torch.no_grad(), adapter.trace(b):
        h = adapter.sites[last]
        adapter.sites[last] = torch.zeros_like(h)
        m = adapter.sites.margin().save()
    torch.testing.assert_close(m, torch.zeros(3))  # zero residual -> zero logits -> zero margin
    torch.testing.assert_close(adapter.margins(b), clean)  # nothing left behind
    assert n_hooks(adapter.model) == before


def test_trace_gradients(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    """nnsight gradient of the margin w.r.t. a site equals the plain-autograd gradient via hooks."""
    b = adapter.prepare(images[:1], QUESTIONS[:1])
    with adapter.trace(b):
        h = adapter.sites[resid_post(1)]
        m = adapter.sites.margin()
        with m.sum().backward():
            g = h.grad.save()
    store: dict[str, Tensor] = {}

    def keep(x: Tensor) -> Tensor:
        x.retain_grad()
        store["x"] = x
        return x

    with adapter.hooks({resid_post(1): keep}):
        adapter.margins(b, grad=True).sum().backward()
    torch.testing.assert_close(g, store["x"].grad)
    assert g.abs().sum() > 0


def test_trace_order_error(gemma3_adapter: VLMAdapter) -> None:
    b = gemma3_adapter.prepare(random_images(1, 64), QUESTIONS[:1])
    with pytest.raises(ValueError, match="forward order"), gemma3_adapter.trace(b):
        gemma3_adapter.sites[resid_post(2)].save()
        gemma3_adapter.sites[resid_post(1)].save()


def test_hooks_patch_and_always_clean_up(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    before = n_hooks(adapter.model)
    b = adapter.prepare(images, QUESTIONS)
    clean = adapter.margins(b)
    with adapter.hooks({resid_post(0): lambda x: x}):
        assert n_hooks(adapter.model) == before + 1  # identity patch changes nothing
        torch.testing.assert_close(adapter.margins(b), clean)
    with pytest.raises(RuntimeError, match="boom"), adapter.hooks({resid_pre(1): lambda x: x * 0}):
        raise RuntimeError("boom")
    assert n_hooks(adapter.model) == before
    torch.testing.assert_close(adapter.margins(b), clean)


def test_unembed_is_the_logit_lens_at_the_last_layer(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    b = adapter.prepare(images, QUESTIONS)
    with torch.no_grad(), adapter.trace(b):
        h = adapter.sites[resid_post(-1)].save()
    with torch.no_grad():
        lens = adapter.answer_ids.margin(adapter.unembed(h[:, -1]))
    torch.testing.assert_close(lens, adapter.margins(b), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input
def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unsupported architecture 'BertModel'"):
        arch_spec("BertModel")
    with pytest.raises(ValueError, match="unsupported architecture"):
        VLMAdapter(torch.nn.Linear(2, 2), None)


def test_wrong_image_size(adapter: VLMAdapter) -> None:
    with pytest.raises(ValueError, match="does not match the model's input size"):
        adapter.prepare(random_images(1, 48), QUESTIONS[:1])


def test_expected_size_guard_names_the_size(adapter: VLMAdapter) -> None:
    """The guard is opt-in: with it set, one odd image in a batch is refused and named."""
    size = adapter.config.expected_image_size or 64
    with pytest.raises(ValueError, match=rf"image size \({2 * size}, {2 * size}\) does not match"):
        adapter.prepare(random_images(1, size) + random_images(1, size * 2), QUESTIONS[:2])


def test_empty_question(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    with pytest.raises(ValueError, match="empty question"):
        adapter.prepare(images[:1], ["   "])
    with pytest.raises(ValueError, match="one image per question"):
        adapter.prepare(images[:2], QUESTIONS[:1])


def test_missing_image_file(adapter: VLMAdapter, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image file not found"):
        adapter.prepare([tmp_path / "nope.png"], QUESTIONS[:1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        adapter.prepare([bad], QUESTIONS[:1])


def test_image_from_file_equals_in_memory(
    adapter: VLMAdapter, images: list[Image.Image], tmp_path: Path
) -> None:
    path = tmp_path / "x.png"
    images[0].save(path)
    torch.testing.assert_close(
        adapter.margins(adapter.prepare([path], QUESTIONS[:1])),
        adapter.margins(adapter.prepare(images[:1], QUESTIONS[:1])),
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="must contain"):
        AdapterConfig(prompt_template="no placeholder")
    with pytest.raises(ValueError, match="answer_reduce"):
        AdapterConfig(answer_reduce="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown removal"):
        Removal("black")  # type: ignore[arg-type]


def test_save_and_from_pretrained_roundtrip(gemma3_adapter: VLMAdapter, tmp_path: Path) -> None:
    """Loading code path: a local folder, offline, gives the same margins."""
    gemma3_adapter.model.save_pretrained(tmp_path)
    gemma3_adapter.processor.save_pretrained(tmp_path)
    loaded = VLMAdapter.from_pretrained(tmp_path, config=gemma3_adapter.config)
    imgs = random_images(2, 64)
    b1 = gemma3_adapter.prepare(imgs, QUESTIONS[:2])
    b2 = loaded.prepare(imgs, QUESTIONS[:2])
    assert torch.equal(b1.input_ids, b2.input_ids)
    torch.testing.assert_close(loaded.margins(b2), gemma3_adapter.margins(b1))
    assert loaded.describe()["architecture"] == "Gemma3ForConditionalGeneration"
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        VLMAdapter.from_pretrained("./does/not/exist")


def test_cached_image_features_give_the_same_margins(adapter: VLMAdapter, images: list[Image.Image]) -> None:
    """Encoding each image once and reusing its features == the full forward."""
    b = adapter.prepare([images[0], None, images[2]], QUESTIONS)
    feats = adapter.image_features(b.image_inputs)
    assert [f.shape for f in feats] == [(int(b.image_mask[i].sum()), adapter.d_model) for i in (0, 2)]
    torch.testing.assert_close(
        adapter.margins(b, image_features=feats), adapter.margins(b), atol=1e-5, rtol=1e-5
    )
    encoded = adapter.encode_images([images[0], images[2]])  # the evaluator's path: images alone
    torch.testing.assert_close(
        adapter.margins(b, image_features=encoded), adapter.margins(b), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="image feature sets"):
        adapter.margins(b, image_features=feats[:1])
    with pytest.raises(ValueError, match="tokens but its row has"):
        adapter.margins(b, image_features=[feats[0][:-1], feats[1]])
