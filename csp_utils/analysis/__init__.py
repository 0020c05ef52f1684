"""Stages 05 to 07, from saved results only: bootstrap tables (``tables``), figures
(``plots``, ``report``; their names declared once in ``outputs``) and every Markdown the study
writes (``markdown``). Reads ``<run>/results/`` and ``<run>/train_logs/``; writes
``results/*.csv``, ``figures/`` (PNG + PDF), the README's results section and
``docs/results.md``. Imports no torch."""
