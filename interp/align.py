"""Which clean position patches which corrupted position, for every pair of a patching sweep.

``image`` tokens map by their index within the image block and ``final`` is the last position of each
prompt, so these two classes patch across prompts of different lengths. ``question``, ``text``, ``all``
and ``each`` (every single position) map position by position (offset from the end of the prompt) and
need the same token layout in both runs; otherwise :func:`align_pairs` raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from hooks.batch import Batch

PATCH_CLASSES: tuple[str, ...] = ("image", "question", "final", "text", "all")
#: Classes aligned by class membership, which also work for prompts of different lengths.
ALIGNED_BY_CLASS: tuple[str, ...] = ("image", "final")
EACH = "each"


class Alignment(NamedTuple):
    """Matching positions of one pair: ``clean[k]`` in the clean row patches ``corrupt[k]``."""

    clean: Int[Tensor, " n"]
    corrupt: Int[Tensor, " n"]


def check_pairs(clean: Batch, corrupt: Batch) -> None:
    """Row i of ``clean`` pairs with row i of ``corrupt``: both need the same number of rows."""
    if len(clean) != len(corrupt):
        raise ValueError(f"clean has {len(clean)} rows but corrupt has {len(corrupt)}: pair them row by row")


def align_pairs(clean: Batch, corrupt: Batch, position: str) -> list[Alignment]:
    """For each pair, which clean positions patch which corrupted positions for class ``position``.

    ``final``: the last position of both. ``image``: the k-th image token of one run to the k-th of
    the other (both runs need the same number of image tokens; both without -> empty). Other classes
    (``question``, ``text``, ``all``): position by position, which needs the same layout in both runs
    (the class sits at the same offsets from the end of the prompt); otherwise ``ValueError``.
    """
    check_pairs(clean, corrupt)
    if position not in PATCH_CLASSES:
        raise ValueError(f"unknown position class {position!r}; choose one of {PATCH_CLASSES}")
    lk, lc = clean.seq_len, corrupt.seq_len
    out = []
    for i in range(len(corrupt)):
        if position == "final":
            out.append(Alignment(torch.tensor([lk - 1]), torch.tensor([lc - 1])))
            continue
        src = clean.position_mask(position)[i].nonzero()[:, 0]  # type: ignore[arg-type]
        dst = corrupt.position_mask(position)[i].nonzero()[:, 0]  # type: ignore[arg-type]
        if position == "image":
            if len(src) != len(dst):
                raise ValueError(
                    f"pair {i}: the clean run has {len(src)} image tokens and the corrupted run {len(dst)}; "
                    "image tokens can only be patched between runs that both have the image block (use a "
                    "gray/white/noise removal instead of 'none', or patch 'final' only)"
                )
        elif len(src) != len(dst) or not torch.equal(src - lk, dst - lc):
            raise ValueError(
                f"position class {position!r} cannot be patched for pair {i}: the clean prompt has "
                f"{len(src)} such tokens and the corrupted one {len(dst)} (or they sit at other offsets). "
                "Position-by-position patching needs the same token layout in both runs; a paraphrase of "
                "another length has no token correspondence. Patch ('image', 'final'), which align by class, "
                "or use pairs whose questions have the same number of tokens."
            )
        out.append(Alignment(src, dst))
    return out


@dataclass
class PositionPlan:
    """Every (position column, pair, corrupted position, clean position) entry of a sweep."""

    labels: list[str]
    n_pairs: int
    col: Int[Tensor, " entry"]
    pair: Int[Tensor, " entry"]
    dst: Int[Tensor, " entry"]
    """Position in the corrupted batch."""
    src: Int[Tensor, " entry"]
    """Position in the clean batch."""

    @property
    def valid(self) -> Bool[Tensor, "position pair"]:
        """Variants that have at least one position to patch."""
        v = torch.zeros(len(self.labels), self.n_pairs, dtype=torch.bool)
        v[self.col, self.pair] = True
        return v

    def subset(self, rows: Sequence[int]) -> PositionPlan:
        """The entries of pairs ``rows``, renumbered 0..len(rows)-1 in that order."""
        remap = torch.full((self.n_pairs,), -1, dtype=torch.long)
        remap[torch.as_tensor(list(rows), dtype=torch.long)] = torch.arange(len(rows))
        new = remap[self.pair]
        keep = new >= 0
        return PositionPlan(self.labels, len(rows), self.col[keep], new[keep], self.dst[keep], self.src[keep])


def plan_positions(clean: Batch, corrupt: Batch, positions: tuple[str, ...] | str) -> PositionPlan:
    """All patch entries for ``positions`` (classes, or ``"each"``), aligned per :func:`align_pairs`."""
    check_pairs(clean, corrupt)
    n = len(corrupt)
    lk, lc = clean.seq_len, corrupt.seq_len
    if positions == EACH:
        len_k, len_c = clean.attention_mask.sum(-1), corrupt.attention_mask.sum(-1)
        if not torch.equal(len_k, len_c):
            bad = (len_k != len_c).nonzero()[:, 0].tolist()
            raise ValueError(
                f"positions='each' needs prompts of the same token length in each pair; pairs {bad} differ "
                f"(clean {len_k[bad].tolist()} vs corrupt {len_c[bad].tolist()} tokens). Use position "
                "classes ('image', 'final') for pairs of different lengths."
            )
        pair, dst = corrupt.attention_mask.nonzero(as_tuple=True)
        labels = [str(j - lc) for j in range(lc)]
        return PositionPlan(labels, n, dst.clone(), pair, dst, dst - lc + lk)
    cols, pairs, dsts, srcs = [], [], [], []
    for p, cls in enumerate(positions):
        for i, al in enumerate(align_pairs(clean, corrupt, cls)):
            k = len(al.clean)
            cols.append(torch.full((k,), p))
            pairs.append(torch.full((k,), i))
            dsts.append(al.corrupt)
            srcs.append(al.clean)
    cat = lambda xs: torch.cat(xs).long() if xs else torch.zeros(0, dtype=torch.long)
    return PositionPlan(list(positions), n, cat(cols), cat(pairs), cat(dsts), cat(srcs))
