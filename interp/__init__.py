"""Interpretability primitives: activation cache, activation / attribution patching, logit lens,
attention in box, per-layer scores and figures. Everything takes a :class:`hooks.VLMAdapter`."""

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
    upsample,
)
from interp.attribution import agreement, attribution_patching, rankdata, spearman
from interp.cache import ActivationCache, cache_activations
from interp.figures import attention_overlay, bootstrap_ci, patching_heatmap, recovery_line
from interp.lens import LensResult, logit_lens
from interp.patching import PatchingConfig, PatchingResult, patch_one, patching_sweep, sweep_reference
from interp.resume import ResumeUnsupported, StackState, capture_stack, resume
from interp.scores import LayerScores

__all__ = [
    "ActivationCache",
    "Alignment",
    "BoxOverlap",
    "LayerScores",
    "LensResult",
    "PatchingConfig",
    "PatchingResult",
    "agreement",
    "align_pairs",
    "attention_grid",
    "attention_in_box",
    "attention_maps",
    "attention_overlay",
    "attribution_patching",
    "bootstrap_ci",
    "box_coverage_precision",
    "box_mask",
    "cache_activations",
    "eager_attention",
    "final_attention_to_image",
    "logit_lens",
    "patch_one",
    "patching_heatmap",
    "patching_sweep",
    "plan_positions",
    "rankdata",
    "recovery_line",
    "spearman",
    "sweep_reference",
    "threshold_map",
    "upsample",
]

# SAE features: loading (sae-lens objects), attribution, patching, clamping, training (sae-lens imported lazily)
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
    feature_patch,
    flip_rate_change,
    top_features,
)
from interp.sae_train import SAETrainConfig, SAETrainReport, evaluate_sae, train_sae

__all__ += ["ResumeUnsupported", "StackState", "capture_stack", "resume"]

__all__ += [
    "FeatureAttribution",
    "FeaturePatch",
    "FeatureRef",
    "FlipRateChange",
    "LoadedSAE",
    "SAETrainConfig",
    "SAETrainReport",
    "clamp_features",
    "clamping",
    "evaluate_sae",
    "feature_attribution",
    "feature_patch",
    "flip_rate_change",
    "gemma_scope_2_disk_loader",
    "load_sae",
    "load_sae_from_hub",
    "save_sae",
    "site_from_hook_name",
    "top_features",
    "train_sae",
]
