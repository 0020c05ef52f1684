"""Metrics against hand-computed cases and against independent (loop / pairwise) computations."""

import itertools
import math

import numpy as np
import pytest

from csp_utils.core import metrics as M


def rand_set(seed, n=300, levels=11):
    """Verbalized-style confidences (few distinct values, many ties) and correctness."""
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, levels, n) / (levels - 1)
    correct = (rng.random(n) < 0.3 + 0.5 * conf).astype(int)
    return conf, correct


# ------------------------------------------------------------------ independent references
def loop_bin(c, n_bins):
    """Bin by scanning intervals (k/n, (k+1)/n] with an explicit tolerance; 0 -> bin 0."""
    for k in range(n_bins):
        if c <= (k + 1) / n_bins + 1e-9:
            return k
    return n_bins - 1


def loop_ece(conf, correct, n_bins, maximum=False):
    bins = {}
    for c, y in zip(conf, correct):
        bins.setdefault(loop_bin(c, n_bins), []).append((c, y))
    gaps = []
    for items in bins.values():
        mc = sum(c for c, _ in items) / len(items)
        acc = sum(y for _, y in items) / len(items)
        gaps.append((len(items), abs(acc - mc)))
    if maximum:
        return max(g for _, g in gaps)
    return sum(k * g for k, g in gaps) / len(conf)


def pairwise_auroc(conf, correct):
    pos = [c for c, y in zip(conf, correct) if y == 1]
    neg = [c for c, y in zip(conf, correct) if y == 0]
    score = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return score / (len(pos) * len(neg))


# ------------------------------------------------------------------------------- binning
def test_bin_edges_guo_convention():
    # (k/10, (k+1)/10]: 0.0 joins bin 0; 0.1 is the top of bin 0; 1.0 is in bin 9.
    conf = [0.0, 0.05, 0.1, 0.11, 0.3, 0.1 + 0.2, 30 / 100, 0.31, 0.9, 0.95, 1.0]
    assert M.bin_index(conf, 10).tolist() == [0, 0, 0, 1, 2, 2, 2, 3, 8, 9, 9]


def test_floating_point_representations_share_a_bin():
    assert 0.1 + 0.2 != 0.3  # the float error we guard against
    for n_bins in (10, 15):
        for p in range(101):
            exact = max(0, -(-p * n_bins // 100) - 1)  # integer ceil(p*n/100) - 1
            forms = [p / 100, p * 0.01, sum([0.01] * p), (p / 10) / 10]
            assert set(M.bin_index(forms, n_bins).tolist()) == {exact}, (n_bins, p)


def test_hundred_percent_alone_in_top_bin():
    levels = np.arange(0, 101, 10) / 100  # the verbalized levels 0%, 10%, ..., 100%
    bins = M.bin_index(levels, 10)
    assert bins.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert (bins == 9).sum() == 1
    assert M.bin_index([0.0, 1.0, 2 / 15, 1 / 15 + 1 / 15], 15).tolist() == [0, 14, 1, 1]


def test_bin_index_rejects_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        M.bin_index([0.5], 0)


# ------------------------------------------------------------------ hand-computed metrics
# conf  0.95 0.85 0.85 0.15 ; correct 1 1 0 0
# bins (10): 0.95 -> 9, 0.85 -> 8, 0.15 -> 1
#   bin 9: acc 1,   conf 0.95, gap 0.05, weight 1/4
#   bin 8: acc 0.5, conf 0.85, gap 0.35, weight 2/4
#   bin 1: acc 0,   conf 0.15, gap 0.15, weight 1/4
# ECE = 0.0125 + 0.175 + 0.0375 = 0.225 ; MCE = 0.35
# Brier = (0.05^2 + 0.15^2 + 0.85^2 + 0.15^2) / 4 = (0.0025 + 0.0225 + 0.7225 + 0.0225) / 4 = 0.1925
# AUROC: right {0.95, 0.85} vs wrong {0.85, 0.15}: 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4 = 0.875
HAND_CONF = [0.95, 0.85, 0.85, 0.15]
HAND_CORRECT = [1, 1, 0, 0]


def test_hand_case():
    assert M.ece(HAND_CONF, HAND_CORRECT) == pytest.approx(0.225)
    assert M.mce(HAND_CONF, HAND_CORRECT) == pytest.approx(0.35)
    assert M.brier(HAND_CONF, HAND_CORRECT) == pytest.approx(0.1925)
    assert M.auroc(HAND_CONF, HAND_CORRECT) == pytest.approx(0.875)


def test_ece_edge_values_hand():
    # 0.9 x2 (one right) sit in (0.8, 0.9]: gap |0.5 - 0.9| = 0.4, weight 2/3
    # 1.0 x1 (right) alone in (0.9, 1.0]: gap 0
    # ECE = 2/3 * 0.4 = 0.26667
    assert M.ece([0.9, 0.9, 1.0], [1, 0, 1]) == pytest.approx(0.4 * 2 / 3)
    # 15 bins: 0.9 -> ceil(13.5) - 1 = 13, 1.0 -> 14; same gaps, same ECE
    assert M.ece([0.9, 0.9, 1.0], [1, 0, 1], n_bins=15) == pytest.approx(0.4 * 2 / 3)
    # perfect calibration: 0.0 always wrong, 1.0 always right
    assert M.ece([0.0, 0.0, 1.0], [0, 0, 1]) == 0.0


def test_adaptive_ece_hand_and_ties():
    # n = 6, 3 bins; a plain equal-mass split (2, 2, 2) would split the three 0.2s.
    # first ranks: 0.2 -> 0 -> bin 0; 0.4 -> 3 -> 9//6 = bin 1; 0.6 -> 4 -> 12//6 = bin 2; 0.8 -> 5 -> bin 2
    # bin 0: {.2,.2,.2} correct 0,0,1: acc 1/3, conf 0.2, gap 2/15, weight 3/6
    # bin 1: {.4} correct 1: gap 0.6, weight 1/6
    # bin 2: {.6,.8} correct 1,0: acc 0.5, conf 0.7, gap 0.2, weight 2/6
    # AECE = 1/15 + 0.1 + 1/15 = 7/30
    conf = [0.2, 0.2, 0.2, 0.4, 0.6, 0.8]
    correct = [0, 0, 1, 1, 1, 0]
    assert M.adaptive_bin_index(conf, 3).tolist() == [0, 0, 0, 1, 2, 2]
    assert M.adaptive_ece(conf, correct, n_bins=3) == pytest.approx(7 / 30)


@pytest.mark.parametrize("seed", range(5))
def test_adaptive_bins_never_split_ties(seed):
    conf, _ = rand_set(seed, n=257)
    bins = M.adaptive_bin_index(conf, 10)
    for v in np.unique(conf):
        assert len(set(bins[conf == v].tolist())) == 1
    order = np.argsort(conf, kind="stable")
    assert np.all(np.diff(bins[order]) >= 0)  # bins follow the order of confidence


def test_adaptive_ece_matches_equal_mass_split_without_ties():
    rng = np.random.default_rng(3)
    conf = rng.random(1000)  # continuous: no ties
    correct = (rng.random(1000) < conf).astype(int)
    order = np.argsort(conf)
    ref = 0.0
    for part in np.array_split(order, 10):  # equal-mass bins written differently
        ref += len(part) / 1000 * abs(correct[part].mean() - conf[part].mean())
    assert M.adaptive_ece(conf, correct, 10) == pytest.approx(ref)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_bins", [10, 15])
def test_against_loop_references(seed, n_bins):
    conf, correct = rand_set(seed, n=200, levels=21)
    assert M.ece(conf, correct, n_bins) == pytest.approx(loop_ece(conf, correct, n_bins))
    assert M.mce(conf, correct, n_bins) == pytest.approx(loop_ece(conf, correct, n_bins, maximum=True))
    assert M.auroc(conf, correct) == pytest.approx(pairwise_auroc(conf, correct))
    assert M.brier(conf, correct) == pytest.approx(sum((c - y) ** 2 for c, y in zip(conf, correct)) / len(conf))


def test_auroc_extremes_and_one_class():
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert M.auroc([0.5] * 4, [0, 1, 0, 1]) == 0.5  # all ties
    assert math.isnan(M.auroc([0.2, 0.9], [1, 1]))  # one class: undefined
    assert math.isnan(M.auroc([0.2, 0.9], [0, 0]))


def test_reliability_table_consistent_with_ece():
    conf, correct = rand_set(7)
    t = M.reliability_table(conf, correct, 10)
    assert list(t.columns) == ["bin", "lower", "upper", "count", "mean_confidence", "accuracy", "gap"]
    assert t["count"].sum() == len(conf)
    full = t["count"] > 0
    assert (t.loc[full, "count"] / len(conf) * t.loc[full, "gap"].abs()).sum() == pytest.approx(M.ece(conf, correct))
    assert t.loc[~full, "accuracy"].isna().all()
    # hand case: bin 8 holds the two 0.85s (acc 0.5), gap = 0.85 - 0.5 (overconfident, positive)
    h = M.reliability_table(HAND_CONF, HAND_CORRECT).set_index("bin")
    assert h.loc[8, "count"] == 2 and h.loc[8, "gap"] == pytest.approx(0.35)
    assert h.loc[1, "gap"] == pytest.approx(0.15)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "conf, correct, match",
    [
        ([], [], "empty"),
        ([0.5, 0.5], [1], "length"),
        ([0.5, float("nan")], [1, 0], "drop_missing"),
        ([0.5, float("inf")], [1, 0], "drop_missing"),
        ([0.5, None], [1, 0], "drop_missing"),
        ([0.5, 1.2], [1, 0], r"\[0, 1\]"),
        ([50, 90], [1, 0], "divide by 100"),
        ([-0.1, 0.5], [1, 0], r"\[0, 1\]"),
        ([0.5, 0.5], [1, 2], "correct"),
        ([0.5, 0.5], ["yes", "no"], "correct"),
        (["high", 0.5], [1, 0], "conf"),
    ],
)
def test_validation_errors(conf, correct, match):
    with pytest.raises(ValueError, match=match):
        M.ece(conf, correct)


def test_validation_accepts_bool_and_float_01():
    c, y = M.validate([0.2, 0.8], np.array([False, True]))
    assert y.tolist() == [0, 1]
    assert M.validate([0.2, 0.8], [0.0, 1.0])[1].tolist() == [0, 1]


def test_drop_missing_and_coverage():
    c, y, cov = M.drop_missing([0.9, None, float("nan"), 0.6], [1, 0, 1, 1])
    assert c.tolist() == [0.9, 0.6] and y.tolist() == [1, 1] and cov == 0.5
    c, y, cov = M.drop_missing([None, None], [1, 0])
    assert c.size == 0 and cov == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.drop_missing([None, 1.5], [1, 0])  # out of range is an error, not "missing"


def test_calibration_summary():
    s = M.calibration_summary(HAND_CONF + [None, None], HAND_CORRECT + [1, 0])
    assert s["n"] == 4 and s["n_total"] == 6 and s["coverage"] == pytest.approx(4 / 6)
    assert s["ece"] == pytest.approx(0.225) and s["auroc"] == pytest.approx(0.875)
    assert s["brier"] == pytest.approx(0.1925) and s["mce"] == pytest.approx(0.35)
    assert s["accuracy"] == 0.5 and s["mean_confidence"] == pytest.approx(0.7)
    assert set(s) >= {"ece", "adaptive_ece", "mce", "brier", "auroc", "n", "coverage"}
    empty = M.calibration_summary([None, None], [1, 0])
    assert empty["coverage"] == 0.0 and empty["n"] == 0 and math.isnan(empty["ece"])


# --------------------------------------------------------------------------- task metrics
def test_task_metrics_hand():
    # idx:    0    1    2    3    4
    t = ["yes", "yes", "no", "no", "yes"]
    p = ["yes", "no", "yes", "no", "yes"]
    # positive yes: TP = {0, 4} = 2, FP = {2} = 1, FN = {1} = 1 -> P = R = F1 = 2/3; acc 3/5
    m = M.task_metrics(t, p)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.6) and m["positive_class"] == "yes" and m["n"] == 5
    # positive no: TP = {3} = 1, FP = {1} = 1, FN = {2} = 1 -> 0.5 each; yes_ratio unchanged
    m = M.task_metrics([s.capitalize() for s in t], [s.upper() for s in p], positive="No")
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["yes_ratio"] == pytest.approx(0.6) and m["positive_class"] == "no"


def test_task_metrics_zero_division_and_other_replies():
    m = M.task_metrics(["yes", "no"], ["no", "no"])  # nothing predicted positive
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    m = M.task_metrics(["no", "no"], ["yes", "no"])  # no actual positives
    assert m["recall"] == 0.0 and m["f1"] == 0.0
    m = M.task_metrics(["yes", "no"], ["maybe", "no"])  # unscorable reply: wrong, not positive
    assert m["accuracy"] == 0.5 and m["n_other"] == 1 and m["yes_ratio"] == 0.0
    with pytest.raises(ValueError, match="y_true"):
        M.task_metrics(["yes", "perhaps"], ["yes", "no"])
    with pytest.raises(ValueError, match="length"):
        M.task_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="positive"):
        M.task_metrics(["yes"], ["yes"], positive="maybe")


def test_task_metrics_against_counting_loop():
    rng = np.random.default_rng(11)
    t = rng.choice(["yes", "no"], 300).tolist()
    p = rng.choice(["yes", "no"], 300).tolist()
    for pos in ("yes", "no"):
        tp = sum(a == pos and b == pos for a, b in zip(t, p))
        pp = sum(b == pos for b in p)
        ap = sum(a == pos for a in t)
        prec, rec = tp / pp, tp / ap
        m = M.task_metrics(t, p, positive=pos)
        assert m["precision"] == pytest.approx(prec) and m["recall"] == pytest.approx(rec)
        assert m["f1"] == pytest.approx(2 * prec * rec / (prec + rec))


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_deterministic_and_contains_point():
    conf, correct = rand_set(5, n=400)
    for fn in (M.brier, M.auroc, lambda c, y: float(np.mean(y)), M.ece):
        point, low, high = M.bootstrap_ci(fn, conf, correct, n_boot=200, seed=1)
        assert point == pytest.approx(fn(conf, correct))
        assert low <= point <= high and low < high
        assert M.bootstrap_ci(fn, conf, correct, n_boot=200, seed=1) == (point, low, high)
    assert M.bootstrap_ci(M.brier, conf, correct, n_boot=200, seed=2) != M.bootstrap_ci(
        M.brier, conf, correct, n_boot=200, seed=1
    )


def test_bootstrap_wider_at_lower_confidence_level():
    conf, correct = rand_set(6, n=300)
    _, l95, h95 = M.bootstrap_ci(M.brier, conf, correct, n_boot=300, alpha=0.05)
    _, l50, h50 = M.bootstrap_ci(M.brier, conf, correct, n_boot=300, alpha=0.5)
    assert l95 <= l50 and h50 <= h95


def test_bootstrap_task_metric_and_nan_replicates():
    t = ["yes", "no"] * 50
    p = ["yes", "no", "no", "no"] * 25
    point, low, high = M.bootstrap_ci(lambda a, b: M.task_metrics(a, b)["f1"], t, p, n_boot=100)
    assert point == pytest.approx(M.task_metrics(t, p)["f1"]) and low <= point <= high
    # AUROC on 2 items, one right: many resamples are one-class (NaN) and are left out
    point, low, high = M.bootstrap_ci(M.auroc, [0.2, 0.9], [0, 1], n_boot=50)
    assert point == 1.0 and low == high == 1.0
    assert all(math.isnan(v) for v in M.bootstrap_ci(M.auroc, [0.2, 0.9], [1, 1], n_boot=20))
    with pytest.raises(ValueError, match="length"):
        M.bootstrap_ci(M.brier, [0.5], [1, 0])


# ------------------------------------------------------------------------------ spearman
def test_spearman():
    # d = ranks differ by 0, 1, 1, 0 -> rho = 1 - 6 * 2 / (4 * 15) = 0.8
    rho, p = M.spearman([1, 2, 3, 4], [1, 3, 2, 4])
    assert rho == pytest.approx(0.8) and 0 <= p <= 1
    assert M.spearman([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)
    assert all(math.isnan(v) for v in M.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        M.spearman([1, 2], [1])


# ------------------------------------------------------------------- cluster bootstrap
def test_resample_counts_draw_every_resample_in_full_and_repeat_under_a_seed():
    counts = M.resample_counts(7, 50, seed=3)
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()
    assert np.array_equal(counts, M.resample_counts(7, 50, seed=3))
    assert not np.array_equal(counts, M.resample_counts(7, 50, seed=4))
    with pytest.raises(ValueError):
        M.resample_counts(0, 5)


@pytest.mark.parametrize("values", ["verbal", "continuous"])
def test_resampled_calibration_equals_metrics_on_the_resampled_rows(values):
    rng = np.random.default_rng(5)
    n, C = 150, 30
    conf = rng.choice(np.arange(11) / 10, n) if values == "verbal" else rng.random(n)
    conf[rng.random(n) < 0.1] = np.nan
    correct = (rng.random(n) < 0.7).astype(float)
    codes = rng.integers(0, C, n)
    counts = M.resample_counts(C, 20, seed=1)
    fast = M.resampled_calibration(conf, correct, codes, counts, (10, 15), nll=True, selective=True)
    for b in range(len(counts)):
        idx = np.repeat(np.arange(n), counts[b, codes])
        c, y = conf[idx], correct[idx]
        ok = ~np.isnan(c)
        c, y = c[ok], y[ok]
        expect = {"ece": M.ece(c, y), "ece15": M.ece(c, y, 15), "adaptive_ece": M.adaptive_ece(c, y),
                  "brier": M.brier(c, y), "auroc": M.auroc(c, y), "nll": M.nll(c, y)} | M.selective_metrics(c, y)
        assert set(expect) == set(fast)
        for k, v in expect.items():
            assert fast[k][b] == pytest.approx(v, abs=1e-9 if k in M.SELECTIVE_KEYS else 1e-12, nan_ok=True), (k, b)


def test_resampled_calibration_per_resample_path():
    """Clusters x distinct values beyond the table limit take the per-resample path: same numbers."""
    rng = np.random.default_rng(2)
    n, C = 400, 200
    conf, correct = rng.random(n), (rng.random(n) < 0.6).astype(float)
    codes = np.repeat(np.arange(C), 2)
    counts = M.resample_counts(C, 15, seed=0)
    small = M.resampled_calibration(conf, correct, codes, counts)
    conf_big = np.concatenate([conf, np.linspace(0, 1, 20_001)])  # > 4M cells with 200 clusters
    correct_big = np.concatenate([correct, np.zeros(20_001)])
    codes_big = np.concatenate([codes, np.full(20_001, C)])
    counts_big = np.concatenate([counts, np.zeros((15, 1), dtype=np.int64)], axis=1)  # the extra cluster never drawn
    big = M.resampled_calibration(conf_big, correct_big, codes_big, counts_big)
    for k in small:
        np.testing.assert_allclose(big[k], small[k], atol=1e-12, err_msg=k)


def test_cluster_bootstrap_is_wider_when_questions_share_their_image():
    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(80), 6)
    correct = np.repeat(rng.random(80) < 0.7, 6).astype(float)   # all questions of an image right or wrong together
    conf = np.full(images.size, 0.7)
    by_image = M.cluster_bootstrap(conf, correct, images, n_boot=500, cluster="image")
    by_question = M.cluster_bootstrap(conf, correct, images, n_boot=500, cluster="question")
    width = lambda r: r["brier"][2] - r["brier"][1]  # noqa: E731
    assert width(by_image) > 1.8 * width(by_question)
    assert by_image["brier"][0] == pytest.approx(M.brier(conf, correct))
    assert set(by_image) == {"ece", "ece15", "brier", "auroc"}
    with pytest.raises(ValueError, match="cluster"):
        M.cluster_bootstrap(conf, correct, images, cluster="scene")
    with pytest.raises(ValueError, match="ids"):
        M.cluster_bootstrap(conf, correct, images[:-1])


def test_cluster_bootstrap_computes_all_resamples_at_once(monkeypatch):
    """What its speed rests on (timings: scripts/bench_bootstrap.py): one call of
    resampled_calibration for every resample (and one for the point), whose numbers equal the
    metrics on each resample's rows (above); the intervals equal a loop over the resamples."""
    rng = np.random.default_rng(0)
    n, n_boot = 6000, 200
    images = np.repeat(np.arange(n // 6), 6)
    correct = (rng.random(n) < 0.8).astype(float)
    calls, real = [], M.resampled_calibration

    def counting(conf, correct, codes, counts, *args, **kw):
        calls.append(np.shape(counts))
        return real(conf, correct, codes, counts, *args, **kw)

    monkeypatch.setattr(M, "resampled_calibration", counting)
    for conf in (rng.choice(np.arange(11) / 10, n), rng.random(n)):  # verbalized, continuous
        calls.clear()
        got = M.cluster_bootstrap(conf, correct, images, n_boot=n_boot)
        assert calls == [(n_boot, n // 6), (1, n // 6)]
        loop = {"ece": [], "ece15": [], "brier": [], "auroc": []}
        for drawn in M.resample_counts(n // 6, n_boot, seed=0):
            rows = np.repeat(np.arange(n), drawn[images])
            c, y = conf[rows], correct[rows]
            for k, v in zip(loop, (M.ece(c, y), M.ece(c, y, 15), M.brier(c, y), M.auroc(c, y))):
                loop[k].append(v)
        for k, f in zip(loop, (M.ece, lambda c, y: M.ece(c, y, 15), M.brier, M.auroc)):
            assert got[k][0] == pytest.approx(f(conf, correct), abs=1e-12)
            assert got[k][1:] == pytest.approx(M.interval(np.array(loop[k]), 0.05), abs=1e-12), k


@pytest.mark.parametrize("metric,low,high,expect", [
    ("brier", -0.03, -0.01, "better"), ("brier", 0.01, 0.03, "worse"), ("ece", -0.01, 0.02, "level"),
    ("auroc", 0.01, 0.05, "better"), ("auroc", -0.05, -0.01, "worse"), ("accuracy", -0.02, -0.001, "worse"),
    ("ece15", float("nan"), float("nan"), "level")])
def test_verdict_direction(metric, low, high, expect):
    assert M.verdict(low, high, metric) == expect


def test_verdict_rejects_unknown_metric():
    with pytest.raises(ValueError, match="direction"):
        M.verdict(0.1, 0.2, "mce")


def test_image_variance_share():
    images = np.repeat(np.arange(4), 3)
    per_image = np.repeat([0.2, 0.4, 0.6, 0.8], 3)
    assert M.image_variance_share(per_image, images) == pytest.approx(1.0)
    within = np.tile([0.2, 0.5, 0.8], 4)                           # same spread inside every image
    assert M.image_variance_share(within, images) == pytest.approx(0.0)
    mixed = per_image + np.tile([-0.1, 0.0, 0.1], 4)
    expect = np.var(per_image) / np.var(mixed)
    assert M.image_variance_share(mixed, images) == pytest.approx(expect)
    with_missing = mixed.copy()
    with_missing[0] = np.nan
    assert 0 < M.image_variance_share(with_missing, images) < 1
    assert np.isnan(M.image_variance_share(np.full(12, 0.7), images))


# ------------------------------------------------------------------ selective prediction
def _orders_of_ties(conf):
    """Every order of the answers by falling confidence, ties in every order of their own."""
    groups = [np.flatnonzero(conf == v) for v in sorted(set(conf.tolist()), reverse=True)]
    for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
        yield np.array([i for p in perms for i in p])


def _direct_selective(conf, correct):
    """Sort, cumulative errors / rank, mean; accuracy of the first k kept: averaged over the orders of ties."""
    aurcs, kept_acc = [], []
    for order in _orders_of_ties(conf):
        errors = np.cumsum(1 - correct[order])
        ranks = np.arange(1, conf.size + 1)
        aurcs.append(np.mean(errors / ranks))
        kept_acc.append(1 - errors / ranks)
    return float(np.mean(aurcs)), np.mean(kept_acc, axis=0)


@pytest.mark.parametrize("ties", [False, True])
def test_aurc_equals_the_direct_computation_ties_averaged(ties):
    rng = np.random.default_rng(11)
    for _ in range(40):
        n = int(rng.integers(2, 8))
        conf = rng.choice([0.1, 0.5, 0.9], n) if ties else rng.random(n)
        correct = (rng.random(n) < 0.6).astype(int)
        expect, acc_at = _direct_selective(conf, correct)
        got = M.selective_metrics(conf, correct, coverages=np.arange(1, n + 1) / n)
        assert M.aurc(conf, correct) == pytest.approx(expect, abs=1e-12)
        for k in range(1, n + 1):   # selective accuracy keeping the k most confident
            assert got[M.sel_acc_key(k / n)] == pytest.approx(acc_at[k - 1], abs=1e-12)
        assert M.risk_coverage(conf, correct, np.arange(1, n + 1) / n) == pytest.approx(1 - acc_at, abs=1e-12)
        oracle, _ = _direct_selective(correct.astype(float), correct)
        assert got["eaurc"] == pytest.approx(expect - oracle, abs=1e-12)
        rate = 1 - correct.mean()
        if 0 < rate < 1:
            assert got["prr"] == pytest.approx((rate - expect) / (rate - oracle), abs=1e-9)
        else:
            assert np.isnan(got["prr"])


@pytest.mark.parametrize("weights", ["integer", "fractional"])
def test_harmonic_steps_equal_the_two_harmonic_numbers(weights):
    """Each tie group's H(end) - H(start), the shared ends computed once: the same bits as
    computing both, for integer counts (ends meet exactly) and fractional ones (they may not)."""
    rng = np.random.default_rng(0)
    count = rng.integers(0, 4, (5, 40)).astype(float)
    if weights == "fractional":
        count = count * rng.random((5, 40)) * 1.7
    before = np.cumsum(count, 1) - count
    np.testing.assert_array_equal(M._harmonic_steps(before, count), M._harmonic(before + count) - M._harmonic(before))


def test_selective_metrics_order_matters_and_the_oracle_has_no_excess():
    correct = np.array([1, 1, 0, 1, 0, 0, 1, 1])
    good = M.selective_metrics(correct * 0.8 + 0.1, correct)
    assert good["eaurc"] == pytest.approx(0.0, abs=1e-12) and good["prr"] == pytest.approx(1.0)
    worst = M.selective_metrics(1 - correct * 0.8, correct)
    assert worst["aurc"] > M.aurc(np.full(8, 0.5), correct) > good["aurc"]
    assert M.aurc(np.full(8, 0.5), correct) == pytest.approx(1 - correct.mean())   # one tie group: the error rate
    assert worst["prr"] == pytest.approx(-1.0, abs=0.5) and worst["prr"] < 0
    assert good["sel_acc50"] == 1.0


def test_nll_clips_and_equals_the_direct_computation():
    conf, correct = np.array([0.0, 0.3, 0.9, 1.0]), np.array([0, 1, 1, 0])
    q = np.clip(conf, M.NLL_CLIP, 1 - M.NLL_CLIP)
    assert M.nll(conf, correct) == pytest.approx(-np.mean(np.where(correct == 1, np.log(q), np.log(1 - q))))
    assert np.isfinite(M.nll([1.0], [0])) and M.nll([1.0], [0]) == pytest.approx(-np.log(M.NLL_CLIP))


# ------------------------------------------------------------------ recalibrators
def _isotonic_direct(x, y):
    """The isotonic fit at each distinct x by its min-max formula: max over j <= i of min over
    k >= i of the weighted mean of the values from the j-th to the k-th distinct x."""
    xs = np.unique(x)
    s = np.array([y[x == v].sum() for v in xs])
    w = np.array([(x == v).sum() for v in xs], float)
    return xs, np.array([max(min(s[j:k + 1].sum() / w[j:k + 1].sum() for k in range(i, xs.size))
                             for j in range(i + 1)) for i in range(xs.size)])


def test_isotonic_equals_the_min_max_formula_and_interpolates_between_steps():
    from csp_utils.core import baselines

    rng = np.random.default_rng(4)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        x = rng.choice(np.arange(11) / 10, n) if rng.random() < 0.5 else rng.random(n)
        y = (rng.random(n) < x).astype(float)
        fit = baselines.fit_recalibrator("isotonic", x, y)
        xs, expect = _isotonic_direct(x, y)
        np.testing.assert_allclose(fit.apply(xs), expect, atol=1e-12)
    fit = baselines.fit_recalibrator("isotonic", [0.2, 0.4], [0, 1])
    assert fit.apply([0.0, 0.3, 1.0]) == pytest.approx([0.0, 0.5, 1.0])


def test_platt_with_an_answer_term_sets_the_likelihood_gradient_to_zero():
    from csp_utils.core import baselines

    rng = np.random.default_rng(8)
    n = 400
    p, yes = rng.uniform(0.5, 0.99, n), rng.random(n) < 0.5
    correct = (rng.random(n) < np.where(yes, p - 0.3, p)).astype(float)   # "yes" answers overconfident
    fit = baselines.fit_recalibrator("platt", p, correct, yes)
    q = fit.apply(p, yes)
    z = np.log(p) - np.log1p(-p)
    for feature in (np.ones(n), z, yes.astype(float)):   # the score equations of the logistic fit
        assert abs(np.sum((q - correct) * feature)) < 1e-3 * n
    assert fit.c < -0.5                                  # it learned the answer's shift
    assert np.mean((q - correct) ** 2) < np.mean((p - correct) ** 2)


def test_histogram_binning_maps_each_bin_to_its_calibration_accuracy():
    import pandas as pd

    from csp_utils.core import baselines

    rng = np.random.default_rng(2)
    x = rng.choice(np.arange(11) / 10, 300)
    x = x[x < 0.75]                                  # the top bins get no calibration answer
    y = (rng.random(x.size) < 0.6).astype(float)
    fit = baselines.fit_recalibrator("histogram", x, y)
    per_bin = pd.Series(y).groupby(M.bin_index(x, 10)).mean()
    test = np.array([0.0, 0.1, 0.15, 0.3, 0.7, 0.95, 1.0])
    expect = [per_bin.get(k, y.mean()) for k in M.bin_index(test, 10)]
    np.testing.assert_allclose(fit.apply(test), expect)
    with pytest.raises(ValueError, match="unknown"):
        baselines.fit_recalibrator("beta", x, y)
