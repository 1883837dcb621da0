"""The papers in miniature (tier 2): the experiments that experiments.py runs."""
