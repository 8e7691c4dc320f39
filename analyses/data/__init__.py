"""Question rows and where they come from.

- :mod:`analyses.data.schema`: ``QuestionRow``, paraphrase families, findings, ``ImageSource``, ``first_images``
- :mod:`analyses.data.questions`: the question bank (templates per finding and family)
- :mod:`analyses.data.psf`: PSF-Med-style question files (``load_psf_rows``, one validator table)
- :mod:`analyses.data.boxes`: VinDr-CXR box tables (``load_vindr_boxes``, ``boxes_for``)
- :mod:`analyses.data.mimic`: MIMIC-CXR-JPG image paths
- :mod:`analyses.data.resolve`: the one ``--model`` / ``--data`` resolver every CLI uses

A new dataset loader is a module here plus a row in ``resolve.py``.
"""
