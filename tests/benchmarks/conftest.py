"""The brute-force MegaFace reference shared by the harness tests."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from benchmarks.megaface import canonical_normalize, far_grid


def _brute_force(xq, ids, xb, codes_q=None, codes_b=None, tie_rule="mate"):
    """All scores materialised (canonical float64 products), plain comparisons and a full sort of the negatives."""
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
            if codes_q is not None and codes_q[g] != codes_q[p]:
                excluded += 1
                continue
            row = S[p] if codes_q is None else S[p][codes_b == codes_q[p]]
            r = int((row > M[p, g]).sum())
            t = int((row == M[p, g]).sum())
            ties += t
            hist[r + (t if tie_rule == "distractor" else 0)] += 1
    neg = S if codes_q is None else np.where(codes_q[:, None] == codes_b[None, :], S, -np.inf)
    neg = np.sort(neg.ravel())[::-1]
    pos = [M[i, j] for i in range(len(q)) for j in range(i + 1, len(q)) if ids[i] == ids[j]
           and (codes_q is None or codes_q[i] == codes_q[j])]  # fmt: skip
    pos = np.array(pos)
    n_neg = len(q) * nb
    tar = {}
    for far in far_grid(n_neg, 1.0):
        m = int(Fraction(repr(far)) * n_neg)
        tau = -np.inf if m >= n_neg else neg[m]
        tar[far] = int((pos > tau).sum())
    return hist, excluded, ties, tar


@pytest.fixture(scope="session")
def brute_force():
    """``brute_force(xq, ids, xb, codes_q=None, codes_b=None, tie_rule="mate")`` -> (rank histogram, excluded mates,
    ties, {far: TAR count}): every score materialised, plain comparisons and a full sort of the negatives."""
    return _brute_force
