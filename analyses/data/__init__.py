"""Question rows and where they come from.

- :mod:`analyses.data.schema`: ``QuestionRow``, paraphrase families, findings, ``ImageSource``, ``first_images``
- :mod:`analyses.data.questions`: the question bank (templates per finding and family)
- :mod:`analyses.data.records`: question / label files read line by line (a bad line is skipped), hub datasets
- :mod:`analyses.data.loaded`: ``LoadedRows`` (what every file loader returns), image files under a root
- :mod:`analyses.data.psf`: flipscope-layout question files (``load_psf_rows``, one validator table)
- :mod:`analyses.data.psfmed`: the PSF-Med release and the VinDR-CXR-PSF flip bank (pairs into clusters)
- :mod:`analyses.data.labels`: CheXpert / MIMIC-CXR label tables into presence questions
- :mod:`analyses.data.boxes`: VinDr-CXR box tables (``load_vindr_boxes``, ``boxes_for``)
- :mod:`analyses.data.mimic`: MIMIC-CXR-JPG image paths
- :mod:`analyses.data.resolve`: the one ``--model`` / ``--data`` resolver every CLI uses

A new dataset loader is a module here plus a row in ``resolve.py`` (``LAYOUTS`` for a file layout,
``NAMED_DATA`` for a named source). Layouts, column names and the phenomenon map: docs/data.md.
"""
