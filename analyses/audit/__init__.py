"""``flipscope audit``: the method as one resumable pipeline (eval -> pairs -> localize -> features -> lora ->
report). Each stage is a function here that notebooks call; :func:`run_audit` chains them in a run folder."""

from analyses.audit.features import FeatureResult, FeaturesConfig, score_features
from analyses.audit.localize import (
    FLAG_MIN_PAIRS,
    FLAG_MIN_RECOVERY,
    RULE_TEXT,
    Localization,
    LocalizeConfig,
    check_flagged_layers,
    flag_sites,
    flagged_layers,
    localize,
)
from analyses.audit.lora import LoraCheck, LoraCheckConfig, lora_check, recommend
from analyses.audit.pairs import PairSplit, split_pairs
from analyses.audit.run import AuditConfig, AuditResult, pair_runs, run_audit
from analyses.audit.stages import STAGES, AuditFolder, StageChanged

__all__ = [
    "FLAG_MIN_PAIRS", "FLAG_MIN_RECOVERY", "RULE_TEXT", "STAGES", "AuditConfig", "AuditFolder", "AuditResult",
    "FeatureResult", "FeaturesConfig", "Localization", "LocalizeConfig", "LoraCheck", "LoraCheckConfig",
    "PairSplit", "StageChanged", "check_flagged_layers", "flag_sites", "flagged_layers", "localize", "lora_check",
    "pair_runs", "recommend", "run_audit", "score_features", "split_pairs",
]  # fmt: skip
