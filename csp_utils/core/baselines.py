"""Confidence baselines that plant nothing, to judge CSP against.

- ``constant``: every answer gets the base model's accuracy on its training questions.
- ``answer_constant``: that accuracy given the model's own answer (one value after "yes",
  one after "no"): a confidence that knows nothing about the image.
- ``internal``: the model's own probability of the answer it gave (yes/no token probability).
- ``temperature``: that probability temperature-scaled (Guo et al. 2017), T fitted on a
  held-out split by minimising the negative log-likelihood of correctness.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar

_EPS = 1e-6


def answer_conditioned_accuracy(answers, correct) -> dict[str, float]:
    """Training accuracy per own answer: ``{"yes": acc, "no": acc}``; an answer absent from
    the training rows (or neither yes nor no) gets no entry, so the caller picks its fallback."""
    a = np.array([str(x).strip().lower() for x in answers], dtype=object)
    y = np.asarray(correct, dtype=float)
    if a.size != y.size or a.size == 0:
        raise ValueError(f"answers and correct need equal, non-zero lengths; got {a.size} and {y.size}")
    return {k: float(y[a == k].mean()) for k in ("yes", "no") if np.any(a == k)}


def answer_logit(p_answer: np.ndarray) -> np.ndarray:
    """Binary logit of the chosen answer over the other one (yes/no renormalised)."""
    p = np.clip(np.asarray(p_answer, dtype=float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def temperature_scale(p_answer, temperature: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-answer_logit(p_answer) / temperature))


def fit_temperature(p_answer, correct, bounds=(0.05, 20.0)) -> float:
    """T minimising the NLL of correctness given the scaled confidence of the chosen answer.

    For a two-way answer this is the usual softmax temperature: correctness is the event
    "the chosen answer is the true one", whose scaled probability is sigmoid(z / T).
    """
    p = np.asarray(p_answer, dtype=float)
    y = np.asarray(correct, dtype=float)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"p_answer and correct need equal, non-zero lengths; got {p.shape} and {y.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("p_answer has non-finite values; drop missing rows before fitting")
    z = answer_logit(p)

    def nll(log_t: float) -> float:
        q = np.clip(1.0 / (1.0 + np.exp(-z / np.exp(log_t))), _EPS, 1 - _EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded")
    return float(np.exp(res.x))


def fit_logistic(features, correct, l2=None) -> np.ndarray:
    """Weights of a logistic model of correctness (maximum likelihood, L2 penalty ``l2[j]`` on
    weight j; none by default). ``features`` (N, D) holds its own constant column."""
    X, y = np.asarray(features, dtype=float), np.asarray(correct, dtype=float)
    if X.ndim != 2 or X.shape[0] != y.size or y.size == 0:
        raise ValueError(f"features must be (N, D) with N = len(correct); got {X.shape} and {y.size}")
    lam = np.zeros(X.shape[1]) if l2 is None else np.asarray(l2, dtype=float)

    def loss(w):
        z = X @ w
        # log(1 + e^z) - y z, stable for large |z|
        nll = np.logaddexp(0.0, z) - y * z
        grad = X.T @ (1.0 / (1.0 + np.exp(-z)) - y) + lam * w
        return nll.sum() + 0.5 * (lam * w * w).sum(), grad

    res = minimize(loss, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B")
    return res.x


def logistic_predict(features, weights) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.asarray(features, dtype=float) @ np.asarray(weights, dtype=float))))
