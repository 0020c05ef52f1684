"""Stages 05 to 07, from saved results only: metrics, bootstrap tables, figures, Markdown.
Reads ``<run>/results/`` and ``<run>/train_logs/``; writes ``results/*.csv``, ``figures/``
(PNG + PDF, declared once in ``outputs``), the README's results section and
``docs/results.md``. Imports no torch."""
