"""Exact (brute-force) inner-product search over a stream of database blocks, behind one interface.

``search_exact(xq, blocks, k)`` streams ``(ids, xb)`` blocks, takes each block's top-k and merges it into a running
top-k, so memory is bounded by the block/tile size and never by ``nb``. Two back-ends compute the block scores:

- ``faiss``: ``faiss.IndexFlatIP`` per block (on the GPU when the installed faiss has GPU support and
  ``device="cuda"``);
- ``torch``: a tiled matrix product + ``torch.topk`` on CPU or CUDA. Optionally the tile product runs in bfloat16 or
  float16 (``screen``) **only as a screen**: the top ``k + margin`` candidates per query are re-scored exactly in
  float32, and the result is accepted only when the k-th exact score provably beats every candidate the screen left out
  (see :func:`_screen_error`); otherwise that query is recomputed exactly. Results therefore equal the float32 search.

Ties: among equal scores the smaller id ranks first, deterministically, whatever the block boundaries (a boundary tie
at position k is resolved by looking at every item of the block with that score). Scores are compared as the back-end
computes them in float32, so two back-ends may order items whose scores differ by one ulp differently.
When fewer than k items exist, results are padded with score ``-inf`` and id ``-1``.

Queries: :func:`normalize_queries` L2-normalises query rows by the routine the gallery's embeddings went through
(``torch.nn.functional.normalize(x, dim=1, eps=1e-12)`` in float32, as in :mod:`facesearch.model.inference`), so scores
are cosine similarities whatever the scale of a query, and refuses rows it cannot normalise (NaN, infinity, all zeros).
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids), as STYLE.md asks
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facesearch.model.measure import gemm_flops, seconds_per_call

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
SCREENS = ("none", "bf16", "fp16")
_UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def normalize_queries(xq: np.ndarray) -> np.ndarray:
    """Query rows scaled to unit L2 norm, as the gallery's embeddings are: (nq, d) float32, C-contiguous.

    xq: (nq, d) or (d,) of any real dtype (float64 is scaled before it is rounded to float32, so values beyond the
    float32 range still give their direction).  Each row is first multiplied by the power of two that brings its
    largest entry into [0.5, 1) -- exact, so the result is bit for bit what ``F.normalize(x, eps=1e-12)`` (the
    model's routine) gives for an ordinary row, while a row scaled by 1e-30 or 1e30 neither underflows to a zero
    norm (where ``eps`` would shrink it instead) nor overflows.  Rows already of unit norm to float32 rounding
    (|‖x‖ - 1| <= d 2^-24, e.g. stored gallery vectors or the model's embeddings) are returned as they are, so a
    query by id is its stored vector bit for bit.

    A row with a NaN or infinite entry, or with all entries zero (no direction: every item would score 0), is a
    ``ValueError`` naming the row (the first few when several are bad)."""
    x = np.asarray(xq)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"queries must be (nq, d) or (d,), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise ValueError(f"queries must be real numbers, got dtype {x.dtype}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    nq, d = x.shape
    if nq == 0 or d == 0:
        return np.zeros((nq, d), np.float32)
    _refuse_rows(~np.isfinite(x).all(axis=1), "holds NaN or infinite values")
    peak = np.abs(x).max(axis=1)
    _refuse_rows(peak == 0, "is all zeros: it has no direction to search by (every item would score 0)")
    with np.errstate(over="ignore", under="ignore"):  # rows beyond the float32 range are redone from x below
        x32 = np.array(x, dtype=np.float32, order="C")  # a copy: the caller's array is never written
    norm = np.linalg.norm(x32.astype(np.float64), axis=1)
    todo = np.flatnonzero(~(np.abs(norm - 1.0) <= d * 2.0**-24))
    if len(todo):
        _, exp = np.frexp(peak[todo])
        scaled = np.ldexp(x[todo], -exp[:, None].astype(np.int32))  # exact: a power of two
        unit = F.normalize(torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32)), dim=1, eps=1e-12)
        x32[todo] = unit.numpy()
    return x32


def _refuse_rows(bad: np.ndarray, what: str) -> None:
    """A ValueError naming the first bad query row (and the next few) when any is bad."""
    rows = np.flatnonzero(bad)
    if len(rows):
        more = ", ".join(map(str, rows[1:6])) + (" …" if len(rows) > 6 else "")
        also = f" (also row{'s' if len(rows) > 2 else ''} {more})" if len(rows) > 1 else ""
        raise ValueError(f"query row {rows[0]}{also} {what}")


def merge_topk(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of candidate lists, ties broken by the smaller id; padded with -inf / -1.

    D: (nq, c) float32 scores, I: (nq, c) int64 ids (-1 = empty slot). Returns (nq, k) float32, (nq, k) int64."""
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    key_id = np.where(I < 0, np.iinfo(np.int64).max, I)
    order = np.lexsort((key_id, -D), axis=1)[:, :k]  # primary key: score descending; then id ascending
    D_out = np.take_along_axis(D, order, axis=1)
    I_out = np.take_along_axis(I, order, axis=1)
    if D_out.shape[1] < k:
        pad = k - D_out.shape[1]
        D_out = np.pad(D_out, ((0, 0), (0, pad)), constant_values=-np.inf)
        I_out = np.pad(I_out, ((0, 0), (0, pad)), constant_values=-1)
    return D_out.astype(np.float32), I_out.astype(np.int64)


def _topk_full_rows(S: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with id tie-breaking from full score rows. S: (m, n) float32, ids: (n,) int64."""
    kk = min(k + 1, S.shape[1])
    vals, pos = torch.topk(S, kk, dim=1)
    D, I = vals.cpu().numpy(), ids[pos].cpu().numpy()
    if kk > k:
        # Rows whose k-th and (k+1)-th scores tie may have more tied items outside; take all items >= k-th score.
        tie = np.flatnonzero((D[:, k - 1] == D[:, k]) & np.isfinite(D[:, k - 1]))  # -inf: masked-out items
        D, I = merge_topk(D[:, :k], I[:, :k], k)
        for r in tie:
            sel = torch.nonzero(S[r] >= float(D[r, k - 1])).flatten()
            Dr, Ir = merge_topk(S[r, sel].cpu().numpy()[None], ids[sel].cpu().numpy()[None], k)
            D[r], I[r] = Dr[0], Ir[0]
        return D, I
    return merge_topk(D, I, k)


def _faiss_block(xq: np.ndarray, ids: np.ndarray, xb: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one block with FAISS flat inner product. xq: (nq, d) float32, ids: (n,) int64, xb: (n, d).

    FAISS orders equal scores arbitrarily, so k+1 results are fetched; rows whose k-th and last fetched scores tie are
    searched again with a doubled width until every item tied with the k-th is in view (then ids break the tie)."""
    from facesearch.indexer.faiss_import import faiss

    index: Any = faiss.IndexFlatIP(xb.shape[1])
    if device.startswith("cuda"):
        index = faiss.index_cpu_to_gpu(_gpu_resources(), int(device.partition(":")[2] or 0), index)
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    n = xb.shape[0]
    kk = min(k + 1, n)
    D, P = index.search(xq, kk)
    D_out, I_out = merge_topk(D, ids[P], k)
    rows = np.flatnonzero(D[:, k - 1] == D[:, kk - 1]) if kk > k else np.zeros(0, dtype=np.int64)
    while len(rows):
        kk = min(2 * kk, n)
        D2, P2 = index.search(xq[rows], kk)
        D_out[rows], I_out[rows] = merge_topk(D2, ids[P2], k)
        if kk == n:
            break
        rows = rows[D2[:, k - 1] == D2[:, kk - 1]]
    return D_out, I_out


_GPU_RES: list[Any] = []


_MIN_DIM = 64  # products with fewer queries or database rows are padded to this many (see _scores)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    if 0 < x.shape[0] < _MIN_DIM:
        return torch.cat([x, torch.zeros(_MIN_DIM - x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)])
    return x


def _scores(xq32: torch.Tensor, xb32: torch.Tensor, pad_queries: bool = True) -> torch.Tensor:
    """``xq32 @ xb32.T``, the one product every exact score comes from.  CPU BLAS kernels round a product with only
    a few rows or columns differently (measured: 0.99999988 vs 0.99999994 for copies of the query in a 3-column
    tile), so exact copies in a short tile at a block boundary, or re-scored for one query, would not tie with
    their twins elsewhere; short operands are zero-padded to the shape of the common path.  ``pad_queries=False``
    keeps a short query block as it is, for callers whose every product in a search has the same queries (then
    one kernel scores them all: a single query costs a matrix-vector product, not a 64-row one)."""
    m, n = xq32.shape[0], xb32.shape[0]
    return ((_pad_rows(xq32) if pad_queries else xq32) @ _pad_rows(xb32).T)[:m, :n]


def _gpu_resources() -> Any:
    """One ``faiss.StandardGpuResources`` per process (allocating it per block would be slow)."""
    from facesearch.indexer.faiss_import import faiss

    if not _GPU_RES:
        _GPU_RES.append(faiss.StandardGpuResources())
    return _GPU_RES[0]


def _tile_norms(xb32: torch.Tensor, xbs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The database side of the screen's error bound: max |y|, max |dy| and max |y~| over the rows (0-d tensors)."""
    xb_up = xbs.float()
    return (torch.linalg.vector_norm(xb32, dim=1).max(), torch.linalg.vector_norm(xb_up - xb32, dim=1).max(),
            torch.linalg.vector_norm(xb_up, dim=1).max())  # fmt: skip


def _screen_error(
    xq32: torch.Tensor, xqs: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Upper bound, per query, of |low-precision score - float32 score| for every item of the tile, before the
    rounding of the product's output (handled by the caller).  ``norms``: :func:`_tile_norms` of the tile (or of any
    superset of it: the maxima only grow).

    With x~ = x + dx and y~ = y + dy: |x~.y~ - x.y| = |dx.y + x~.dy| <= |dx| |y| + |x~| |dy| (Cauchy-Schwarz, using the
    measured rounding-error norms), plus the float32 accumulation of d products in the screen, gamma_d |x~| |y~|, and
    in the exact product a left-out item would get, gamma_d |x| |y| (gamma_d = d u32 / (1 - d u32)), so a left-out
    item's *computed* float32 score is bounded, not only its real one. Returns (m,) float32."""
    d = xq32.shape[1]
    u32 = 2.0**-24
    gamma = d * u32 / (1 - d * u32)
    nb_max, db_max, nbs_max = norms
    xq_up = xqs.float()
    dq = torch.linalg.vector_norm(xq_up - xq32, dim=1)
    nq_s = torch.linalg.vector_norm(xq_up, dim=1)
    nq32 = torch.linalg.vector_norm(xq32, dim=1)
    return dq * nb_max + nq_s * db_max + gamma * (nq_s * nbs_max + nq32 * nb_max)


def _masked(S: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Scores of items outside ``keep`` (a (n,) bool mask over the columns) set to -inf, in place: a broadcast add
    of 0 / -inf (exact for finite scores; 10x faster than a broadcast masked fill on the CPU)."""
    if keep is None:
        return S
    return S.add_(torch.zeros(keep.shape, dtype=S.dtype, device=S.device).masked_fill_(~keep, -np.inf))


#: screen dtype -> whether a batch's screened search beats the unscreened float32 one on this CPU
#: (:func:`batch_screen_pays`).
_BATCH_SCREEN_PAYS: dict[torch.dtype, bool] = {}
#: How much faster than float32 a screen's products must run to pay for its top-k and re-scoring.
_BATCH_SCREEN_MIN_SPEEDUP = 1.5


def batch_screen_pays(dtype: torch.dtype) -> bool:
    """Whether products in ``dtype`` run at least :data:`_BATCH_SCREEN_MIN_SPEEDUP` times the float32 rate on this
    CPU, timed once per process on a batch-sized product (256 x 1024 by 1024 x 8192).  A batch's search is bound by
    its products: where the low precision is not much faster (a Xeon with ``avx512_bf16`` and no AMX ran bf16 GEMMs
    at half the float32 rate), the screen only adds its top-k and re-scoring, and the resident gallery answers
    batches over the whole gallery exactly in float32 instead; results are the same either way (both are exact)."""
    if dtype not in _BATCH_SCREEN_PAYS:
        with strict_matmul():
            low = gemm_flops(256, 1024, 8192, dtype, min_run_time=0.05)
            f32 = gemm_flops(256, 1024, 8192, torch.float32, min_run_time=0.05)
        _BATCH_SCREEN_PAYS[dtype] = low >= _BATCH_SCREEN_MIN_SPEEDUP * f32
        log.debug("batch screen in %s: %s (%.2f against %.2f TFLOP/s in float32)", dtype,
                  "used" if _BATCH_SCREEN_PAYS[dtype] else "skipped", low / 1e12, f32 / 1e12)  # fmt: skip
    return _BATCH_SCREEN_PAYS[dtype]


#: (screen dtype, d) -> whether one query's screen product runs as a matrix-vector product on this CPU (else as a
#: 1-row GEMM), chosen by timing both once per process (:func:`_one_query_by_mv`).
_ONE_QUERY_MV: dict[tuple[torch.dtype, int], bool] = {}


def _one_query_by_mv(xbs: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``torch.mv`` reads a database faster than a 1-row matrix product on this CPU, timed once per process
    on (up to) 32,768 of its rows, larger than the caches.  Which is faster depends on the CPU and torch's kernels:
    measured 5.8 against 9.6 GB/s for mv on one machine, 17.8 against 8.9 GB/s for the GEMM on another (avx512_bf16,
    no AMX).  Both accumulate in float32 and round once (the screen's bound holds for either)."""
    key = (xbs.dtype, xbs.shape[1])
    if key not in _ONE_QUERY_MV:
        sample = xbs[: min(len(xbs), 32768)]
        mv = seconds_per_call(lambda: torch.mv(sample, q), min_run_time=0.05, warmup=1)
        gemm = seconds_per_call(lambda: q[None] @ sample.T, min_run_time=0.05, warmup=1)
        _ONE_QUERY_MV[key] = mv <= gemm
        log.debug("one-query screen product: %s (mv %.2f ms, gemm %.2f ms on %d rows)",
                  "mv" if mv <= gemm else "gemm", 1e3 * mv, 1e3 * gemm, len(sample))  # fmt: skip
    return _ONE_QUERY_MV[key]


def _low_product(xqs: torch.Tensor, xbs: torch.Tensor) -> torch.Tensor:
    """The screen's product in its own precision, (m, n): top-k runs on it as is, with no float32 pass over it.
    One query on the CPU goes through whichever of a matrix-vector product and a 1-row GEMM reads the database
    faster here (:func:`_one_query_by_mv`); both accumulate in float32 and round once to the low precision (checked
    against float64: within the bound of :func:`_screened_tile`)."""
    if xqs.shape[0] == 1 and xqs.device.type == "cpu" and len(xbs) and _one_query_by_mv(xbs, xqs[0]):
        return torch.mv(xbs, xqs[0])[None]
    return xqs @ xbs.T


#: Rows gathered at a time for a subset's screen product on the CPU: the gathered block (2 MiB at d = 1024 in bf16)
#: stays in cache between its gather and its product, so the subset is read once from memory, not read, written
#: and read again.
_GATHER_ROWS = 1024


def _gathered_low(xqs: torch.Tensor, xbs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The screen's product of ``xqs`` with the rows ``rows`` of ``xbs``, (m, len(rows)), a cache-sized block of
    rows gathered at a time (each block through :func:`_low_product`, as a tile of gathered rows would be)."""
    out = torch.empty((xqs.shape[0], len(rows)), dtype=xbs.dtype, device=xbs.device)
    block = torch.empty((min(_GATHER_ROWS, len(rows)), xbs.shape[1]), dtype=xbs.dtype, device=xbs.device)
    for s in range(0, len(rows), _GATHER_ROWS):
        r = rows[s : s + _GATHER_ROWS]
        b = block[: len(r)]
        torch.index_select(xbs, 0, r, out=b)
        out[:, s : s + len(r)] = _low_product(xqs, b)
    return out


def _screened_tile(
    xq32: torch.Tensor,
    ids: torch.Tensor,
    xb32: torch.Tensor,
    k: int,
    screen: str,
    margin: int,
    floor: np.ndarray,
    xbs: torch.Tensor | None = None,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k of one tile via a low-precision screen + exact re-scoring; queries that fail the proof run exactly.

    floor: (m,) float32, the running global k-th score (a left-out item below it cannot enter the result anyway).
    xbs / norms: the tile in the screen's precision and its :func:`_tile_norms`, when kept resident (computed here
    otherwise).  keep: (n,) bool, only these items may be returned (the others score -inf).  rows: the positions of
    the tile's n items in ``xb32``, which is then a larger matrix read only at the re-scored candidates (a gathered
    subset needs no float32 copy); ids, xbs and keep are per item of the tile either way.  low: the screen's product
    of the tile, when already computed (:func:`_gathered_low`); then ``xbs`` is not read and ``norms`` must be given.
    Returns D (m, k) float32, I (m, k) int64, and the number of queries that fell back to the exact product."""
    n = xb32.shape[0] if rows is None else len(rows)

    def tile32(idx: torch.Tensor | None = None) -> torch.Tensor:
        """float32 rows of the tile's items ``idx`` (all when None)."""
        if rows is None:
            return xb32 if idx is None else xb32[idx]
        return xb32[rows if idx is None else rows[idx]]

    kk = min(k + margin, n)
    if kk >= n:
        return (*_topk_full_rows(_masked(_scores(xq32, tile32()), keep), ids, k), 0)
    dt = _TORCH_DTYPE[screen]
    xqs = xq32.to(dt)
    if low is None:
        if xbs is None:
            xbs = tile32().to(dt)
        low = _low_product(xqs, xbs)
    elif norms is None:
        raise ValueError("a precomputed screen product needs the database norms of the error bound")
    low = _masked(low, keep)
    vals, pos = torch.topk(low, kk, dim=1)
    vals = vals.float()
    # float32 re-scores of the candidates, (m, kk), by the same matrix product as the unscreened path (a batched
    # matrix-vector product rounds differently on some CPUs, and exact copies must tie whichever path scored them);
    # queries go in groups of _MIN_DIM so each group's candidate union stays small
    exact = torch.empty(pos.shape, dtype=torch.float32, device=pos.device)
    for g in range(0, len(pos), _MIN_DIM):
        union, inverse = torch.unique(pos[g : g + _MIN_DIM], return_inverse=True)
        exact[g : g + _MIN_DIM] = torch.gather(_scores(xq32[g : g + _MIN_DIM], tile32(union)), 1, inverse)
    if keep is not None:
        exact.masked_fill_(~keep[pos], -np.inf)
    D, I = _topk_full_rows_cand(exact, ids[pos], k)
    u_out = _UNIT_ROUNDOFF[screen]
    thresh = vals[:, -1]  # every left-out item has a low-precision score <= thresh
    if norms is None:
        assert xbs is not None, "the screen's rows were read above"
        norms = _tile_norms(tile32(), xbs)
    err = _screen_error(xq32, xqs, norms)
    bound = (thresh + thresh.abs() * (u_out / (1 - u_out)) + err).cpu().numpy()
    bar = np.maximum(D[:, k - 1], floor)
    # thresh = -inf: fewer than kk items pass, so every passing item is a candidate and nothing was left out
    fail = np.flatnonzero(~((bound < bar) | np.isneginf(thresh.cpu().numpy())))
    if len(fail):
        f = torch.as_tensor(fail, device=xq32.device)
        Df, If = _topk_full_rows(_masked(_scores(xq32[f], tile32()), keep), ids, k)
        D[fail], I[fail] = Df, If
    return D, I, len(fail)


def _topk_full_rows_cand(S: torch.Tensor, cand_ids: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of per-row candidate lists. S: (m, c) float32 scores of candidates cand_ids (m, c) int64."""
    return merge_topk(S.cpu().numpy(), cand_ids.cpu().numpy(), k)


@contextlib.contextmanager
def strict_matmul() -> Iterator[None]:
    """float32 products in full float32 (no TF32 / bf16 internal passes) and reduced-precision products reduced in
    float32 (no split-K partial sums rounded to bf16/fp16 on CUDA), so the exact path is exact and the screen's error
    bound holds; the previous global settings are restored on exit."""
    cuda = torch.backends.cuda.matmul
    saved = (torch.get_float32_matmul_precision(), cuda.allow_tf32, cuda.allow_bf16_reduced_precision_reduction,
             cuda.allow_fp16_reduced_precision_reduction)  # fmt: skip
    torch.set_float32_matmul_precision("highest")
    cuda.allow_tf32 = cuda.allow_bf16_reduced_precision_reduction = cuda.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        cuda.allow_tf32, cuda.allow_bf16_reduced_precision_reduction = saved[1], saved[2]
        cuda.allow_fp16_reduced_precision_reduction = saved[3]


def _torch_blocks(
    xq: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    device: str,
    tile_rows: int,
    screen: str,
    margin: int,
) -> tuple[np.ndarray, np.ndarray]:
    dev = torch.device(device)
    xq32 = torch.from_numpy(xq).to(dev)
    D = np.full((xq.shape[0], k), -np.inf, dtype=np.float32)
    I = np.full((xq.shape[0], k), -1, dtype=np.int64)
    fallbacks = 0
    with torch.inference_mode(), strict_matmul():
        for ids_np, xb_np in blocks:
            for s in range(0, len(ids_np), tile_rows):
                ids = torch.tensor(ids_np[s : s + tile_rows], dtype=torch.int64, device=dev)
                xb32 = torch.tensor(xb_np[s : s + tile_rows], device=dev).float()  # a copy: blocks may be read-only
                if screen == "none":
                    Dt, It = _topk_full_rows(_scores(xq32, xb32), ids, k)
                else:
                    Dt, It, nf = _screened_tile(xq32, ids, xb32, k, screen, margin, D[:, k - 1])
                    fallbacks += nf
                D, I = merge_topk(np.concatenate([D, Dt], 1), np.concatenate([I, It], 1), k)
    if screen != "none":
        log.debug("%s screen: %d query-tile pairs fell back to the exact product", screen, fallbacks)
    return D, I


class ResidentGallery:
    """Exact top-k over a gallery held in memory, by tiled torch products: the engine's path for flat indexes.

    ids: (nb,) int64; xb: (nb, d) float32, used in place on the CPU (e.g. a zero-copy view of a FAISS ``IndexFlat``'s
    storage; it must outlive this object) and copied once to a CUDA device.  screen: ``bf16`` / ``fp16`` keep a
    low-precision copy (nb x d x 2 bytes) that screens every tile; its candidates are re-scored in float32 and a query
    whose k-th score is not proven (:func:`_screen_error`, with the gallery-wide norms) is recomputed exactly, so the
    answer always equals the float32 search, ties by the smaller id; ``none`` multiplies in float32.

    ``search`` restricts the answer to ``rows`` (positions, gathered first: cheap when few pass) or to ``keep`` (a
    (nb,) bool mask applied to the scores: one pass over the gallery whatever the selectivity).  Results are (nq, k),
    padded with -inf / -1 when fewer than k items are eligible."""

    def __init__(
        self, ids: np.ndarray, xb: np.ndarray, device: str = "cpu", screen: str = "none", tile_rows: int = 65536,
        margin: int = 16,
    ) -> None:  # fmt: skip
        if screen not in SCREENS:
            raise ValueError(f"screen {screen!r} is not one of {', '.join(SCREENS)}")
        if xb.ndim != 2 or len(ids) != xb.shape[0]:
            raise ValueError(f"{len(ids)} ids for vectors of shape {xb.shape}")
        self.device, self.screen, self.tile_rows, self.margin = torch.device(device), screen, tile_rows, margin
        self.ids = torch.as_tensor(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        self.xb32 = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(self.device)
        self.xbs: torch.Tensor | None = None
        self.norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if screen != "none" and len(ids):
            self.xbs = torch.empty(self.xb32.shape, dtype=_TORCH_DTYPE[screen], device=self.device)
            parts = []
            for s in range(0, len(ids), tile_rows):  # tile by tile: no float32 temporary of the whole gallery
                self.xbs[s : s + tile_rows] = self.xb32[s : s + tile_rows]
                parts.append(_tile_norms(self.xb32[s : s + tile_rows], self.xbs[s : s + tile_rows]))
            self.norms = tuple(torch.stack(c).max() for c in zip(*parts, strict=True))  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        """Memory this object adds to the stored vectors (the screen's copy)."""
        return 0 if self.xbs is None else self.xbs.numel() * self.xbs.element_size()

    def search(
        self, xq: np.ndarray, k: int, rows: np.ndarray | None = None, keep: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """xq: (nq, d) float32 -> D (nq, k) float32 descending, I (nq, k) int64 ids; ``rows`` / ``keep`` restrict
        the eligible items (see the class doc)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if rows is not None and keep is not None:
            raise ValueError("pass rows or keep, not both")
        dev = self.device
        ids, xb32, xbs = self.ids, self.xb32, self.xbs
        if xbs is not None and rows is None and len(xq) > 1 and dev.type == "cpu" and not batch_screen_pays(xbs.dtype):
            # a full pass of a batch: the float32 product outruns the screen on this CPU, so search exactly, unscreened
            # (a subset keeps the screen: gathering its half-size rows in cache-sized blocks beats copying float32 ones)
            xbs = None
        r = None
        fused = False  # the subset's screen product gathers its rows block by block (no gathered copy)
        if rows is not None:  # gather the subset: only its low-precision rows when screened (float32 read in place)
            r = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=dev)
            ids = ids[r]
            if xbs is None:
                xb32 = torch.index_select(xb32, 0, r)  # 1.7x faster than xb32[r] here
            elif dev.type == "cpu" and self.norms is not None:
                fused = True
            else:
                xbs = torch.index_select(xbs, 0, r)
        keep_t = None if keep is None else torch.as_tensor(np.asarray(keep, dtype=bool), device=dev)
        nq = len(xq)
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if not len(ids) or not nq:
            return D, I
        xq32 = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(dev)
        fallbacks = 0
        with torch.inference_mode(), strict_matmul():
            for s in range(0, len(ids), self.tile_rows):
                e = s + self.tile_rows
                kt = None if keep_t is None else keep_t[s:e]
                if kt is not None and not bool(kt.any()):
                    continue
                if xbs is None:  # every tile has all the queries: unpadded (see _scores)
                    Dt, It = _topk_full_rows(_masked(_scores(xq32, xb32[s:e], pad_queries=False), kt), ids[s:e], k)
                elif r is None:
                    Dt, It, nf = _screened_tile(xq32, ids[s:e], xb32[s:e], k, self.screen, self.margin, D[:, k - 1],
                                                xbs=xbs[s:e], norms=self.norms, keep=kt)  # fmt: skip
                elif fused:
                    assert r is not None
                    low = _gathered_low(xq32.to(xbs.dtype), xbs, r[s:e])
                    Dt, It, nf = _screened_tile(xq32, ids[s:e], xb32, k, self.screen, self.margin, D[:, k - 1],
                                                norms=self.norms, rows=r[s:e], low=low)  # fmt: skip
                else:
                    Dt, It, nf = _screened_tile(xq32, ids[s:e], xb32, k, self.screen, self.margin, D[:, k - 1],
                                                xbs=xbs[s:e], norms=self.norms, rows=r[s:e])  # fmt: skip
                if xbs is not None:
                    fallbacks += nf
                D, I = merge_topk(np.concatenate([D, Dt], 1), np.concatenate([I, It], 1), k)
        if fallbacks:
            log.debug("%s screen: %d query-tile pairs fell back to the exact product", self.screen, fallbacks)
        I[np.isneginf(D)] = -1  # masked-out items that filled a short answer
        return D, I


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` -> ``faiss`` on CPU or with faiss GPU support, else ``torch``. Raises ValueError on bad names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device {device!r} is not cpu, cuda or cuda:N (resolve 'auto' at the edge)")
    if device.startswith("cuda") and not torch.cuda.is_available() and backend != "faiss":
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    if backend != "auto":
        if backend == "faiss" and device.startswith("cuda"):
            from facesearch.indexer.faiss_import import faiss

            if faiss.get_num_gpus() == 0:
                raise ValueError("backend 'faiss' on cuda needs faiss with GPU support (pip install faiss-gpu-cu12)")
        return backend
    if device == "cpu":
        return "faiss"
    from facesearch.indexer.faiss_import import faiss

    return "faiss" if faiss.get_num_gpus() > 0 else "torch"


def search_exact(
    xq: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    backend: str = "auto",
    device: str = "cpu",
    tile_rows: int = 16384,
    screen: str = "none",
    margin: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search of ``xq`` against a stream of database blocks.

    xq: (nq, d) float32 queries. blocks: iterable of ``(ids (n,) int64, xb (n, d) float32 or float16)``; a block may be
    empty. k >= 1. backend: auto | faiss | torch. device: cpu | cuda | cuda:N. tile_rows: database rows per product
    (memory ~ nq * tile_rows * 4 bytes). screen: none | bf16 | fp16 (torch only; exact results, see module doc).
    margin: extra candidates per query kept by the screen.
    Returns D (nq, k) float32 scores, descending, and I (nq, k) int64 ids; ties by smaller id; padding -inf / -1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if tile_rows < 1 or margin < 0:
        raise ValueError(f"tile_rows must be >= 1 and margin >= 0, got {tile_rows}, {margin}")
    if screen not in SCREENS:
        raise ValueError(f"screen {screen!r} is not one of {', '.join(SCREENS)}")
    backend = resolve_backend(backend, device)
    if screen != "none" and backend != "torch":
        raise ValueError(f"screen={screen!r} needs backend='torch' (FAISS flat search is float32 only)")
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if xq.ndim != 2:
        raise ValueError(f"xq must be (nq, d), got shape {xq.shape}")
    checked = _check_blocks(blocks, xq.shape[1])
    if backend == "torch":
        return _torch_blocks(xq, checked, k, device, tile_rows, screen, margin)
    D = np.full((xq.shape[0], k), -np.inf, dtype=np.float32)
    I = np.full((xq.shape[0], k), -1, dtype=np.int64)
    for ids, xb in checked:
        for s in range(0, len(ids), tile_rows):
            Db, Ib = _faiss_block(xq, ids[s : s + tile_rows], xb[s : s + tile_rows], k, device)
            D, I = merge_topk(np.concatenate([D, Db], 1), np.concatenate([I, Ib], 1), k)
    return D, I


def _check_blocks(blocks: Iterable[tuple[np.ndarray, np.ndarray]], d: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Validate shapes lazily and skip empty blocks."""
    for ids, xb in blocks:
        if xb.ndim != 2 or xb.shape[1] != d or len(ids) != xb.shape[0]:
            raise ValueError(f"block of {len(ids)} ids with xb shape {xb.shape} does not match d={d}")
        if len(ids):
            yield np.ascontiguousarray(ids, dtype=np.int64), xb


__all__ = [
    "BACKENDS",
    "SCREENS",
    "ResidentGallery",
    "merge_topk",
    "normalize_queries",
    "resolve_backend",
    "search_exact",
]
