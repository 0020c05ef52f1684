"""The per-question results of a study as one tidy pandas table, whatever folder they are in.

    from csp_utils.analysis.loading import per_question
    df = per_question("figures/results")           # or a run folder: per_question("runs/default")
    df.groupby(["base", "method", "set"]).correct.mean()

Reads the ``per_question.csv.gz`` files that the evaluation notebook writes (one per base
model: the results folder's own and each subfolder's), never the raw matrix.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from csp_utils.analysis.tables import model_group, seed_label

PER_QUESTION = "per_question.csv.gz"
KEYS = ("base", "method", "seed", "model", "set", "framing", "readout")


def results_folders(path, top_label: str = "main") -> dict[str, Path]:
    """{base label: results folder holding ``per_question.csv.gz``} under a run folder (its
    ``results/``) or a results folder (``figures/results/``, ``<run>/results``): the folder
    itself under ``top_label`` and each subfolder with one (another base model) under its name."""
    root = Path(path)
    if not (root / PER_QUESTION).exists() and (root / "results").is_dir():
        root = root / "results"
    found = {top_label: root} if (root / PER_QUESTION).exists() else {}
    found |= {sub.name: sub for sub in sorted(p for p in root.iterdir() if p.is_dir()) if (sub / PER_QUESTION).exists()} \
        if root.is_dir() else {}
    if not found:
        raise FileNotFoundError(f"no {PER_QUESTION} in {root} or its subfolders: give a run folder or a results "
                                "folder such as figures/results (the evaluation notebook writes it)")
    return found


def per_question(path, top_label: str = "main") -> pd.DataFrame:
    """Every per-question row of a run folder or results folder, one row per (base model, model,
    set, framing, read-out, question).

    Columns: ``base`` (``top_label`` for the folder's own evaluation, the subfolder's name for
    another base model's), ``method`` (the model group: ``sft_simpo``, ``baseline:temperature``,
    ``sft_simpo+isotonic``), ``seed`` (``s0``, ...; "" for a model without seeds), ``model`` (the
    name as stored), ``set``, ``framing`` and ``readout`` ("-" for the baselines), then the stored
    columns: ``question_id``, ``image_id``, ``label``, ``answer``, ``correct`` (bool),
    ``confidence`` (a fraction; NaN when the reply could not be read) and ``internal_prob``.
    """
    frames = []
    for label, folder in results_folders(path, top_label).items():
        df = pd.read_csv(folder / PER_QUESTION)
        df.insert(0, "base", label)
        df.insert(1, "method", df["model"].map(model_group))
        df.insert(2, "seed", df["model"].map(seed_label))
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["correct"] = out["correct"].astype(bool)
    return out[list(KEYS) + [c for c in out.columns if c not in KEYS]]


def as_rows(df: pd.DataFrame) -> list[dict]:
    """The rows of a per-question table as the dicts the bootstrap tables take (missing values None)."""
    df = df.astype(object)
    return df.where(df.notna(), None).to_dict("records")
