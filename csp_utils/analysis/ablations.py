"""The ablation tables (notebook 06): variants with their seeds, their rows under variant labels,
the long table of metrics with intervals, and each variant's paired differences against its
reference.

A variant is a label and a model name, or a list of them (one per seed, reported as
``label@s0``, ``label@s1``, ... and paired by position with the seeds of the variant it is
compared with).
"""

from __future__ import annotations

import pandas as pd

from csp_utils.analysis.tables import headline_table, model_group, paired_against
from csp_utils.evaluate.matrix import model_names

# the metrics of the ablation table, in its order
ABLATION_METRICS = ("ece", "ece15", "brier", "auroc_within", "auroc", "accuracy")
# what the notebook shows of the paired differences
PAIRED_SHOWN = ("reference", "method", "metric", "diff", "diff_low", "diff_high", "verdict")


def variant_seeds(variants: dict) -> dict[str, list[str]]:
    """Ablation variants ``{label: model name or [model name per seed]}`` -> ``{label: [names]}``;
    labels must not hold ``@`` (it marks the seed of a reported name)."""
    out = {}
    for label, names in variants.items():
        if "@" in str(label):
            raise ValueError(f"variant label {label!r} holds '@', which marks seeds; rename it")
        names = [names] if isinstance(names, str) else list(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"variant {label!r}: expected a model name or a list of them, got {names!r}")
        out[str(label)] = names
    return out


def variant_labels(seeded: dict[str, list[str]]) -> dict[str, str]:
    """Model name (as its rows carry it: ``LABEL`` of a ``LABEL=ADAPTER`` entry) -> the name its
    rows are reported under: the variant label for a one-seed variant, ``label@s<k>`` for the
    k-th seed of a variant with several (seeds pair by position)."""
    out = {}
    for label, entries in seeded.items():
        for k, name in enumerate(model_names(entries)):
            if name in out:
                raise ValueError(f"model {name!r} is listed under two variants ({out[name]!r} and {label!r})")
            out[name] = label if len(entries) == 1 else f"{label}@s{k}"
    return out


def variant_rows(rows: list[dict], label_of: dict[str, str], sets, framing: str, readout: str,
                 reference: str | None = None) -> list[dict]:
    """The rows of the ablation, each under its reported name (``label_of``, from
    :func:`variant_labels`): those of ``sets`` at ``readout``, at ``framing`` for the variants.

    ``reference`` (a model as the params name it, ``LABEL=ADAPTER`` allowed): its first-person
    rows join as a variant of their own, ``"<its group> (first person)"``; None: none do.
    """
    first_name = model_names([reference])[0] if reference is not None else None
    picked = []
    for r in rows:
        if r["set"] not in sets or r["readout"] != readout:
            continue
        if r["model"] in label_of and r["framing"] == framing:
            picked.append({**r, "model": label_of[r["model"]]})
        elif reference is not None and r["model"] == first_name and r["framing"] == "first":
            picked.append({**r, "model": f"{model_group(label_of.get(reference, reference))} (first person)"})
    return picked


def ablation_table(picked: list[dict], metrics=ABLATION_METRICS, **boot) -> pd.DataFrame:
    """One row per (variant, set, metric): ``value`` with its interval (``low``, ``high``), the
    cluster, the seeds and the per-seed values, from :func:`~csp_utils.analysis.tables.headline_table`
    (``boot``: its keywords) over the rows :func:`variant_rows` picked."""
    table = headline_table(picked, **boot)
    long = []
    for _, r in table.iterrows():
        for metric in metrics:
            long.append({"name": r["model"], "set": r["set"], "metric": metric, "cluster": r["cluster"],
                         "value": r[metric], "low": r[f"{metric}_low"], "high": r[f"{metric}_high"],
                         "seeds": r["seeds"], "per_seed": r.get(f"{metric}_per_seed")})
    return pd.DataFrame(long)


def ablation_paired(picked: list[dict], paired: dict, labels, framing: str, readout: str, **boot) -> pd.DataFrame:
    """Each listed variant minus its reference, ``paired`` = ``{reference label: [variant labels]}``,
    on the same resamples with a verdict (:func:`~csp_utils.analysis.tables.paired_against`;
    ``boot``: its keywords), the references' tables one after another. Every name must be one of
    ``labels`` (the variants' labels). Empty when ``paired`` is."""
    labels = list(labels)
    parts = []
    for ref, compared in paired.items():
        unknown = [x for x in [ref, *compared] if x not in labels]
        if unknown:
            raise ValueError(f"paired names {unknown} are not variant labels; labels: {labels}")
        sub = [r for r in picked if model_group(r["model"]) in {ref, *compared}]
        parts.append(paired_against(sub, ref, framing, readout, **boot))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def ablation_view(ablation: pd.DataFrame) -> pd.DataFrame:
    """The ablation table as the notebook shows it: variants by (metric, set), values rounded."""
    return ablation.pivot_table(index="name", columns=["metric", "set"], values="value").round(3)


def paired_view(ablation_paired: pd.DataFrame, pool: str = "pooled-clean",
                metrics=("brier", "auroc_within", "ece")) -> pd.DataFrame:
    """The paired differences on ``pool`` for ``metrics``, the columns of ``PAIRED_SHOWN``, rounded."""
    if not len(ablation_paired):
        return ablation_paired
    shown = ablation_paired[(ablation_paired["set"] == pool) & ablation_paired["metric"].isin(list(metrics))]
    return shown[list(PAIRED_SHOWN)].round(3)
