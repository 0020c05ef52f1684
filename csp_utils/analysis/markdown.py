"""Every Markdown the study writes: the tables of results, the README's results section and
``docs/results.md``, from the compact result files only.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from csp_utils.analysis.tables import MAIN_COMBO, POOLED, SEED_METRICS, per_seed_text, read_result, strongest_baseline
from csp_utils.core import metrics
from csp_utils.world.schema import CLEAN_SETS, GROUNDED_SET



def fmt(r, k, digits=3):
    v, lo, hi = r.get(k), r.get(f"{k}_low"), r.get(f"{k}_high")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if lo == lo and hi == hi else f"{v:.{digits}f}"


def value(r, k, digits=3) -> str:
    """A point value without its interval ("n/a" when missing)."""
    v = None if r is None else r.get(k)
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def main_rows(df: pd.DataFrame, framing: str, readout: str) -> pd.DataFrame:
    return df[((df["framing"] == framing) & (df["readout"] == readout)) | (df["framing"] == "-")]


def diff_cell(paired: pd.DataFrame | None, set_, method, reference, metric) -> str:
    if paired is None or paired.empty or method == reference:
        return "—"
    p = paired[(paired["set"] == set_) & (paired["method"] == method) & (paired["reference"] == reference)
               & (paired["metric"] == metric)]
    if p.empty:
        return "—"
    r = p.iloc[0]
    return f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}] {r['verdict']}"


def markdown_table(df: pd.DataFrame, framing: str = "third", readout: str = "single_pass",
                   sets: tuple = CLEAN_SETS, paired: pd.DataFrame | None = None,
                   reference: str | None = None) -> str:
    """Results table: one row per model/baseline x set, intervals in brackets.

    With ``paired`` and ``reference`` (e.g. the strongest baseline), two more columns give
    each row's paired Brier and within-set AUROC difference against it, with interval and verdict.
    """
    keep = main_rows(df, framing, readout)
    keep = keep[keep["set"].isin(sets)]
    cl = ", ".join(sorted(set(keep["cluster"]))) if "cluster" in keep else "question"
    ref = f" vs {reference}" if reference else ""
    head = ["set", "model", "seeds", "accuracy", "F1 (positive)", "ECE10", "ECE15", "Brier", "within-set AUROC",
            "AUROC (pooled: mixes sets)", "per-set constant AUROC", "coverage", "image share"] \
        + ([f"ΔBrier{ref}", f"Δwithin-set AUROC{ref}"] if reference else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for set_ in sets:
        for _, r in keep[keep["set"] == set_].iterrows():
            const = r.get("auroc_set_constant", math.nan)
            cells = [set_, r["model"], str(int(r.get("seeds", 1))), fmt(r, "accuracy"),
                     f"{fmt(r, 'f1')} ({r['positive_class']})", fmt(r, "ece"), fmt(r, "ece15"), fmt(r, "brier"),
                     fmt(r, "auroc_within"), fmt(r, "auroc"), "—" if const != const else f"{const:.3f}",
                     f"{r['coverage']:.2f}",
                     "n/a" if r.get("image_share") != r.get("image_share") else f"{r.get('image_share', math.nan):.2f}"]
            if reference:
                cells += [diff_cell(paired, set_, r["model"], reference, k) for k in ("brier", "auroc_within")]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"95% percentile bootstrap intervals, resampling seeds (models with several), then {cl}s "
                 f"({framing} person, {readout.replace('_', ' ')} read-out for the models). Within-set AUROC: "
                 "a set's own AUROC, and for a pool the mean over its sets; per-set constant AUROC: what a "
                 "confidence knowing only each set's accuracy earns on a pool.")
    return "\n".join(lines)


def seed_markdown(df: pd.DataFrame, framing: str = "third", readout: str = "single_pass",
                  sets: tuple = ("pooled-clean", "pooled-transfer"), metrics_=SEED_METRICS) -> str:
    """Each seed's own value for the models with several seeds (pooled sets)."""
    keep = main_rows(df, framing, readout)
    keep = keep[keep["set"].isin(sets) & (keep.get("seeds", 1) > 1)]
    if keep.empty:
        return "_no model with several seeds_"
    head = ["set", "model", "seeds"] + [METRIC_NAMES.get(m, m) + " per seed" for m in metrics_]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in keep.iterrows():
        cells = [r["set"], r["model"], str(r["seed_labels"]).replace(";", " / ")]
        cells += [per_seed_text(r.get(f"{m}_per_seed")) for m in metrics_]  # results older than a metric lack it
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


METRIC_NAMES = {"ece": "ECE10", "ece15": "ECE15", "brier": "Brier", "auroc": "AUROC", "auroc_within": "within-set AUROC",
                "accuracy": "accuracy"}


def paired_markdown(paired: pd.DataFrame, sets=None, methods=None,
                    metrics_=("ece", "ece15", "brier", "auroc_within", "auroc", "accuracy")) -> str:
    """Paired differences (method - reference) as a table: one row per set x method x reference."""
    if paired is None or paired.empty:
        return "_no paired differences_"
    p = paired
    if sets is not None:
        p = p[p["set"].isin(sets)]
    if methods is not None:
        p = p[p["method"].isin(methods)]
    head = ["set", "method", "reference"] + ["Δ" + METRIC_NAMES[m] for m in metrics_]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(dict.fromkeys(p["set"]))
    for set_ in order:
        sp = p[p["set"] == set_]
        for (m, r), _ in sp.groupby(["method", "reference"], sort=False):
            lines.append("| " + " | ".join([set_, m, r] + [diff_cell(sp, set_, m, r, k) for k in metrics_]) + " |")
    cl = ", ".join(sorted(set(p["cluster"]))) if len(p) else "image"
    lines += ["", f"Difference = method - reference on the same bootstrap resamples (seeds paired by position, "
                  f"then {cl}s), 95% interval; verdict: better / worse when the interval excludes 0 (lower ECE and "
                  "Brier, higher AUROC and accuracy are better), level otherwise. On a pool, ΔAUROC mixes sets: "
                  "rank claims use Δwithin-set AUROC."]
    return "\n".join(lines)


def write_readme_section(readme, text: str, tag: str = "results") -> None:
    """Replace the text between ``<!-- {tag}:start -->`` and ``<!-- {tag}:end -->``."""
    readme = Path(readme)
    body = readme.read_text()
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    if start not in body or end not in body:
        raise ValueError(f"{readme} has no {start} ... {end} markers to write the table between")
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def _tables(results_dir):
    results_dir = Path(results_dir)
    head = read_result(results_dir, "headline.csv")
    if head is None:
        raise FileNotFoundError(f"{results_dir}/headline.csv not found: run the evaluation notebook first")
    paired = read_result(results_dir, "paired.csv")
    return head, paired


def _plain_markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)])


def _bases(results) -> dict[str, Path]:
    """``results``: one results folder, or {base-model label: its results folder}."""
    return {k: Path(v) for k, v in results.items()} if isinstance(results, dict) else {"": Path(results)}


README_REFERENCES = ("base", "baseline:answer_constant")   # shown beside the methods in the README table


def pooled_markdown(results, methods=("sft_simpo",)) -> str:
    """The pooled table of docs/results.md: pooled clean and pooled transfer x each base model x (the
    base model, each CSP method in ``methods``, the answer-conditioned constant, the strongest
    baseline), with paired Brier and within-set AUROC differences against that baseline (lowest
    pooled clean Brier, chosen per base model by :func:`strongest_baseline` before
    any method is looked at). Within-set AUROC is the ranking metric; the pooled AUROC mixes
    sets and stands beside what a per-set constant earns on the same pool."""
    head_cols = ["set", "base model", "model", "seeds", "accuracy", "ECE10", "Brier", "within-set AUROC",
                 "within-set AUROC per seed", "pooled AUROC (per-set constant)", "ΔBrier vs strongest",
                 "Δwithin-set AUROC vs strongest"]
    lines = ["| " + " | ".join(head_cols) + " |", "|" + "---|" * len(head_cols)]
    clusters, notes = set(), []
    tables = {label: _tables(folder) for label, folder in _bases(results).items()}
    for set_ in POOLED:
        for label, (head, paired) in tables.items():
            strongest, shown = _shown(head, methods)
            main = main_rows(head, *MAIN_COMBO)
            main = main[main["set"] == set_]
            clusters |= set(main.get("cluster", pd.Series(dtype=str)))
            for model in (m for m in shown if m in set(main["model"])):
                r = main[main["model"] == model].iloc[0]
                pooled = f"{fmt(r, 'auroc')} ({r['auroc_set_constant']:.3f})"
                lines.append("| " + " | ".join([set_, label or "base", model, str(int(r["seeds"])),
                                                fmt(r, "accuracy"), fmt(r, "ece"),
                                                fmt(r, "brier"), fmt(r, "auroc_within"),
                                                per_seed_text(r.get("auroc_within_per_seed")) or "—", pooled]
                                               + [diff_cell(paired, set_, model, strongest, k)
                                                  for k in ("brier", "auroc_within")]) + " |")
        if set_ == POOLED[0]:
            notes = [f"`{label or 'base'}`: `{strongest_baseline(h)}`" for label, (h, _) in tables.items()]
    return ("\n".join(lines) + f"\n\n95% percentile bootstrap intervals resampling seeds, then "
            f"{', '.join(sorted(clusters))}s; {MAIN_COMBO[0]} person, {MAIN_COMBO[1].replace('_', ' ')} read-out. "
            "Within-set AUROC: the mean of the per-set AUROCs (six clean sets, five transfer sets); pooled AUROC "
            "mixes sets, and the per-set constant in brackets (a confidence that knows only each set's accuracy) "
            f"shows what set difficulty alone earns there. Strongest baseline (lowest pooled clean Brier) per base "
            f"model: {', '.join(notes)}.")


def _shown(head: pd.DataFrame, methods) -> tuple[str, list[str]]:
    """(strongest baseline, the models a compact table shows: the base model, ``methods``, the
    answer-conditioned constant, the strongest baseline) of one base model's headline table."""
    strongest = strongest_baseline(head)
    present = set(head["model"])
    return strongest, [m for m in dict.fromkeys(("base", *methods, *README_REFERENCES[1:], strongest)) if m in present]


def results_markdown(results, methods=("sft_simpo",)) -> str:
    """The README's compact results table: per base model, each shown model (:func:`_shown`)
    with its seeds, clean within-set AUROC with interval, clean Brier and ECE10, and transfer
    Brier (pooled sets; the strongest baseline, lowest pooled clean Brier, is chosen per base
    model before any method is looked at). The full tables are in docs/results.md."""
    head_cols = ["base model", "model", "seeds", "within-set AUROC (clean)", "Brier (clean)", "ECE10 (clean)",
                 "Brier (transfer)"]
    lines = ["| " + " | ".join(head_cols) + " |", "|" + "---|" * len(head_cols)]
    clusters, notes = set(), []
    for label, folder in _bases(results).items():
        head, _ = _tables(folder)
        strongest, shown = _shown(head, methods)
        notes.append(f"`{label or 'base'}`: `{strongest}`")
        main = main_rows(head, *MAIN_COMBO)
        clusters |= set(main.get("cluster", pd.Series(dtype=str)))
        for model in shown:
            cell = {}
            for set_ in POOLED:
                r = main[(main["model"] == model) & (main["set"] == set_)]
                cell[set_] = r.iloc[0] if len(r) else None
            clean, transfer = cell[POOLED[0]], cell[POOLED[1]]
            if clean is None:
                continue
            lines.append("| " + " | ".join([label or "base", model, str(int(clean["seeds"])),
                                            fmt(clean, "auroc_within"), value(clean, "brier"), value(clean, "ece"),
                                            value(transfer, "brier")]) + " |")
    return ("\n".join(lines) + f"\n\nPooled clean (six sets) and pooled transfer (five sets); {MAIN_COMBO[0]} person, "
            f"{MAIN_COMBO[1].replace('_', ' ')} read-out; seeds pooled. Within-set AUROC: the mean of the per-set AUROCs, "
            f"95% bootstrap interval resampling seeds, then {', '.join(sorted(clusters))}s. Strongest baseline (lowest "
            f"pooled clean Brier) per base model: {', '.join(notes)}. Intervals of every metric, each seed, paired "
            "differences, selective prediction (AURC, accuracy at 80% coverage) and the recalibrated confidences: "
            "[docs/results.md](docs/results.md).")


SELECTIVE_COLUMNS = (("aurc", "AURC"), ("eaurc", "excess AURC"), ("sel_acc50", "accuracy at 50%"),
                     ("sel_acc80", "accuracy at 80%"), ("sel_acc90", "accuracy at 90%"), ("prr", "PRR"), ("nll", "NLL"))
RECALIBRATION_NOTE = ("`+platt`, `+isotonic`, `+histogram` (and `baseline:platt`, ... on the internal probability): "
                      "the confidence recalibrated, fitted on the calibration set only. A strictly increasing map "
                      "(temperature scaling) cannot change within-set AUROC or AURC; isotonic regression and histogram "
                      "binning are monotone and change them only through the ties they create; Platt's answer term "
                      "can re-order answers across \"yes\" and \"no\".")


def selective_markdown(df: pd.DataFrame, sets=POOLED, framing: str = "third", readout: str = "single_pass") -> str:
    """Selective prediction and NLL per set (and pool) for every model and baseline: AURC, excess
    AURC, selective accuracy at 50/80/90% coverage, PRR (a pool's: the mean of its sets'), and NLL."""
    keep = main_rows(df, framing, readout)
    keep = keep[keep["set"].isin(sets)]
    if keep.empty or "aurc" not in keep:
        return "_no selective-prediction columns in these results_"
    head = ["set", "model", "seeds"] + [name for _, name in SELECTIVE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for set_ in sets:
        for _, r in keep[keep["set"] == set_].iterrows():
            lines.append("| " + " | ".join([set_, r["model"], str(int(r.get("seeds", 1)))]
                                           + [fmt(r, k) for k, _ in SELECTIVE_COLUMNS]) + " |")
    lines += ["", "Answers kept in order of falling confidence, ties averaged. AURC: mean selective risk over "
                  "coverages (lower is better); excess AURC: AURC minus the oracle order's (right answers first); "
                  "accuracy at c%: of the most confident c% of answers; PRR: share of the oracle's AURC gain over a "
                  "random order that the confidence achieves (1 oracle, 0 random). A pool's selective metrics are "
                  "the mean of its sets', as within-set AUROC. NLL clipped at "
                  f"{metrics.NLL_CLIP:g} and pooled over rows, as Brier. 95% intervals resampling seeds, then images. "
                  + RECALIBRATION_NOTE]
    return "\n".join(lines)


def results_document(results, methods=("sft_simpo",), source: str = "figures/results/") -> str:
    """``docs/results.md``: per base model, the full per-set table and every paired difference;
    ``source`` names the results folder it is written from."""
    parts = ["# Results (generated)", "",
             f"Written by the study's `--publish` step from `{source}`; do not edit by hand. "
             "Protocol, set sizes and success criteria: [evaluation.md](evaluation.md)."]
    parts += ["", "## Pooled sets, every base model", "", pooled_markdown(results, methods)]
    for label, folder in _bases(results).items():
        head, paired = _tables(folder)
        strongest = strongest_baseline(head)
        sets = tuple(dict.fromkeys([u for u in POOLED if u in set(head["set"])]
                                   + [s for s in CLEAN_SETS if s in set(head["set"])]
                                   + sorted(s for s in set(head["set"]) if s.startswith(("transfer-", "coco-", "official-")))
                                   + [s for s in ("perturbed", GROUNDED_SET) if s in set(head["set"])]))
        title = f"base model `{label}`" if label else "the base model"
        parts += ["", f"## {title.capitalize()}: every model and baseline, per set and pooled", "",
                  f"Strongest baseline (lowest pooled clean Brier): `{strongest}`.", "",
                  markdown_table(head, *MAIN_COMBO, sets=sets, paired=paired, reference=strongest),
                  "", f"### {title.capitalize()}: selective prediction (abstaining on the least confident answers)", "",
                  selective_markdown(head, sets=tuple(u for u in sets if u not in ("perturbed", GROUNDED_SET))),
                  "", f"### {title.capitalize()}: each seed of the models with several", "",
                  seed_markdown(head, *MAIN_COMBO)]
        noise = read_result(folder, "grounded_perturbed.csv")
        if noise is not None and len(noise):
            parts += ["", f"### {title.capitalize()}: the grounded perturbed set by noise target", "",
                      "Confidence that follows correctness falls under noise on the asked object only where the "
                      "answers go wrong, and stays up under noise on a distractor.", "",
                      _plain_markdown(noise.round(3))]
        if paired is not None and len(paired):
            shown = [m for m in methods if m in set(paired["method"])]
            parts += ["", f"### {title.capitalize()}: paired differences of {', '.join(shown)} against the base "
                          "model and each baseline", "",
                      paired_markdown(paired, sets=sets, methods=shown),
                      "", f"### {title.capitalize()}: paired differences of every other model", "",
                      paired_markdown(paired[~paired["method"].isin(shown)], sets=sets)]
    return "\n".join(parts) + "\n"
