"""Analyses by concern, one sub-package each; dependencies point one way (left may be imported by right):

``analyses.data`` -> ``analyses.synthcxr`` -> ``analyses.eval`` -> ``analyses.organism`` ->
(``lora_targeted``) -> ``analyses.cli``

- :mod:`analyses.data`: question rows, the question bank, real-data importers, the ``--data``/``--model`` resolver
- :mod:`analyses.synthcxr`: the synthetic chest X-ray world
- :mod:`analyses.eval`: the evaluator, metrics, reports
- :mod:`analyses.organism`: the model organism (model, training, SAE, card)
- :mod:`analyses.cli`: the ``flipscope`` command line

Everything here builds on ``hooks`` (model adapters) and ``interp`` (primitives). ``tests/test_layout.py``
checks the direction of every import.
"""

import hooks.progress  # noqa: F401  (in a notebook kernel: no widget-bar warnings, no HF bars)
