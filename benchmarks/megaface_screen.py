"""The int8 screen of the MegaFace harness: which probe x distractor pairs of a tile can reach their row's threshold,
and their float32 scores — the harness's float32 screen (:mod:`facesearch.benchmarks.megaface`) without computing
the float32 product of every pair.

The float32 screen multiplies every probe with every distractor and keeps the entries at or above their row's
threshold ``t`` (the probe's lowest mate, or the running ROC threshold).  Almost no pair reaches it (~0.1 % at 1M
distractors), so the product itself is the cost.  Here the product runs in int8 (exact int32 sums: VNNI / AMX-INT8
run them at 3.5-5x the float32 rate), and only the pairs whose int8 score, widened by a proven bound, reaches ``t``
(~0.8 % at d = 1024) get their float32 score — a sampled product (``torch.sparse.sampled_addmm``) of exactly those
pairs.  The entries returned are those the float32 screen would keep, with float32 scores (in another summation
order, which the harness's bound allows), so every count downstream is unchanged.

**Rows.** Probes: int8 with one scale per row.  A tile's distractors are sorted by their largest magnitude and cut
into :data:`GROUPS` groups, each quantised with one scale (its largest magnitude / 127): the test "int8 score + bound
>= t" is then an integer compare of the int32 sums against one threshold per (probe, group), with no float pass over
the product; sorting makes a group's rows alike, so a shared scale costs ~1 % of precision.

**Bound.** For probe row x (float32), its int8 row x~ = q sp, a distractor row y (float32, unit) and y~ = q' sg, the
real product x~.y~ = I sp sg exactly (I the int32 sum), and |x~.y~ - fl(x.y)| <= E: the resident search's bound
(:func:`facesearch.indexer.screen.screen_error`: |dx| |y| + |x~| |dy| + the float32 accumulation of both products),
with |dy|, |y| and |y~| the maxima over the group.  A pair is dropped only when I < (t - E) / (sp sg), i.e. when its
float32 score is certainly below ``t``.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from facesearch.indexer.screen import Low, query_terms, screen_bound, to_low

#: Groups of a tile's distractor rows that share an int8 scale (rows sorted by their largest magnitude).
GROUPS = 16
#: Probe rows per int8 product: its int32 sums (8 MiB at 8192 columns) are compared while still in cache.
CHUNK_ROWS = 512
#: Distractor rows quantised at a time (2 MiB of float32 at d = 1024: its temporaries stay in cache).
QUANT_ROWS = 512
_INT8_MAX = 127
_U32 = 2.0**-24


class Scratch:
    """Named buffers reused from tile to tile.  A fresh tensor is fresh memory: on a VM each first touch of a 4 KiB
    page costs ~10 us in the kernel, so a new 115 MB product per tile would spend ~0.3 s there, more than the product
    itself."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous (uninitialised) tensor of ``shape`` in the buffer ``name``, grown when too small."""
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < size:
            buf = self.buffers[name] = torch.empty(size, dtype=dtype, device=self.device)
        return buf[:size].view(shape)


class Int8Screen:
    """The probes' side of the screen (quantised once); :meth:`select` screens one tile."""

    def __init__(self, p32: torch.Tensor, scratch: Scratch | None = None) -> None:
        self.p32 = p32
        self.scratch = Scratch(p32.device) if scratch is None else scratch
        self.seconds = {"quantise_s": 0.0, "products_s": 0.0, "rescore_s": 0.0}
        self.low = to_low(p32, "int8")
        dq, nq_s, nq32 = query_terms(p32, self.low)
        self.terms = (dq.double(), nq_s.double(), nq32.double())
        assert self.low.scale is not None
        self.scale = self.low.scale.double()

    def select(
        self, rows: np.ndarray | None, d32: torch.Tensor, t_row: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries (value, row, column) of the float32 product ``p32[rows] @ d32.T`` at or above ``t_row`` (per
        row, float32), as the float32 screen selects them.  ``rows``: probe positions (None: all); ``d32``: the
        tile's normalised float32 rows.  Seconds accumulate in :attr:`seconds`."""
        n, nq = d32.shape[0], (len(self.p32) if rows is None else len(rows))
        empty = (np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        if n == 0 or nq == 0:
            return empty
        t0 = time.perf_counter()
        pick = None if rows is None else torch.from_numpy(np.asarray(rows, np.int64)).to(d32.device)
        order, low, bounds = _group_rows(d32, self.scratch)
        theta = self._thresholds(pick, t_row, bounds, low)[:, :, None]
        q_vals = self.low.values if pick is None else self.low.values[pick]
        n_pad, groups = low.values.shape[0], len(bounds[0])
        chunks_r, chunks_c = [], []
        t1 = time.perf_counter()
        for a in range(0, nq, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, nq)
            acc = torch._int_mm(q_vals[a:b], low.values.T, out=self.scratch.get("sums", (b - a, n_pad), torch.int32))
            mask = self.scratch.get("mask", (b - a, groups, n_pad // groups), torch.bool)
            torch.ge(acc.view(b - a, groups, -1), theta[a:b], out=mask)
            flat = np.flatnonzero(mask.cpu().numpy())
            chunks_r.append(flat // n_pad + a)
            chunks_c.append(flat % n_pad)
        t2 = time.perf_counter()
        r = np.concatenate(chunks_r)
        c = np.concatenate(chunks_c)
        if n_pad > n:  # the padding rows (zeros) pass a threshold <= 0: not the tile's
            real = c < n
            r, c = r[real], c[real]
        out = empty
        if len(r):
            c = order.cpu().numpy()[c]  # the tile's own columns (CSR columns need not be sorted within a row)
            v = _sampled_scores(self.p32 if pick is None else self.p32[pick], d32, r, c, nq, n)
            keep = np.flatnonzero(v >= t_row.cpu().numpy()[r])
            out = v[keep], r[keep], c[keep]
        self.seconds["quantise_s"] += t1 - t0
        self.seconds["products_s"] += t2 - t1
        self.seconds["rescore_s"] += time.perf_counter() - t2
        return out

    def _thresholds(
        self, pick: torch.Tensor | None, t_row: torch.Tensor, bounds: torch.Tensor, low: Low
    ) -> torch.Tensor:
        """(nq, groups) int32: a pair whose int32 sum is below its (probe, group) threshold is certainly below t."""
        dq, nq_s, nq32 = (x if pick is None else x[pick] for x in self.terms)
        sp = self.scale if pick is None else self.scale[pick]
        E = screen_bound((dq[:, None], nq_s[:, None], nq32[:, None]), bounds.double(), self.p32.shape[1])
        assert low.scale is not None
        sg = low.scale.double()
        X = (t_row.double()[:, None] - E) / (sp[:, None] * sg[None, :])
        theta = torch.floor(X - X.abs() * 1e-9 - 1e-9)
        lim = float(2**31 - 1)
        return theta.clamp_(-lim, lim).to(torch.int32)


def _group_rows(d32: torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, Low, torch.Tensor]:
    """The tile's rows sorted by largest magnitude (``order``); in int8 with one scale per group (``Low``: values
    (groups * size, d) in that order, zero rows padding the last group, and scale (groups,)); each group's bound terms
    (3, groups): max |y|, max |dy|, max |y~|.  Rows are quantised a cache-sized chunk at a time (one pass)."""
    n, dev = d32.shape[0], d32.device
    peak = torch.maximum(d32.amax(dim=1), -d32.amin(dim=1))
    order = torch.argsort(peak, stable=True)
    groups = min(GROUPS, n)
    size = -(-n // groups)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=dev)
    gid = torch.div(rank, size, rounding_mode="floor")  # each row's group, in the tile's order
    g_peak = torch.zeros(groups, dtype=peak.dtype, device=dev).scatter_reduce_(0, gid, peak, "amax")
    scale = torch.where(g_peak > 0, g_peak / _INT8_MAX, torch.ones_like(g_peak))
    inv = 1.0 / scale
    d = d32.shape[1]
    values = scratch.get("int8 rows", (groups * size, d), torch.int8)
    values[n:] = 0
    natural = scratch.get("int8 rows, tile order", (n, d), torch.int8)
    dy, ny = (torch.empty(n, dtype=d32.dtype, device=dev) for _ in range(2))
    t_buf, q_buf = (scratch.get(name, (min(QUANT_ROWS, n), d), d32.dtype) for name in ("quant t", "quant q"))
    for a in range(0, n, QUANT_ROWS):  # into reused buffers: fresh 2 MB temporaries cost page faults (3x the loop)
        b = min(a + QUANT_ROWS, n)
        t, q = t_buf[: b - a], q_buf[: b - a]
        torch.mul(d32[a:b], inv[gid[a:b]][:, None], out=t)  # y / s, rounded once
        torch.round(t, out=q).clamp_(-_INT8_MAX, _INT8_MAX)
        torch.linalg.vector_norm(t.sub_(q), dim=1, out=dy[a:b])  # exact: a float minus its nearest integer
        torch.linalg.vector_norm(d32[a:b], dim=1, out=ny[a:b])
        natural[a:b].copy_(q)
    torch.index_select(natural, 0, order, out=values[:n])  # sorted by peak: row j is the tile's row order[j]
    # |y~ - y| = s |y/s - q|: the computed y/s is within 2.0001 u |y| / s of the real one, hence the 3 u |y| term.
    dy = dy * scale[gid] + 3 * _U32 * ny
    zeros = torch.zeros(groups, dtype=ny.dtype, device=dev)
    # per group: max |y|, max |dy|, max |y~| <= |y| + |y~ - y|
    bounds = torch.stack([zeros.clone().scatter_reduce_(0, gid, x, "amax") for x in (ny, dy, ny + dy)])
    return order, Low(values, scale), bounds


def _sampled_scores(p32: torch.Tensor, ys: torch.Tensor, r: np.ndarray, c: np.ndarray, m: int, n: int) -> np.ndarray:
    """float32 scores of the pairs (r, c) of ``p32 @ ys.T``, ``r`` ascending (columns in any order within a row)."""
    crow = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=m), out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta" / invariant checks: the indices are ours
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(c), torch.zeros(len(c)),
                                          size=(m, n), device=p32.device)  # fmt: skip
        out = torch.sparse.sampled_addmm(pattern, p32, ys.T, beta=0.0)
    return out.values().cpu().numpy()


__all__ = ["CHUNK_ROWS", "GROUPS", "Int8Screen", "Scratch"]
