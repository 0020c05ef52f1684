"""Stages 05 and 06, evaluation: the benchmark suite (``suites``), the protocol (what is
asked, which rows are stored: ``evaluation``) and the model x set matrix with the baselines'
rows (``matrix``). Reads the base model and ``<run>/adapters/``; writes
``<run>/results[/<base>]/matrix/<model>/<set>.jsonl`` and ``sets.json``."""
