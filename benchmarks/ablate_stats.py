"""The numbers behind ``facesearch ablate``'s tables: per-probe-identity rank-1 hits by exact brute force, per-identity
attribute confusion counts, and paired bootstrap intervals of differences between variants.

Pure functions on arrays, no I/O.  The unit resampled is the probe *identity* (a person's images are not
independent: they share the attributes and the look), drawn with replacement, the same draw for both variants
(paired), and, with several seeds, the seeds too (again the same seeds for both): the interval covers the people
the probes happen to be and the training run a seed happens to give.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from facesearch.benchmarks.megaface_exact import canonical_normalize, canonical_scores

#: Fields of the last axis of :func:`attribute_counts`.
COUNT_FIELDS: tuple[str, ...] = ("tp", "pos", "tn", "neg")


def rank1_by_identity(
    xq: np.ndarray, identity: Sequence[str], xb: np.ndarray, device: str = "cpu", chunk: int = 65_536
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """MegaFace rank-1 hits per probe identity, by brute force in float64.

    ``xq`` (nq, d) probe features with their ``identity``; ``xb`` (nb, d) the distractors.  Every ordered pair (g, p)
    of two images of one identity is one trial (p the probe, g its gallery mate among the distractors); it is a hit
    when no distractor scores above s(p, g) (ties go to the mate, the harness's default), i.e. s(p, g) >= max_d
    s(p, d).  Scores are the harness's canonical cosines (:func:`facesearch.benchmarks.megaface.canonical_scores` of
    the float64-normalised rows); the distractor maxima come from one float64 GEMM per ``chunk`` distractors on
    ``device``, and where a mate lies within ``_NEAR`` of its probe's maximum the distractors near it are re-scored
    canonically, so an exact tie stays a tie.  Returns (identities sorted, mates (n_id,) int64 = k (k - 1), hits
    (n_id,) int64); their sum equals the harness's rank-1 count except for two different scores closer than float64
    rounding (which the harness orders in exact arithmetic)."""
    q = canonical_normalize(xq)
    top = _max_scores(q, xb, device, chunk)
    labels = np.asarray([str(i) for i in identity], dtype=object)
    names = sorted(set(labels.tolist()))
    mates, hits = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64)
    exact: dict[int, float] = {}
    for i, name in enumerate(names):
        idx = np.flatnonzero(labels == name)
        mates[i] = len(idx) * (len(idx) - 1)
        for p in idx.tolist():
            s = canonical_scores(q[p], q[idx[idx != p]])
            if np.any(np.abs(s - top[p]) <= _NEAR) and p not in exact:
                exact[p] = _canonical_max(q[p], xb, top[p] - _NEAR, chunk)
            hits[i] += int((s >= exact.get(p, top[p])).sum())
    return names, mates, hits


_NEAR = 1e-9  # far wider than the float64 rounding of a cosine at any d the harness allows


def _max_scores(q: np.ndarray, xb: np.ndarray, device: str, chunk: int) -> np.ndarray:
    """(nq,) the largest score of each normalised probe row against the distractors (float64 GEMM)."""
    dev = torch.device(device)
    qt = torch.from_numpy(q).to(dev)
    best = torch.full((len(q),), -torch.inf, dtype=torch.float64, device=dev)
    for lo in range(0, len(xb), chunk):
        bt = torch.from_numpy(canonical_normalize(xb[lo : lo + chunk])).to(dev)
        best = torch.maximum(best, (qt @ bt.T).max(dim=1).values)
    return best.cpu().numpy()


def _canonical_max(q: np.ndarray, xb: np.ndarray, floor: float, chunk: int) -> float:
    """The largest canonical score of probe row ``q`` among the distractors whose GEMM score is >= ``floor``."""
    best = -np.inf
    for lo in range(0, len(xb), chunk):
        b = canonical_normalize(xb[lo : lo + chunk])
        near = b[b @ q >= floor]
        if len(near):
            best = max(best, float(canonical_scores(q, near).max()))
    return best


def attribute_counts(
    prob: np.ndarray, truth: np.ndarray, identity: Sequence[str]
) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """Per identity and attribute, the confusion counts of the decision ``prob >= 0.5`` against 0/1 ``truth``.

    ``prob`` and ``truth``: (n, m) float, NaN = no prediction (an image that could not be read) / unknown label, left
    out.  Returns (identities sorted, counts (n_id, m, 4) int64 of :data:`COUNT_FIELDS`: true positives, positives,
    true negatives, negatives)."""
    prob, truth = np.asarray(prob, np.float64), np.asarray(truth, np.float64)
    if prob.shape != truth.shape or prob.ndim != 2 or len(prob) != len(identity):
        raise ValueError(f"prob and truth must be (n, m) arrays of one shape with n identities, got {prob.shape}, "
                         f"{truth.shape} and {len(identity)}")  # fmt: skip
    known = np.isfinite(prob) & np.isfinite(truth)
    pred, pos, neg = prob >= 0.5, known & (truth >= 0.5), known & (truth < 0.5)
    labels = np.asarray([str(i) for i in identity], dtype=object)
    names = sorted(set(labels.tolist()))
    out = np.zeros((len(names), prob.shape[1], 4), np.int64)
    for i, name in enumerate(names):
        rows = labels == name
        out[i, :, 0] = (pred & pos)[rows].sum(0)
        out[i, :, 1] = pos[rows].sum(0)
        out[i, :, 2] = (~pred & neg)[rows].sum(0)
        out[i, :, 3] = neg[rows].sum(0)
    return names, out


def attribute_rates(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, balanced accuracy), each (..., m) float64, from counts (..., n_id, m, 4) summed over identities.
    Balanced accuracy is NaN where a class is absent (as :func:`facesearch.benchmarks.attribute_accuracy.
    balanced_accuracy`'s default), accuracy where no image is labelled."""
    c = np.asarray(counts, np.float64).sum(axis=-3)
    tp, pos, tn, neg = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (tp + tn) / (pos + neg), (tp / pos + tn / neg) / 2


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard deviation (ddof = 1; None with fewer than 2 values) of the finite ``values``."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def _draws(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n) multiplicities of ``n`` items drawn with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _interval(draws: np.ndarray) -> tuple[float | None, float | None]:
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return None, None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def paired_ratio_difference(
    num_v: np.ndarray, num_r: np.ndarray, den: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, float | None]:
    """The difference of two pooled rates, variant − reference, with a paired bootstrap 95 % interval.

    ``num_v`` / ``num_r``: (S, n) per-seed, per-unit numerators (rank-1 hits per probe identity, or accuracies per
    LFW fold with ``den`` = 1); ``den``: (n,) per-unit denominators, the same for both (mate pairs).  The rate of seed
    s is ``sum(num[s]) / sum(den)``; the estimate is the mean over seeds of the paired differences.  Each resample
    draws units and seeds with replacement, the same for both variants.  Returns {estimate, lo, hi, resamples}."""
    num_v, num_r = np.atleast_2d(np.asarray(num_v, np.float64)), np.atleast_2d(np.asarray(num_r, np.float64))
    den = np.asarray(den, np.float64)
    if num_v.shape != num_r.shape or num_v.shape[1] != len(den) or not len(den):
        raise ValueError(f"need (S, n) numerators of one shape and (n,) denominators, got {num_v.shape}, "
                         f"{num_r.shape} and {den.shape}")  # fmt: skip
    s, n = num_v.shape
    estimate = float(((num_v.sum(1) - num_r.sum(1)) / den.sum()).mean())
    rng = np.random.default_rng(seed)
    w, ws = _draws(rng, n, resamples), _draws(rng, s, resamples)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = (w @ num_v.T - w @ num_r.T) / (w @ den)[:, None]  # (B, S)
    lo, hi = _interval((diff * ws).sum(1) / s)
    return {"estimate": estimate, "lo": lo, "hi": hi, "resamples": resamples}


def paired_attribute_difference(
    student: np.ndarray, teacher: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, list[float | None] | float | None]]:
    """Student − teacher accuracy and balanced accuracy per attribute and their mean over attributes, with paired
    bootstrap 95 % intervals over the probe identities (the same draw for both) and the student's seeds.

    ``student``: (S, n_id, m, 4) counts per seed (:func:`attribute_counts`); ``teacher``: (n_id, m, 4) (one model,
    no seeds).  Returns {"accuracy" | "balanced": {estimate, lo, hi: (m,) lists, mean_estimate, mean_lo,
    mean_hi}}; NaN (None) where a class is absent."""
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    s, n = student.shape[0], student.shape[1]
    rng = np.random.default_rng(seed)
    w, ws = _draws(rng, n, resamples), _draws(rng, s, resamples)
    drawn_s = np.einsum("bn,snmk->bsmk", w, student)[:, :, None]  # (B, S, 1, m, 4): one "identity" of sums
    drawn_t = np.einsum("bn,nmk->bmk", w, teacher)[:, None]  # (B, 1, m, 4)
    out: dict[str, dict[str, list[float | None] | float | None]] = {}
    for i, what in enumerate(("accuracy", "balanced")):
        point = attribute_rates(student)[i].mean(0) - attribute_rates(teacher)[i]  # (m,)
        diff = (attribute_rates(drawn_s)[i] * ws[:, :, None]).sum(1) / s - attribute_rates(drawn_t)[i]  # (B, m)
        with warnings.catch_warnings():  # a resample where no attribute has both classes: NaN, left out below
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_draws = np.nanmean(diff, axis=1)
        per = [_interval(diff[:, j]) for j in range(diff.shape[1])]
        lo_m, hi_m = _interval(mean_draws)
        finite = point[np.isfinite(point)]
        out[what] = {"estimate": [None if not np.isfinite(p) else float(p) for p in point],
                     "lo": [p[0] for p in per], "hi": [p[1] for p in per],
                     "mean_estimate": float(finite.mean()) if len(finite) else None, "mean_lo": lo_m,
                     "mean_hi": hi_m}  # fmt: skip
    return out


__all__ = [
    "COUNT_FIELDS",
    "attribute_counts",
    "attribute_rates",
    "mean_sd",
    "paired_attribute_difference",
    "paired_ratio_difference",
    "rank1_by_identity",
]
