"""Scores -> probabilities: Platt scaling per attribute, and how well probabilities are calibrated.

A bare attribute name in a search filter means "probability > 0.5", so every predictor's outputs must be
probabilities (ATTRIBUTE_MODELS.md §0).  :class:`Calibration` maps raw scores (logits, SVM decision values) through
``sigmoid(a * s + b)`` per attribute; :func:`fit_platt` fits ``a, b`` on a validation split by maximum likelihood
with Platt's smoothed targets (``(n+ + 1) / (n+ + 2)`` and ``1 / (n- + 2)``, so a separable validation set does not
drive the slope to infinity).  :func:`reliability` bins predictions (equal-width bins) and
:func:`expected_calibration_error` is the count-weighted mean gap between each bin's mean probability and its
observed positive rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Equal-width probability bins of :func:`reliability` / :func:`expected_calibration_error`.
ECE_BINS = 15
#: Bins of the validation score histograms (:func:`score_histogram`): a filter margin is chosen on this grid.
HISTOGRAM_BINS = 100


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


@dataclass(frozen=True)
class Calibration:
    """Per attribute ``p = sigmoid(scale * score + bias)``; ``method``: ``platt`` (fitted), ``identity`` (the scores
    are taken as logits as they are: scale 1, bias 0)."""

    scale: np.ndarray
    bias: np.ndarray
    method: str = "platt"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", np.asarray(self.scale, np.float64).ravel())
        object.__setattr__(self, "bias", np.asarray(self.bias, np.float64).ravel())
        if self.scale.shape != self.bias.shape:
            raise ValueError(f"scale {self.scale.shape} and bias {self.bias.shape} must have one length")
        if not (np.isfinite(self.scale).all() and np.isfinite(self.bias).all()):
            raise ValueError("calibration scale and bias must be finite")

    @classmethod
    def identity(cls, m: int) -> Calibration:
        return cls(np.ones(m), np.zeros(m), "identity")

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """(N, M) scores -> (N, M) float32 probabilities in [0, 1]; NaN rows stay NaN."""
        s = np.asarray(scores, np.float64)
        if s.ndim != 2 or s.shape[1] != len(self.scale):
            raise ValueError(f"scores must be (N, {len(self.scale)}), got {s.shape}")
        return _sigmoid(s * self.scale + self.bias).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scale": self.scale.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(np.asarray(d["scale"]), np.asarray(d["bias"]), str(d.get("method", "platt")))


def _platt_one(s: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """Newton's method on the smoothed log-likelihood of ``sigmoid(a s + b)`` (a 2x2 system), each step halved until
    the loss does not rise."""
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    t = np.where(y > 0.5, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    a, b = 0.0, float(np.log((n_pos + 1.0) / (n_neg + 1.0)))

    def loss(a: float, b: float) -> float:
        z = a * s + b
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    cur = loss(a, b)
    for _ in range(iterations):
        p = _sigmoid(a * s + b)
        g = np.array([np.sum((p - t) * s), np.sum(p - t)])
        w = p * (1.0 - p) + 1e-12
        h = np.array([[np.sum(w * s * s), np.sum(w * s)], [np.sum(w * s), np.sum(w)]]) + 1e-9 * np.eye(2)
        da, db = np.linalg.solve(h, g)
        k = 1.0
        while k > 1e-6 and loss(a - k * da, b - k * db) > cur:
            k /= 2
        if k <= 1e-6:
            break
        a, b, new = a - k * da, b - k * db, loss(a - k * da, b - k * db)
        done, cur = cur - new < 1e-10 * max(1.0, abs(cur)), new
        if done:
            break
    return a, b


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> Calibration:
    """Platt scaling of (N, M) ``scores`` against (N, M) 0/1 ``labels`` (NaN = unknown, ignored).  An attribute
    whose known labels hold only one class (or none) keeps scale 1, bias 0 (nothing to fit)."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be (N, M) arrays of one shape")
    scale, bias = np.ones(s.shape[1]), np.zeros(s.shape[1])
    for j in range(s.shape[1]):
        ok = np.isfinite(y[:, j]) & np.isfinite(s[:, j])
        yj = y[ok, j]
        if 0 < yj.sum() < len(yj):
            scale[j], bias[j] = _platt_one(s[ok, j], yj)
    return Calibration(scale, bias, "platt")


@dataclass(frozen=True)
class ReliabilityBin:
    lo: float
    hi: float
    n: int
    mean_probability: float
    positive_rate: float


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width bins of one attribute's (n,) probabilities with their (n,) 0/1 labels (NaN labels ignored):
    count, mean probability and observed positive rate per non-empty bin."""
    p, y = np.asarray(probabilities, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} probabilities for {len(y)} labels")
    ok = np.isfinite(p) & np.isfinite(y)
    p, y = p[ok], y[ok]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        sel = which == k
        if sel.any():
            out.append(ReliabilityBin(float(edges[k]), float(edges[k + 1]), int(sel.sum()), float(p[sel].mean()),
                                      float(y[sel].mean())))  # fmt: skip
    return out


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Per column of (N, M) probabilities and 0/1 labels (NaN = unknown): the expected calibration error, the
    count-weighted mean |mean probability - positive rate| over :func:`reliability`'s bins; (M,) float64, NaN for a
    column without known labels."""
    p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} must be (N, M) arrays of one shape")
    out = np.full(p.shape[1], np.nan)
    for j in range(p.shape[1]):
        table = reliability(p[:, j], y[:, j], bins)
        n = sum(b.n for b in table)
        if n:
            out[j] = sum(b.n * abs(b.mean_probability - b.positive_rate) for b in table) / n
    return out


def score_histogram(probabilities: np.ndarray, labels: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """The distributions of one attribute's calibrated probabilities among its known positives and negatives:
    counts in ``bins`` equal bins of [0, 1] (the last one closed), the statistics a confidence-aware filter
    predicts its cost from (:mod:`facesearch.engine.filter_cost`)."""
    p, y = np.asarray(probabilities, np.float64), np.asarray(labels, np.float64)
    ok = np.isfinite(p) & np.isfinite(y)
    idx = np.clip((p[ok] * bins).astype(np.int64), 0, bins - 1)
    pos = np.bincount(idx[y[ok] > 0.5], minlength=bins)
    neg = np.bincount(idx[y[ok] <= 0.5], minlength=bins)
    return {"bins": bins, "positive": pos.tolist(), "negative": neg.tolist()}


def calibration_report(
    probabilities: np.ndarray, labels: np.ndarray, attributes: Sequence[str], bins: int = ECE_BINS
) -> dict[str, Any]:
    """JSON-ready: per attribute its ECE, the counts of known positives / negatives, the reliability table and the
    histograms of the probabilities of positives and negatives (:func:`score_histogram`)."""
    ece = expected_calibration_error(probabilities, labels, bins)
    y = np.asarray(labels, np.float64)
    report: dict[str, Any] = {"bins": bins, "attributes": {}}
    for j, name in enumerate(attributes):
        known = np.isfinite(y[:, j])
        report["attributes"][name] = {
            "ece": None if np.isnan(ece[j]) else float(ece[j]),
            "n_pos": int((y[known, j] > 0.5).sum()),
            "n_neg": int((y[known, j] <= 0.5).sum()),
            "reliability": [b.__dict__ for b in reliability(probabilities[:, j], y[:, j], bins)],
            "histogram": score_histogram(probabilities[:, j], y[:, j]),
        }
    return report


__all__ = [
    "ECE_BINS",
    "HISTOGRAM_BINS",
    "Calibration",
    "ReliabilityBin",
    "calibration_report",
    "expected_calibration_error",
    "fit_platt",
    "reliability",
    "score_histogram",
]
