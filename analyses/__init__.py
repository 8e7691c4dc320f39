"""Datasets, the synthetic world, evaluation and reports."""
