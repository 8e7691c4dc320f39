"""The yes/no decision: which token ids the margin reads, the margin, and the loss on the answer token.

The decision margin is ``m = logit(yes) - logit(no)`` at the first answer token (the last prompt
position), each side reduced over the surface forms of the word that are single tokens
(:func:`find_answer_ids`); prediction = ``m > 0``. Definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

AnswerReduce = Literal["max", "sum", "logsumexp"]


@dataclass(frozen=True)
class AnswerIds:
    """The token ids the margin reads, recorded with every result."""

    yes_ids: tuple[int, ...]
    """Ids of the single-token surface forms of "yes"."""
    no_ids: tuple[int, ...]
    """Ids of the single-token surface forms of "no"."""
    yes_tokens: tuple[str, ...]
    """The tokens of ``yes_ids``, as the tokenizer spells them."""
    no_tokens: tuple[str, ...]
    """The tokens of ``no_ids``."""
    reduce: AnswerReduce = "max"
    """How several ids of one word are combined: ``max``, ``sum`` or ``logsumexp`` of their logits."""

    def margin(self, logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, " *batch"]:
        """logit(yes) - logit(no), each reduced over its ids."""
        yes, no = logits[..., list(self.yes_ids)].float(), logits[..., list(self.no_ids)].float()
        if self.reduce == "max":
            return yes.max(-1).values - no.max(-1).values
        if self.reduce == "sum":
            return yes.sum(-1) - no.sum(-1)
        return yes.logsumexp(-1) - no.logsumexp(-1)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def find_answer_ids(
    tokenizer: Any, words: Sequence[str], what: str = "answer"
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Ids of the words in ``words`` that the tokenizer encodes as exactly one (non-unknown) token.

    Refuses a tokenizer where none is, naming how each variant tokenizes (``what``: ``"yes"`` or ``"no"``).
    """
    ids: dict[int, str] = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    seen: dict[str, list[str]] = {}
    for w in words:
        enc = tokenizer.encode(w, add_special_tokens=False)
        seen[w] = tokenizer.convert_ids_to_tokens(enc)
        if len(enc) == 1 and enc[0] != unk:
            ids.setdefault(enc[0], tokenizer.convert_ids_to_tokens(enc[0]))
    if not ids:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"no {what!r} variant is a single token of the tokenizer {name!r}: "
            + ", ".join(f"{w!r} -> {toks}" for w, toks in seen.items())
            + f"; pass AdapterConfig({what}_words=(...)) with surface forms this tokenizer has as one token"
        )
    return tuple(ids), tuple(ids.values())


def answer_loss(
    answer_ids: AnswerIds,
    logits: Float[Tensor, "batch vocab"],
    targets: Bool[Tensor, " batch"],
    uniform: Bool[Tensor, " batch"],
) -> Float[Tensor, ""]:
    """Mean cross-entropy on the first answer token (full-vocabulary log-softmax).

    Per row: ``-log p(yes)`` if the target is yes, ``-log p(no)`` if no, and ``-(log p(yes) + log p(no)) / 2``
    where ``uniform`` (no honest answer, e.g. the image was removed). Reads the first id of each word.
    Used by the organism trainer and the LoRA trainer.
    """
    logp = torch.log_softmax(logits.float(), -1)
    lp_yes, lp_no = logp[:, answer_ids.yes_ids[0]], logp[:, answer_ids.no_ids[0]]
    hard = -torch.where(targets, lp_yes, lp_no)
    soft = -0.5 * (lp_yes + lp_no)
    return torch.where(uniform, soft, hard).mean()
