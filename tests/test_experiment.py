import numpy as np
import pytest

from csp_utils import baselines


def test_temperature_recovers_overconfidence():
    # Simulate a model whose true accuracy is sigmoid(z / 3) but which reports sigmoid(z):
    # the fitted temperature should come out near 3.
    rng = np.random.default_rng(0)
    z = rng.uniform(0.0, 8.0, 20000)
    p_reported = 1 / (1 + np.exp(-z))
    correct = rng.random(z.size) < 1 / (1 + np.exp(-z / 3.0))
    t = baselines.fit_temperature(p_reported, correct)
    assert 2.6 < t < 3.4
    scaled = baselines.temperature_scale(p_reported, t)
    assert abs(scaled.mean() - correct.mean()) < 0.02
    assert np.all(np.diff(scaled[np.argsort(p_reported)]) >= -1e-12)  # monotone: AUROC unchanged


def test_temperature_one_is_identity_and_errors():
    p = np.array([0.6, 0.9, 0.99])
    np.testing.assert_allclose(baselines.temperature_scale(p, 1.0), p, rtol=1e-6)
    with pytest.raises(ValueError, match="equal"):
        baselines.fit_temperature([0.5, 0.6], [1])
    with pytest.raises(ValueError, match="accuracy"):
        baselines.constant_confidence(3, 1.5)


def test_split_holdout_disjoint_and_deterministic():
    a, b = baselines.split_holdout(100, 0.3, seed=1)
    assert len(a) == 30 and len(b) == 70 and not set(a) & set(b)
    a2, _ = baselines.split_holdout(100, 0.3, seed=1)
    assert np.array_equal(a, a2)


def test_suite_takes_the_official_files(benchmarks_dir, tmp_path):
    # Images are not shipped: the suite builds the sets lazily, a missing image is named on use.
    from csp_utils import experiment

    cfg = experiment.SuiteConfig(pope_dir=str(benchmarks_dir / "pope"), coco_images=str(tmp_path),
                                 amber_dir=str(benchmarks_dir / "amber"), amber_images=str(tmp_path),
                                 official_only=True)
    suite = experiment.build_suite(cfg)
    assert {"coco-pope-random", "coco-pope-popular", "coco-pope-adversarial"} <= set(suite)
    assert len(suite["coco-pope-adversarial"].items) == 3000
    assert len(suite["official-amber-relation"].items) == 975 + 689
    assert experiment.positive_class("official-amber-existence") == "no"
    with pytest.raises(FileNotFoundError, match="COCO_val2014"):
        suite["coco-pope-random"].image_loader(suite["coco-pope-random"].items[0].image_id)
    with pytest.raises(ValueError, match="coco_images"):
        experiment.build_suite(experiment.SuiteConfig(pope_dir=str(benchmarks_dir / "pope")))


def _rows(model, set_, n, acc, conf, seed=0, internal=0.9):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < acc
    return [{"model": model, "set": set_, "framing": "third", "readout": "single_pass", "question_id": f"q{i}",
             "label": "yes", "answer": "yes" if c else "no", "correct": bool(c), "confidence": conf,
             "internal_prob": internal} for i, c in enumerate(correct)]


def test_headline_table_pools_seeds_and_bootstraps_by_question():
    from csp_utils import experiment, metrics

    rows = _rows("csp@s0", "pope-random", 200, 0.7, 0.7, seed=1) + _rows("csp@s1", "pope-random", 200, 0.7, 0.9, seed=1)
    table = experiment.headline_table(rows, n_boot=200, seed=0)
    r = table.iloc[0]
    assert r["model"] == "csp" and r["seeds"] == 2 and r["n_questions"] == 200
    conf = np.array([x["confidence"] for x in rows])
    correct = np.array([x["correct"] for x in rows], dtype=float)
    assert r["ece"] == pytest.approx(metrics.ece(conf, correct))
    assert r["ece_low"] <= r["ece"] <= r["ece_high"] + 1e-9
    assert r["ece_seed_min"] < r["ece_seed_max"]  # 0.7 is calibrated, 0.9 is not
    assert r["f1"] == pytest.approx(2 * correct.sum() / (len(rows) + correct.sum()))  # all labels yes


@pytest.mark.parametrize("case", ["ties", "continuous", "one_class", "all_missing"])
def test_resampled_metrics_equal_row_by_row_metrics(case):
    """The bootstrap's one-bincount metrics equal _metric_values on each resample's rows."""
    from csp_utils import experiment

    rng = np.random.default_rng(3)
    n = 120
    conf = {"ties": rng.choice([0.0, 0.3, 0.1 + 0.2, 0.7, 0.9, 1.0], n), "continuous": rng.random(n),
            "one_class": rng.random(n), "all_missing": np.full(n, np.nan)}[case]
    if case != "all_missing":
        conf[rng.random(n) < 0.1] = np.nan                      # unparsed confidences
    correct = (rng.random(n) < 0.7).astype(float)
    if case == "one_class":
        correct[:] = 1.0
    truth, pred = rng.random(n) < 0.5, rng.random(n) < 0.5
    codes = rng.integers(0, 40, n)                               # rows grouped into 40 questions
    drawn = np.stack([np.bincount(rng.integers(0, 40, 40), minlength=40) for _ in range(25)])
    fast = experiment._resampled_metric_values(conf, correct, truth, pred, drawn[:, codes])
    for b in range(len(drawn)):
        idx = np.repeat(np.arange(n), drawn[b, codes])
        slow = experiment._metric_values(conf[idx], correct[idx], truth[idx], pred[idx])
        for k, v in slow.items():
            assert fast[k][b] == pytest.approx(v, abs=1e-12, nan_ok=True), (case, b, k)


def test_baseline_rows_use_the_base_models_answers():
    from csp_utils import experiment

    rows = (_rows("base", "train-sample", 100, 0.8, 0.95) + _rows("base", "calibration", 300, 0.75, 0.95, seed=2)
            + _rows("base", "pope-random", 50, 0.7, 0.95, seed=3))
    out = experiment.baseline_rows(rows)
    assert {r["model"] for r in out} == {"baseline:constant", "baseline:internal", "baseline:temperature"}
    const = [r for r in out if r["model"] == "baseline:constant"]
    acc = np.mean([r["correct"] for r in rows if r["set"] == "train-sample"])
    assert len(const) == 50 and all(r["confidence"] == pytest.approx(acc) for r in const)
    temp = [r["confidence"] for r in out if r["model"] == "baseline:temperature"]
    assert all(t < 0.9 for t in temp)  # overconfident 0.9 scaled down towards the held-out accuracy
    with pytest.raises(ValueError, match="calibration"):
        experiment.baseline_rows(_rows("base", "pope-random", 5, 0.5, 0.5))
