"""`VLMAdapter`: one object that loads an HF image-text-to-text model, builds batches, reads the
yes/no decision margin, and exposes every site by its typed name (plain hooks or nnsight traces).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor, nn

from hooks.answer import AnswerIds, AnswerReduce, find_answer_ids
from hooks.batch import Batch, build_batch, render_prompts
from hooks.checkpoints import check_hf_format
from hooks.devices import input_device
from hooks.inputs import DEFAULT_TEMPLATE, ImageLike, Removal, check_images, load_image
from hooks.layout import EncodedImage, build_layout, layout_features
from hooks.prompt import IMAGE_POSITIONS, PROMPT_MODES, ImagePosition, PromptMode, resolve_mode
from hooks.sites import ArchSpec, ModuleRef, Site, arch_spec, config_arch
from hooks.trace import SiteTrace

HookFn = Callable[[Tensor], Tensor | None]
#: Image features of the rows that have an image, in row order: one ``(tokens, d_model)`` block each
#: (a list, since rows may differ in token count), or a stacked ``(n, tokens, d_model)`` tensor.
ImageFeatures = Sequence[Tensor] | Tensor


@dataclass(frozen=True)
class AdapterConfig:
    """How questions become prompts and logits become a decision margin."""

    prompt_template: str = DEFAULT_TEMPLATE
    """Prompt with ``{q}`` where the question goes."""
    prompt: PromptMode = "auto"
    """``chat``: the prompt goes into a user turn of the processor's chat template (instruction-tuned
    models such as MedGemma-it); ``plain``: image placeholder and prompt only; ``auto``: ``chat`` if the
    processor has a chat template, else ``plain`` (see :mod:`hooks.prompt`)."""
    image_position: ImagePosition = "before"
    """Where the image goes relative to the question text: ``before`` or ``after`` (MedGemma
    interpretability work puts the text first)."""
    yes_words: tuple[str, ...] = ("yes", "Yes", "YES", " yes", " Yes")
    """Surface forms of "yes"; those that are single tokens of the tokenizer are used."""
    no_words: tuple[str, ...] = ("no", "No", "NO", " no", " No")
    """Surface forms of "no"; those that are single tokens of the tokenizer are used."""
    answer_reduce: AnswerReduce = "max"
    """How the logits of several yes (no) token ids are combined: ``max``, ``sum`` or ``logsumexp``."""
    expected_image_size: int | None = None
    """If set, images of another size are refused (instead of silently resized by the processor)."""
    resize_images: bool = False
    """With ``expected_image_size`` set: let the processor resize images of another size to it instead of
    refusing them (CLI ``--resize``; recorded as ``image_size`` in run records)."""
    batch_size: int = 32
    """Rows per forward pass in :meth:`VLMAdapter.margins_for`."""

    def __post_init__(self) -> None:
        if "{q}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{q}}': {self.prompt_template!r}")
        if self.answer_reduce not in ("max", "sum", "logsumexp"):
            raise ValueError(f"answer_reduce must be max, sum or logsumexp, got {self.answer_reduce!r}")
        if not self.yes_words or not self.no_words:
            raise ValueError("yes_words and no_words must be non-empty")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prompt not in PROMPT_MODES:
            raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {self.prompt!r}")
        if self.image_position not in IMAGE_POSITIONS:
            raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {self.image_position!r}")


def _hub_snapshot(name: str | Path, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model just loaded (from the HF cache, no network), or ``None``."""
    from transformers.utils import cached_file

    try:
        found = cached_file(str(name), "config.json", revision=revision, local_files_only=True)
    except OSError:
        return None
    return Path(found).parent if found else None


class VLMAdapter:
    """A loaded VLM with typed sites and a yes/no decision margin.

    >>> adapter = VLMAdapter.from_pretrained("organism/")          # or "google/medgemma-4b-it"
    >>> batch = adapter.prepare([image], ["Is there cardiomegaly?"])
    >>> adapter.margins(batch)                                       # logit(yes) - logit(no)
    """

    def __init__(self, model: nn.Module, processor: Any, config: AdapterConfig | None = None, name: str = ""):
        self.spec: ArchSpec = arch_spec(model)
        self.model: Any = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.configure(config or AdapterConfig())
        self.n_layers: int = len(self.get_module(self.spec.text_layers))  # type: ignore[arg-type]
        self.n_vision_layers: int = len(self.get_module(self.spec.vision_layers))  # type: ignore[arg-type]
        hf_cfg: Any = model.config
        self.d_model: int = hf_cfg.get_text_config().hidden_size
        self.image_token_id: int = hf_cfg.image_token_id

    def configure(self, config: AdapterConfig) -> None:
        """Use ``config`` from now on (prompt mode, answer words, ...), checked against this model."""
        self.prompt_mode = resolve_mode(config.prompt, self.processor)
        yes_ids, yes_tok = find_answer_ids(self.tokenizer, config.yes_words, "yes")
        no_ids, no_tok = find_answer_ids(self.tokenizer, config.no_words, "no")
        if set(yes_ids) & set(no_ids):
            raise ValueError(f"yes and no share token ids {set(yes_ids) & set(no_ids)}")
        self.answer_ids = AnswerIds(yes_ids, no_ids, yes_tok, no_tok, config.answer_reduce)
        before = getattr(self, "config", None)
        self.config = config
        try:
            self._check_image_position()
        except ValueError:
            if before is not None:
                self.configure(before)
            raise

    def _check_image_position(self) -> None:
        """Refuse a chat template that puts the image elsewhere than ``config.image_position`` says (the
        LLaVA templates render every image first), so that what a run records is what ran."""
        from hooks.prefix import image_order

        want = self.config.image_position
        if self.prompt_mode != "chat" or image_order(self, "Is there an effusion?") in (None, want):
            return
        got = "before" if want == "after" else "after"
        raise ValueError(
            f"image_position={want!r}, but this processor's chat template puts the image {got} the question "
            f"whatever the order given; use --prompt plain (prompt='plain') or --image-position {got}"
        )

    def set_prompt(
        self, prompt: PromptMode | None = None, image_position: ImagePosition | None = None
    ) -> None:
        """Change the prompt mode and/or the image position (``None``: keep), e.g. from CLI options."""
        changes: dict[str, Any] = {}
        if prompt is not None:
            changes["prompt"] = prompt
        if image_position is not None:
            changes["image_position"] = image_position
        self.configure(dataclasses.replace(self.config, **changes))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        config: AdapterConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool | None = None,
        attn_implementation: str | None = "sdpa",
    ) -> VLMAdapter:
        """Load a model and processor from a local folder or a hub id (e.g. ``google/medgemma-4b-it``).

        A local folder never touches the network. ``dtype`` defaults to the checkpoint's own
        (bf16 for MedGemma); ``device_map="auto"`` spreads a 27B model over GPUs, within ``max_memory``
        per device if given (:mod:`hooks.devices`). SDPA attention is the default:
        the computations that need eager (attention weights, the resumed sweep's materialised masks)
        switch the text stack to it for their own forward passes only (:mod:`hooks.attn`).
        """
        from hooks.loading import check_folder, check_model_files, load_config, load_model, load_processor

        path = Path(name_or_path)
        is_local = path.exists()
        if not is_local and str(name_or_path).startswith((".", "/")):
            raise FileNotFoundError(f"model folder not found: {path}")
        if is_local:
            check_folder(path)
        offline = local_files_only if local_files_only is not None else is_local
        check_hf_format(name_or_path, revision=revision, local_files_only=offline)
        if is_local:
            check_model_files(path)
        hub: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code, local_files_only=offline)
        hf_config = load_config(name_or_path, **hub)
        arch_name = config_arch(hf_config)
        arch_spec(arch_name)  # fail before loading weights if unsupported
        kwargs: dict[str, Any] = dict(hub)
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model: Any = load_model(name_or_path, arch_name, **kwargs)
        if device is not None and device_map is None:
            model = model.to(device)
        model.eval()
        processor = load_processor(name_or_path, str(hf_config.model_type), **hub)
        adapter = cls(model, processor, config, name=str(name_or_path))
        adapter.revision = revision or getattr(hf_config, "_commit_hash", None) or "local"
        adapter.weights_dir = path.absolute() if is_local else _hub_snapshot(name_or_path, revision)
        return adapter

    revision: str | None = None
    weights_dir: Path | None = None
    """The folder the weights were loaded from (a local folder or the hub cache's snapshot); ``None`` for a
    model built in memory. Run folders fingerprint the weight files found here."""

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (the first device of a model spread over several)."""
        return input_device(self.model)

    def describe(self, example_question: str | None = None) -> dict[str, Any]:
        """What produced a result: recorded with every run.

        With ``example_question`` (e.g. the first row's), the prompt it renders to with an image is
        recorded too: as given to the processor, and as token ids (runs of image tokens shortened).
        """
        out: dict[str, Any] = {
            "model": self.name,
            "revision": self.revision,
            "architecture": self.spec.name,
            "n_layers": self.n_layers,
            "prompt_template": self.config.prompt_template,
            "prompt_mode": self.prompt_mode,
            "image_position": self.config.image_position,
            "image_size": self.image_size_rule(),
            "answer_ids": self.answer_ids.as_dict(),
        }
        if example_question is not None:
            out["prompt_example"] = self.render_prompt(example_question)
        return out

    @property
    def size_guard(self) -> int | None:
        """The only image side this adapter takes (``expected_image_size`` without ``resize_images``), or
        ``None``: any size (the processor resizes)."""
        return None if self.config.resize_images else self.config.expected_image_size

    def image_size_rule(self) -> str:
        """What happens to an image's size, as recorded: ``processor`` (every size, the processor resizes),
        ``NxN only`` (other sizes refused) or ``resized to NxN`` (``resize_images``)."""
        size = self.config.expected_image_size
        if size is None:
            return "processor"
        return f"resized to {size}x{size}" if self.config.resize_images else f"{size}x{size} only"

    def render_prompt(self, question: str, has_image: bool = True) -> dict[str, Any]:
        """The prompt of ``question``: ``text`` as given to the processor, ``token_ids`` and ``tokens``
        after tokenization (with a stand-in image; a run of image tokens is listed once with its count)."""
        text = render_prompts(self, [question], [has_image])[0].text
        image = Image.new("RGB", (self.config.expected_image_size or 64,) * 2, (128, 128, 128))
        batch = self.prepare([image if has_image else None], [question])
        ids = batch.input_ids[0][batch.attention_mask[0]].tolist()
        image_tok = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        runs: list[list[Any]] = []
        for tok in self.tokenizer.convert_ids_to_tokens(ids):
            if tok == image_tok and runs and runs[-1][0] == image_tok:
                runs[-1][1] += 1
            else:
                runs.append([tok, 1])
        tokens = [tok if n == 1 else f"{tok} x{n}" for tok, n in runs]
        return {"text": text, "token_ids": ids, "tokens": tokens}

    # ------------------------------------------------------------------ inputs
    def prepare(
        self,
        images: Sequence[ImageLike | None],
        questions: Sequence[str],
        conditions: Sequence[str] | None = None,
    ) -> Batch:
        """Tokenize (image, question) pairs into one left-padded batch.

        ``images[i] = None`` means no image tokens at all (the ``none`` removal). Every prompt ends
        at the same (last) position, where the first answer token is predicted.
        """
        if len(images) != len(questions):
            raise ValueError(
                f"{len(images)} images but {len(questions)} questions: pass one image per question"
            )
        if not questions:
            raise ValueError("empty batch: pass at least one (image, question) pair")
        pil = [None if im is None else load_image(im) for im in images]
        conds = (
            list(conditions) if conditions is not None else ["image" if im else "removed:none" for im in pil]
        )
        return build_batch(self, pil, list(questions), conds)

    def removed(self, images: Sequence[ImageLike], removal: Removal) -> list[Image.Image | None]:
        """The image-removed condition for each image (``None`` entries for ``kind="none"``)."""
        return [removal.apply(load_image(im), i) for i, im in enumerate(images)]

    # ------------------------------------------------------------------ forward
    def forward_kwargs(self, batch: Batch) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.inputs.items()}

    def image_inputs(self, images: Sequence[ImageLike]) -> dict[str, Tensor]:
        """The image tensors the processor makes for ``images`` (the family's image keys, e.g.
        ``pixel_values`` + ``image_grid_thw``), exactly as :meth:`prepare` puts them into a batch."""
        return self._process_images([load_image(im) for im in images])[0]

    def _process_images(self, pil: list[Image.Image]) -> tuple[dict[str, Tensor], list[str]]:
        """The processor's image half: image tensors and each image's placeholder replacement string."""
        family = self.spec.inputs
        if not pil:
            raise ValueError("no images to encode")
        check_images(list(pil), self.size_guard)
        # through the full processor (its image kwargs included), with a bare placeholder as the text
        text = [family.placeholder_text(self.processor)] * len(pil)
        out = self.processor(
            text=text,
            images=family.processor_images(pil),
            padding=True,
            return_tensors="pt",
            return_text_replacement_offsets=True,
        )
        replacements = [offsets[0]["replacement"] for offsets in out["text_replacement_offsets"]]
        return {k: out[k] for k in family.image_keys}, replacements

    def encode(self, images: Sequence[ImageLike]) -> list[EncodedImage]:
        """Each image processed and encoded once (one at a time, so a result does not depend on its
        neighbours): features, placeholder replacement and grid, for :meth:`layout` and the prefix path."""
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            for im in images:
                pil = load_image(im)
                inputs, (replacement,) = self._process_images([pil])
                (feats,) = self.image_features(inputs)
                grid = {k: v for k, v in inputs.items() if k != "pixel_values"}
                out.append(EncodedImage(feats.detach(), replacement, grid))
        finally:
            self.model.train(was_training)
        return out

    def layout(
        self,
        questions: Sequence[str],
        images: Sequence[EncodedImage | None],
        conditions: Sequence[str] | None = None,
    ) -> Batch:
        r""":meth:`prepare` for images already :meth:`encode`\ d: the tokenizer alone, no image processing.
        Pass ``image_features=layout_features(images)`` (:func:`hooks.layout.layout_features`) to score it."""
        return build_layout(
            self, list(questions), list(images), None if conditions is None else list(conditions)
        )

    def image_features(self, image_inputs: dict[str, Tensor]) -> list[Float[Tensor, "tokens d_model"]]:
        """Features of each image as the model writes them into its image tokens (vision tower,
        projector and any family-specific packing), one ``(tokens, d_model)`` block per image.

        ``image_inputs``: a batch's :attr:`~hooks.batch.Batch.image_inputs` or :meth:`image_inputs`.
        """
        dev, dtype = self.device, self.dtype
        moved = {k: v.to(dev, dtype) if v.is_floating_point() else v.to(dev) for k, v in image_inputs.items()}
        with torch.no_grad():
            return self.spec.inputs.features(self.model, moved)

    def encode_images(self, images: Sequence[ImageLike]) -> list[Float[Tensor, "tokens d_model"]]:
        """Features of each image (:meth:`image_features` of :meth:`image_inputs`), in eval mode and
        without gradients: what :class:`hooks.features.ImageFeatureCache` stores."""
        was_training = self.model.training
        self.model.eval()
        try:
            return [f.detach() for f in self.image_features(self.image_inputs(images))]
        finally:
            self.model.train(was_training)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def embed(self, batch: Batch, image_features: ImageFeatures) -> Tensor:
        """Input embeddings with precomputed image features scattered into the image tokens.

        ``image_features[k]`` (a ``(tokens, d_model)`` block, or a row of a stacked tensor) belongs to the
        k-th row of the batch that has an image. Lets an evaluator encode each image once and reuse it
        for every question and condition.
        """
        ids = batch.input_ids.to(self.device)
        emb = self.model.get_input_embeddings()(
            ids.clamp(max=self.model.get_input_embeddings().num_embeddings - 1)
        )
        mask = batch.image_mask.to(self.device)
        counts = mask.sum(-1)[mask.any(-1)].tolist()
        feats = list(image_features)
        if len(feats) != len(counts):
            raise ValueError(f"{len(feats)} image feature sets for {len(counts)} rows with an image")
        bad = [
            (k, f.shape[0], c) for k, (f, c) in enumerate(zip(feats, counts, strict=True)) if f.shape[0] != c
        ]
        if bad:
            k, got, want = bad[0]
            raise ValueError(
                f"image feature set {k} has {got} tokens but its row has {want} image tokens; encode the "
                "image the row shows (same size: dynamic-resolution models give each size its own count)"
            )
        flat = (
            torch.cat([f.to(emb.device, emb.dtype) for f in feats])
            if feats
            else emb.new_zeros(0, emb.shape[-1])
        )
        return emb.masked_scatter(mask.unsqueeze(-1), flat)

    def logits(
        self, batch: Batch, last_only: bool = True, image_features: ImageFeatures | None = None
    ) -> Tensor:
        """Plain HF forward; logits at the last position only by default.

        With ``image_features`` (from :meth:`image_features` / :meth:`encode_images`) the vision tower is
        skipped.
        """
        kwargs = self.forward_kwargs(batch)
        if image_features is None and not batch.image_inputs and bool(batch.image_mask.any()):
            raise ValueError(
                "this batch has image tokens but no pixels (laid out by adapter.layout): pass "
                "image_features=layout_features(images), or build it with adapter.prepare"
            )
        if image_features is not None:
            for key in self.spec.inputs.image_keys:
                kwargs.pop(key, None)
            kwargs["inputs_embeds"] = self.embed(batch, image_features)
            kwargs.pop("input_ids")
        out = self.model(**kwargs, logits_to_keep=1 if last_only else 0, use_cache=False)
        return out.logits

    def margins(
        self, batch: Batch, grad: bool = False, image_features: ImageFeatures | None = None
    ) -> Float[Tensor, " batch"]:
        """Decision margin logit(yes) - logit(no) at the first answer token, one forward pass."""
        with torch.set_grad_enabled(grad):
            return self.answer_ids.margin(self.logits(batch, image_features=image_features)[:, -1])

    def margins_for(
        self,
        images: Sequence[ImageLike | None],
        questions: Sequence[str],
        batch_size: int | None = None,
        reuse_prefix: bool | None = None,
    ) -> Float[Tensor, " n"]:
        """Margins for many pairs, in batches of ``batch_size`` (default: config.batch_size).

        Each distinct image (the same object or path) is processed and encoded once; with the image
        before the question, rows about one image share its prefix's keys/values (:mod:`hooks.prefix`;
        ``reuse_prefix=False`` forces full forwards, ``None`` reuses wherever the prompt allows).
        """
        from hooks.prefix import PrefixStore, prefix_margins, reusable

        if len(images) != len(questions):
            raise ValueError(
                f"{len(images)} images but {len(questions)} questions: pass one image per question"
            )
        bs = batch_size or self.config.batch_size
        keys = [None if im is None else (str(im) if isinstance(im, str | Path) else id(im)) for im in images]
        encoded: dict[Any, EncodedImage] = {}
        for key, im in zip(keys, images, strict=True):
            if im is not None and key not in encoded:
                encoded[key] = self.encode([im])[0]
        store = PrefixStore()
        out = []
        for i in range(0, len(questions), bs):
            shown = [None if k is None else encoded[k] for k in keys[i : i + bs]]
            batch = self.layout(questions[i : i + bs], shown)
            feats = layout_features(shown)
            if reuse_prefix is not False and (reuse_prefix or reusable(batch)):
                img_keys = [k for k in keys[i : i + bs] if k is not None]
                out.append(prefix_margins(self, batch, feats, img_keys, store))
            else:
                out.append(self.margins(batch, image_features=feats).float().cpu())
        return torch.cat(out)

    def compile_text_stack(self) -> None:
        """``torch.compile`` each text decoder layer in place (dynamic shapes; hooks on it keep working).

        Compiles lazily on the first forward of each new shape class: worth it for long runs on a GPU
        (measured at MedGemma-4B shape on an H200: a bare forward 153 -> 220 rows/s), not on a CPU."""
        layers: Any = self.get_module(self.spec.text_layers)
        for layer in layers:
            layer.compile(dynamic=True)

    # ------------------------------------------------------------------ sites
    def resolve(self, site: Site) -> ModuleRef:
        return self.spec.resolve(site, self.n_layers, self.n_vision_layers)

    def get_module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def module(self, site: Site) -> nn.Module:
        """The nn.Module a site lives on (read its input or output per :meth:`resolve`)."""
        return self.get_module(self.resolve(site).path)

    def text_layer(self, layer: int) -> nn.Module:
        return self.get_module(f"{self.spec.text_layers}.{layer}")

    def unembed(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """Final norm + unembedding (+ soft-cap where the architecture has one): the logit lens."""
        logits = self.get_module(self.spec.lm_head)(self.get_module(self.spec.final_norm)(resid))
        cap_attr = self.spec.logit_softcap_attr
        cap = getattr(self.model.config.get_text_config(), cap_attr, None) if cap_attr else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @contextmanager
    def hooks(self, fns: dict[Site, HookFn]) -> Iterator[None]:
        """Plain PyTorch hooks on sites, removed on exit even if the body raises.

        Each function receives the site's activation ``(batch, pos, d)`` and returns a replacement
        (or ``None`` to leave it). Cheap enough for sweeps of thousands of patched forwards.
        """
        handles = []
        try:
            for site, fn in fns.items():
                ref = self.resolve(site)
                mod = self.get_module(ref.path)
                if ref.io == "input":
                    handles.append(mod.register_forward_pre_hook(_pre_hook(fn), with_kwargs=True))
                else:
                    handles.append(mod.register_forward_hook(_post_hook(fn, ref.index)))
            yield
        finally:
            for h in handles:
                h.remove()

    def trace(self, batch: Batch) -> Any:
        """An nnsight trace over one batch; inside it, :attr:`sites` addresses sites by typed name.

        >>> with adapter.trace(batch):
        ...     h = adapter.sites[resid_post(3)].save()       # read
        ...     adapter.sites[resid_post(3)] = h * 0          # overwrite
        ...     m = adapter.sites.margin().save()             # decision margin per row

        nnsight compiles the body of the ``with`` block from the caller's frame, so this returns
        nnsight's own tracer (a wrapper would hide that frame); nnsight removes its hooks on exit.
        """
        from hooks.trace import SiteTrace, nnsight_model

        nn_model = nnsight_model(self)
        self.sites = SiteTrace(self, nn_model)
        return nn_model.trace(**self.forward_kwargs(batch), use_cache=False)

    sites: SiteTrace


def _pre_hook(fn: HookFn) -> Callable[..., Any]:
    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _post_hook(fn: HookFn, index: int | None) -> Callable[..., Any]:
    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        if index is None:
            return fn(output)
        new = fn(output[index])
        return None if new is None else (*output[:index], new, *output[index + 1 :])

    return hook
