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
