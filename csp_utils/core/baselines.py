"""Confidence baselines that plant nothing, to judge CSP against.

- ``constant``: every answer gets the base model's accuracy on its training questions.
- ``answer_constant``: that accuracy given the model's own answer (one value after "yes",
  one after "no"): a confidence that knows nothing about the image.
- ``internal``: the model's own probability of the answer it gave (yes/no token probability).
- ``temperature``: that probability temperature-scaled (Guo et al. 2017), T fitted on a
  held-out split by minimising the negative log-likelihood of correctness.
- Recalibrators of any confidence, fitted on a held-out split: Platt scaling with an answer
  term, isotonic regression, histogram binning.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from csp_utils.core.metrics import bin_index

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


# ------------------------------------------------------------------ post-hoc recalibrators
# Each is fitted on one sample (the suite's calibration set) and applied to another; ``apply``
# maps confidences (fractions) and, for Platt, the own answers, to recalibrated confidences.
RECALIBRATORS = ("platt", "isotonic", "histogram")


def fit_logistic(X, y, l2=0.0) -> np.ndarray:
    """Weights of a logistic regression of ``y`` (0/1) on the columns of ``X`` (give it a column
    of ones for an intercept), by maximum likelihood with ``l2`` times the squared weights
    added: a number for every column but the last (the intercept by convention), or one
    number per column."""
    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    if X.ndim != 2 or X.shape[0] != y.size or y.size == 0:
        raise ValueError(f"X must be (N, D) with N = len(y); got {X.shape} and {y.size}")
    pen = (np.asarray(l2, dtype=float) if np.ndim(l2) else np.r_[np.full(X.shape[1] - 1, float(l2)), 0.0])
    if pen.shape != (X.shape[1],):
        raise ValueError(f"l2 needs one value per column of X ({X.shape[1]}), got {pen.shape[0]}")

    def loss(w):
        t = X @ w
        return (float(np.sum(np.logaddexp(0.0, t) - y * t) + np.sum(pen * w * w)),
                X.T @ (1.0 / (1.0 + np.exp(-t)) - y) + 2 * pen * w)

    return minimize(loss, np.zeros(X.shape[1]), jac=True, method="BFGS").x


class Platt:
    """Platt scaling with an answer term: sigmoid(a * logit(p) + b + c * [answer is yes]),
    fitted by maximum likelihood of correctness (a confidence after "yes" and one after "no" may
    need different shifts; the term is what lets it re-order answers across the two)."""

    def __init__(self, conf, correct, answer_yes=None):
        z, y, s = answer_logit(conf), np.asarray(correct, dtype=float), _yes(answer_yes, np.size(conf))
        both = s.any() and not s.all()   # one answer only: its term would be the intercept's twin
        w = fit_logistic(np.column_stack([z, s, np.ones_like(z)] if both else [z, np.ones_like(z)]), y)
        self.a, self.b, self.c = float(w[0]), float(w[-1]), float(w[1]) if both else 0.0

    def apply(self, conf, answer_yes=None) -> np.ndarray:
        t = self.a * answer_logit(conf) + self.b + self.c * _yes(answer_yes, np.size(conf))
        return 1.0 / (1.0 + np.exp(-t))

    def params(self) -> dict:
        return {"a": self.a, "b": self.b, "c_yes": self.c}


def _yes(answer_yes, n: int) -> np.ndarray:
    return np.zeros(n) if answer_yes is None else np.asarray(answer_yes, dtype=float).ravel()


class Isotonic:
    """Isotonic regression of correctness on confidence (pool-adjacent-violators, equal
    confidences pooled first); between fitted confidences it interpolates linearly, outside
    their range it keeps the end values."""

    def __init__(self, conf, correct, answer_yes=None):
        x, y = np.asarray(conf, dtype=float).ravel(), np.asarray(correct, dtype=float).ravel()
        xs, inverse = np.unique(x, return_inverse=True)
        w = np.bincount(inverse.ravel()).astype(float)
        mean = np.bincount(inverse.ravel(), weights=y) / w
        blocks: list[list[float]] = []          # [value, weight, number of distinct confidences]
        for m, wt in zip(mean, w):
            blocks.append([m, wt, 1])
            while len(blocks) > 1 and blocks[-2][0] >= blocks[-1][0]:
                v2, w2, k2 = blocks.pop()
                v1, w1, k1 = blocks.pop()
                blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, k1 + k2])
        self.x = xs
        self.y = np.repeat([b[0] for b in blocks], [b[2] for b in blocks])

    def apply(self, conf, answer_yes=None) -> np.ndarray:
        return np.interp(np.asarray(conf, dtype=float), self.x, self.y)

    def params(self) -> dict:
        return {"n_steps": int(np.unique(self.y).size)}


class Histogram:
    """Histogram binning (Zadrozny and Elkan 2001): each equal-width bin (the ECE's bins) maps to
    the calibration accuracy in it; a bin with no calibration answer maps to the overall one."""

    def __init__(self, conf, correct, answer_yes=None, n_bins: int = 10):
        c, y = np.asarray(conf, dtype=float).ravel(), np.asarray(correct, dtype=float).ravel()
        k = bin_index(c, n_bins)
        count = np.bincount(k, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.values = np.where(count > 0, np.bincount(k, weights=y, minlength=n_bins) / count, y.mean())
        self.n_bins = n_bins

    def apply(self, conf, answer_yes=None) -> np.ndarray:
        return self.values[bin_index(np.asarray(conf, dtype=float), self.n_bins)]

    def params(self) -> dict:
        return {"bins": [round(float(v), 6) for v in self.values]}


def fit_recalibrator(kind: str, conf, correct, answer_yes=None):
    """A fitted recalibrator of ``kind`` (one of :data:`RECALIBRATORS`)."""
    classes = {"platt": Platt, "isotonic": Isotonic, "histogram": Histogram}
    if kind not in classes:
        raise ValueError(f"unknown recalibrator {kind!r}; one of {RECALIBRATORS}")
    c, y = np.asarray(conf, dtype=float).ravel(), np.asarray(correct, dtype=float).ravel()
    if c.size == 0 or c.size != y.size or not np.all(np.isfinite(c)):
        raise ValueError(f"{kind}: need equal, non-zero numbers of finite confidences and correctness; "
                         f"got {c.size} and {y.size}")
    return classes[kind](c, y, answer_yes)


def logistic_predict(features, weights) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.asarray(features, dtype=float) @ np.asarray(weights, dtype=float))))
