"""Stages 05 and 06, evaluation: the benchmark suite (``suites``), the protocol (what is
asked, which rows are stored: ``evaluation``), the model x set matrix (``matrix``) and the
baselines that plant nothing (``baselines``). Reads the base model and
``<run>/adapters/``; writes ``<run>/results[/<base>]/matrix/<model>/<set>.jsonl`` and
``sets.json``."""
