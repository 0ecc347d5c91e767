"""The counting half of the MegaFace harness's :class:`~facesearch.benchmarks.megaface.Evaluation`: each probe's mates,
the streamed top negatives, and :meth:`Counting.finish`, which turns what the stream left (the CMC histogram, the kept
negatives) into exact CMC and ROC counts — re-scoring canonically, and exactly where needed, the few negatives that
lie within the screen's bound of a TAR threshold.  The protocol and the proofs: the module docstring of
:mod:`facesearch.benchmarks.megaface`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from facesearch.benchmarks.megaface_exact import (
    ExactRows,
    canonical_normalize,
    canonical_scores,
    compatible,
    far_grid,
    floor_m,
)
from facesearch.benchmarks.megaface_screen import Int8Screen

TIE_RULES = ("mate", "distractor")


class ThresholdGuessMissed(RuntimeError):
    """The guessed threshold of the top negatives was too high: fewer than ``keep`` negatives are certainly above it,
    so the counts cannot be proven from the negatives kept; the run must be repeated with ``guess=False``."""


@dataclass
class Mates:
    """Each probe's mates sorted by canonical score: rows ``off[p]:off[p+1]`` of ``g`` / ``s`` / ``ok``."""

    off: np.ndarray
    g: np.ndarray
    s: np.ndarray
    ok: np.ndarray  # False when the attribute filter excludes the mate (a miss)


def build_mates(p64: np.ndarray, identity: Sequence[str], codes: np.ndarray | None) -> Mates:
    labels = np.asarray(identity, dtype=object)
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(labels):
        groups.setdefault(c, []).append(i)
    nq = len(labels)
    per: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0))] * nq
    for members in groups.values():
        idx = np.asarray(members, np.int64)
        for p in idx:
            g = idx[idx != p]
            s = canonical_scores(p64[p], p64[g])
            order = np.argsort(s, kind="stable")
            per[p] = (g[order], s[order])
    counts = np.array([len(g) for g, _ in per], np.int64)
    off = np.concatenate([[0], np.cumsum(counts)])
    g = np.concatenate([g for g, _ in per]) if off[-1] else np.zeros(0, np.int64)
    s = np.concatenate([s for _, s in per]) if off[-1] else np.zeros(0)
    owner = np.repeat(np.arange(nq), counts)
    ok = np.ones(len(g), bool) if codes is None else compatible(codes[owner], codes[g])
    return Mates(off, g, s, ok)


@dataclass
class Negatives:
    """The streamed top negatives: screened value, probe row, global distractor index."""

    v: list[np.ndarray] = field(default_factory=list)
    r: list[np.ndarray] = field(default_factory=list)
    c: list[np.ndarray] = field(default_factory=list)
    size: int = 0

    def add(self, v: np.ndarray, r: np.ndarray, c: np.ndarray) -> None:
        self.v.append(v)
        self.r.append(r)
        self.c.append(c)
        self.size += len(v)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.v:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
        v, r, c = np.concatenate(self.v), np.concatenate(self.r), np.concatenate(self.c)
        self.v, self.r, self.c = [v], [r], [c]
        return v, r, c


class Counting:
    """What :class:`~facesearch.benchmarks.megaface.Evaluation` counts with; its constructor sets these."""

    p64: np.ndarray
    exact_p: ExactRows
    mates: Mates
    mate_owner: np.ndarray
    _mate_keys: dict[int, Fraction]
    neg: Negatives
    nb: int
    n_neg: int
    keep: int
    keep_all: bool
    far_max: float
    eps: float
    tol: float
    thr: float
    guess: float
    hist: np.ndarray
    extra: np.ndarray
    ties: np.ndarray
    seen: int
    compared: int
    rescored: int
    int8: Int8Screen | None
    timings: dict[str, float]

    def _mate_key(self, j: int) -> Fraction:
        """Exact order key of mate slot ``j`` (its probe against the mate)."""
        got = self._mate_keys.get(j)
        if got is None:
            p, g = int(self.mate_owner[j]), int(self.mates.g[j])
            got = self._mate_keys[j] = ExactRows.key(self.exact_p.row(p), self.exact_p.row(g))
        return got

    def _prune(self) -> None:
        v, r, c = self.neg.arrays()
        kth = np.partition(v, len(v) - self.keep)[len(v) - self.keep]
        self.thr = max(self.thr, float(np.float32(kth - 2 * self.eps)))
        keep = v >= self.thr
        self.neg = Negatives()
        self.neg.add(v[keep], r[keep], c[keep])

    def _rescore_bands(
        self, fetch: Callable[[np.ndarray], np.ndarray], r: np.ndarray, c: np.ndarray, bands: list[tuple[int, int]]
    ) -> tuple[np.ndarray, Callable[[int], Fraction]]:
        """Canonical scores at the kept-negative positions inside ``bands`` (NaN elsewhere), and the exact order key
        of the negative at a position; each distractor is fetched once, in its stored precision."""
        pos = np.unique(np.concatenate([np.arange(a, b) for a, b in bands]))
        idx = np.unique(c[pos])
        xb = fetch(idx)
        exact = np.full(len(c), np.nan)
        exact[pos] = _rescore_chunks(self.p64, r[pos], xb, np.searchsorted(idx, c[pos]))
        self.rescored = len(pos)
        fetched = ExactRows(np.asarray(xb))

        def key(i: int) -> Fraction:
            return ExactRows.key(self.exact_p.row(int(r[i])), fetched.row(int(np.searchsorted(idx, c[i]))))

        return exact, key

    # -- results -----------------------------------------------------------------------------------------------------
    def finish(self, fetch: Callable[[np.ndarray], np.ndarray], tie_rule: str = "mate") -> dict[str, Any]:
        """Exact counts.  ``fetch(indices)`` returns the raw features of distractors by global stream index (used only
        to resolve a TAR threshold that lies within ``eps`` of a positive)."""
        if tie_rule not in TIE_RULES:
            raise ValueError(f"tie_rule must be one of {list(TIE_RULES)}, got {tie_rule!r}")
        if self.seen != self.nb:
            raise ValueError(f"{self.seen} distractors were streamed but {self.nb} were announced")
        t0 = time.perf_counter()
        out = self._cmc(tie_rule)
        out["roc"] = self._roc(fetch)
        self.timings["finish_s"] = time.perf_counter() - t0
        if self.int8 is not None:  # the int8 screen's own seconds, in the stages they stand for
            self.timings["prepare_s"] += self.int8.seconds["quantise_s"]
            self.timings["gemm_s"] += self.int8.seconds["products_s"]
            self.timings["select_s"] += self.int8.seconds["rescore_s"]
        out["timings"] = dict(self.timings)
        out["eps"] = self.eps
        out["screen"] = "none" if self.int8 is None else "int8"  # what ran (none when all negatives are kept)
        out["threshold_guess"] = None if self.guess == -np.inf else self.guess
        return out

    def _cmc(self, tie_rule: str) -> dict[str, Any]:
        m = self.mates
        nq = len(self.p64)
        above = np.zeros(len(m.s), np.int64)
        for p in range(nq):
            a, b = m.off[p], m.off[p + 1]
            h = self.hist[a + p : b + p + 1]
            above[a:b] = np.cumsum(h[::-1])[::-1][1:]  # above mate j = candidates above more than j mates
        above += self.extra
        rank = above + (self.ties if tie_rule == "distractor" else 0)
        live = rank[m.ok]
        hist = np.bincount(live, minlength=self.nb + 1)
        uniq = np.flatnonzero(hist)
        return {
            "N": len(m.s),
            "excluded": int((~m.ok).sum()),
            "rank_values": uniq.tolist(),
            "rank_counts": hist[uniq].tolist(),
            "hits": np.cumsum(hist),
            "ties_total": int(self.ties[m.ok].sum()),
            "pairs_with_ties": int((self.ties[m.ok] > 0).sum()),
            "compared": int(self.compared),
        }

    def _roc(self, fetch: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
        m = self.mates
        owner = np.repeat(np.arange(len(self.p64)), np.diff(m.off))
        upper = owner < m.g  # unordered pairs i < j
        pos_j = np.flatnonzero(upper & m.ok)
        pos_j = pos_j[np.argsort(m.s[pos_j], kind="stable")]  # mate slots of the positives, ascending
        pos = m.s[pos_j]
        n_pos = int(upper.sum())
        if not self.keep_all and self.neg.size > self.keep:
            self._prune()  # sort only what can matter
        v, r, c = self.neg.arrays()
        order = _descending(v)
        v, r, c = v[order], r[order], c[order]
        eps = self.eps
        if self.guess > -np.inf and (len(v) < self.keep or self.guess > float(np.float32(v[self.keep - 1] - 2 * eps))):
            raise ThresholdGuessMissed(
                f"the guessed threshold {self.guess:.6g} for the top {self.keep} negatives was too high (only "
                f"{int((v >= self.guess + 2 * eps).sum())} negatives are certainly above it)"
            )
        rows = []
        pending: list[tuple[dict[str, Any], int, int, int]] = []
        for far in far_grid(self.n_neg, self.far_max):
            mm = floor_m(far, self.n_neg)
            row: dict[str, Any] = {"far": far, "m": mm, "supported": far == 0 or mm >= 1}
            if mm >= self.n_neg or (self.keep_all and mm >= len(v)):
                # no (m+1)-th compared negative: everything compared is accepted (a filtered-out pair is a rejection)
                row.update(threshold=None, threshold_exact=True, tar_count=len(pos), false_accepts=int(self.compared))
            elif mm >= len(v):
                continue  # beyond the kept negatives (far > far_max)
            else:
                t32 = float(v[mm])
                a = int(np.searchsorted(-v, -(t32 + 2 * eps), side="left"))  # certainly above tau
                b = int(np.searchsorted(-v, -(t32 - 2 * eps), side="right"))  # band is [a, b)
                sure = int(len(pos) - np.searchsorted(pos, t32 + eps, side="right"))
                unsure = int(np.searchsorted(pos, t32 + eps, side="right") - np.searchsorted(pos, t32 - eps, "right"))
                row.update(threshold=t32, threshold_exact=False, tar_count=sure, false_accepts=None)
                if unsure:
                    pending.append((row, mm, a, b))
            rows.append(row)
        if pending:
            exact_at, neg_key = self._rescore_bands(fetch, r, c, [(a, b) for _, _, a, b in pending])

            def pos_key(i: int) -> Fraction:
                return self._mate_key(int(pos_j[i]))

            for row, mm, a, b in pending:
                band = exact_at[a:b]

                def band_key(i: int, a: int = a) -> Fraction:
                    return neg_key(a + i)

                t = a + self._kth_exact(band, mm - a, band_key)  # the (m+1)-th largest negative, exactly
                tau, key_t = float(exact_at[t]), neg_key(t)
                row.update(threshold=tau, threshold_exact=True,
                           tar_count=self._count_above(pos, tau, key_t, pos_key),
                           false_accepts=a + self._count_above(band, tau, key_t, band_key))  # fmt: skip
        for row in rows:
            row["tar"] = row["tar_count"] / n_pos if n_pos else None
        return {"N_pos": n_pos, "N_neg": self.n_neg, "kept_negatives": len(v), "rescored_negatives": self.rescored,
                "far_max": self.far_max, "points": rows}  # fmt: skip

    def _kth_exact(self, values: np.ndarray, t: int, key_of: Callable[[int], Fraction]) -> int:
        """Index into ``values`` (canonical scores) of the ``t``-th largest (0-based) in the exact order: the canonical
        order, with runs of scores closer than ``tol`` around position t sorted by their exact keys."""
        order = np.argsort(-values, kind="stable")
        cs = values[order]
        lo = hi = t
        while lo > 0 and cs[lo - 1] - cs[lo] <= self.tol:
            lo -= 1
        while hi + 1 < len(cs) and cs[hi] - cs[hi + 1] <= self.tol:
            hi += 1
        if lo == hi:
            return int(order[t])
        run = sorted(order[lo : hi + 1].tolist(), key=key_of, reverse=True)
        return int(run[t - lo])

    def _count_above(self, values: np.ndarray, tau: float, key_t: Fraction, key_of: Callable[[int], Fraction]) -> int:
        """How many of ``values`` (canonical scores) are above the threshold whose canonical score is ``tau`` and exact
        key ``key_t``: by their canonical score where it is farther than ``tol``, by the exact key where it is not."""
        close = np.flatnonzero(np.abs(values - tau) <= self.tol)
        clear = int((values > tau + self.tol).sum())
        return clear + sum(1 for i in close.tolist() if key_of(i) > key_t)


_RESCORE_ROWS = 1024


def _rescore_chunks(p64: np.ndarray, r: np.ndarray, xb: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Canonical scores of probe rows ``r`` against raw distractor rows ``xb[where]``, in chunks (bounded memory) on
    torch's number of threads (numpy releases the GIL in them; each chunk's scores are the same on any thread).
    Chunks of :data:`_RESCORE_ROWS`: their float64 temporaries (8 MiB at d = 1024) are reused from the heap, where
    ones over glibc's 32 MiB mmap ceiling would be fresh pages every time (0.65 -> 0.2 s for 57,000 pairs here)."""
    out = np.empty(len(r))
    n = _RESCORE_ROWS

    def chunk(s: int) -> None:
        x64 = canonical_normalize(xb[where[s : s + n]])
        out[s : s + n] = np.sum(p64[r[s : s + n]] * x64, axis=1)

    starts = range(0, len(r), n)
    workers = min(len(starts), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(chunk, starts))
    else:
        for s in starts:
            chunk(s)
    return out


def _descending(v: np.ndarray) -> np.ndarray:
    """``np.argsort(-v, kind="stable")`` for float32 ``v``: one sort of 64-bit keys (the score's bits, mapped so that
    unsigned order is descending score order, above the position), 0.07-0.27 s against 0.5 s for 3.6M scores."""
    if v.dtype != np.float32 or len(v) >= 1 << 32:
        return np.argsort(-v, kind="stable")
    b = (v + np.float32(0)).view(np.uint32)  # -0.0 -> +0.0: equal scores get equal keys
    asc = np.where(b >> 31, ~b, b | np.uint32(0x80000000))  # the float order as unsigned integers
    key = (~asc).astype(np.uint64) << np.uint64(32)
    key |= np.arange(len(v), dtype=np.uint64)
    key.sort()
    return (key & np.uint64(0xFFFFFFFF)).astype(np.int64)


__all__ = ["TIE_RULES", "Counting", "Mates", "Negatives", "ThresholdGuessMissed", "build_mates"]
