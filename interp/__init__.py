"""Interpretability primitives: activation cache, activation / attribution patching, logit lens,
attention in box, per-layer scores, SAE features and figures. Everything takes a :class:`hooks.adapter.VLMAdapter`.

Names are imported lazily (PEP 562): ``from interp import patching_sweep`` loads only
``interp.patching`` and what it needs, so analysis code never pays for plotly or sae-lens unless it
uses figures or SAEs. Each public name lives in exactly one submodule, listed in :data:`EXPORTS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import hooks.progress  # (in a notebook kernel: no widget-bar warnings, no HF bars)

#: Public name -> submodule of ``interp`` that defines it.
EXPORTS: dict[str, str] = {
    # interp.cache
    "ActivationCache": "cache",
    "cache_activations": "cache",
    "merge_parts": "cache",
    # interp.patching
    "PatchingConfig": "patching",
    "PatchingResult": "patching",
    "patch_one": "patching",
    "patching_sweep": "patching",
    "sweep_reference": "patching",
    # interp.stack
    "ResumeUnsupported": "stack",
    "StackState": "stack",
    "capture_stack": "stack",
    "resume": "stack",
    # interp.align
    "Alignment": "align",
    "align_pairs": "align",
    "plan_positions": "align",
    # interp.attribution
    "agreement": "attribution",
    "attribution_patching": "attribution",
    "rankdata": "attribution",
    "spearman": "attribution",
    # interp.lens
    "LensResult": "lens",
    "logit_lens": "lens",
    # interp.attention
    "BoxOverlap": "attention",
    "attention_grid": "attention",
    "attention_in_box": "attention",
    "attention_maps": "attention",
    "box_coverage_precision": "attention",
    "box_mask": "attention",
    "eager_attention": "attention",
    "final_attention_to_image": "attention",
    "threshold_map": "attention",
    "token_grids": "attention",
    "upsample": "attention",
    # interp.scores
    "COMPONENT_KINDS": "scores",
    "LayerScores": "scores",
    "component_sweep": "scores",
    "flagged_site": "scores",
    "load_flagged": "scores",
    "save_flagged": "scores",
    "ranked_above": "scores",
    "site_ranking": "scores",
    # interp.crossmodel
    "cross_model_patching": "crossmodel",
    "patch_components": "crossmodel",
    # interp.figures
    "attention_overlay": "figures",
    "patching_heatmap": "figures",
    "recovery_line": "figures",
    # interp.stats
    "compare_intervals": "stats",
    "interval_relation": "stats",
    "mean_bootstrap": "stats",
    "mean_ci_by": "stats",
    "ratio_bootstrap": "stats",
    # interp.sae
    "FeatureRef": "sae",
    "LoadedSAE": "sae",
    "gemma_scope_2_disk_loader": "sae",
    "load_sae": "sae",
    "load_sae_from_hub": "sae",
    "save_sae": "sae",
    "site_from_hook_name": "sae",
    # interp.sae_attr
    "FeatureAttribution": "sae_attr",
    "FeaturePatch": "sae_attr",
    "FlipRateChange": "sae_attr",
    "clamp_features": "sae_attr",
    "clamping": "sae_attr",
    "feature_attribution": "sae_attr",
    "feature_contrast": "sae_attr",
    "feature_patch": "sae_attr",
    "flip_rate_change": "sae_attr",
    "top_features": "sae_attr",
    # interp.sae_fake
    "fake_gemma_scope_params": "sae_fake",
    "write_fake_gemma_scope": "sae_fake",
    # interp.sae_score
    "FeatureScore": "sae_score",
    "choose_and_score": "sae_score",
    "clamp_to_original": "sae_score",
    "decoder_cosine": "sae_score",
    "score_feature": "sae_score",
    # interp.sae_train
    "SAETrainConfig": "sae_train",
    "SAETrainReport": "sae_train",
    "evaluate_sae": "sae_train",
    "train_sae": "sae_train",
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'interp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"interp.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})


if TYPE_CHECKING:
    from interp.align import Alignment, align_pairs, plan_positions
    from interp.attention import (
        BoxOverlap,
        attention_grid,
        attention_in_box,
        attention_maps,
        box_coverage_precision,
        box_mask,
        eager_attention,
        final_attention_to_image,
        threshold_map,
        token_grids,
        upsample,
    )
    from interp.attribution import agreement, attribution_patching, rankdata, spearman
    from interp.cache import ActivationCache, cache_activations, merge_parts
    from interp.crossmodel import cross_model_patching, patch_components
    from interp.figures import attention_overlay, patching_heatmap, recovery_line
    from interp.lens import LensResult, logit_lens
    from interp.patching import PatchingConfig, PatchingResult, patch_one, patching_sweep, sweep_reference
    from interp.sae import (
        FeatureRef,
        LoadedSAE,
        gemma_scope_2_disk_loader,
        load_sae,
        load_sae_from_hub,
        save_sae,
        site_from_hook_name,
    )
    from interp.sae_attr import (
        FeatureAttribution,
        FeaturePatch,
        FlipRateChange,
        clamp_features,
        clamping,
        feature_attribution,
        feature_contrast,
        feature_patch,
        flip_rate_change,
        top_features,
    )
    from interp.sae_fake import fake_gemma_scope_params, write_fake_gemma_scope
    from interp.sae_score import (
        FeatureScore,
        choose_and_score,
        clamp_to_original,
        decoder_cosine,
        score_feature,
    )
    from interp.sae_train import SAETrainConfig, SAETrainReport, evaluate_sae, train_sae
    from interp.scores import (
        COMPONENT_KINDS,
        LayerScores,
        component_sweep,
        flagged_site,
        load_flagged,
        ranked_above,
        save_flagged,
        site_ranking,
    )
    from interp.stack import ResumeUnsupported, StackState, capture_stack, resume
    from interp.stats import compare_intervals, interval_relation, mean_bootstrap, mean_ci_by, ratio_bootstrap
