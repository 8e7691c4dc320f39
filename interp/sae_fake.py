"""Fake Gemma Scope 2 folders: the released layout (``params.safetensors`` + ``config.json`` under
``<release>/<kind>/layer_L_width_W_l0_X/``) with made-up JumpReLU weights.

For tests of the loader and for running the MedGemma code path offline on a model of another width
(notebook 03 does this on the organism). With ``fit`` activations, the weights are not entirely random:
unit decoder directions, ``w_enc = w_dec.T``, ``b_dec`` = the activations' mean (Gemma Scope does not
subtract ``b_dec`` from the input, so the encoder is centred through ``b_enc``), thresholds set so about
``l0`` features fire per input, and the decoder scaled by least squares. Its features mean nothing; its
numbers (FVU, attribution) are not findings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

#: The tensors of a Gemma Scope 2 ``params.safetensors``.
PARAM_NAMES: tuple[str, ...] = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")


def fake_gemma_scope_params(
    d_in: int, width: int, seed: int = 0, fit: Float[Tensor, "n d_in"] | None = None, l0: float = 24.0
) -> dict[str, Tensor]:
    """JumpReLU weights in the Gemma Scope 2 layout: ``w_enc [d_in, width]``, ``w_dec [width, d_in]``,
    ``b_enc [width]``, ``b_dec [d_in]``, ``threshold [width]`` (random, or fitted as described above)."""
    if d_in < 1 or width < 1:
        raise ValueError(f"d_in and width must be >= 1, got {d_in}, {width}")
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(width, d_in, generator=g)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    if fit is None:
        return {
            "w_enc": w_dec.T.contiguous() / d_in**0.5,
            "w_dec": w_dec * 0.3,
            "b_enc": torch.randn(width, generator=g) * 0.1,
            "b_dec": torch.randn(d_in, generator=g) * 0.1,
            "threshold": torch.rand(width, generator=g) + 0.5,
        }
    x = fit.float()
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"fit must be (n, {d_in}) activations, got {tuple(x.shape)}")
    if not 0 < l0 < width:
        raise ValueError(f"l0 must be in (0, width={width}), got {l0}")
    w_enc = w_dec.T.contiguous()
    b_dec = x.mean(0)
    b_enc = -(b_dec @ w_enc)
    pre = x @ w_enc + b_enc
    threshold = pre.quantile(1 - l0 / width, dim=0).clamp_min(1e-3)
    recon = (torch.relu(pre) * (pre > threshold)) @ w_dec
    scale = float(((x - b_dec) * recon).sum() / recon.pow(2).sum().clamp_min(1e-12))
    return {"w_enc": w_enc, "w_dec": w_dec * scale, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold}


def write_fake_gemma_scope(
    root: str | Path,
    layer: int,
    params: dict[str, Tensor],
    *,
    kind: str = "resid_post",
    release: str = "gemma-scope-2-tiny-it",
    l0_name: str = "medium",
    folder_name: str = "",
    config: bool = True,
    model_name: str = "",
) -> Path:
    """Write ``params`` as ``root/<release>/<kind>/layer_<layer>_width_<W>_l0_<l0_name>/`` (or
    ``folder_name``), with the keys of a real Gemma Scope 2 ``config.json`` unless ``config=False``."""
    missing = [k for k in PARAM_NAMES if k not in params]
    if missing:
        raise ValueError(f"params lacks {missing}; a Gemma Scope 2 folder holds {PARAM_NAMES}")
    width = int(params["w_dec"].shape[0])
    folder = Path(root) / release / kind / (folder_name or f"layer_{layer}_width_{width}_l0_{l0_name}")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: params[k].contiguous() for k in PARAM_NAMES}, str(folder / "params.safetensors"))
    if config:
        hook = {
            "resid_post": f"model.layers.{layer}.output",
            "mlp_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
            "attn_out": f"model.layers.{layer}.self_attn.o_proj.input",
        }.get(kind.removesuffix("_all"), f"model.layers.{layer}.output")
        cfg = {
            "hf_hook_point_in": hook,
            "width": width,
            "architecture": "jump_relu",
            "model_name": model_name,
        }
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder
