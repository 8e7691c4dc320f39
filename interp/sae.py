"""Sparse-autoencoder features at one site: loading (sae-lens objects), feature references, attribution
of a paraphrase flip's margin shift to features, feature patching and clamping. Training an SAE for a
model that has none: :mod:`interp.sae_train`.

Every SAE is a sae-lens :class:`~sae_lens.SAE` object wrapped in a :class:`LoadedSAE` that records what
it is (``release``, ``layer``, ``width``, ``l0`` variant) and the typed adapter :class:`~hooks.sites.Site`
it reads (``resid_post(17)`` = output of ``model.language_model.layers.17`` in MedGemma). Feature ``i``
is named by :class:`FeatureRef` ``(release, layer, width, l0, i)`` everywhere.

Sources (:func:`load_sae`):

- a sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``, written by :func:`save_sae` or
  ``SAE.save_model``): ``SAE.load_from_disk``;
- a Gemma Scope 2 folder (``params.safetensors`` with ``w_enc [d, width]``, ``w_dec [width, d]``,
  ``b_enc``, ``b_dec``, ``threshold``, optionally ``config.json``): ``SAE.load_from_disk(path,
  converter=gemma_scope_2_disk_loader)`` builds a sae-lens ``JumpReLUSAE``, configured as sae-lens' own
  hub loader does (``apply_b_dec_to_input=False``), so ``f = relu(x @ w_enc + b_enc) * (pre > threshold)``.
  Site, release and seed variant come from the folder as released (:mod:`interp.gemma_scope`);
  attention-out SAEs and transcoders are refused with the reason;
- the hub (:func:`load_sae_from_hub`, wraps ``SAE.from_pretrained``; needs the network, never in tests).

sae-lens is imported lazily (it takes seconds), so ``import interp`` stays cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from hooks.sites import Site, attn_out, mlp_out, parse_site, resid_post, resid_pre
from interp.gemma_scope import (
    ATTN_OUT_REASON,
    TRANSCODER_REASON,
    parse_folder,
    refuse_kind,
    release_of,
    site_of,
)

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooks.adapter import VLMAdapter

GEMMA_SCOPE_PARAMS = "params.safetensors"
GEMMA_SCOPE_KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
SAE_LENS_CFG = "cfg.json"
#: ``position`` arguments: ``"final"`` (the last prompt position) or a negative offset from the end.
Position = Literal["final"] | int

_HOOK_PATTERNS: tuple[tuple[str, Any], ...] = (
    (r"blocks\.(\d+)\.hook_resid_post", resid_post),
    (r"blocks\.(\d+)\.hook_resid_pre", resid_pre),
    (r"blocks\.(\d+)\.hook_mlp_out", mlp_out),
    (r"blocks\.(\d+)\.hook_attn_out", attn_out),
    (r"(?:[\w.]+\.)?layers\.(\d+)(?:\.output)?", resid_post),
    (r"(?:[\w.]+\.)?layers\.(\d+)\.input", resid_pre),
    (r"(?:[\w.]+\.)?layers\.(\d+)\.post_feedforward_layernorm(?:\.output)?", mlp_out),
    (r"(?:[\w.]+\.)?layers\.(\d+)\.post_attention_layernorm(?:\.output)?", attn_out),
)


def site_from_hook_name(hook_name: str) -> Site:
    """The typed site an SAE hook name refers to.

    ``"blocks.17.hook_resid_post"`` (sae-lens / TransformerLens), ``"model.layers.17.output"`` (Gemma
    Scope 2 ``hf_hook_point_in``), ``"model.language_model.layers.17"`` (the VLM module path) and
    ``"resid_post(17)"`` all give ``resid_post(17)``. Head-split hooks (``hook_z``, ``o_proj.input``: what
    Gemma Scope 2 attention SAEs read) have no typed site and raise, saying so.
    """
    name = hook_name.strip()
    head_split = re.fullmatch(
        r"(?:[\w.]+\.)?(?:layers|blocks)\.(\d+)\.(?:self_attn\.o_proj\.input|attn\.hook_z)", name
    )
    if head_split:
        raise ValueError(f"SAE hook {hook_name!r}: {ATTN_OUT_REASON.format(L=head_split.group(1))}")
    if "vision" not in name:
        for pattern, make in _HOOK_PATTERNS:
            hit = re.fullmatch(pattern, name)
            if hit:
                return make(int(hit.group(1)))
    try:
        return parse_site(name)
    except ValueError:
        raise ValueError(
            f"no typed site for SAE hook {hook_name!r}; pass site= explicitly (e.g. site=resid_post(17))"
        ) from None


@dataclass(frozen=True, order=True)
class FeatureRef:
    """One SAE feature, named by the SAE it belongs to and its index."""

    release: str
    """SAE release (``"gemma-scope-2-4b-it-res"``, or the name given to a trained SAE)."""
    layer: int | None
    """Text layer of the SAE's site (``None`` for an SAE with no layered site)."""
    width: int
    """Number of features of the SAE (``d_sae``)."""
    l0: str
    """L0 variant of the release (``"small"``, ``"medium"``, ``"big"``, ``"k32"`` for a trained TopK)."""
    index: int
    """Feature index in ``[0, width)``."""
    seed: int = 0
    """Training seed of the SAE's variant (Gemma Scope ``..._l0_medium_seed_1`` -> 1; 0 for the default)."""

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.width:
            raise ValueError(
                f"feature index {self.index} out of range for width {self.width}; use 0..width-1"
            )

    def __str__(self) -> str:
        seed = f"/seed={self.seed}" if self.seed else ""
        return f"{self.release}/L{self.layer}/w{self.width}/l0={self.l0}{seed}#{self.index}"


@dataclass
class LoadedSAE:
    """A sae-lens SAE plus what it is and where in the adapter it reads."""

    sae: SAE
    """The sae-lens object (``JumpReLUSAE``, ``TopKSAE``, ...): ``encode``, ``decode``, ``W_dec``."""
    site: Site | None
    """Adapter site the SAE reads and writes; ``None`` only for an SAE trained on bare tensors."""
    release: str
    """Release name recorded in every :class:`FeatureRef`."""
    layer: int | None
    """Text layer of ``site`` (kept separately so feature references survive without a site)."""
    width: int
    """Number of features; must equal ``sae.cfg.d_sae``."""
    l0: str
    """L0 variant (``"medium"``, ``"k32"``, ...)."""
    hook_name: str | None = None
    """Hook name from the SAE's own metadata (``blocks.17.hook_resid_post``, ``model.layers.17.output``)."""
    path: str | None = None
    """Folder it was loaded from (``None`` for an in-memory or hub SAE)."""
    seed: int = 0
    """Seed variant (Gemma Scope ``_seed_N`` folders); 0 for the default."""

    def __post_init__(self) -> None:
        if self.width != self.sae.cfg.d_sae:
            raise ValueError(f"width={self.width} but the SAE has d_sae={self.sae.cfg.d_sae}; pass its d_sae")
        if self.site is not None and self.site.layer is not None and self.layer != self.site.layer:
            raise ValueError(
                f"layer={self.layer} disagrees with site {self.site}; pass layer={self.site.layer}"
            )
        if self.site is not None and not self.site.is_text:
            raise ValueError(f"site {self.site} is not a text-sequence site; SAEs here read text sites")

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def W_dec(self) -> Float[Tensor, "width d_in"]:
        return self.sae.W_dec

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch width"]:
        """Feature activations (in the SAE's dtype, on its device)."""
        return self.sae.encode(x.to(self.sae.device))

    def decode(self, f: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch d_in"]:
        """Reconstruction ``f @ W_dec + b_dec`` (plus any output normalisation of the SAE)."""
        return self.sae.decode(f.to(self.sae.device))

    def ref(self, index: int) -> FeatureRef:
        """The :class:`FeatureRef` of feature ``index``."""
        return FeatureRef(self.release, self.layer, self.width, self.l0, int(index), self.seed)

    def indices(self, features: Sequence[int | FeatureRef] | Tensor) -> Tensor:
        """Feature indices as a long tensor; FeatureRefs must belong to this SAE."""
        if isinstance(features, Tensor):
            idx = features.long().flatten()
        else:
            out = []
            for feat in features:
                if isinstance(feat, FeatureRef):
                    if (feat.release, feat.layer, feat.width, feat.l0, feat.seed) != (
                        self.release,
                        self.layer,
                        self.width,
                        self.l0,
                        self.seed,
                    ):
                        raise ValueError(f"{feat} belongs to another SAE than {self.ref(0)}")
                    out.append(feat.index)
                else:
                    out.append(int(feat))
            idx = torch.tensor(out, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.width):
            raise ValueError(f"feature indices must lie in 0..{self.width - 1}; got {idx.tolist()}")
        return idx.to(self.sae.device)

    def require_site(self, adapter: VLMAdapter | None = None) -> Site:
        """The site, checked against ``adapter`` (layer range, ``d_model == d_in``)."""
        if self.site is None:
            raise ValueError("this SAE has no site; build it with site=... (e.g. SAETrainConfig(site=...))")
        if adapter is not None:
            adapter.resolve(self.site)
            if adapter.d_model != self.d_in:
                raise ValueError(
                    f"SAE d_in={self.d_in} but {adapter.name} has d_model={adapter.d_model}; "
                    "load the SAE trained on this model's site"
                )
        return self.site

    def __repr__(self) -> str:
        return (
            f"LoadedSAE({type(self.sae).__name__}, release={self.release!r}, site={self.site}, "
            f"width={self.width}, l0={self.l0!r}, d_in={self.d_in})"
        )


# ---------------------------------------------------------------------- loading
def gemma_scope_2_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sae-lens disk converter for a Gemma Scope 2 SAE folder (``SAE.load_from_disk(path, converter=...)``).

    Mirrors sae-lens' ``gemma_3`` hub loader: a ``jumprelu`` config with ``apply_b_dec_to_input=False``
    and the weights renamed ``w_enc -> W_enc`` etc. (Gemma Scope stores them in the orientation sae-lens
    uses). The site comes from ``config.json``, else from the parent folder; transcoders, CLTs and
    attention-out SAEs are refused with the reason (:mod:`interp.gemma_scope`).
    """
    from sae_lens import __version__

    root = Path(path)
    raw: dict[str, Any] = {}
    if (root / "config.json").is_file():
        raw = json.loads((root / "config.json").read_text())
    folder = parse_folder(root.name)
    refuse_kind(root, raw, folder)
    with safe_open(str(root / GEMMA_SCOPE_PARAMS), framework="pt", device=device) as f:
        missing = [k for k in GEMMA_SCOPE_KEYS if k not in f.keys()]  # noqa: SIM118
        if missing:
            raise ValueError(f"{root / GEMMA_SCOPE_PARAMS} lacks {missing}; expected {GEMMA_SCOPE_KEYS}")
        weights = {k: f.get_tensor(k) for k in GEMMA_SCOPE_KEYS}
    d_in, d_sae = weights["w_enc"].shape
    if weights["w_dec"].shape != (d_sae, d_in):
        raise ValueError(f"w_dec has shape {tuple(weights['w_dec'].shape)}; expected {(d_sae, d_in)}")
    site, hf_hook = site_of(root, raw, folder)
    tl_hook = None
    if site is not None and site.kind in ("resid_post", "resid_pre", "mlp_out"):
        tl_hook = f"blocks.{site.layer}.hook_{site.kind}"
    cfg: dict[str, Any] = {
        "architecture": "jumprelu",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": device,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": __version__,
            "model_name": raw.get("model_name"),
            "hook_name": tl_hook,
            "hf_hook_name": hf_hook,
            "flipscope_release": release_of(root) or root.name,
            "flipscope_l0": str(
                raw.get("l0_variant") or (folder and folder.l0) or raw.get("l0") or "unknown"
            ),
            "flipscope_seed": folder.seed if folder is not None else None,
            "flipscope_site": str(site) if site is not None else None,
        },
    }
    cfg.update(cfg_overrides or {})
    dtype = getattr(torch, cfg["dtype"].removeprefix("torch."))
    state = {k[0].upper() + k[1:] if k[0] == "w" else k: v.to(device, dtype) for k, v in weights.items()}
    return cfg, state


def _wrap(
    sae: SAE, path: Path | None, site: Site | None, release: str | None, l0: str | None, name: str = ""
) -> LoadedSAE:
    meta = sae.cfg.metadata
    if "transcoder" in str(getattr(sae.cfg, "architecture", lambda: "")()) or meta.get("hook_name_out"):
        raise ValueError(f"{path or name or 'this SAE'}: {TRANSCODER_REASON}")
    hook = meta.get("flipscope_site") or meta.get("hf_hook_name") or meta.get("hook_name")
    if site is None and hook:
        site = site_from_hook_name(hook)
    name = name or (path.name if path is not None else "")
    folder = parse_folder(name)
    if site is None:
        raise ValueError(
            f"cannot tell which site {path or 'this SAE'} reads: no hook in its config, and a Gemma Scope "
            "folder needs config.json or a parent folder named resid_post or mlp_out; pass site=resid_post(L)"
        )
    seed = meta.get("flipscope_seed")
    return LoadedSAE(
        sae=sae,
        site=site,
        release=release or meta.get("flipscope_release") or meta.get("release") or name or "sae",
        layer=site.layer,
        width=int(sae.cfg.d_sae),
        l0=l0 or meta.get("flipscope_l0") or (folder and folder.l0) or _l0_of(sae),
        hook_name=meta.get("hf_hook_name") or meta.get("hook_name"),
        path=str(path) if path is not None else None,
        seed=int(seed) if seed is not None else (folder.seed if folder is not None else 0),
    )


def _l0_of(sae: SAE) -> str:
    k = getattr(sae.cfg, "k", None)
    return f"k{k}" if k is not None else "unknown"


def load_sae(
    path: str | Path,
    site: Site | None = None,
    device: str = "cpu",
    *,
    release: str | None = None,
    l0: str | None = None,
    dtype: str | None = None,
) -> LoadedSAE:
    """Load a local sae-lens folder or Gemma Scope 2 folder as a :class:`LoadedSAE` (offline).

    ``site`` overrides the site read from the SAE's metadata (``hf_hook_point_in``, ``hook_name``) or
    folder name (``layer_17_...`` -> ``resid_post(17)``); ``release``/``l0`` override the recorded names.
    """
    from sae_lens import SAE

    root = Path(path)
    if (root / SAE_LENS_CFG).is_file():
        sae = SAE.load_from_disk(root, device=device, dtype=dtype)
    elif (root / GEMMA_SCOPE_PARAMS).is_file():
        sae = SAE.load_from_disk(root, device=device, dtype=dtype, converter=gemma_scope_2_disk_loader)
    else:
        raise FileNotFoundError(
            f"{root} holds neither a sae-lens SAE ({SAE_LENS_CFG}) nor a Gemma Scope one ({GEMMA_SCOPE_PARAMS})"
        )
    return _wrap(sae, root, site, release, l0)


def load_sae_from_hub(
    release: str, sae_id: str, site: Site | None = None, device: str = "cpu", dtype: str = "float32"
) -> LoadedSAE:
    """``SAE.from_pretrained(release, sae_id)`` wrapped as a :class:`LoadedSAE` (downloads; not offline).

    >>> load_sae_from_hub("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_medium")  # resid_post(17)
    """
    from sae_lens import SAE

    sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    folder = parse_folder(sae_id)
    loaded = _wrap(sae, None, site, release, folder.l0 if folder else None, name=sae_id)
    loaded.path = f"hub:{release}/{sae_id}"
    return loaded


def save_sae(sae: LoadedSAE, path: str | Path) -> Path:
    """Write ``sae`` as a sae-lens folder (``SAE.save_model``) that :func:`load_sae` reopens with its names."""
    meta = sae.sae.cfg.metadata
    meta.flipscope_release, meta.flipscope_l0, meta.flipscope_seed = sae.release, sae.l0, sae.seed
    meta.flipscope_site = str(sae.site) if sae.site is not None else None
    if (
        meta.get("hook_name") is None
        and sae.site is not None
        and sae.site.kind in ("resid_post", "resid_pre")
    ):
        meta.hook_name = f"blocks.{sae.site.layer}.hook_{sae.site.kind}"
    root = Path(path)
    sae.sae.save_model(root)
    return root
