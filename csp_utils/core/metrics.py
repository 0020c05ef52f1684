"""Task metrics and calibration metrics for yes/no answers with verbalized confidence.

Conventions (one per question, stated once here):

* Confidences are fractions in [0, 1] (data keeps integer percents; divide by 100 before
  calling). Correctness is 0/1 (bool or int). :func:`validate` checks both.
* Missing confidences (unparsable replies, NaN/None) are the caller's to drop with
  :func:`drop_missing`; :func:`calibration_summary` does it for you and reports coverage.
* Equal-width bins follow Guo et al. (2017): bin k of n holds (k/n, (k+1)/n], 0.0 joins
  the first bin. With 10 bins a verbalized 90% sits in (0.8, 0.9] and 100% alone in
  (0.9, 1.0]. Assignment is rounded so that 0.3, 0.1 + 0.2 and 30/100 share a bin.
* ``gap`` in a reliability table is ``mean_confidence - accuracy``: positive means
  overconfident.
* AUROC is NaN when all answers are right or all wrong (one class: undefined).
* Zero divisions in task metrics (no predicted positives, no true positives) give 0.0.

Only numpy and pandas at import time; scipy is imported inside :func:`spearman`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

# Decimals kept before binning: far finer than any confidence we care about, far coarser
# than float error (0.1 + 0.2 = 0.30000000000000004).
_BIN_DECIMALS = 9


# ---------------------------------------------------------------------------- validation
def validate(conf, correct) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert inputs: returns ``(conf float64, correct int64)``.

    Raises ValueError naming the bad argument: empty input, unequal lengths, non-finite or
    missing confidences (drop them first with :func:`drop_missing`), confidences outside
    [0, 1] (percents must be divided by 100), correctness other than 0/1.
    """
    try:
        c = np.asarray(conf, dtype=float).ravel()
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"conf must be numbers in [0, 1]; could not convert it ({e}). "
            "Drop missing confidences first with drop_missing(conf, correct)."
        ) from None
    y = as_binary(correct, "correct")
    if c.size == 0:
        raise ValueError("conf is empty: need at least one (confidence, correct) pair")
    if c.size != y.size:
        raise ValueError(f"conf and correct differ in length ({c.size} vs {y.size}); pass one correctness per confidence")
    if not np.all(np.isfinite(c)):
        bad = int(np.sum(~np.isfinite(c)))
        raise ValueError(
            f"conf holds {bad} missing or non-finite value(s); drop them with drop_missing(conf, correct) "
            "and report the coverage"
        )
    if c.min() < 0.0 or c.max() > 1.0:
        hint = " (looks like percents: divide by 100)" if c.max() <= 100.0 and c.max() > 1.0 else ""
        raise ValueError(f"conf must lie in [0, 1]; got min {c.min():g}, max {c.max():g}{hint}")
    return c, y


def as_binary(values, name: str) -> np.ndarray:
    """0/1 (or bool) values as int64; anything else is a ValueError naming ``name``."""
    try:
        a = np.asarray(values).ravel()
    except Exception as e:  # ragged input and the like
        raise ValueError(f"{name} must be a 1-d sequence of 0/1 or bool ({e})") from None
    if a.dtype == bool:
        return a.astype(np.int64)
    if a.size and not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must hold 0/1 or bool, got dtype {a.dtype}; e.g. pass (pred == label)")
    a = a.astype(float)
    if a.size and not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must hold only 0/1 or bool (NaN not allowed); found {np.unique(a[(a != 0) & (a != 1)])[:5]}")
    return a.astype(np.int64)


def drop_missing(conf, correct) -> tuple[np.ndarray, np.ndarray, float]:
    """Drop items whose confidence is missing (None or NaN).

    Returns ``(conf, correct, coverage)`` with coverage = kept / total (0.0 when nothing
    was parsed). The kept subset is validated like :func:`validate`, except that it may be
    empty. Correctness itself may not be missing.
    """
    raw = list(conf) if not isinstance(conf, np.ndarray) else conf.ravel().tolist()
    y = as_binary(correct, "correct")
    if len(raw) != y.size:
        raise ValueError(f"conf and correct differ in length ({len(raw)} vs {y.size})")
    if len(raw) == 0:
        raise ValueError("conf is empty: coverage of nothing is undefined")
    try:  # None, NaN and pandas' NA all mean "not parsed"
        c = np.array([np.nan if pd.isna(v) else v for v in raw], dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"conf must hold numbers in [0, 1] or None/NaN for missing ({e})") from None
    keep = ~np.isnan(c)
    coverage = float(keep.mean())
    c, y = c[keep], y[keep]
    if c.size:
        c, y = validate(c, y)  # inf and out-of-range values are errors, not "missing"
    return c, y, coverage


# --------------------------------------------------------------------------------- bins
def bin_index(conf, n_bins: int = 10) -> np.ndarray:
    """Equal-width bin of each confidence: bin k holds (k/n, (k+1)/n], 0.0 goes to bin 0.

    ``conf * n`` is rounded to 9 decimals before the ceiling, so values that differ only
    by float error (0.3, 0.1 + 0.2, 30/100) land in the same bin.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    c = np.asarray(conf, dtype=float)
    k = np.ceil(np.round(c * n_bins, _BIN_DECIMALS)).astype(np.int64) - 1
    return np.clip(k, 0, n_bins - 1)  # 0.0 gives -1 -> first bin


def _bin_stats(bins: np.ndarray, conf: np.ndarray, correct: np.ndarray, n_bins: int):
    """Per-bin count, mean confidence and accuracy (NaN for empty bins)."""
    count = np.bincount(bins, minlength=n_bins).astype(float)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, conf_sum / count, acc_sum / count


def reliability_table(conf, correct, n_bins: int = 10) -> pd.DataFrame:
    """One row per equal-width bin: ``bin, lower, upper, count, mean_confidence, accuracy, gap``.

    ``gap = mean_confidence - accuracy`` (positive: overconfident); NaN in empty bins.
    """
    c, y = validate(conf, correct)
    count, mean_conf, acc = _bin_stats(bin_index(c, n_bins), c, y, n_bins)
    k = np.arange(n_bins)
    return pd.DataFrame(
        {
            "bin": k,
            "lower": k / n_bins,
            "upper": (k + 1) / n_bins,
            "count": count.astype(int),
            "mean_confidence": mean_conf,
            "accuracy": acc,
            "gap": mean_conf - acc,
        }
    )


# -------------------------------------------------------------------- calibration metrics
def ece(conf, correct, n_bins: int = 10) -> float:
    """Expected calibration error, equal-width bins: sum_b |B_b|/n * |acc_b - conf_b|."""
    c, y = validate(conf, correct)
    count, mean_conf, acc = _bin_stats(bin_index(c, n_bins), c, y, n_bins)
    full = count > 0
    return float(np.sum(count[full] / c.size * np.abs(acc[full] - mean_conf[full])))


def mce(conf, correct, n_bins: int = 10) -> float:
    """Maximum calibration error: the largest |acc_b - conf_b| over non-empty bins."""
    c, y = validate(conf, correct)
    count, mean_conf, acc = _bin_stats(bin_index(c, n_bins), c, y, n_bins)
    full = count > 0
    return float(np.max(np.abs(acc[full] - mean_conf[full])))


def adaptive_bin_index(conf, n_bins: int = 10) -> np.ndarray:
    """Equal-mass bins that never split ties.

    Sort the confidences; under a plain equal-mass split, rank r goes to bin
    floor(r * n_bins / n). Each distinct value goes, whole, to the bin of its first
    (lowest) rank. Without ties this is exactly the equal-mass split; with ties some bins
    grow and some stay empty (verbalized confidences have few distinct values).
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    c = np.asarray(conf, dtype=float)
    values, inverse, counts = np.unique(c, return_inverse=True, return_counts=True)
    first_rank = np.concatenate([[0], np.cumsum(counts)[:-1]])
    value_bin = np.minimum(first_rank * n_bins // c.size, n_bins - 1)
    return value_bin[inverse.ravel()]


def adaptive_ece(conf, correct, n_bins: int = 10) -> float:
    """ECE over equal-mass bins (:func:`adaptive_bin_index`; ties stay together)."""
    c, y = validate(conf, correct)
    count, mean_conf, acc = _bin_stats(adaptive_bin_index(c, n_bins), c, y, n_bins)
    full = count > 0
    return float(np.sum(count[full] / c.size * np.abs(acc[full] - mean_conf[full])))


def brier(conf, correct) -> float:
    """Brier score of the confidence as a probability of being right: mean (conf - correct)^2."""
    c, y = validate(conf, correct)
    return float(np.mean((c - y) ** 2))


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts  # ranks before each distinct value
    return (start + (counts + 1) / 2.0)[inverse.ravel()]


def auroc(conf, correct) -> float:
    """AUROC of confidence for separating right (1) from wrong (0) answers.

    The probability that a random right answer has higher confidence than a random wrong
    one, ties counting 1/2 (Mann-Whitney U / (n_right * n_wrong), from midranks).
    Returns NaN when every answer is right or every answer is wrong: with one class the
    AUROC is undefined (it is not 0.5).
    """
    c, y = validate(conf, correct)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _midranks(c)[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------------ selective prediction
# Answers are kept in order of falling confidence; the risk at coverage k/n is the error rate
# of the k kept. Tied confidences have no order of their own: every quantity below is its
# expectation over random orders of the ties, which puts a tie group's errors evenly along its
# ranks (the cumulative error count is linear inside the group).
COVERAGES = (0.5, 0.8, 0.9)        # selective accuracy is reported at these coverages
NLL_CLIP = 1e-3                    # confidences clipped to [NLL_CLIP, 1 - NLL_CLIP] in the NLL


def sel_acc_key(coverage: float) -> str:
    return f"sel_acc{round(coverage * 100)}"


SELECTIVE_KEYS = ("aurc", "eaurc", "prr") + tuple(sel_acc_key(c) for c in COVERAGES)


def nll(conf, correct, clip: float = NLL_CLIP) -> float:
    """Negative log-likelihood of correctness, confidence clipped to [clip, 1 - clip] (a stated
    100% that is wrong costs -log(clip), not infinity)."""
    c, y = validate(conf, correct)
    q = np.clip(c, clip, 1.0 - clip)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def _harmonic(x: np.ndarray) -> np.ndarray:
    """H(x) = sum_{j<=x} 1/j, extended to real x >= 0 (digamma(x + 1) + Euler's gamma)."""
    from scipy.special import digamma

    return digamma(np.asarray(x, dtype=float) + 1.0) + np.euler_gamma


def _cumulative_errors(count: np.ndarray, err: np.ndarray, kept: np.ndarray, before=None) -> np.ndarray:
    """(B,) expected errors among the ``kept`` (B,) most confident answers: ``count``/``err``
    (B, U) rows and wrong rows at each distinct confidence, most confident first; ``before``:
    the rows before each, when the caller has them."""
    if before is None:
        before = np.cumsum(count, 1) - count
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.clip((kept[:, None] - before) / count, 0.0, 1.0)
    return np.where(count > 0, err * share, 0.0).sum(1)


def _harmonic_steps(before: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``H(before + count) - H(before)``, each harmonic number computed once where each tie
    group's end is the next one's start (the usual case: integer counts)."""
    upper = before + count
    low = _harmonic(before)
    if np.array_equal(upper[:, :-1], before[:, 1:]):
        high = np.concatenate([low[:, 1:], _harmonic(upper[:, -1:])], axis=1)
    else:
        high = _harmonic(upper)
    return high - low


def selective_from_counts(count, right, coverages=COVERAGES) -> dict[str, np.ndarray]:
    """AURC, excess AURC, PRR and selective accuracy at ``coverages`` of B samples at once.

    ``count``/``right`` (B, U): rows and right rows at each distinct confidence, most confident
    first (weights may be any counts >= 0). The area under the risk-coverage curve sums, over
    each tie group g (n_g rows, e_g wrong, N and E rows and errors before it), the risks
    (E + e_g j / n_g) / (N + j) for j = 1..n_g; in closed form
    (E - e_g N / n_g) (H(N + n_g) - H(N)) + e_g with H the harmonic number. The oracle keeps
    every right answer first; PRR = (error rate - AURC) / (error rate - oracle AURC).
    """
    count = np.atleast_2d(np.asarray(count, dtype=float))
    err = count - np.atleast_2d(np.asarray(right, dtype=float))
    n, e = count.sum(1), err.sum(1)
    before_n = np.cumsum(count, 1) - count
    before_e = np.cumsum(err, 1) - err
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(count > 0, err / count, 0.0)
        area = ((before_e - slope * before_n) * _harmonic_steps(before_n, count) + err).sum(1)
        aurc = area / n
        oracle = (e - (n - e) * (_harmonic(n) - _harmonic(n - e))) / n
        rate = e / n
        spread = rate - oracle
        out = {"aurc": aurc, "eaurc": aurc - oracle,
               "prr": np.where(spread > 1e-12, (rate - aurc) / spread, np.nan)}
        for cov in coverages:
            kept = cov * n
            out[sel_acc_key(cov)] = 1.0 - _cumulative_errors(count, err, kept, before_n) / kept
    return {k: np.where(n > 0, v, np.nan) for k, v in out.items()}


def _by_confidence(conf, correct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct confidences falling, rows at each, right rows at each)."""
    c, y = validate(conf, correct)
    u, inverse = np.unique(-c, return_inverse=True)
    return -u, np.bincount(inverse.ravel()).astype(float), np.bincount(inverse.ravel(), weights=y)


def selective_metrics(conf, correct, coverages=COVERAGES) -> dict[str, float]:
    """``aurc``, ``eaurc``, ``prr`` and ``sel_acc<cov>`` of one sample (:func:`selective_from_counts`)."""
    _, count, right = _by_confidence(conf, correct)
    return {k: float(v[0]) for k, v in selective_from_counts(count[None], right[None], coverages).items()}


def aurc(conf, correct) -> float:
    """Area under the selective risk against coverage, ties averaged (Geifman et al. 2019)."""
    return selective_metrics(conf, correct)["aurc"]


def risk_coverage(conf, correct, coverages) -> np.ndarray:
    """Selective risk (error rate of the answers kept) at each coverage in (0, 1], keeping
    ``coverage * n`` answers in order of falling confidence, ties averaged. With
    ``coverages = k / n`` for k = 1..n its mean is :func:`aurc`."""
    _, count, right = _by_confidence(conf, correct)
    cov = np.asarray(coverages, dtype=float).ravel()
    if cov.size and (cov.min() <= 0 or cov.max() > 1):
        raise ValueError("coverages must lie in (0, 1]")
    kept = cov * count.sum()
    K = np.broadcast_to(count, (cov.size, count.size))
    E = np.broadcast_to(count - right, (cov.size, count.size))
    return _cumulative_errors(K, E, kept) / kept


def oracle_risk_coverage(correct, coverages) -> np.ndarray:
    """The risk-coverage curve of the order that keeps every right answer first."""
    y = as_binary(correct, "correct")
    return risk_coverage(y.astype(float), y, coverages)


# ---------------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    conf,
    correct,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval for any metric of two paired arrays.

    ``metric_fn(a, b)`` is called on the full data (point estimate) and on ``n_boot``
    resamples of the pairs with replacement; returns ``(point, low, high)`` with low/high
    the alpha/2 and 1 - alpha/2 quantiles. Works for task metrics too, e.g.
    ``bootstrap_ci(lambda t, p: task_metrics(t, p)["f1"], y_true, y_pred)``.

    Resamples where the metric is NaN (e.g. AUROC on a one-class resample) are left out;
    if all are NaN, low and high are NaN. Deterministic given ``seed``.
    Note: for biased statistics such as ECE (which small samples overestimate), the
    percentile interval can sit mostly above the point estimate.
    """
    a, b = np.asarray(conf), np.asarray(correct)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"the two arrays differ in length ({a.shape[0]} vs {b.shape[0]})")
    if a.shape[0] == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    point = float(metric_fn(a, b))
    rng = np.random.default_rng(seed)
    n = a.shape[0]
    reps = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, n, size=n)
        reps[i] = metric_fn(a[idx], b[idx])
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return point, float("nan"), float("nan")
    low, high = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return point, float(low), float(high)


# ------------------------------------------------------------------- cluster bootstrap
# Questions about one image share its evidence, so they are not independent draws: the
# default resampling unit is the image ("question" resamples single questions).
CLUSTERS = ("image", "question")
LOWER_IS_BETTER = {"ece": True, "ece15": True, "adaptive_ece": True, "brier": True, "auroc": False,
                   "auroc_within": False, "accuracy": False, "f1": False, "nll": True, "aurc": True,
                   "eaurc": True, "prr": False, "sel_acc50": False, "sel_acc80": False, "sel_acc90": False}


def resample_counts(n_clusters: int, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """(n_boot, n_clusters) counts: how often each cluster is drawn in each resample.

    Each resample draws ``n_clusters`` clusters with replacement (one vectorised bincount).
    """
    if n_clusters < 1:
        raise ValueError("cannot resample zero clusters")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    flat = (np.arange(n_boot)[:, None] * n_clusters + draws).ravel()
    return np.bincount(flat, minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)


def cluster_codes(ids) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, unique ids)``: the cluster index of every row."""
    codes, uniq = pd.factorize(pd.Series(np.asarray(ids, dtype=object).ravel()), sort=False)
    if (codes < 0).any():
        raise ValueError("cluster ids hold missing values; give every row its image (or question) id")
    return codes.astype(np.int64), np.asarray(uniq)


def resampled_calibration(conf, correct, codes, counts, n_bins: Sequence[int] = (10, 15),
                          adaptive: bool = True, nll: bool = False,
                          selective: bool = False) -> dict[str, np.ndarray]:
    """ECE (one key per bin count: ``ece`` for 10, ``ece15`` ...), adaptive ECE (unless
    ``adaptive=False``, which saves a third of the time on continuous confidences), Brier and
    AUROC of B cluster resamples at once; with ``nll`` the clipped NLL, with ``selective`` the
    keys of :func:`selective_from_counts` (AURC, excess AURC, PRR, selective accuracy).

    ``codes`` (n,): each row's cluster; ``counts`` (B, C): how often each cluster was drawn
    (:func:`resample_counts`). ECE and Brier come from per-cluster sums (per-bin confidence
    and correctness, squared error) times the counts; AUROC and adaptive ECE from the count
    of right / wrong rows at each distinct confidence per resample (one bincount instead of
    B sorts). Results equal the row-by-row functions on the resampled rows within float
    rounding. Missing confidences (NaN) are left out, as :func:`calibration_summary` does;
    resamples with no parsed row give NaN, one-class resamples NaN AUROC.
    """
    conf = np.asarray(conf, dtype=float).ravel()
    correct = np.asarray(correct, dtype=float).ravel()
    codes = np.asarray(codes, dtype=np.int64).ravel()
    K = np.atleast_2d(np.asarray(counts)).astype(float)
    if codes.size != conf.size or correct.size != conf.size:
        raise ValueError(f"need one cluster code and one correctness per confidence: {codes.size}, {correct.size} "
                         f"for {conf.size}")
    B, C = K.shape
    if codes.size and codes.max() >= C:
        raise ValueError(f"cluster code {codes.max()} out of range for {C} clusters in counts")
    keys = ([_ece_key(k) for k in n_bins] + (["adaptive_ece"] if adaptive else []) + ["brier", "auroc"]
            + (["nll"] if nll else []) + (list(SELECTIVE_KEYS) if selective else []))
    ok = ~np.isnan(conf)
    if not ok.any():
        return {k: np.full(B, np.nan) for k in keys}
    c, y, k_ = conf[ok], correct[ok], codes[ok]
    per_cluster = lambda w: np.bincount(k_, weights=w, minlength=C)  # noqa: E731
    n = K @ per_cluster(np.ones_like(c))
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for nb in n_bins:  # per-cluster sums of confidence and correctness in each bin
            idx = k_ * nb + bin_index(c, nb)
            gap = (np.bincount(idx, weights=y, minlength=C * nb) - np.bincount(idx, weights=c, minlength=C * nb))
            out[_ece_key(nb)] = np.abs(K @ gap.reshape(C, nb)).sum(1) / n
        out["brier"] = K @ per_cluster((c - y) ** 2) / n
        if nll:
            q = np.clip(c, NLL_CLIP, 1.0 - NLL_CLIP)
            out["nll"] = -(K @ per_cluster(y * np.log(q) + (1 - y) * np.log1p(-q))) / n
        # AUROC and adaptive ECE need ranks: right / all rows at each distinct confidence
        order = np.argsort(c, kind="stable")
        cs = c[order]
        starts = np.flatnonzero(np.concatenate([[True], cs[1:] != cs[:-1]]))
        u, U = cs[starts], starts.size
        if C * U <= 4_000_000:  # per-cluster table times counts
            cell = k_[order] * U + np.repeat(np.arange(U), np.diff(np.append(starts, cs.size)))
            count = K @ np.bincount(cell, minlength=C * U).reshape(C, U).astype(float)
            right = K @ np.bincount(cell, weights=y[order], minlength=C * U).reshape(C, U)
        else:  # rows in confidence order, weighted per resample, summed per distinct value
            K0 = np.concatenate([K, np.zeros((B, 1))], axis=1)   # column C: weight 0 for wrong rows
            count = np.add.reduceat(K[:, k_[order]], starts, axis=1)
            right = np.add.reduceat(K0[:, np.where(y[order] == 1, k_[order], C)], starts, axis=1)
        first_rank = np.cumsum(count, 1) - count
        if adaptive:
            nb = n_bins[0]
            vbin = np.minimum(np.floor(first_rank * nb / np.maximum(n, 1)[:, None]).astype(np.int64), nb - 1)
            flat = (np.arange(B)[:, None] * nb + vbin).ravel()
            conf_sum = np.bincount(flat, weights=(count * u).ravel(), minlength=B * nb).reshape(B, nb)
            acc_sum = np.bincount(flat, weights=right.ravel(), minlength=B * nb).reshape(B, nb)
            out["adaptive_ece"] = np.abs(acc_sum - conf_sum).sum(1) / n
        n_pos = right.sum(1)
        n_neg = n - n_pos
        rank_sum = (right * (first_rank + (count + 1) / 2.0)).sum(1)   # midranks, as _midranks
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        out["auroc"] = np.where((n_pos == 0) | (n_neg == 0), np.nan, auc)
        if selective:   # most confident first
            out |= selective_from_counts(count[:, ::-1], right[:, ::-1])
        for k in keys:
            out[k] = np.where(n > 0, out[k], np.nan)
    return {k: out[k] for k in keys}


def _ece_key(n_bins: int) -> str:
    return "ece" if n_bins == 10 else f"ece{n_bins}"


def interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates, NaN replicates left out (NaN if all are)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def cluster_bootstrap(conf, correct, clusters, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                      cluster: str = "image", n_bins: Sequence[int] = (10, 15)) -> dict[str, tuple]:
    """``{metric: (point, low, high)}`` for ECE (per bin count), Brier, AUROC.

    ``cluster="image"`` resamples the ids in ``clusters`` with replacement and keeps all of
    their rows; ``"question"`` resamples rows one by one. Missing confidences are left out.
    """
    conf = np.asarray(conf, dtype=float).ravel()
    codes, uniq = _codes_for(clusters, conf.size, cluster)
    boots = resampled_calibration(conf, correct, codes, resample_counts(len(uniq), n_boot, seed), n_bins, adaptive=False)
    point = resampled_calibration(conf, correct, codes, np.ones((1, len(uniq))), n_bins, adaptive=False)
    return {k: (float(point[k][0]), *interval(boots[k], alpha)) for k in boots}


def _codes_for(clusters, n: int, cluster: str) -> tuple[np.ndarray, np.ndarray]:
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {CLUSTERS}, got {cluster!r}")
    if cluster == "question":
        return np.arange(n), np.arange(n)
    codes, uniq = cluster_codes(clusters)
    if codes.size != n:
        raise ValueError(f"clusters has {codes.size} ids for {n} rows; give one image id per row")
    return codes, uniq


def verdict(low: float, high: float, metric: str) -> str:
    """"better" / "worse" / "level" for a difference (method - reference) and its interval.

    Lower is better for ECE and Brier, higher for AUROC and accuracy; "level" when the
    interval holds 0 (or is undefined).
    """
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"no direction known for metric {metric!r}; one of {sorted(LOWER_IS_BETTER)}")
    if not (low == low and high == high) or low <= 0.0 <= high:
        return "level"
    below = high < 0.0
    return "better" if below == LOWER_IS_BETTER[metric] else "worse"


def image_variance_share(conf, clusters) -> float:
    """Between-image share of the confidence variance: sum_i n_i (mean_i - mean)^2 / sum (c - mean)^2.

    1.0: the confidence depends on the image only (every question about an image gets the
    same value); near 0: it varies within images. NaN when the confidence is constant or
    nothing was parsed. Missing confidences are left out.
    """
    c = np.asarray(conf, dtype=float).ravel()
    codes, _ = cluster_codes(clusters)
    if codes.size != c.size:
        raise ValueError(f"clusters has {codes.size} ids for {c.size} confidences")
    ok = ~np.isnan(c)
    c, codes = c[ok], codes[ok]
    if c.size == 0:
        return float("nan")
    total = float(np.sum((c - c.mean()) ** 2))
    if total <= 1e-15 * c.size:
        return float("nan")
    n_i = np.bincount(codes)
    has = n_i > 0
    means = np.bincount(codes, weights=c)[has] / n_i[has]
    return float(np.sum(n_i[has] * (means - c.mean()) ** 2) / total)


# ---------------------------------------------------------------------------- task metrics
def _labels(values) -> np.ndarray:
    """Normalised answer labels: "Yes " -> "yes"."""
    return np.array([str(v).strip().lower() for v in values], dtype=object)


def task_metrics(y_true: Sequence[str], y_pred: Sequence[str], positive: str = "yes") -> dict:
    """Accuracy, precision, recall, F1 (for ``positive``), yes-ratio, for yes/no answers.

    Labels are compared case-insensitively after stripping ("Yes" == "yes"). ``y_true``
    must be yes/no; a prediction that is neither (an unscorable reply) counts as wrong and
    as not positive, and is counted in ``n_other``. ``yes_ratio`` is the share of
    *predicted* "yes", whatever the positive class (POPE reports it; AMBER's positive is
    "no"). Zero divisions give 0.0: precision with no predicted positives, recall with no
    actual positives, F1 when precision + recall = 0.
    """
    pos = str(positive).strip().lower()
    if pos not in ("yes", "no"):
        raise ValueError(f"positive must be 'yes' or 'no', got {positive!r}")
    t, p = _labels(y_true), _labels(y_pred)
    if t.size == 0:
        raise ValueError("y_true is empty")
    if t.size != p.size:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    bad = sorted(set(t) - {"yes", "no"})
    if bad:
        raise ValueError(f"y_true must hold only 'yes'/'no'; found {bad[:5]}")
    tp = int(np.sum((p == pos) & (t == pos)))
    fp = int(np.sum((p == pos) & (t != pos)))
    fn = int(np.sum((p != pos) & (t == pos)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float(np.mean(p == t)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "yes_ratio": float(np.mean(p == "yes")),
        "positive_class": pos,
        "n": int(t.size),
        "n_other": int(np.sum((p != "yes") & (p != "no"))),
    }


# ------------------------------------------------------------------------------ summaries
def calibration_summary(conf, correct, n_bins: int = 10) -> dict:
    """All calibration metrics on the parsed subset, with its size and coverage.

    ``conf`` may hold missing values (None/NaN); they are dropped and
    ``coverage = n / n_total``. If nothing was parsed, the metrics are NaN and coverage 0.
    Keys: ece, adaptive_ece, mce, brier, auroc, accuracy, mean_confidence, n, n_total,
    coverage.
    """
    c, y, coverage = drop_missing(conf, correct)
    n_total = int(np.asarray(correct).size)
    out = {"n": int(c.size), "n_total": n_total, "coverage": coverage}
    if c.size == 0:
        nan = float("nan")
        return {k: nan for k in ("ece", "adaptive_ece", "mce", "brier", "auroc", "accuracy", "mean_confidence")} | out
    return {
        "ece": ece(c, y, n_bins),
        "adaptive_ece": adaptive_ece(c, y, n_bins),
        "mce": mce(c, y, n_bins),
        "brier": brier(c, y),
        "auroc": auroc(c, y),
        "accuracy": float(y.mean()),
        "mean_confidence": float(c.mean()),
    } | out


def spearman(x, y) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value, ``(rho, p)``.

    NaN for both when there are fewer than 3 pairs or either input is constant.
    """
    a = np.asarray(x, dtype=float).ravel()
    b = np.asarray(y, dtype=float).ravel()
    if a.size != b.size:
        raise ValueError(f"x and y differ in length ({a.size} vs {b.size})")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("x and y must be finite; drop missing pairs first")
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan"), float("nan")
    from scipy import stats

    res = stats.spearmanr(a, b)
    return float(res.statistic), float(res.pvalue)


__all__ = [
    "validate",
    "as_binary",
    "drop_missing",
    "bin_index",
    "adaptive_bin_index",
    "reliability_table",
    "ece",
    "mce",
    "adaptive_ece",
    "brier",
    "auroc",
    "nll",
    "aurc",
    "selective_metrics",
    "selective_from_counts",
    "risk_coverage",
    "oracle_risk_coverage",
    "bootstrap_ci",
    "resample_counts",
    "cluster_codes",
    "resampled_calibration",
    "cluster_bootstrap",
    "interval",
    "verdict",
    "image_variance_share",
    "task_metrics",
    "calibration_summary",
    "spearman",
]
