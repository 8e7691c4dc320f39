"""Evaluation: run a model over question rows under image conditions, score it, report it.

- :mod:`analyses.eval.predictions`: the predictions table (conditions, columns) and the run folder
- :mod:`analyses.eval.fingerprint`: content hashes of a run's weights and images (a resume never mixes runs)
- :mod:`analyses.eval.evaluate`: ``EvalConfig``, ``evaluate`` (plan, encode, score, write; resumable)
- :mod:`analyses.eval.shard`: ``evaluate_sharded``: one run over the processes of torchrun / accelerate launch
- :mod:`analyses.eval.shard_cache`: ``cache_run``: activation caches of a run, one part per process
- :mod:`analyses.eval.track`: ``track_run``: config, metrics and report to wandb or mlflow (optional)
- :mod:`analyses.eval.metrics`: flip rate, text-only agreement, swap sensitivity, quadrants, ``summarize``
- :mod:`analyses.eval.report`: text summary and ``report.html`` (built from :mod:`~analyses.eval.page`,
  :mod:`~analyses.eval.figures`, :mod:`~analyses.eval.gallery`, :mod:`~analyses.eval.localization`)
- :mod:`analyses.eval.compare`: ``compare_runs``: finished run folders side by side (``flipscope compare``)
- :mod:`analyses.eval.browser`: the report in headless Chromium (probe, screenshot)

Metric definitions: ``docs/metrics.md``; the run folder: ``docs/data.md``.
"""
