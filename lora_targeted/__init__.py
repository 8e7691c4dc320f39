"""Targeted LoRA: from per-layer interpretability scores to LoRA on those text layers only.

- :mod:`lora_targeted.targets`: ``select_layers``, ``lora_config`` (text-layer regex), ``trainable_fraction``
- :mod:`lora_targeted.train`: ``LoraTrainConfig``, ``train_lora`` (CE + paraphrase consistency), ``load_lora``
- :mod:`lora_targeted.arms`: ``arm_layers`` (targeted / same-size control / all layers), ``run_arms`` (arms x
  seeds, train split only), ``seed_cluster_bootstrap``, ``arm_table``, ``where_changed`` (cross-model patching)
- :mod:`lora_targeted.compare`: ``compare`` base vs LoRA adapters (flip, reliance, quadrants, migration)
- :mod:`lora_targeted.cli`: ``add_lora_parser`` for ``flipscope lora train|compare``

Submodules are imported explicitly (nothing heavy is imported here, so the CLI parser stays fast).
"""

import hooks.progress  # noqa: F401  (in a notebook kernel: no widget-bar warnings, no HF bars)
