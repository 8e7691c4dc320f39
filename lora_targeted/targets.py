"""From a per-layer interpretability result to a LoRA config on those text layers only.

peft's ``layers_to_transform=[...]`` matches *every* module list with a number in its path, so on a
VLM it also wraps the vision tower's same-numbered layers. Here the targets are one anchored regex
built from the architecture's text-layer path (``adapter.spec.text_layers``), which peft matches with
``re.fullmatch`` against module names of the base model: the vision tower can never match.

>>> layers = select_layers(LayerScores.from_json("scores.json"), k=5)
>>> cfg = lora_config(adapter, layers)                  # r=16, alpha=32, dropout 0.05, q/k/v/o + MLP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from interp.scores import LayerScores

if TYPE_CHECKING:
    from peft import LoraConfig

    from hooks.adapter import VLMAdapter

#: Attention and MLP projections of a Gemma3 / Llama-family decoder layer (the released adapters' set).
DEFAULT_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def all_layers(adapter: VLMAdapter) -> list[int]:
    """Every text decoder layer of the adapter's model: the all-layers LoRA baseline."""
    return list(range(adapter.n_layers))


def select_layers(
    scores: LayerScores | None = None,
    k: int | None = None,
    layers: Sequence[int] | None = None,
    n_layers: int | None = None,
) -> list[int]:
    """The text layers to adapt: the ``k`` best of ``scores``, or an explicit ``layers`` list.

    Exactly one of (``scores`` with ``k``) or ``layers`` must be given. Negative layers count from the
    end when ``n_layers`` is known; with ``n_layers`` every layer is checked to lie in ``0..n_layers-1``
    and ``k`` must not exceed it. The result is sorted ascending and has no duplicates.
    """
    if (scores is None) == (layers is None):
        raise ValueError(
            "give either scores (with k) or an explicit layers list, not both and not neither: "
            "e.g. select_layers(scores, k=5) or select_layers(layers=[15, 16, 17])"
        )
    if n_layers is not None and n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if scores is not None:
        if k is None:
            raise ValueError("select_layers(scores, ...) needs k, the number of layers to adapt (e.g. k=5)")
        if k < 1:
            raise ValueError(f"k must be >= 1 (number of layers to adapt), got {k}")
        if n_layers is not None and k > n_layers:
            raise ValueError(f"k={k} is larger than the model's {n_layers} text layers; pick k <= {n_layers}")
        measured = sum(1 for s in scores.scores if s == s)  # NaN != NaN
        if k > measured:
            raise ValueError(
                f"k={k} but the scores ({scores.method}) measure only {measured} layers; "
                f"pick k <= {measured} or score more layers"
            )
        chosen = scores.top_k(k)
    else:
        if k is not None:
            raise ValueError(f"k={k} only applies to scores; with an explicit layers list leave k=None")
        assert layers is not None
        chosen = [int(x) for x in layers]
        if not chosen:
            raise ValueError("layers is empty: name at least one text layer to adapt")
    out: list[int] = []
    for layer in chosen:
        resolved = layer + n_layers if (n_layers is not None and layer < 0) else layer
        if resolved < 0 or (n_layers is not None and resolved >= n_layers):
            bound = f"0..{n_layers - 1}" if n_layers is not None else ">= 0"
            raise ValueError(f"layer {layer} is out of range: this model's text layers are {bound}")
        out.append(resolved)
    if len(set(out)) != len(out):
        raise ValueError(f"layers {chosen} name the same layer twice; list each text layer once")
    return sorted(out)


def control_layers(flagged: Sequence[int], n_layers: int, scores: LayerScores | None = None) -> list[int]:
    """As many layers as ``flagged``, none of them flagged: the control arm of a targeted LoRA.

    With ``scores``, the unflagged layers the analysis scored lowest (the layers it says matter least);
    without, the unflagged layers farthest from every flagged one (ties: the lower layer). Every text
    layer of a model has the same shapes, so LoRA on the control trains as many parameters.
    """
    chosen = select_layers(layers=list(flagged), n_layers=n_layers)
    free = [x for x in range(n_layers) if x not in chosen]
    if len(free) < len(chosen):
        raise ValueError(
            f"{len(chosen)} flagged layers {chosen} leave only {len(free)} of {n_layers} for a control of "
            "the same size; flag fewer layers"
        )
    if scores is not None:
        score = dict(zip(scores.layers, scores.scores, strict=True))
        missing = [x for x in free if x not in score or score[x] != score[x]]
        if missing:
            raise ValueError(f"the scores do not measure unflagged layers {missing}; score every layer")
        key = {x: (score[x], x) for x in free}
    else:
        key = {x: (-min(abs(x - f) for f in chosen), x) for x in free}
    return sorted(sorted(free, key=lambda x: key[x])[: len(chosen)])


def target_regex(
    text_layers_path: str, layers: Sequence[int], modules: Sequence[str] = DEFAULT_MODULES
) -> str:
    """Anchored regex (peft uses ``re.fullmatch``) for ``modules`` inside the given text layers only.

    ``text_layers_path`` is the dotted path of the decoder's layer list, e.g.
    ``model.language_model.layers``; any submodule chain may sit between a layer and the projection
    (``self_attn.q_proj``, ``mlp.down_proj``).
    """
    if not layers:
        raise ValueError("layers is empty: name at least one text layer to adapt")
    if not modules:
        raise ValueError("modules is empty: name the projections to adapt, e.g. ('q_proj', 'v_proj')")
    bad = [m for m in modules if not re.fullmatch(r"\w+", m)]
    if bad:
        raise ValueError(f"module names {bad} must be plain attribute names like 'q_proj' (no dots or regex)")
    layer_alt = "|".join(str(int(x)) for x in sorted(set(layers)))
    mod_alt = "|".join(re.escape(m) for m in modules)
    return rf"{re.escape(text_layers_path)}\.({layer_alt})\.(?:\w+\.)*({mod_alt})"


def matched_modules(model: nn.Module, regex: str) -> list[str]:
    """Names of the modules of ``model`` that ``regex`` fully matches (what peft will wrap)."""
    pattern = re.compile(regex)
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]


def lora_config(
    adapter: VLMAdapter,
    layers: Sequence[int],
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    modules: Sequence[str] = DEFAULT_MODULES,
) -> LoraConfig:
    """A peft ``LoraConfig`` adapting ``modules`` in the given text decoder layers and nowhere else.

    The targets are a regex over ``adapter.spec.text_layers`` (never the vision tower's
    same-numbered layers). Fails if a layer is out of range or a module name is absent from a layer.
    """
    from peft import LoraConfig

    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    chosen = select_layers(layers=list(layers), n_layers=adapter.n_layers)
    regex = target_regex(adapter.spec.text_layers, chosen, modules)
    found = matched_modules(adapter.model, regex)
    missing = [
        (layer, m)
        for layer in chosen
        for m in modules
        if not any(
            n.startswith(f"{adapter.spec.text_layers}.{layer}.") and n.endswith(f".{m}") for n in found
        )
    ]
    if missing:
        raise ValueError(
            f"no module for (layer, name) {missing[:5]} in {adapter.spec.name}; a text layer has "
            f"{sorted(_leaf_linear_names(adapter, chosen[0]))}: pass modules from that list"
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=regex,
        bias="none",
    )


def _leaf_linear_names(adapter: VLMAdapter, layer: int) -> set[str]:
    layer_mod = adapter.text_layer(layer)
    return {name.rsplit(".", 1)[-1] for name, m in layer_mod.named_modules() if isinstance(m, nn.Linear)}


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable / total) parameter counts; ``total`` includes the LoRA weights.

    Same convention as peft's ``print_trainable_parameters`` (shared/tied tensors counted once).
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total, (trainable / total if total else 0.0)


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA weights (have a non-empty ``lora_A``)."""
    out = []
    for name, m in model.named_modules():
        lora_a = getattr(m, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and len(lora_a) > 0:
            out.append(name)
    return out
