"""nnsight traces addressed by typed site names.

nnsight rules that hold here (checked on nnsight 0.8.1): sites must be touched in forward order
(:func:`forward_order` sorts them), only ``.save()``d values survive the trace, and one trace runs
one batch (batch rows yourself rather than using several invokes with images).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hooks.sites import Site

if TYPE_CHECKING:
    from hooks.adapter import VLMAdapter

_KIND_ORDER = {
    "vision_resid": 0,
    "image_embeds": 1,
    "resid_pre": 2,
    "attn_out": 3,
    "mlp_out": 4,
    "resid_post": 5,
}


def forward_order(
    sites: list[Site], n_layers: int | None = None, n_vision_layers: int | None = None
) -> list[Site]:
    """Sort sites in the order the forward pass reaches them."""

    def key(s: Site) -> tuple[int, int, int]:
        if s.kind == "final_norm":
            return (2, 0, 0)
        layer = s.layer or 0
        if layer < 0:
            layer += (n_vision_layers if s.kind == "vision_resid" else n_layers) or 0
        if s.kind in ("vision_resid", "image_embeds"):
            return (0, _KIND_ORDER[s.kind], layer)
        return (1, layer, _KIND_ORDER[s.kind])

    return sorted(sites, key=key)


def nnsight_model(adapter: VLMAdapter) -> Any:
    """The adapter's model wrapped once by ``nnsight.NNsight`` (cached on the adapter)."""
    import nnsight

    class Placed(nnsight.NNsight):
        """nnsight moves inputs to the first parameter's device: ``meta`` for a model whose weights
        accelerate offloads (:mod:`hooks.devices`); send them where the adapter sends them."""

        @property
        def device(self) -> Any:
            return adapter.device

    cached = getattr(adapter, "_nnsight_model", None)
    if cached is None or cached[0] is not adapter.model:
        cached = (adapter.model, Placed(adapter.model))
        adapter._nnsight_model = cached  # type: ignore[attr-defined]
    return cached[1]


class SiteTrace:
    """Inside ``adapter.trace(batch)``: ``sites[site]`` reads, ``sites[site] = x`` overwrites, ``sites.margin()``."""

    def __init__(self, adapter: VLMAdapter, nn_model: Any):
        self.adapter = adapter
        self.nn_model = nn_model
        self._last: Site | None = None

    def envoy(self, path: str) -> Any:
        node = self.nn_model
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    def _check_order(self, site: Site) -> None:
        a = self.adapter
        if self._last is not None and site != self._last:
            ordered = forward_order([self._last, site], a.n_layers, a.n_vision_layers)
            if ordered[0] != self._last:
                raise ValueError(
                    f"{site} is reached before {self._last} in the forward pass; nnsight needs sites in "
                    "forward order (use hooks.trace.forward_order to sort them)"
                )
        self._last = site

    def __getitem__(self, site: Site) -> Any:
        self._check_order(site)
        ref = self.adapter.resolve(site)
        env = self.envoy(ref.path)
        value = env.input if ref.io == "input" else env.output
        return value if ref.index is None else value[ref.index]

    def __setitem__(self, site: Site, value: Any) -> None:
        self._check_order(site)
        ref = self.adapter.resolve(site)
        env = self.envoy(ref.path)
        if ref.io == "input":
            env.input = value
        elif ref.index is None:
            env.output = value
        else:
            out = env.output
            env.output = (*out[: ref.index], value, *out[ref.index + 1 :])

    def logits(self) -> Any:
        return self.nn_model.output.logits

    def margin(self) -> Any:
        """Decision margin of every row (a proxy: ``.save()`` it)."""
        return self.adapter.answer_ids.margin(self.nn_model.output.logits[:, -1])
