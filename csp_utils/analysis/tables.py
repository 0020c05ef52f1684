"""The numbers the study reports, from evaluation rows: summaries per set, bootstrap tables
that resample seeds then images, within-set AUROC beside the pooled one and the per-set
constant's, paired differences (seeds paired by position), level and noise tables, and the
evaluation's tables as notebook 05 writes and shows them (``analysis/ablations.py`` holds the
ablations').

Intervals are bootstrap intervals over images by default (``cluster="image"``): all the
questions about one image move together, since they share its evidence.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from csp_utils.core import metrics
from csp_utils.world.schema import FIT_SETS, GROUNDED_SET, POOLS, level_of, noise_on_of, scene_of


def read_result(results_dir, name: str) -> pd.DataFrame | None:
    """A results CSV of ``results_dir``, or None where the study did not write it."""
    path = Path(results_dir) / name
    return pd.read_csv(path) if path.exists() else None


# ------------------------------------------------------------------ headline numbers
POOLED = ("pooled-clean", "pooled-transfer")
MAIN_COMBO = ("third", "single_pass")   # framing and read-out of the figures and the README table
HEADLINE = ("accuracy", "ece", "ece15", "brier", "auroc_within", "auroc")
CALIBRATION_METRICS = ("ece", "ece15", "adaptive_ece", "brier", "auroc", "nll")
# auroc_within: the mean over a pool's sets of each set's own AUROC (a set's AUROC for a set);
# "auroc" on a pool mixes sets, so knowing which set is harder earns it (auroc_set_constant).
# The selective metrics (AURC, excess AURC, PRR, selective accuracy) rank answers too: a pool's
# value is likewise the mean of its sets' own.
WITHIN_SET = ("auroc_within", *metrics.SELECTIVE_KEYS)
SELECTIVE = metrics.SELECTIVE_KEYS
PAIRED_METRICS = ("accuracy", "ece", "ece15", "brier", "nll", "auroc_within", "auroc", *SELECTIVE)
SEED_METRICS = ("accuracy", "ece", "brier", "auroc_within", "auroc", "aurc")   # reported per seed too


def model_group(name: str) -> str:
    """``sft_simpo@s1`` -> ``sft_simpo``: seeds of one model are pooled."""
    return name.split("@")[0]


def seed_label(name: str) -> str:
    """``sft_simpo@s1`` -> ``s1`` ("" for a name without a seed)."""
    return name.split("@", 1)[1] if "@" in name else ""


def _seed_order(names) -> list[str]:
    """Model names of one group, in the order their seeds pair across groups: s0, s1, ..., s10."""
    key = lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", seed_label(n))]  # noqa: E731
    return sorted(set(names), key=key)


def seed_resample_counts(n_seeds: int, uniform: np.ndarray) -> np.ndarray:
    """(B, n_seeds) counts: how often each seed is drawn in each resample (seeds with replacement).

    ``uniform`` (B, >= n_seeds) uniforms drawn once per table unit: every group with the same
    number of seeds draws the same seed positions, so the k-th seed of a method is paired with
    the k-th seed of another in each resample (s0 with s0, ...). One seed: always drawn once.
    """
    B = uniform.shape[0]
    if n_seeds == 1:
        return np.ones((B, 1))
    draws = np.floor(uniform[:, :n_seeds] * n_seeds).astype(np.int64)
    flat = (np.arange(B)[:, None] * n_seeds + draws).ravel()
    return np.bincount(flat, minlength=B * n_seeds).reshape(B, n_seeds).astype(float)


def two_level_counts(seed_counts: np.ndarray, image_counts: np.ndarray) -> np.ndarray:
    """(B, S * C) counts of the (seed, image) clusters, cluster code ``seed * C + image``: a
    resample draws seeds, then images, and a row weighs (times its seed) x (times its image)."""
    B, S = seed_counts.shape
    return (seed_counts[:, :, None] * image_counts[:, None, :]).reshape(B, S * image_counts.shape[1])


def within_set_metrics(conf, correct, sets, codes, counts) -> dict[str, np.ndarray]:
    """(B,) per key of :data:`WITHIN_SET`: the mean over sets of each set's own AUROC and
    selective metrics, for B cluster resamples at once (``codes``/``counts`` as
    :func:`metrics.resampled_calibration`; ``counts`` of ones: the point estimate). A set whose
    resample has one class only is left out of that resample's AUROC mean (its AURC stands)."""
    conf, correct, sets = np.asarray(conf, float), np.asarray(correct, float), np.asarray(sets)
    codes = np.asarray(codes, np.int64)
    K = np.atleast_2d(np.asarray(counts, float))
    per_set = []
    for s in pd.unique(sets):
        m = sets == s
        used, local = np.unique(codes[m], return_inverse=True)
        per_set.append(metrics.resampled_calibration(conf[m], correct[m], local, K[:, used], (), adaptive=False,
                                                     selective=True))
    out = {}
    for key in WITHIN_SET:
        if not per_set:
            out[key] = np.full(K.shape[0], np.nan)
            continue
        stacked = np.vstack([p["auroc" if key == "auroc_within" else key] for p in per_set])
        ok = ~np.isnan(stacked)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[key] = np.where(ok.any(0), np.where(ok, stacked, 0.0).sum(0) / ok.sum(0), np.nan)
    return out


def mean_set_metrics(conf, correct, sets) -> dict[str, float]:
    """The point values of :func:`within_set_metrics`, row by row: per set (rows with no
    confidence left out) its AUROC (one-class sets skipped) and selective metrics, averaged."""
    conf, correct, sets = np.asarray(conf, float), np.asarray(correct, float), np.asarray(sets)
    vals: dict[str, list] = {k: [] for k in WITHIN_SET}
    for s in pd.unique(sets):
        m = (sets == s) & ~np.isnan(conf)
        if not m.any():
            continue
        if 0 < correct[m].sum() < m.sum():
            vals["auroc_within"].append(metrics.auroc(conf[m], correct[m]))
        for k, v in metrics.selective_metrics(conf[m], correct[m]).items():
            vals[k].append(v)
    return {k: float(np.nanmean(v)) if v and not np.all(np.isnan(v)) else math.nan for k, v in vals.items()}


def set_constant_auroc(correct, sets) -> float:
    """The AUROC of a confidence that knows only each set's accuracy: what set difficulty alone
    earns on a pool (0.5 on one set)."""
    correct = np.asarray(correct, float)
    acc = pd.Series(correct).groupby(np.asarray(sets)).transform("mean").to_numpy()
    return metrics.auroc(acc, correct) if 0 < correct.sum() < correct.size else math.nan


def positive_class(set_name: str) -> str:
    """AMBER's official scorer treats "no" as positive; POPE and the rest "yes"."""
    return "no" if set_name.startswith(("amber", "official-amber")) else "yes"



def _f1(truth: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(truth & pred))
    denom = float(np.sum(truth) + np.sum(pred))
    return 2 * tp / denom if denom else 0.0


def _metric_values(conf: np.ndarray, correct: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> dict:
    """``truth``/``pred``: bool arrays, True = the set's positive class."""
    ok = ~np.isnan(conf)
    c, y = conf[ok], correct[ok]
    out = {"accuracy": float(correct.mean()) if correct.size else math.nan, "f1": _f1(truth, pred),
           "coverage": float(ok.mean()) if ok.size else math.nan}
    if c.size == 0:
        return out | {k: math.nan for k in CALIBRATION_METRICS}
    return out | {"ece": metrics.ece(c, y), "ece15": metrics.ece(c, y, 15), "adaptive_ece": metrics.adaptive_ece(c, y),
                  "brier": metrics.brier(c, y), "auroc": metrics.auroc(c, y), "nll": metrics.nll(c, y)}


def _resampled_metric_values(conf: np.ndarray, correct: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                             codes: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`_metric_values` of B cluster resamples at once: ``codes`` (n,) each row's cluster,
    ``counts`` (B, C) how often each cluster was drawn. Task metrics from per-cluster sums
    times the counts; calibration metrics from :func:`metrics.resampled_calibration`."""
    K = counts.astype(float)
    C = K.shape[1]
    per = lambda w: K @ np.bincount(codes, weights=np.asarray(w, dtype=float), minlength=C)  # noqa: E731
    total = per(np.ones(codes.size))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": per(correct) / total,
               "f1": 2.0 * per(truth & pred) / (per(truth) + per(pred))}
        out["f1"] = np.where(np.isnan(out["f1"]), 0.0, out["f1"])
        out["coverage"] = per(~np.isnan(conf)) / total
    # adaptive ECE: point estimate only (the tables report 10- and 15-bin ECE with intervals)
    return out | metrics.resampled_calibration(conf, correct, codes, counts, (10, 15), adaptive=False, nll=True)


def _frame(rows, pool_seeds: bool = True) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["group"] = df["model"].map(model_group) if pool_seeds else df["model"].astype(str)
    df["conf"] = pd.to_numeric(df["confidence"], errors="coerce").astype(float)
    df["ok"] = df["correct"].astype(float)
    ids = df["image_id"].where(df["image_id"].notna(), df["question_id"]) if "image_id" in df else df["question_id"]
    df["image"] = ids.astype(str).map(scene_of)
    df["pos"] = df["set"].map(positive_class)
    df["truth"] = (df["label"].astype(str).str.strip().str.lower() == df["pos"]).to_numpy()
    df["pred"] = (df["answer"].astype(str).str.strip().str.lower() == df["pos"]).to_numpy()
    return df


def _units(df: pd.DataFrame, pools: dict | None):
    """(unit name, its rows): every set, then every pool of the sets present."""
    for set_, g in df.groupby("set", sort=False):
        yield set_, g
    for pool, members in (pools or {}).items():
        g = df[df["set"].isin(members)]
        if g["set"].nunique() >= 1 and len(g):
            yield pool, g


def _codes(g: pd.DataFrame, key: str, uniq) -> np.ndarray:
    return pd.Index(uniq).get_indexer(g[key])


def _scored(g: pd.DataFrame, key: str, uniq, image_counts: np.ndarray, uniform: np.ndarray):
    """(point values, resampled values) of one model group's rows. A resample draws the
    group's seeds with replacement (:func:`seed_resample_counts`), then images
    (``image_counts``): seed-to-seed variation is in every interval."""
    seeds = _seed_order(g["model"])
    codes = pd.Index(seeds).get_indexer(g["model"]) * len(uniq) + _codes(g, key, uniq)
    counts = two_level_counts(seed_resample_counts(len(seeds), uniform), image_counts)
    arrays = (g["conf"].to_numpy(), g["ok"].to_numpy(), g["truth"].to_numpy(), g["pred"].to_numpy())
    boots = _resampled_metric_values(*arrays, codes, counts)
    boots |= within_set_metrics(arrays[0], arrays[1], g["set"].to_numpy(), codes, counts)
    return _point_values(g), boots


def _point_values(g: pd.DataFrame) -> dict:
    """:func:`_metric_values` of a group's rows, with the within-set AUROC and selective metrics."""
    point = _metric_values(g["conf"].to_numpy(), g["ok"].to_numpy(), g["truth"].to_numpy(), g["pred"].to_numpy())
    return point | mean_set_metrics(g["conf"].to_numpy(), g["ok"].to_numpy(), g["set"].to_numpy())


def per_seed_text(value, digits: int = 3) -> str:
    """A ``<metric>_per_seed`` cell (``0.512;0.519``) as ``0.512 / 0.519`` ("" when missing)."""
    return " / ".join(f"{float(x):.{digits}f}" for x in value.split(";")) if isinstance(value, str) else ""


class _Scorer:
    """:func:`_scored` over a list of tasks, in order: in this process, or in ``workers`` spawned
    processes (None: one per core) when the table is large enough (``n_rows``) to repay
    starting them. The resamples are drawn before, here, so the results do not depend on it."""

    MIN_ROWS = 100_000

    def __init__(self, workers: int | None, n_rows: int):
        n = (os.cpu_count() or 1) if workers is None else int(workers)
        self.workers = n if n > 1 and n_rows >= self.MIN_ROWS else 1
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, tasks: list[tuple]) -> list:
        if self.pool is None or len(tasks) < 2:
            return [_scored(*t) for t in tasks]
        return list(self.pool.map(_scored_task, tasks))


def _scored_task(task: tuple):
    return _scored(*task)


def _seed_uniforms(df: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random((n_boot, int(df.groupby("group")["model"].nunique().max())))


def headline_table(rows: list[dict], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                   cluster: str = "image", pools: dict | None = POOLS, workers: int | None = None) -> pd.DataFrame:
    """Per (model group, set or pool, framing, read-out): metrics with bootstrap intervals.

    ``cluster="image"`` resamples images (all their questions, and all seeds' rows of them,
    move together); ``"question"`` resamples questions. The ``cluster`` column says which.
    Seeds of one model (``name@s0``, ``name@s1``, ...) are pooled for the point values and
    resampled before the images (two levels), so the intervals hold the seed spread; each
    seed's own value is in ``<metric>_per_seed`` (``seed_labels`` gives the order) and
    ``<metric>_seed_min/max``. ``auroc_within`` is the mean of the per-set AUROCs of a pool
    (a set's own AUROC for a set); a pool's ``auroc`` mixes its sets and is shown beside
    ``auroc_set_constant``, what a confidence knowing only each set's accuracy earns there.
    Pools (``pooled-clean``, ``pooled-transfer``) gather the rows of their member sets and
    resample the images of all of them at once. ``image_share`` is the between-image share of
    the confidence variance (:func:`metrics.image_variance_share`), the mean over seeds.
    ``workers``: processes that score the groups of a set side by side (:class:`_Scorer`); the
    table is the same for any number.
    """
    if cluster not in metrics.CLUSTERS:
        raise ValueError(f"cluster must be one of {metrics.CLUSTERS}, got {cluster!r}")
    df = _frame(rows)
    if df.empty:
        return df
    key = "image" if cluster == "image" else "question_id"
    out = []
    rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1])   # its own stream: one-seed models keep their image resamples
    with _Scorer(workers, len(df)) as scorer:
        for unit, gu in _units(df, pools):
            uniform = _seed_uniforms(df, n_boot, seed_rng)
            tasks = []
            for (group, framing, readout), g in gu.groupby(["group", "framing", "readout"], sort=False):
                uniq = pd.unique(g[key])
                tasks.append((g, key, uniq, metrics.resample_counts(len(uniq), n_boot, rng), uniform))
            for (g, *_), (point, boots) in zip(tasks, scorer.map(tasks)):
                out.append(_headline_record(unit, g, point, boots, cluster, alpha))
    return pd.DataFrame(out)


def _headline_record(unit: str, g: pd.DataFrame, point: dict, boots: dict, cluster: str, alpha: float) -> dict:
    """One row of :func:`headline_table`: a model group's values on a set or pool, with intervals."""
    group, framing, readout = g["group"].iloc[0], g["framing"].iloc[0], g["readout"].iloc[0]
    pos = sorted(set(g["pos"]))
    rec = {"model": group, "set": unit, "framing": framing, "readout": readout,
           "positive_class": pos[0] if len(pos) == 1 else "per set",
           "n_questions": g["question_id"].nunique(), "n_images": g["image"].nunique(),
           "n_sets": g["set"].nunique(), "seeds": g["model"].nunique(), "cluster": cluster}
    for k, v in point.items():
        rec[k] = v
        rec[f"{k}_low"], rec[f"{k}_high"] = metrics.interval(boots[k], alpha) if k in boots else (math.nan,) * 2
    rec["auroc_set_constant"] = (set_constant_auroc(g["ok"].to_numpy(), g["set"].to_numpy())
                                 if rec["n_sets"] > 1 else math.nan)
    # per seed, then averaged: seeds disagreeing about an image is not within-image variation
    shares = [metrics.image_variance_share(s["conf"].to_numpy(), s["image"].to_numpy())
              for _, s in g.groupby("model")]
    rec["image_share"] = float(np.mean(shares)) if not np.all(np.isnan(shares)) else math.nan
    if rec["seeds"] > 1:
        names = _seed_order(g["model"])
        per_seed = [_point_values(g[g["model"] == name]) for name in names]
        rec["seed_labels"] = ";".join(seed_label(n) for n in names)
        for k in SEED_METRICS:
            vals = [v[k] for v in per_seed]
            rec[f"{k}_per_seed"] = ";".join(f"{x:.6f}" for x in vals)
            rec[f"{k}_seed_min"], rec[f"{k}_seed_max"] = float(np.nanmin(vals)), float(np.nanmax(vals))
    return rec


def paired_table(rows: list[dict], framing: str = "third", readout: str = "single_pass", n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, cluster: str = "image", pools: dict | None = POOLS,
                 base: str = "base", pool_seeds: bool = True, workers: int | None = None) -> pd.DataFrame:
    """Every method against every baseline and against ``base``, on the same resamples.

    Methods are the model groups at (``framing``, ``readout``; with ``pool_seeds=False`` each
    model name is its own group, ``@`` not read as a seed); references are the
    ``baseline:*`` groups and the base model. Per set and pool and metric: ``diff`` =
    method - reference, its percentile interval over resamples drawn once per set (each
    resample scores both on the same images and, for groups with the same number of seeds,
    the same seed positions: s0 with s0), and ``verdict`` (better / worse / level by whether
    the interval excludes 0; lower is better for ECE and Brier, higher for AUROC and
    accuracy). A group with several seeds has them resampled too (:func:`_scored`). Both must
    have answered the same questions. ``workers`` as in :func:`headline_table`.
    """
    if cluster not in metrics.CLUSTERS:
        raise ValueError(f"cluster must be one of {metrics.CLUSTERS}, got {cluster!r}")
    df = _frame(rows, pool_seeds)
    if df.empty:
        return pd.DataFrame()
    df = df[((df["framing"] == framing) & (df["readout"] == readout)) | df["group"].str.startswith("baseline:")]
    key = "image" if cluster == "image" else "question_id"
    rng = np.random.default_rng(seed)
    seed_rng = np.random.default_rng([seed, 1])
    with _Scorer(workers, len(df)) as scorer:
        out = _paired_rows(df, pools, key, n_boot, alpha, rng, seed_rng, base, cluster, framing, readout, scorer)
    return pd.DataFrame(out)


def _paired_rows(df, pools, key, n_boot, alpha, rng, seed_rng, base, cluster, framing, readout, scorer) -> list[dict]:
    out = []
    for unit, gu in _units(df, pools):
        groups = list(dict.fromkeys(gu["group"]))
        refs = [g for g in groups if g.startswith("baseline:")] + ([base] if base in groups else [])
        methods = [g for g in groups if not g.startswith("baseline:")]
        if not refs or not methods:
            continue
        uniq = pd.unique(gu[key])
        counts = metrics.resample_counts(len(uniq), n_boot, rng)
        uniform = _seed_uniforms(gu, n_boot, seed_rng)
        point, boots, qids = {}, {}, {}
        names = list(dict.fromkeys(methods + refs))
        tasks = [(gu[gu["group"] == name], key, uniq, counts, uniform) for name in names]
        for name, (g, *_), scored in zip(names, tasks, scorer.map(tasks)):
            point[name], boots[name] = scored
            qids[name] = frozenset(g["question_id"])
        for m in methods:
            for r in refs:
                if m == r:
                    continue
                if qids[m] != qids[r]:
                    raise ValueError(f"{unit}: {m!r} and {r!r} answered different questions "
                                     f"({len(qids[m] ^ qids[r])} differ); pair them on the same set")
                for k in PAIRED_METRICS:
                    lo, hi = metrics.interval(boots[m][k] - boots[r][k], alpha)
                    out.append({"set": unit, "method": m, "reference": r, "metric": k,
                                "method_value": point[m][k], "reference_value": point[r][k],
                                "diff": point[m][k] - point[r][k], "diff_low": lo, "diff_high": hi,
                                "verdict": metrics.verdict(lo, hi, k), "cluster": cluster,
                                "method_seeds": gu.loc[gu["group"] == m, "model"].nunique(),
                                "reference_seeds": gu.loc[gu["group"] == r, "model"].nunique(),
                                "n_images": gu["image"].nunique(), "framing": framing, "readout": readout})
    return out


def evaluation_tables(rows: list[dict], framing: str = "third", readout: str = "single_pass",
                      fit_sets=FIT_SETS, **boot) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The evaluation's headline and paired tables from all its rows (models, baselines,
    recalibrations, sources); ``boot``: the keywords of :func:`headline_table` and :func:`paired_table`.

    The sets recalibrations and sources are fitted on (``fit_sets``) are left out of both. The
    paired table gives verdicts for each model and plain baseline at (``framing``, ``readout``);
    a model's recalibrations (``model+isotonic``, ...) have their intervals in the headline only.
    """
    reported = [r for r in rows if r["set"] not in fit_sets]
    headline = headline_table(reported, **boot)
    paired = paired_table([r for r in reported if "+" not in model_group(r["model"])],
                          framing=framing, readout=readout, **boot)
    return headline, paired


# the headline table's columns notebook 05 shows
HEADLINE_SHOWN = ("model", "set", "seeds", "n_images", "accuracy", "ece", "brier", "brier_low", "brier_high",
                  "auroc_within", "auroc_within_low", "auroc_within_high", "auroc", "auroc_set_constant",
                  "image_share", "nll", "aurc", "aurc_low", "aurc_high", "eaurc", "sel_acc80", "sel_acc80_low",
                  "sel_acc80_high", "prr")


def pooled_headline(headline: pd.DataFrame, framing: str = "third", readout: str = "single_pass",
                    columns=HEADLINE_SHOWN) -> pd.DataFrame:
    """The pools' rows of the headline table at (``framing``, ``readout``), with the baselines'
    (framed ``"-"``), in ``columns``, rounded."""
    keep = (headline.framing.isin([framing, "-"]) & headline.readout.isin([readout, "-"])
            & headline.set.str.startswith("pooled"))
    return headline[keep][list(columns)].round(3)


def pooled_verdicts(paired: pd.DataFrame, metrics=("ece", "brier", "auroc_within")) -> pd.DataFrame:
    """The paired table's differences and verdicts on the pools for ``metrics``: one row per
    (set, method, reference), a (diff | verdict, metric) column each, rounded. Empty when it is."""
    if not len(paired):
        return paired
    shown = paired[paired.set.str.startswith("pooled") & paired.metric.isin(list(metrics))]
    return shown.pivot_table(index=["set", "method", "reference"], columns="metric", values=["diff", "verdict"],
                             aggfunc="first").round(3)


def strongest_baseline(headline: pd.DataFrame, pool: str = "pooled-clean", metric: str = "brier") -> str:
    """The baseline with the lowest ``metric`` on ``pool`` (fixed before any method is compared);
    without that pool, the lowest mean over the sets present."""
    b = headline[headline["model"].str.startswith("baseline:")]
    if b.empty:
        raise ValueError("no baseline rows in the headline table: compute baseline_rows first")
    on_pool = b[b["set"] == pool]
    scores = (on_pool.set_index("model")[metric] if len(on_pool)
              else b[~b["set"].isin(list(POOLS) + ["perturbed"])].groupby("model")[metric].mean())
    return str(scores.idxmin())


def summary_table(rows: list[dict], n_bins: int = 10) -> pd.DataFrame:
    """``evaluation.summarize`` per set, each with its benchmark's positive class."""
    from csp_utils.evaluate import evaluation

    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(r["set"], []).append(r)
    out = []
    for set_, rs in by_set.items():
        out += evaluation.summarize(rs, positive_class(set_), n_bins)
    return pd.DataFrame(out)


FIGURE_COLUMNS = ("model", "set", "framing", "readout", "question_id", "image_id", "label", "answer", "correct",
                  "confidence", "internal_prob")


def figure_data(rows: list[dict]) -> pd.DataFrame:
    """The per-question columns the figures need (small enough to commit, gzip-compressed)."""
    df = pd.DataFrame(rows)
    return df[[c for c in FIGURE_COLUMNS if c in df.columns]]


def confidence_accuracy_table(rows: list[dict] | pd.DataFrame, sets, framing: str = "third",
                              readout: str = "single_pass") -> pd.DataFrame:
    """Per set and model group (seeds pooled): accuracy, mean confidence, Brier, ECE10 and the
    within-set AUROC of the main framing and read-out (baselines, with no framing, alike)."""
    df = pd.DataFrame(rows)
    df = df[df["set"].isin(list(sets)) & df["framing"].isin([framing, "-"]) & df["readout"].isin([readout, "-"])]
    df = df.dropna(subset=["confidence"])
    out = []
    for (s, group), g in df.groupby(["set", df["model"].map(model_group)], sort=False):
        conf, correct = g["confidence"].to_numpy(float), g["correct"].to_numpy(int)
        out.append({"set": s, "model": group, "n": len(g), "accuracy": correct.mean(), "confidence": conf.mean(),
                    "brier": metrics.brier(conf, correct), "ece": metrics.ece(conf, correct),
                    "auroc": metrics.auroc(conf, correct) if 0 < correct.sum() < len(correct) else math.nan})
    return pd.DataFrame(out)


def level_table(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows of the held-out perturbed set -> (model, level, confidence, correct)."""
    df = pd.DataFrame(rows)
    df = df[df["set"] == "perturbed"].copy()
    df["level"] = df["question_id"].map(level_of)
    return df


def noise_table(rows: list[dict] | pd.DataFrame, framing: str = "third", readout: str = "single_pass") -> pd.DataFrame:
    """The grounded perturbed set per model and noise target (none / key / distractor): accuracy,
    mean confidence, ECE, Brier and AUROC. Confidence that follows correctness drops with key noise
    only where answers go wrong, and stays up under distractor noise."""
    df = pd.DataFrame(rows)
    df = df[(df["set"] == GROUNDED_SET) & df["framing"].isin([framing, "-"]) & df["readout"].isin([readout, "-"])]
    df = df.dropna(subset=["confidence"])
    if df.empty:
        return pd.DataFrame()
    df = df.assign(noise_on=df["question_id"].map(noise_on_of))
    out = []
    for (model, noise_on), g in df.groupby(["model", "noise_on"]):
        conf, correct = g["confidence"].to_numpy(float), g["correct"].to_numpy(int)
        out.append({"model": model, "noise_on": noise_on, "n": len(g), "accuracy": correct.mean(),
                    "confidence": conf.mean(), "ece": metrics.ece(conf, correct), "brier": metrics.brier(conf, correct),
                    "auroc": metrics.auroc(conf, correct) if 0 < correct.sum() < len(correct) else math.nan})
    return pd.DataFrame(out)


def level_spearman(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman of verbalized confidence against the noise level, per model/framing/read-out."""
    out = []
    for (model, framing, readout), g in df.groupby(["model", "framing", "readout"]):
        g = g.dropna(subset=["confidence"])
        rho, p = metrics.spearman(g["level"], g["confidence"]) if len(g) >= 3 else (math.nan, math.nan)
        out.append({"model": model, "framing": framing, "readout": readout, "spearman_level": rho, "p": p, "n": len(g)})
    return pd.DataFrame(out)


def paired_against(rows: list[dict], reference: str, framing: str = "third", readout: str = "single_pass",
                   pool_seeds: bool = True, **boot) -> pd.DataFrame:
    """Every other model group against ``reference`` (an ablation's full variant, or another
    method), on the same resamples; ``boot``: :func:`paired_table`'s keywords (n_boot, alpha,
    seed, cluster, pools).

    Seeds (``name@s0``, ``name@s1``, ...) are pooled per group and resampled seed with seed:
    the k-th seed of each group is drawn together. ``pool_seeds=False`` takes every model
    name whole (each its own one-seed model)."""
    models = [r for r in rows if not str(r["model"]).startswith("baseline:")]
    names = {str(r["model"]) if not pool_seeds else model_group(str(r["model"])) for r in models}
    if reference not in names:
        raise ValueError(f"reference {reference!r} has no rows; models: {sorted(names)}")
    table = paired_table(models, framing, readout, base=reference, pool_seeds=pool_seeds, **boot)
    if table.empty:
        return table
    return table[table["reference"] == reference].reset_index(drop=True)
