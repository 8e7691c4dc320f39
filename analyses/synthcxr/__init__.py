"""SynthCXR, the synthetic chest X-ray world with known answers.

- :mod:`analyses.synthcxr.world`: ``SynthCXRConfig``, ``SynthCXRWorld`` (cases, images, boxes, question rows)
- :mod:`analyses.synthcxr.render`: geometry masks and the rendered image of a case
"""
