"""interp.stack: recording a text stack and resuming it from a layer on a suffix of positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.attn import attention_implementation, attn_state, text_attn_implementation
from hooks.inputs import Removal
from hooks.sites import resid_post
from hooks.tiny import build_word_tokenizer, tiny_llava
from interp import PatchingConfig, StackState, capture_stack, patching_sweep, resume
from interp.patching import capture
from tests.conftest import WORDS, random_images

Q = "Is there cardiomegaly?"


pytestmark = pytest.mark.usefixtures("one_thread")


def batch_of(adapter: VLMAdapter, questions: list[str], seed: int = 3):
    imgs = random_images(len(questions), adapter.config.expected_image_size or 64, seed=seed)
    return adapter.prepare(imgs, questions)


def test_record_matches_the_model(adapter: VLMAdapter) -> None:
    batch = batch_of(adapter, [Q, "Is there an enlarged heart?", "Is there effusion?"])
    state = capture_stack(adapter, batch)
    with attention_implementation(adapter.model, "eager"):  # the record runs the text stack on eager
        assert torch.equal(state.margins, adapter.margins(batch).float().cpu())
    torch.testing.assert_close(state.margins, adapter.margins(batch).float().cpu(), atol=1e-6, rtol=0)
    assert len(state.hidden) == adapter.n_layers + 1 == len(state.keys) + 1
    acts, _ = capture(adapter, batch, [resid_post(i) for i in range(adapter.n_layers)])
    real = batch.attention_mask  # padding rows differ between eager and sdpa; nothing reads them
    for i in range(adapter.n_layers):
        torch.testing.assert_close(state.hidden[i + 1][real], acts[resid_post(i)][real], atol=1e-5, rtol=0)
    b, t = len(batch), batch.seq_len
    assert state.keys[0].shape[0] == b and state.keys[0].shape[2] == t
    assert state.allowed.shape == (b, t, t)


def test_resuming_an_unchanged_state_reproduces_the_margins(adapter: VLMAdapter) -> None:
    batch = batch_of(adapter, [Q, "Is there an enlarged heart?"])
    state = capture_stack(adapter, batch)
    t = state.seq_len
    for layer in range(adapter.n_layers + 1):
        for start in (0, 1, t // 2, t - 1):
            rows = [1, 0, 1]  # repeats and reordering, as a sweep uses them
            m = resume(adapter, state, rows, start, layer, state.hidden[layer][rows, start:])
            torch.testing.assert_close(m, state.margins[rows], atol=1e-5, rtol=0)


def test_suffix_start_hand_computed() -> None:
    """Causal 7 positions with a bidirectional block at 2..4 and one row whose first 2 are padding."""
    t = 7
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    block = causal.clone()
    block[2:5, 2:5] = True
    padded = causal.clone()
    padded[:, :2] = False  # nobody attends the pads
    padded[:2] = False  # pads attend nothing
    state = StackState([torch.zeros(2, t, 1)], [{}], [], [], torch.stack([block, padded]), torch.zeros(2))
    s = state.suffix_start()
    assert s[0].tolist() == [0, 1, 2, 2, 2, 5, 6]
    assert s[1].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_suffix_start_follows_the_model_masks(adapter: VLMAdapter) -> None:
    batch = batch_of(adapter, [Q, "Is there an enlarged heart?"])
    s = capture_stack(adapter, batch).suffix_start()
    t = batch.seq_len
    for row in range(len(batch)):
        img = batch.image_mask[row].nonzero()[:, 0]
        text = batch.attention_mask[row].bool() & ~batch.image_mask[row]
        positions = torch.arange(t)
        assert torch.equal(s[row, text], positions[text])  # text is causal in both architectures
        if adapter.spec.name.startswith("Gemma3"):  # Gemma3's image block is bidirectional
            assert (s[row, img] == img.min()).all()
        else:
            assert torch.equal(s[row, img], img)


def test_a_causal_guess_would_be_wrong_inside_gemma3s_image_block(gemma3_adapter: VLMAdapter) -> None:
    """Resuming an image-token patch from the patched position (as if causal) misses the earlier
    image tokens that attend to it; resuming from ``suffix_start`` matches the full forward."""
    adapter = gemma3_adapter
    batch = batch_of(adapter, [Q])
    state = capture_stack(adapter, batch)
    img = batch.image_mask[0].nonzero()[:, 0]
    p = int(img[-1])  # the last image token: every other one attends to it
    h = state.hidden[1].clone()
    h[0, p] += 5 * torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(0))

    def fn(x: Tensor) -> Tensor:
        return torch.where(torch.arange(x.shape[1])[None, :, None] == p, h.to(x), x)

    with torch.no_grad(), adapter.hooks({resid_post(0): fn}):
        full = adapter.margins(batch).float().cpu()
    s = int(state.suffix_start()[0, p])
    assert s == int(img[0]) < p
    right = resume(adapter, state, [0], s, 1, h[:, s:])
    wrong = resume(adapter, state, [0], p, 1, h[:, p:])
    torch.testing.assert_close(right, full, atol=1e-5, rtol=0)
    miss = (wrong - full).abs().item()
    assert miss > 1e-4 and miss > 100 * (right - full).abs().item(), (miss, right, full)


def test_clean_into_clean_skips_every_variant(adapter: VLMAdapter) -> None:
    batch = batch_of(adapter, [Q, "Is there effusion?"])
    res = patching_sweep(adapter, batch, batch, PatchingConfig(positions="each", method="resume"))
    n_var = adapter.n_layers * int(batch.attention_mask.sum())
    assert res.meta["skipped_noop"] == n_var and res.n_forwards == 2
    valid = ~res.patched_margins.isnan()
    assert int(valid.sum()) == n_var
    assert torch.equal(res.patched_margins[valid], res.corrupt_margins.expand_as(res.patched_margins)[valid])


def test_sdpa_model_resumes_on_eager_and_gets_sdpa_back() -> None:
    """An sdpa-loaded model: the resumed sweep switches its text stack to eager for the call (the record
    reproduces the sdpa full forward's margins) and leaves every implementation as it was."""
    tok = build_word_tokenizer(WORDS, "llava")
    model, proc = tiny_llava(tok, attn_implementation="sdpa")
    adapter = VLMAdapter(model, proc, AdapterConfig(expected_image_size=32), name="tiny-llava-sdpa")
    before = attn_state(model.config)
    assert text_attn_implementation(model) == "sdpa"
    imgs = random_images(2, 32, seed=4)
    clean = adapter.prepare(imgs, [Q, Q])
    corrupt = adapter.prepare(adapter.removed(imgs, Removal("gray")), [Q, Q])
    state = capture_stack(adapter, corrupt)
    assert attn_state(model.config) == before
    full = adapter.margins(corrupt).float().cpu()  # sdpa, vision tower in the forward
    torch.testing.assert_close(state.margins, full, atol=1e-5, rtol=0)
    t = state.seq_len
    torch.testing.assert_close(resume(adapter, state, [1, 0], t // 2, 1, state.hidden[1][[1, 0], t // 2 :]),
                               full[[1, 0]], atol=1e-5, rtol=0)  # fmt: skip
    cfg = PatchingConfig(positions=("image", "final"))
    resumed = patching_sweep(adapter, clean, corrupt, dataclasses.replace(cfg, method="resume"))
    assert resumed.meta["method"] == "resume" and resumed.meta["attn_implementation"] == "eager"
    assert attn_state(model.config) == before
    stack = patching_sweep(adapter, clean, corrupt, dataclasses.replace(cfg, method="stack"))
    assert stack.meta["attn_implementation"] == "sdpa"
    torch.testing.assert_close(resumed.patched_margins, stack.patched_margins, atol=1e-5, rtol=0)
    torch.testing.assert_close(resumed.corrupt_margins, full, atol=1e-5, rtol=0)
    assert attn_state(model.config) == before


def test_resume_argument_errors(gemma3_adapter: VLMAdapter) -> None:
    adapter = gemma3_adapter
    batch = batch_of(adapter, [Q])
    state = capture_stack(adapter, batch)
    t = state.seq_len
    with pytest.raises(IndexError, match="from_layer 9 out of range"):
        resume(adapter, state, [0], 0, 9, state.hidden[0])
    with pytest.raises(IndexError, match=f"start {t} out of range"):
        resume(adapter, state, [0], t, 0, state.hidden[0])
    with pytest.raises(ValueError, match="expected \\(1, 3, d_model\\)"):
        resume(adapter, state, [0], t - 3, 0, state.hidden[0])
    with pytest.raises(ValueError, match="method 'fast'"):
        PatchingConfig(method="fast")


def test_chunks_never_mix_layers_and_bound_waste() -> None:
    from interp.sweep import chunks as _chunks

    layer = torch.tensor([1, 1, 1, 1, 2, 2])
    start = torch.tensor([0, 0, 1, 16, 3, 3])
    # rows 0-2 need 20+20+19 positions; padding row 2 to start 0 costs 60 <= 1.25 * 59; row 3 needs 4
    # but would cost 80 > 1.25 * 63; layer 2 starts a new range; size 1 splits everything.
    assert _chunks(layer, start, 20, size=8) == [(0, 3), (3, 4), (4, 6)]
    assert _chunks(layer, start, 20, size=1) == [(i, i + 1) for i in range(6)]
    assert _chunks(layer[:0], start[:0], 20, size=4) == []
    assert _chunks(torch.ones(10, dtype=torch.long), torch.zeros(10, dtype=torch.long), 20, size=4) == [
        (0, 4),
        (4, 8),
        (8, 10),
    ]


def test_pair_blocks_give_the_same_sweep(adapter: VLMAdapter) -> None:
    imgs = random_images(3, adapter.config.expected_image_size or 64, seed=5)
    qs = [Q, "Is there effusion?", "Is there an enlarged heart?"]
    clean = adapter.prepare(imgs, qs)
    corrupt = adapter.prepare(adapter.removed(imgs, Removal("gray")), qs)
    cfg = PatchingConfig(positions=("image", "question", "final"))
    whole = patching_sweep(adapter, clean, corrupt, cfg)
    blocks = patching_sweep(adapter, clean, corrupt, PatchingConfig(positions=cfg.positions, pair_block=2))
    assert blocks.meta["pair_blocks"] == 2 and blocks.positions == whole.positions
    torch.testing.assert_close(blocks.patched_margins, whole.patched_margins, atol=1e-5, rtol=0)
    torch.testing.assert_close(blocks.corrupt_margins, whole.corrupt_margins, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pair_block must be >= 1"):
        PatchingConfig(pair_block=0)
