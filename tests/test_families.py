"""Model families as table rows: images of any size in one batch, each family's position ids and image
features, prompt modes with exactly one BOS, answer tokens, LoRA on text layers only, non-HF checkpoints.

Every test that takes ``family`` runs on a tiny random model of each row of ``hooks.sites.ARCHITECTURES``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hooks.adapter import AdapterConfig, VLMAdapter
from hooks.checkpoints import NotHFFormat
from hooks.inputs import Removal
from hooks.prompt import check_bos
from hooks.sites import ARCHITECTURES
from hooks.tiny import tiny_vlm
from tests.conftest import ARCH_OF, FAMILIES, QUESTIONS, WORDS, make_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

#: The Gemma 3 chat template (``tokenizer.chat_template`` of google/gemma-3-*-it, hence MedGemma-it), as
#: printed from the tokenizer into unslothai/unsloth, unsloth/chat_templates.py (``gemma3_template``),
#: commit 015bdef0d94a241bcd94eec7a405b1700632180d. It starts with ``{{ bos_token }}``.
GEMMA3_CHAT_TEMPLATE = (Path(__file__).parent / "fixtures" / "gemma3_chat_template.jinja").read_text()
#: A LLaVA-1.5-style template (written for this test) that does not write a BOS: the tokenizer adds it.
LLAVA_STYLE_TEMPLATE = (
    "{% for message in messages %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
CHAT_WORDS = [*WORDS, "user", "model", "assistant"]
#: (width, height) of images of three shapes: square, landscape, portrait.
SIZES = [(32, 32), (64, 48), (40, 64)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def free(family: str) -> VLMAdapter:
    """The family's tiny model without the image-size guard (the processor resizes)."""
    return make_adapter(family, config=AdapterConfig())


def mixed_images(seed: int = 0) -> list[Image.Image]:
    """Three sizes and three modes (grayscale, RGB, RGBA), as real data comes."""
    rng = np.random.default_rng(seed)
    modes = ["L", "RGB", "RGBA"]
    out = []
    for (w, h), mode in zip(SIZES, modes, strict=True):
        arr = (rng.random((h, w, 4)) * 255).astype(np.uint8)
        out.append(Image.fromarray(arr, mode="RGBA").convert(mode))
    return out


# ---------------------------------------------------------------------- the table
def test_every_row_has_a_tiny_model() -> None:
    """Adding a family = a row + a tiny model: the tests cover every row and nothing else."""
    assert set(ARCH_OF.values()) == set(ARCHITECTURES)
    for fam in FAMILIES:
        model, _ = tiny_vlm(fam, WORDS)  # type: ignore[arg-type]
        assert type(model).__name__ == ARCH_OF[fam]


# ---------------------------------------------------------------------- images of any size
def test_mixed_sizes_and_modes_in_one_batch(free: VLMAdapter) -> None:
    imgs = mixed_images()
    qs = [*QUESTIONS, QUESTIONS[0]]
    batch = free.prepare([*imgs, None], qs)
    m = free.margins(batch)
    single = torch.cat(
        [free.margins(free.prepare([im], [q])) for im, q in zip([*imgs, None], qs, strict=True)]
    )
    torch.testing.assert_close(m, single, atol=1e-5, rtol=1e-5)
    counts = batch.image_mask.sum(-1).tolist()
    assert counts[3] == 0 and min(counts[:3]) > 0
    if free.spec.inputs.image_layout == "grid_patches" or "image_sizes" in free.spec.inputs.image_keys:
        assert len(set(counts[:3])) == 3  # dynamic resolution: each shape its own token count
    else:
        assert len(set(counts[:3])) == 1  # resized to the one input size
    # cached features (images encoded alone, as the evaluator does) == the full forward
    feats = free.encode_images(imgs)
    assert [f.shape[0] for f in feats] == counts[:3]
    torch.testing.assert_close(free.margins(batch, image_features=feats), m, atol=1e-5, rtol=1e-5)
    # a sub-batch with repeats and reordering keeps each row's own image
    sub = batch.select([2, 3, 0, 2])
    torch.testing.assert_close(free.margins(sub), m[[2, 3, 0, 2]], atol=1e-5, rtol=1e-5)


def test_guard_is_opt_in(family: str) -> None:
    guarded = make_adapter(family)
    assert guarded.config.expected_image_size is not None
    side = guarded.config.expected_image_size
    with pytest.raises(
        ValueError,
        match=rf"image size \(40, 64\) does not match the model's input size {side}x{side} \(and 1 other",
    ):
        guarded.prepare(mixed_images()[1:], QUESTIONS[:2])


def test_evaluator_scores_mixed_sizes_with_cached_features(free: VLMAdapter, tmp_path: Path) -> None:
    """The evaluator (unchanged but for passing a list of feature blocks) on images of three sizes."""
    from analyses.data.schema import QuestionRow
    from analyses.eval.evaluate import EvalConfig, evaluate

    imgs = dict(zip(["a", "b", "c"], mixed_images(1), strict=True))
    rows = [
        QuestionRow(f"{k}{j}", k, q, "original", None, 1, (j + i) % 2 == 0, "cardiomegaly", "test", f"p{k}")
        for i, k in enumerate(imgs)
        for j, q in enumerate(QUESTIONS[:2])
    ]
    cfg = EvalConfig(removal="noise", batch_size=16)
    df = evaluate(
        free,
        rows,
        lambda ref: imgs[ref if isinstance(ref, str) else ref.image_id],
        tmp_path,
        cfg,
        progress=False,
    )
    by = df.set_index(["qid", "condition"])
    for r in rows:
        own = imgs[r.image_id].convert("RGB")
        direct = free.margins(free.prepare([own], [r.question]))[0].item()
        assert by.loc[(r.qid, "image"), "margin"] == pytest.approx(direct, abs=1e-5)
        noise = Removal("noise", seed=0).apply(own, 0)
        direct_rm = free.margins(free.prepare([noise], [r.question]))[0].item()
        assert by.loc[(r.qid, "removed"), "margin"] == pytest.approx(direct_rm, abs=1e-5)
        swap = by.loc[(r.qid, "swap_random"), "swap_image_id"]
        direct_sw = free.margins(free.prepare([imgs[swap]], [r.question]))[0].item()
        assert by.loc[(r.qid, "swap_random"), "margin"] == pytest.approx(direct_sw, abs=1e-5)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["prompt_example"]["text"] and meta["answer_ids"]["yes_ids"] == list(free.answer_ids.yes_ids)


# ---------------------------------------------------------------------- positions
def test_positions_equal_the_models_own(free: VLMAdapter) -> None:
    """The family's position rule gives what the HF model computes itself: for one unpadded row for
    every family, and for a left-padded batch with a text-only row for Qwen's 3-D rotary index."""
    one = free.prepare(mixed_images()[1:2], QUESTIONS[:1])
    own = {k: v for k, v in one.inputs.items() if k != "position_ids"}
    with torch.no_grad():
        torch.testing.assert_close(free.model(**one.inputs).logits[:, -1], free.model(**own).logits[:, -1])
    if free.spec.inputs.position_ids != "mrope":
        return
    batch = free.prepare([*mixed_images(), None], [*QUESTIONS, QUESTIONS[0]])
    own = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    with torch.no_grad():
        torch.testing.assert_close(
            free.model(**batch.inputs).logits[:, -1], free.model(**own).logits[:, -1], atol=1e-5, rtol=1e-5
        )


def test_qwen_image_positions_by_hand() -> None:
    """A 64x48 (w x h) image: 6x8 patches of 8 px, merged 2x2 -> a 3x4 token grid at 3-D positions
    (t, row, col) offset by the text before it; text after it resumes at offset + max(3, 4)."""
    a = make_adapter("qwen2_5_vl", config=AdapterConfig())
    b = a.prepare([mixed_images()[1]], QUESTIONS[:1])
    pos = b.inputs["position_ids"][:, 0]  # (3, pos); one row, no padding
    img = b.image_mask[0].nonzero()[:, 0]
    assert len(img) == 12
    start = int(img[0])  # <|vision_start|> sits at start - 1, at position start - 1
    rows = torch.arange(3).repeat_interleave(4)
    cols = torch.arange(4).repeat(3)
    assert torch.equal(pos[0, img], torch.full((12,), start))
    assert torch.equal(pos[1, img], start + rows) and torch.equal(pos[2, img], start + cols)
    after = int(img[-1]) + 1
    assert pos[:, after].tolist() == [start + 4] * 3 and pos[:, after + 1].tolist() == [start + 5] * 3
    assert torch.equal(pos[:, :start], torch.arange(start).expand(3, -1))


# ---------------------------------------------------------------------- prompts
def chat_adapter(family: str, template: str, **cfg: object) -> VLMAdapter:
    extra = ("<start_of_turn>", "<end_of_turn>") if family == "gemma3" else ()
    model, proc = tiny_vlm(family, CHAT_WORDS, extra_specials=extra)  # type: ignore[arg-type]
    proc.chat_template = template
    return VLMAdapter(model, proc, AdapterConfig(**cfg))  # type: ignore[arg-type]


def test_gemma3_chat_prompt_has_exactly_one_bos() -> None:
    a = chat_adapter("gemma3", GEMMA3_CHAT_TEMPLATE)
    assert a.prompt_mode == "chat"  # auto: the processor has a chat template
    b = a.prepare([mixed_images()[0], None], QUESTIONS[:2])
    bos = a.tokenizer.bos_token_id
    for i in range(2):
        toks = a.tokenizer.convert_ids_to_tokens(b.input_ids[i][b.attention_mask[i]].tolist())
        assert toks[:3] == ["<bos>", "<start_of_turn>", "user"] and toks.count("<bos>") == 1
        assert toks[-3:] == [
            "<end_of_turn>",
            "<start_of_turn>",
            "model",
        ]  # answer predicted as the model turn
    assert b.texts[0].startswith("<bos><start_of_turn>user\n<start_of_image>")
    # what the old path did: the rendered text tokenized with special tokens starts with two BOS
    twice = a.processor(text=[b.texts[1]], return_tensors="pt")
    assert twice["input_ids"][0, :2].tolist() == [bos, bos]
    with pytest.raises(ValueError, match="two BOS"):
        check_bos(twice["input_ids"], twice["attention_mask"], bos)
    # margins of the chat prompt are the plain HF forward's
    with torch.no_grad():
        torch.testing.assert_close(a.margins(b), a.answer_ids.margin(a.model(**b.inputs).logits[:, -1]))


def test_text_before_the_image_and_plain_mode() -> None:
    after = chat_adapter("gemma3", GEMMA3_CHAT_TEMPLATE, image_position="after")
    b = after.prepare([mixed_images()[0]], QUESTIONS[:1])
    q_end = int(b.question_mask[0].nonzero().max())
    assert int(b.image_mask[0].nonzero().min()) > q_end  # the question comes first
    assert "cardiomegaly?" in b.texts[0].split("<start_of_image>")[0]
    plain = chat_adapter("gemma3", GEMMA3_CHAT_TEMPLATE, prompt="plain")
    assert plain.prompt_mode == "plain"
    p = plain.prepare([mixed_images()[0]], QUESTIONS[:1])
    assert "<start_of_turn>" not in p.texts[0] and p.texts[0].startswith("<start_of_image> Question:")
    plain.set_prompt("chat", "after")
    assert plain.prompt_mode == "chat" and plain.config.image_position == "after"


def test_template_without_bos_keeps_the_tokenizers_one() -> None:
    a = chat_adapter("llava", LLAVA_STYLE_TEMPLATE)
    b = a.prepare([mixed_images()[0]], QUESTIONS[:1])
    toks = a.tokenizer.convert_ids_to_tokens(b.input_ids[0][b.attention_mask[0]].tolist())
    assert toks[0] == "<bos>" and toks.count("<bos>") == 1 and toks[-2:] == ["assistant", ":"]


def test_prompt_mode_defaults_and_errors() -> None:
    from analyses.organism.model import load_organism

    organism = load_organism()
    assert organism.prompt_mode == "plain"  # its processor has no chat template: as it was trained
    assert organism.describe("Is there cardiomegaly?")["prompt_example"]["tokens"][:3] == [
        "<bos>",
        "<start_of_image>",
        "<image_soft_token> x16",
    ]
    with pytest.raises(ValueError, match="no chat template"):
        make_adapter("llava", config=AdapterConfig(prompt="chat"))
    with pytest.raises(ValueError, match="prompt must be one of"):
        AdapterConfig(prompt="turns")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_position"):
        AdapterConfig(image_position="left")  # type: ignore[arg-type]


def test_describe_records_the_rendered_prompt_and_answer_ids(family: str) -> None:
    a = make_adapter(family)
    d = a.describe(QUESTIONS[0])
    assert d["prompt_mode"] == "plain" and d["image_position"] == "before"
    ex = d["prompt_example"]
    assert "Is there cardiomegaly?" in ex["text"] and len(ex["token_ids"]) > 10
    assert sum(t.startswith(a.tokenizer.convert_ids_to_tokens(a.image_token_id)) for t in ex["tokens"]) == 1
    assert d["answer_ids"]["yes_tokens"] == ["yes"] and d["answer_ids"]["no_tokens"] == ["no"]


def test_answer_words_must_be_single_tokens(family: str) -> None:
    with pytest.raises(ValueError, match=r"no 'yes' variant is a single token.*'yess' -> \['<unk>'\]"):
        make_adapter(family, config=AdapterConfig(yes_words=("yess", "y es")))


# ---------------------------------------------------------------------- LoRA
def test_lora_targets_only_text_layers(family: str) -> None:
    from lora_targeted.targets import lora_module_names
    from lora_targeted.train import wrap_lora

    a = make_adapter(family)
    peft_model, lora = wrap_lora(a, [0, 2])
    names = lora_module_names(peft_model.base_model.model)
    text = a.spec.text_layers
    assert names and all(n.startswith(f"{text}.0.") or n.startswith(f"{text}.2.") for n in names)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each chosen layer
    vision = a.spec.vision_layers.rsplit(".", 1)[0]
    assert not any(
        n.startswith(vision) for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")
    )
    probe = a.prepare(
        mixed_images()[:1]
        if a.config.expected_image_size is None
        else [Image.new("RGB", (a.config.expected_image_size,) * 2)],
        QUESTIONS[:1],
    )
    torch.testing.assert_close(lora.margins(probe), a.margins(probe))  # B = 0 at init


# ---------------------------------------------------------------------- checkpoints not in HF format
@pytest.mark.parametrize(
    ("config", "named"),
    [
        (  # LLaVA-Rad: LLaVA v1.5 code layout, BiomedCLIP vision tower through open_clip
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava_llama",
                "mm_vision_tower": "biomedclip_cxr_518",
                "mm_projector_type": "mlp2x_gelu",
                "mm_hidden_size": 768,
            },
            "biomedclip_cxr_518",
        ),
        (  # LLaVA 1.5 / LLaVA-Med v1.5 original releases: model_type "llava" but not HF's LlavaConfig
            {
                "architectures": ["LlavaMistralForCausalLM"],
                "model_type": "llava",
                "mm_vision_tower": "openai/clip",
            },
            "LlavaMistralForCausalLM",
        ),
    ],
)
def test_non_hf_checkpoint_is_a_one_line_error(tmp_path: Path, config: dict, named: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotHFFormat) as err:
        VLMAdapter.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and named in msg and "HF-format conversion" in msg and "README" in msg
