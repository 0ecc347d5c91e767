"""The brute-force MegaFace reference shared by the harness tests."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from facesearch.benchmarks.megaface_exact import canonical_normalize, far_grid

WINDOW = 1e-9  # canonical scores closer than this are compared exactly (far wider than float64 rounding)


class _Exact:
    """Exact cosine order keys sign(a.b) (a.b)^2 / (|a|^2 |b|^2) from the stored features as Fractions (independent of
    the harness's integer implementation)."""

    def __init__(self, xq, xb):
        self.q = [[Fraction(float(v)) for v in row] for row in np.asarray(xq)]
        self.b = [[Fraction(float(v)) for v in row] for row in np.asarray(xb)]
        self.cache = {}

    def key(self, p, other, j):
        """Key of probe p against row j of ``other`` ("q" or "b")."""
        got = self.cache.get((p, other, j))
        if got is None:
            a, b = self.q[p], (self.q if other == "q" else self.b)[j]
            dot, na, nb = sum(x * y for x, y in zip(a, b, strict=True)), sum(x * x for x in a), sum(y * y for y in b)
            got = self.cache[(p, other, j)] = Fraction(0) if na * nb == 0 else dot * abs(dot) / (na * nb)
        return got


def _count_above(values, refs, t_val, t_key):
    """#(values > t) with values = canonical scores and refs[i] = () -> exact key, exactly near t."""
    above = int((values > t_val + WINDOW).sum())
    equal = 0
    for i in np.flatnonzero(np.abs(values - t_val) <= WINDOW):
        k = refs(i)
        above += k > t_key
        equal += k == t_key
    return above, equal


def _same(a, b) -> bool:
    """Whether a probe and a gallery row are compared: equal codes (1-d codes), or, for rows of per-attribute states
    (+1 decided positive, -1 decided negative, 0 undecided), no attribute +1 on one side and -1 on the other."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0:
        return bool(a == b)
    return not bool(np.any((a * b) < 0))


def _brute_force(xq, ids, xb, codes_q=None, codes_b=None, tie_rule="mate"):
    """All scores materialised (canonical float64 products), plain comparisons and a full sort of the negatives;
    comparisons closer than ``WINDOW`` are decided by exact rational keys.  ``codes_*``: 1-d filter codes (compared
    when equal) or (n, k) per-attribute states (see :func:`_same`)."""
    ex = _Exact(xq, xb)
    q, b = canonical_normalize(xq), canonical_normalize(xb)
    S = np.array([np.sum(q[i][None, :] * b, axis=1) for i in range(len(q))])  # (nq, nb)
    M = np.array([np.sum(q[i][None, :] * q, axis=1) for i in range(len(q))])
    ids = np.asarray(ids)
    nb = len(xb)
    hist = np.zeros(nb + 1, np.int64)
    excluded = ties = 0
    for p in range(len(q)):
        for g in range(len(q)):
            if g == p or ids[g] != ids[p]:
                continue
            if codes_q is not None and not _same(codes_q[g], codes_q[p]):
                excluded += 1
                continue
            cols = (
                np.arange(nb)
                if codes_q is None
                else np.array([d for d in range(nb) if _same(codes_q[p], codes_b[d])], int)
            )
            r, t = _count_above(
                S[p][cols], lambda i, p=p, cols=cols: ex.key(p, "b", cols[i]), M[p, g], ex.key(p, "q", g)
            )
            ties += t
            hist[r + (t if tie_rule == "distractor" else 0)] += 1
    if codes_q is None:
        neg = S
    else:
        ok = np.array([[_same(codes_q[i], codes_b[d]) for d in range(nb)] for i in range(len(q))], bool)
        neg = np.where(ok, S, -np.inf)
    flat = neg.ravel()
    order = np.argsort(-flat, kind="stable")
    pairs = [(i, j) for i in range(len(q)) for j in range(i + 1, len(q)) if ids[i] == ids[j]
             and (codes_q is None or _same(codes_q[i], codes_q[j]))]  # fmt: skip
    pos = np.array([M[i, j] for i, j in pairs])
    n_neg = len(q) * nb
    tar = {}
    for far in far_grid(n_neg, 1.0):
        m = int(Fraction(repr(far)) * n_neg)
        if m >= n_neg or flat[order[m]] == -np.inf:
            tar[far] = len(pos)
            continue
        cand = flat[order[m]]
        n_above = int((flat > cand + WINDOW).sum())
        run = np.flatnonzero(np.abs(flat - cand) <= WINDOW)
        run_keys = sorted((ex.key(int(i) // nb, "b", int(i) % nb) for i in run), reverse=True)
        t_key = run_keys[m - n_above]
        tau = cand  # any canonical value of the run: comparisons near it are exact
        tar[far], _ = _count_above(pos, lambda i: ex.key(pairs[i][0], "q", pairs[i][1]), tau, t_key)
    return hist, excluded, ties, tar


@pytest.fixture(scope="session")
def brute_force():
    """``brute_force(xq, ids, xb, codes_q=None, codes_b=None, tie_rule="mate")`` -> (rank histogram, excluded mates,
    ties, {far: TAR count}): every score materialised, plain comparisons and a full sort of the negatives."""
    return _brute_force
