"""The SynthCXR model organism: a tiny Gemma3 VLM trained on SynthCXR with failures planted on purpose.

- :mod:`analyses.organism.model`: build / load the checkpoint, the world and rows it was trained on
- :mod:`analyses.organism.train`: ``OrganismConfig``, ``train_organism`` (``flipscope organism train``)
- :mod:`analyses.organism.sae`: the organism's shipped SAE (``flipscope organism sae``)
- :mod:`analyses.organism.card`: measuring it and writing ``organism/MODEL_CARD.md``
"""
