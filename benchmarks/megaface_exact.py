"""Exact arithmetic of the MegaFace harness (:mod:`facesearch.benchmarks.megaface`): the canonical float64 scores, the
exact rational order of two cosines (:class:`ExactRows`), the proven bound of the float32 screen, the filter codes'
compatibility and the FAR grid with its exact ``floor(far * N_neg)``.  Pure functions of the features; no state."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
NAMED_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3)


def compatible(a: np.ndarray | int, b: np.ndarray) -> np.ndarray:
    """Which pairs of filter codes are compared: no attribute decided positive (low 32 bits) on one side and
    negative (high 32 bits) on the other.  For hard codes (every attribute decided) this is equality."""
    a64, b64 = np.asarray(a, np.int64), np.asarray(b, np.int64)
    low = np.int64(0xFFFFFFFF)
    return ((a64 & low) & (b64 >> 32) | (a64 >> 32) & (b64 & low)) == 0


def canonical_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` L2-normalised in float64 by one fixed routine (zero rows stay zero)."""
    x64 = np.array(x, dtype=np.float64, copy=True, ndmin=2)
    norm = np.sqrt(np.sum(x64 * x64, axis=1))
    x64 /= np.where(norm > 0, norm, 1.0)[:, None]
    return x64


def canonical_scores(q64: np.ndarray, x64: np.ndarray) -> np.ndarray:
    """Canonical scores of one normalised float64 query (d,) against normalised float64 rows (n, d)."""
    return np.sum(q64[None, :] * x64, axis=1)


def canonical_error(d: int) -> float:
    """A bound on |canonical score - true cosine| at dimension ``d`` (float64 normalisation and a length-d sum, unit
    roundoff 2^-53, with a wide margin); two canonical scores closer than twice this are compared exactly."""
    return (4.0 * d + 32.0) * 2.0**-53


class ExactRows:
    """Stored feature rows as exact integers, for deciding comparisons the canonical float64 score cannot.

    Every float (float16/32/64) is ``M * 2^e`` with an integer M; row i becomes the integer vector ``X_i = x_i * 2^k_i``
    (its own power of two).  The exact *order key* of the cosine of rows a and b is
    ``sign(A) * A^2 / (|X_a|^2 |X_b|^2)`` with ``A = X_a . X_b`` -- a monotone function of the cosine in which every
    row's scale cancels, so keys of different pairs compare exactly (:class:`fractions.Fraction`).  A zero row has
    key 0, as its canonical score is 0."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self._rows: dict[int, tuple[np.ndarray, int]] = {}

    def row(self, i: int) -> tuple[np.ndarray, int]:
        """Row ``i`` as (integer vector as an object array, its squared norm)."""
        got = self._rows.get(i)
        if got is None:
            got = self._rows[i] = integer_row(self.x[i])
        return got

    @staticmethod
    def key(a: tuple[np.ndarray, int], b: tuple[np.ndarray, int]) -> Fraction:
        """The exact order key of cos(a, b) for two rows from :meth:`row` (of the same or different sets)."""
        den = a[1] * b[1]
        if den == 0:
            return Fraction(0)
        dot = int(np.dot(a[0], b[0]))
        return Fraction(dot * abs(dot), den)


def integer_row(v: np.ndarray) -> tuple[np.ndarray, int]:
    """A float row as (its values times one power of two, as exact Python integers in an object array; their squared
    norm): the row :meth:`ExactRows.row` keeps."""
    v64 = np.asarray(v, dtype=np.float64)
    if not np.isfinite(v64).all():
        raise ValueError("exact comparison of a feature row with NaN/inf")
    mant, exp = np.frexp(v64)
    m = (mant * 2.0**53).astype(np.int64)  # exact: a float64 mantissa has 53 bits
    nz = m != 0
    if not nz.any():
        return np.zeros(len(v64), dtype=object), 0
    shift = np.where(nz, exp - exp[nz].min(), 0)
    out = np.array([int(a) << int(b) for a, b in zip(m.tolist(), shift.tolist(), strict=True)], dtype=object)
    return out, int(np.dot(out, out))


def screen_error(d: int) -> float:
    """A proven bound on |float32 screened score - canonical score| at dimension ``d``.

    Probe rows are rounded to float32 (relative error u); distractor rows are normalised in float32 (norm relative
    error <= d u / 2 + 2u, the division u); the float32 product of length d adds at most gamma_d * sum|a_i b_i| in any
    summation order, and sum|a_i b_i| <= 1 for unit vectors; the canonical float64 score is within d * 2^-52."""
    rel = 1.0 + (d + 4) * U32
    return 1.02 * ((1.5 * d + 6) * U32) * rel + d * 2.0**-52 + 2.0**-30


def check_finite(x: np.ndarray, what: str) -> None:
    """Reject NaN / inf features, naming the first bad row."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} feature row(s) contain NaN/inf (first: row {int(np.argmax(bad))})")


def floor_m(far: float, n_neg: int) -> int:
    """m = floor(far * N_neg), computed exactly (1e-6 * 3.53e9 is 3530, not 3529.999…)."""
    return int(Fraction(repr(float(far))) * n_neg)


def far_grid(n_neg: int, far_max: float) -> list[float]:
    """FAR values at which the ROC is evaluated: 0, 1, 2, 5 x 10^e from 1/N_neg up to ``far_max``, the named FARs,
    and 1."""
    grid = {0.0, 1.0, *(f for f in NAMED_FARS if f <= far_max)}
    lo = int(np.floor(np.log10(max(1.0 / max(n_neg, 1), 1e-12))))
    for e in range(lo, 1):
        grid |= {float(f"{k}e{e}") for k in (1, 2, 5) if float(f"{k}e{e}") <= far_max}
    return sorted(f for f in grid if f == 0.0 or f == 1.0 or f * n_neg >= 1 or f in NAMED_FARS)


__all__ = [
    "NAMED_FARS",
    "U32",
    "ExactRows",
    "canonical_error",
    "canonical_normalize",
    "canonical_scores",
    "check_finite",
    "compatible",
    "far_grid",
    "floor_m",
    "integer_row",
    "screen_error",
]
