"""Gradient paths without weight gradients: freeze parameters for one call, restore them exactly after.

Attribution patching and SAE attribution differentiate the margin with respect to *activations* (a zero
probe added at a site, or an SAE's feature vector), never with respect to weights. With parameters left
requiring grad, autograd keeps every layer's inputs to form weight gradients nobody reads: measured on an
H200 at MedGemma-4B shape, attribution patching with 8 pairs took 54 GiB that way and 18 GiB (7x faster)
with the parameters frozen. :func:`frozen_parameters` turns ``requires_grad`` off on every parameter of
the given modules for the body and puts back, parameter by parameter, exactly what each had (also when
the body raises), so a model being fine-tuned elsewhere keeps its trainable set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen_parameters(*modules: nn.Module | None) -> Iterator[None]:
    """Within the block, no parameter of ``modules`` requires grad; each gets its own flag back on exit.

    ``None`` entries are skipped; a parameter shared by several modules is handled once.

    >>> with torch.enable_grad(), frozen_parameters(adapter.model, sae.sae):
    ...     g, = torch.autograd.grad(adapter.margins(batch, grad=True).sum(), probe)
    """
    before: dict[int, tuple[nn.Parameter, bool]] = {}
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            before.setdefault(id(p), (p, p.requires_grad))
    try:
        for p, _ in before.values():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in before.values():
            p.requires_grad_(flag)
