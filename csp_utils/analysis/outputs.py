"""The figures ``report.make_figures`` writes, named once: the figure maker fills these names in
and the driver declares them (as patterns) as notebook 07's outputs. Each is saved as PNG and PDF."""

from __future__ import annotations

import re

RELIABILITY_CLEAN = "reliability_clean_sets"
RELIABILITY_TRANSFER = "reliability_transfer_sets"
CONFIDENCE_VS_LEVEL = "confidence_vs_level"
INTERNAL_VS_VERBALIZED = "internal_vs_verbalized_{model}"
METRICS_POOLED = "metrics_pooled"
METRICS_SETS = "metrics_{group}_sets"
PAIRED_POOLED = "paired_differences_pooled"
RISK_COVERAGE = "risk_coverage"
ABLATION = "ablation{suffix}_{metric}{unit}"  # one per metric of each results/ablation<suffix>.csv
TRAINING = "training_{log}"                   # one per training log
PERTURBATION_GRID = "perturbation_grid_scenes"
CONFIDENCE_VS_ACCURACY = "confidence_vs_accuracy_transfer"
REPORT_FIGURES = (RELIABILITY_CLEAN, RELIABILITY_TRANSFER, CONFIDENCE_VS_LEVEL, INTERNAL_VS_VERBALIZED, METRICS_POOLED,
                  METRICS_SETS, PAIRED_POOLED, RISK_COVERAGE, ABLATION, TRAINING, PERTURBATION_GRID,
                  CONFIDENCE_VS_ACCURACY)
EXTENSIONS = ("png", "pdf")


def pattern(name: str) -> str:
    """A figure name with its fields as one ``*`` each (``ablation{suffix}_{metric}{unit}`` -> ``ablation*_*``)."""
    return re.sub(r"(\{\w+\})+", "*", name)


def figure_files(folder: str, *names: str) -> list[str]:
    return [f"{folder}/{name}.{ext}" for name in names for ext in EXTENSIONS]
