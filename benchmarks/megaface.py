"""Exact MegaFace Challenge 1 counting (protocol §2–3, §6): the CMC and the ROC / TAR@FAR of a probe set against a
stream of distractor blocks, without ever materialising the probe x distractor score matrix.

**Scores.** Every feature is L2-normalised once in float64 (a zero vector stays zero: its scores are 0, never NaN).
The *canonical* score of two features is ``np.sum(a * b)`` over their float64 normalised rows — one fixed routine, so
identical vectors always score identically (exact ties stay ties) and the order is the order of the true cosines
up to :func:`canonical_error` (~2e-13 at d = 1024).  Two scores that close are compared in **exact rational arithmetic**
on the stored features (float16 / float32 / float64 values are exact binary fractions; :class:`ExactRows`), so a
mathematical tie between different vectors is a tie, never split by float64 rounding.  The bulk of the work is a
float32 matrix product used **only as a screen**: with the proven bound ``eps`` on ``|float32 score - canonical score|``
(:func:`screen_error`), a distractor is counted above a mate without re-scoring only when its screened score beats the
mate's by more than ``eps``; anything closer is re-scored canonically (and exactly where that is not enough).  The
counts are therefore those of the true cosines of the stored features, exactly, including ties.

**int8 screen** (``screen="int8"``, the default on a CPU with int8 dot-product units): the float32 product of every
pair is replaced by an int8 product with a proven bound, and only the pairs that can reach their row's threshold
(~0.8 % at d = 1024) get their float32 score (:mod:`facesearch.benchmarks.megaface_screen`): the same entries with
float32 scores, so everything below is unchanged.  Tiles before any threshold is set run in float32.

**CMC.** For every ordered same-identity pair (g, p): r(g,p) = #{d : s(p,d) > s(p,g)} (ties go to the mate by
default; with ``tie_rule="distractor"`` they count against it).  Per block, each probe's row of screened scores is
compared with its own lowest mate score; the few distractors above it are bucketed against the probe's sorted mate
scores (one ``searchsorted`` over all probes at once) into a histogram whose suffix sums are the rank counts.

**ROC.** Positives: unordered same-identity probe pairs.  Negatives: probe x distractor pairs.  For a target FAR f:
m = floor(f * N_neg), tau = the (m+1)-th largest negative, TAR = #{pos > tau} / N_pos.  Only the top ``keep`` =
floor(f_max * N_neg) + 1 negatives (plus an ``2 eps`` margin) are kept while streaming, with a running threshold;
``tau`` is resolved canonically (re-fetching the few distractors near it) only when a positive lies within ``eps``.
A running threshold starts low (the first tile's own keep-th largest: ~12 % of its pairs at 1M) and rises slowly, so
the negatives are filtered from the start by a *guess* instead: the quantile at ``2 f_max`` of the probes' scores
against the first 1,024 distractors (3.6M scores at 3,530 probes).  ``finish`` proves it (at least ``keep`` kept
negatives lie ``2 eps`` above it, so nothing dropped can matter) or raises
:class:`~facesearch.benchmarks.megaface_counts.ThresholdGuessMissed`, and the run is repeated without the guess
(``guess=False``) — never a wrong count.

**Filter (§6).** With attribute codes (two bit sets per row: attributes decided positive, decided negative; see
:class:`facesearch.benchmarks.megaface_data.AttributeFilter`), probe p is compared only with the distractors whose
code is :func:`compatible` with its own (no attribute decided positive on one side and negative on the other), and a
mate whose code is not compatible is a miss (rank = infinity) and a positive the filter rejects; N and N_neg keep
their unfiltered values, so filtered rates are directly comparable (a filtered-out comparison is a rejection, never
a false accept: at FAR = 1 the false accepts are the comparisons made, not N_neg).

**Supported FARs.** A FAR below 1 / N_neg has m = 0, the same threshold as FAR = 0: such ROC rows say
``supported: false`` and reports mark them instead of printing them as measured.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from facesearch.benchmarks.megaface_counts import (
    Counting,
    Negatives,
    build_mates,
)
from facesearch.benchmarks.megaface_exact import (
    ExactRows,
    canonical_error,
    canonical_normalize,
    check_finite,
    compatible,
    floor_m,
    integer_row,
    screen_error,
)
from facesearch.benchmarks.megaface_screen import Int8Screen, Scratch
from facesearch.indexer.screen import INT8_MAX_DIM, auto_screen, check_screen
from facesearch.indexer.search import strict_matmul

#: The harness's screens: float32 products of every pair (``none``), or int8 products with float32 re-scoring of
#: the pairs that can matter (:mod:`facesearch.benchmarks.megaface_screen`); ``auto``: int8 on a CPU with int8
#: dot-product units, else none.
SCREENS = ("auto", "none", "int8")
#: The guessed negatives' threshold is the quantile at this many times ``far_max`` of the scores of all probes
#: against the first :data:`GUESS_COLUMNS` distractors ...
GUESS_FACTOR = 2
GUESS_COLUMNS = 1024
#: ... when at least this many of its scores lie above it (else no guess: too few to estimate a quantile).
GUESS_MIN_ABOVE = 64


def resolve_screen(screen: str, device: torch.device, d: int) -> str:
    """``screen`` (one of :data:`SCREENS`) -> ``none`` or ``int8`` for this device; a ``ValueError`` where int8
    cannot run (off the CPU, a CPU whose int8 sums are not exact, or d too large)."""
    if screen not in SCREENS:
        raise ValueError(f"screen {screen!r}: the MegaFace harness screens with one of {', '.join(SCREENS)}")
    if screen == "auto":
        return "int8" if device.type == "cpu" and d <= INT8_MAX_DIM and auto_screen(device) == "int8" else "none"
    if screen == "int8":
        check_screen("int8", device, d)
    return screen


@dataclass(frozen=True)
class ProbeSet:
    """The probes: raw features ``xq`` (nq, d), identity labels, and optional attribute filter codes."""

    xq: np.ndarray
    identity: Sequence[str]
    codes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.xq.ndim != 2 or len(self.xq) != len(self.identity) or len(self.xq) == 0:
            raise ValueError(f"probes: need (nq, d) features and nq identities, got {self.xq.shape} and "
                             f"{len(self.identity)}")  # fmt: skip
        check_finite(self.xq, "probes")


class Evaluation(Counting):
    """Streams distractor blocks (:meth:`add`) and produces exact counts (:meth:`finish`).

    ``n_distractors``: the total that will be streamed (fixes N_neg and the number of negatives to keep);
    ``far_max``: the largest FAR the ROC needs (negatives are kept up to it; everything when they fit ``keep_cap``).
    """

    def __init__(
        self,
        probes: ProbeSet,
        n_distractors: int,
        far_max: float = 1e-3,
        keep_cap: int = 1 << 25,
        tile_rows: int = 8192,
        device: str = "cpu",
        screen: str = "auto",
        guess: bool = True,
    ) -> None:
        self.probes, self.nb, self.tile_rows = probes, int(n_distractors), tile_rows
        self.dev = torch.device(device)
        self.d = probes.xq.shape[1]
        self.eps = screen_error(self.d)
        self.tol = 2 * canonical_error(self.d)  # canonical scores closer than this are compared exactly
        self.exact_p = ExactRows(probes.xq)
        self._mate_keys: dict[int, Fraction] = {}
        self.p64 = canonical_normalize(probes.xq)
        self.p32 = torch.from_numpy(self.p64.astype(np.float32)).to(self.dev)
        self.codes = None if probes.codes is None else np.asarray(probes.codes, np.int64)
        self.mates = build_mates(self.p64, probes.identity, self.codes)
        nq = len(self.p64)
        self.n_neg = nq * self.nb
        self.keep_all = self.n_neg <= keep_cap
        self.far_max = 1.0 if self.keep_all else far_max
        self.keep = self.n_neg if self.keep_all else floor_m(far_max, self.n_neg) + 1
        # Per probe: the lowest screened value that can matter for its CMC (its lowest counted mate minus eps).
        lo = np.full(nq, np.inf)
        for p in range(nq):
            a, b = self.mates.off[p], self.mates.off[p + 1]
            live = self.mates.s[a:b][self.mates.ok[a:b]]
            if len(live):
                lo[p] = live.min() - 2 * self.eps
        self.lo_np = lo.astype(np.float32)
        self.lo = torch.from_numpy(self.lo_np).to(self.dev)
        # Bucket boundaries (probe p's sorted mate scores +- eps, shifted by 4p) for one global searchsorted.
        owner = self.mate_owner = np.repeat(np.arange(nq), np.diff(self.mates.off))
        base = 4.0 * owner + 2.0
        self.key_hi, self.key_lo = base + self.mates.s + self.eps, base + self.mates.s - self.eps
        self.hist = np.zeros(len(self.mates.s) + nq, np.int64)  # slot off[p] + p + q: above exactly q mates
        self.extra = np.zeros(len(self.mates.s), np.int64)  # band distractors re-scored above the mate
        self.ties = np.zeros(len(self.mates.s), np.int64)
        self.neg = Negatives()
        self.thr = -np.inf  # negatives below this screened value can never matter
        # A guessed threshold for the top negatives (see :class:`ThresholdGuessMissed`): -inf when not guessing.
        self.guessing, self.guess = guess and not self.keep_all, -np.inf
        self.screen = resolve_screen(screen, self.dev, self.d)
        self.scratch = Scratch(self.dev)
        self.int8 = Int8Screen(self.p32, self.scratch) if self.screen == "int8" and not self.keep_all else None
        self.seen = 0
        self.compared = 0
        self.rescored = 0  # kept negatives re-scored canonically to resolve TAR thresholds
        self.timings = {"gemm_s": 0.0, "select_s": 0.0, "cmc_s": 0.0, "roc_s": 0.0, "prepare_s": 0.0}

    # -- streaming ---------------------------------------------------------------------------------------------------
    def add(self, xb: np.ndarray, codes: np.ndarray | None = None) -> None:
        """Add the next block of raw distractor features (n, d) float16/float32 (and their filter codes)."""
        if xb.ndim != 2 or xb.shape[1] != self.d:
            raise ValueError(f"distractor block: expected (n, {self.d}) features, got {xb.shape}")
        if (codes is None) != (self.codes is None):
            raise ValueError("distractor block: filter codes are required exactly when the probes have them")
        for s in range(0, len(xb), self.tile_rows):
            sub = codes[s : s + self.tile_rows] if codes is not None else None
            self._tile(np.asarray(xb[s : s + self.tile_rows]), sub)
        if self.seen > self.nb:
            raise ValueError(f"more distractors streamed ({self.seen}) than announced ({self.nb})")

    def _tile(self, x: np.ndarray, codes: np.ndarray | None) -> None:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # read-only Arrow buffers: only read (copied into the tile buffer)
            warnings.simplefilter("ignore", UserWarning)
            x32 = self.scratch.get("tile", x.shape, torch.float32)
            x32.copy_(torch.from_numpy(np.ascontiguousarray(x)))
        norm = x32.norm(dim=1, keepdim=True)
        if bool((~torch.isfinite(norm) | (norm < 1e-18)).any()):
            # NaN/inf somewhere (an error), or zero / extreme rows whose float32 norm is 0 or overflows: normalise
            # this tile in float64 (a NaN/inf anywhere in a row makes its norm NaN/inf, so finite norms need no check)
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                raise ValueError(f"distractors: {int(bad.sum())} feature row(s) contain NaN/inf (first: distractor "
                                 f"{self.seen + int(np.argmax(bad))} of the stream)")  # fmt: skip
            d32 = torch.from_numpy(canonical_normalize(x).astype(np.float32)).to(self.dev)
        else:
            d32 = x32.div_(norm)
        self.timings["prepare_s"] += time.perf_counter() - t0
        if codes is None:
            self._group(slice(None), None, x, d32)
        else:
            codes = np.asarray(codes, np.int64)
            assert self.codes is not None
            for code in np.unique(self.codes):
                cols = np.flatnonzero(compatible(code, codes))
                rows = np.flatnonzero(self.codes == code)
                if len(cols):
                    self._group(rows, cols, x, d32[torch.from_numpy(cols).to(self.dev)])
        self.seen += len(x)

    def _group(self, rows: Any, cols: np.ndarray | None, x: np.ndarray, d32: torch.Tensor) -> None:
        """Probes ``rows`` against tile columns ``cols`` (None = all) whose normalised float32 rows are ``d32``."""
        t0 = time.perf_counter()
        rows_idx = np.arange(len(self.p64))[rows]
        pick = torch.from_numpy(rows_idx).to(self.dev) if cols is not None else None
        lo = self.lo[pick] if pick is not None else self.lo
        self.compared += len(rows_idx) * len(d32)
        if self.guessing:
            self._guess(pick, d32)
        if self.int8 is not None and self.bar > -np.inf:  # the int8 screen, once a bar is set
            v, r_loc, c_loc = self.int8.select(rows_idx if pick is not None else None, d32, self._t_row(lo))
        else:
            S = self.scratch.get("scores", (len(rows_idx), len(d32)), torch.float32)
            with torch.inference_mode(), strict_matmul():
                torch.matmul(self.p32[pick] if pick is not None else self.p32, d32.T, out=S)
            t1 = time.perf_counter()
            self.timings["gemm_s"] += t1 - t0
            if not self.keep_all and self.bar == -np.inf and S.numel() > self.keep:
                # a valid lower bound for the keep-th largest negative: this tile's own keep-th largest
                self.thr = self._kth_largest(S.reshape(-1).float().cpu().numpy(), self.keep)
            v, r_loc, c_loc = _select(S, self._t_row(lo))
            self.timings["select_s"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        r = rows_idx[r_loc]
        c = (cols[c_loc] if cols is not None else c_loc).astype(np.int64)
        cmc = v >= self.lo_np[r]
        if cmc.any():
            self._count_cmc(v[cmc], r[cmc], c[cmc], x)
        t3 = time.perf_counter()
        self.timings["cmc_s"] += t3 - t2
        roc = v >= self.bar
        if roc.any():
            self.neg.add(v[roc], r[roc].astype(np.int32), c[roc] + self.seen)
            if self.neg.size > 2 * self.keep + min(self.keep, 1 << 20) and not self.keep_all:
                self._prune()
        self.timings["roc_s"] += time.perf_counter() - t3

    @property
    def bar(self) -> float:
        """The screened score below which a negative is dropped: the running threshold or the guess."""
        return max(self.thr, self.guess)

    def _t_row(self, lo: torch.Tensor) -> torch.Tensor:
        """Per probe, the lowest screened score that can matter: its CMC floor or the negatives' threshold."""
        return torch.minimum(lo, torch.tensor(self.bar, dtype=torch.float32, device=self.dev).clamp_min(-3.0))

    def _kth_largest(self, flat: np.ndarray, m: int) -> float:
        """The ``m``-th largest of the screened scores ``flat``, less ``2 eps``, in float32."""
        kth = np.partition(flat, len(flat) - m)[len(flat) - m]
        return float(np.float32(float(kth) - 2 * self.eps))

    def _guess(self, pick: torch.Tensor | None, d32: torch.Tensor) -> None:
        """The guessed threshold of the top negatives: the ``GUESS_FACTOR * far_max`` quantile of the float32 scores
        of (up to) :data:`GUESS_COLUMNS` of the first tile's distractors.  Tried once: with fewer than
        :data:`GUESS_MIN_ABOVE` scores above that quantile the run keeps its running threshold only."""
        self.guessing = False
        sample = d32[:GUESS_COLUMNS]
        with torch.inference_mode(), strict_matmul():
            S = (self.p32[pick] if pick is not None else self.p32) @ sample.T
        flat = S.reshape(-1).float().cpu().numpy()
        m = math.ceil(GUESS_FACTOR * self.far_max * len(flat))
        if GUESS_MIN_ABOVE <= m < min(self.keep, len(flat)):
            self.guess = self._kth_largest(flat, m)

    def _count_cmc(self, v: np.ndarray, r: np.ndarray, c: np.ndarray, x: np.ndarray) -> None:
        key = 4.0 * r + 2.0 + v.astype(np.float64)
        first = self.mates.off[r]
        q_hi = np.searchsorted(self.key_hi, key, side="left") - first
        q_lo = np.searchsorted(self.key_lo, key, side="left") - first
        np.add.at(self.hist, first + r + q_hi, 1)
        band = np.flatnonzero(q_lo > q_hi)
        if not len(band):
            return
        rb, cb = r[band], c[band]
        x64 = canonical_normalize(x[cb])
        exact = np.sum(self.p64[rb] * x64, axis=1)
        n_mates = q_lo[band] - q_hi[band]
        j = np.repeat(first[band] + q_hi[band], n_mates) + _ranges(n_mates)
        e = np.repeat(exact, n_mates)
        above, tie = e > self.mates.s[j], e == self.mates.s[j]
        close = np.flatnonzero(np.abs(e - self.mates.s[j]) <= self.tol)
        if len(close):  # closer than canonical rounding can tell: decide on the stored values, exactly
            which = np.repeat(np.arange(len(band)), n_mates)[close]
            rows: dict[int, tuple[np.ndarray, int]] = {}
            for k, w in zip(close.tolist(), which.tolist(), strict=True):
                xd = rows.get(w)
                if xd is None:
                    xd = rows[w] = integer_row(x[cb[w]])
                kd, kg = ExactRows.key(self.exact_p.row(int(rb[w])), xd), self._mate_key(int(j[k]))
                above[k], tie[k] = kd > kg, kd == kg
        np.add.at(self.extra, j, above)
        np.add.at(self.ties, j, tie)


def _select(S: torch.Tensor, t_row: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values, rows and columns of the entries of ``S`` at or above their row's threshold.  On the CPU numpy's
    compare + flatnonzero is ~4x faster than torch's nonzero (measured: 35 vs 140 ms on 3530 x 8192)."""
    if S.device.type == "cpu":
        s = S.numpy()
        flat = np.flatnonzero(s >= t_row.numpy()[:, None])
        return s.ravel()[flat], flat // s.shape[1], flat % s.shape[1]
    nz = (S >= t_row[:, None]).nonzero()
    return S[nz[:, 0], nz[:, 1]].cpu().numpy(), nz[:, 0].cpu().numpy(), nz[:, 1].cpu().numpy()


def _ranges(n: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..n0-1, 0..n1-1, ...]."""
    total = int(n.sum())
    starts = np.repeat(np.cumsum(n) - n, n)
    return np.arange(total) - starts


__all__ = ["GUESS_COLUMNS", "GUESS_FACTOR", "GUESS_MIN_ABOVE", "SCREENS", "Evaluation", "ProbeSet", "resolve_screen"]
