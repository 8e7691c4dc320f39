"""Gemma Scope 2 SAE folders as released: which site a folder reads, which release and variant it is.

Hub layout (sae-lens 6.54 ``gemma_3`` loader and ``pretrained_saes.yaml``)::

    google/gemma-scope-2-4b-it/
        resid_post/layer_17_width_16k_l0_medium/params.safetensors   (+ config.json on most folders)
        resid_post/layer_17_width_262k_l0_medium_seed_1/...          (a second training seed)
        resid_post_all/ mlp_out/ mlp_out_all/ attn_out/ attn_out_all/ transcoder/ transcoder_all/

The site comes from ``config.json`` (``hf_hook_point_in``) when the folder has one, else from the
parent folder, as sae-lens infers it:

- ``resid_post``: ``model.layers.L.output`` -> ``resid_post(L)``;
- ``mlp_out``: ``model.layers.L.post_feedforward_layernorm.output`` -> ``mlp_out(L)`` (in Gemma3 the
  project's ``mlp_out`` is that norm's output);
- ``attn_out``: ``model.layers.L.self_attn.o_proj.input`` -- the concatenated heads *before* ``o_proj``
  (``n_heads * head_dim`` wide), not the project's ``attn_out`` site (the post-attention norm's output,
  ``d_model`` wide, which is what is added to the residual stream): refused, with that reason;
- ``transcoder``: reads ``pre_feedforward_layernorm.output`` and writes ``post_feedforward_layernorm.output``;
  not an SAE of one site: refused.

The release is ``<repo>-<suffix>`` (``gemma-scope-2-4b-it-res``), the repo name read from the path,
including an HF cache path (``.../models--google--gemma-scope-2-4b-it/snapshots/<sha>/resid_post/...``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hooks.sites import Site, mlp_out, resid_post

_FOLDER = re.compile(r"layer_(\d+)_width_(\d+)(k|m)?_l0_([A-Za-z0-9]+?)(?:_seed_(\d+))?(_affine)?$")
#: Parent folder -> release suffix in sae-lens' ``pretrained_saes.yaml``.
RELEASE_SUFFIX: dict[str, str] = {
    "resid_post": "res",
    "resid_post_all": "res-all",
    "mlp_out": "mlp",
    "mlp_out_all": "mlp-all",
    "attn_out": "att",
    "attn_out_all": "att-all",
    "transcoder": "transcoders",
    "transcoder_all": "transcoders-all",
}
#: Parent folder -> the site an SAE folder of that kind reads (without config.json).
PARENT_SITE: dict[str, Any] = {
    "resid_post": resid_post,
    "resid_post_all": resid_post,
    "mlp_out": mlp_out,
    "mlp_out_all": mlp_out,
}
ATTN_OUT_REASON = (
    "Gemma Scope 2 attention SAEs read model.layers.{L}.self_attn.o_proj.input, the concatenated heads "
    "before o_proj (n_heads * head_dim wide), not flipscope's attn_out site (the post-attention norm's "
    "output that is added to the residual stream); flipscope has no typed site for it, and site= cannot "
    "stand in for one"
)
TRANSCODER_REASON = (
    "a Gemma Scope 2 transcoder (reads pre_feedforward_layernorm.output, writes "
    "post_feedforward_layernorm.output), not an SAE of one site; flipscope loads SAEs only"
)


@dataclass(frozen=True)
class FolderName:
    """What a Gemma Scope folder name says (``layer_17_width_262k_l0_medium_seed_1``)."""

    layer: int
    width: int
    l0: str
    """L0 variant: ``small``, ``medium``, ``big``."""
    seed: int
    """Training seed of a ``_seed_N`` variant; 0 for the default folder."""
    affine: bool
    """An ``_affine`` (skip-connection) transcoder."""


def parse_folder(name: str) -> FolderName | None:
    """``layer_17_width_16k_l0_medium_seed_1`` -> FolderName(17, 16384, "medium", 1, False); else None
    (a folder without ``_seed_N`` is seed 0)."""
    hit = _FOLDER.search(name)
    if not hit:
        return None
    mult = {"k": 1024, "m": 1024**2}.get(hit.group(3) or "", 1)
    seed = int(hit.group(5)) if hit.group(5) is not None else 0
    return FolderName(int(hit.group(1)), int(hit.group(2)) * mult, hit.group(4), seed, bool(hit.group(6)))


def _parts(path: Path) -> tuple[str, ...]:
    return Path(os.path.abspath(path)).parts  # no symlink resolution: HF cache files point into blobs/


def release_of(path: Path) -> str | None:
    """``.../gemma-scope-2-4b-it/resid_post/layer_...`` (or the HF cache form) -> ``gemma-scope-2-4b-it-res``."""
    parts = _parts(path)
    repo = None
    for p in reversed(parts):
        name = p.split("--")[-1] if p.startswith("models--") else p  # models--google--<repo>
        if name.startswith("gemma-scope"):
            repo = name
            break
    suffix = RELEASE_SUFFIX.get(parts[-2]) if len(parts) > 1 else None
    if repo and suffix:
        return f"{repo}-{suffix}"
    return repo


def refuse_kind(root: Path, raw: dict[str, Any], folder: FolderName | None) -> None:
    """Raise ``ValueError`` (with the reason) for a transcoder or an attention-out SAE folder."""
    parent = _parts(root)[-2] if len(_parts(root)) > 1 else ""
    hook_in, hook_out = raw.get("hf_hook_point_in"), raw.get("hf_hook_point_out")
    if (
        parent.startswith(("transcoder", "clt"))
        or (folder is not None and folder.affine)
        or raw.get("architecture", "jump_relu") != "jump_relu"
        or hook_out not in (None, hook_in)
        or "affine_connection" in raw
    ):
        raise ValueError(f"{root}: {TRANSCODER_REASON}")
    if parent.startswith("attn_out") or (isinstance(hook_in, str) and "o_proj" in hook_in):
        layer = folder.layer if folder is not None else "L"
        raise ValueError(f"{root}: {ATTN_OUT_REASON.format(L=layer)}")


def site_of(root: Path, raw: dict[str, Any], folder: FolderName | None) -> tuple[Site | None, str | None]:
    """(site, HF hook point) of a folder: config.json's ``hf_hook_point_in``, else the parent folder."""
    from interp.sae import site_from_hook_name

    hook = raw.get("hf_hook_point_in")
    if hook:
        return site_from_hook_name(hook), hook
    make = PARENT_SITE.get(_parts(root)[-2] if len(_parts(root)) > 1 else "")
    if make is None or folder is None:
        return None, None
    site = make(folder.layer)
    point = "output" if site.kind == "resid_post" else "post_feedforward_layernorm.output"
    return site, f"model.layers.{folder.layer}.{point}"
