"""Exact (brute-force) inner-product search over a stream of database blocks, behind one interface.

``search_exact(xq, blocks, k)`` streams ``(ids, xb)`` blocks, takes each block's top-k and merges it into a running
top-k, so memory is bounded by the block/tile size and never by ``nb``. Two back-ends compute the block scores:

- ``faiss``: ``faiss.IndexFlatIP`` per block (on the GPU when the installed faiss has GPU support and
  ``device="cuda"``);
- ``torch``: a tiled matrix product + ``torch.topk`` on CPU or CUDA. Optionally the tile product runs in bfloat16,
  float16 or int8 (``screen``, :mod:`facesearch.indexer.screen`) **only as a screen**: the top ``k + margin``
  candidates per query are re-scored exactly in float32, and the result is accepted only when the k-th exact score
  provably beats every item the screen left out (:func:`~facesearch.indexer.screen.screen_error`); otherwise every
  item that may still beat it is re-scored too. Results therefore equal the float32 search.

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
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facesearch.indexer.screen import (
    DEFAULT_MARGIN,
    DTYPES,
    SCREENS,
    UNIT_ROUNDOFF,
    Low,
    batch_screen_pays,
    check_screen,
    gathered_product,
    low_product,
    screen_error,
    tile_norms,
    to_low,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")


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


def _masked(S: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Scores of items outside ``keep`` (a (n,) bool mask over the columns) set to -inf, in place: a broadcast add
    of 0 / -inf (exact for finite scores; 10x faster than a broadcast masked fill on the CPU)."""
    if keep is None:
        return S
    return S.add_(torch.zeros(keep.shape, dtype=S.dtype, device=S.device).masked_fill_(~keep, -np.inf))


def _screened_tile(
    xq32: torch.Tensor,
    ids: torch.Tensor,
    xb32: torch.Tensor,
    k: int,
    screen: str,
    margin: int,
    floor: np.ndarray,
    xbs: Low | None = None,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
    qs: Low | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k of one tile via a low-precision screen + exact re-scoring; proven exact for every query.

    The top ``k + margin`` screened items of each query are re-scored in float32.  A query whose k-th exact score
    (or the running ``floor``) is not proven above every left-out item's bound gets a second pass: every item whose
    bound reaches it is re-scored (a few hundred at 1M rows with the int8 screen's wider bound); only when that is a
    large part of the tile does the query run through the exact product of the whole tile.

    floor: (m,) float32, the running global k-th score (a left-out item below it cannot enter the result anyway). xbs /
    norms: the tile in the screen's precision and its :func:`~facesearch.indexer.screen.tile_norms`, when kept resident
    (computed here otherwise).  keep: (n,) bool, only these items may be returned (the others score -inf). rows: the
    positions of the tile's n items in ``xb32``, which is then a larger matrix read only at the re-scored candidates (a
    gathered subset needs no float32 copy); ids, xbs and keep are per item of the tile either way. low: the screen's
    product of the tile, when already computed (:func:`~facesearch.indexer.screen.gathered_product`); then ``xbs`` is
    not read and ``norms`` must be given. qs: ``xq32`` in the screen's precision, when already made (once per search,
    not once per tile).  Returns D (m, k) float32, I (m, k) int64, and the number of queries that fell back to the whole
    tile's exact product."""
    n = xb32.shape[0] if rows is None else len(rows)

    def tile32(idx: torch.Tensor | None = None) -> torch.Tensor:
        """float32 rows of the tile's items ``idx`` (all when None)."""
        if rows is None:
            return xb32 if idx is None else xb32[idx]
        return xb32[rows if idx is None else rows[idx]]

    kk = min(k + margin, n)
    if kk >= n:
        return (*_topk_full_rows(_masked(_scores(xq32, tile32()), keep), ids, k), 0)
    qs = to_low(xq32, screen) if qs is None else qs
    if low is None:
        if xbs is None:
            xbs = to_low(tile32(), screen)
        low = low_product(qs, xbs)
    elif norms is None:
        raise ValueError("a precomputed screen product needs the database norms of the error bound")
    low = _masked(low, keep)
    vals, pos = _top_candidates(low, kk)
    vals = vals.float()
    D, I = _rescored(xq32, pos, tile32, ids, keep, k)
    grow = UNIT_ROUNDOFF[screen] / (1 - UNIT_ROUNDOFF[screen])  # a computed screen score -> its real value's bound
    thresh = vals[:, -1]  # every left-out item has a low-precision score <= thresh
    if norms is None:
        assert xbs is not None, "the screen's rows were read above"
        norms = tile_norms(tile32(), xbs)
    err = screen_error(xq32, qs, norms)
    bound = (thresh + thresh.abs() * grow + err).cpu().numpy()
    bar = np.maximum(D[:, k - 1], floor)
    # thresh = -inf: fewer than kk items pass, so every passing item is a candidate and nothing was left out
    fail = np.flatnonzero(~((bound < bar) | np.isneginf(thresh.cpu().numpy())))
    if not len(fail):
        return D, I, 0
    # Second pass, per failing query: every item whose bound reaches the bar (the others score < bar, strictly: they
    # cannot even tie); the whole tile when that is a large part of it
    whole = []
    for q in fail.tolist():
        row = low[q].float()
        cand = torch.nonzero((row + row.abs() * grow + err[q] >= float(bar[q])) & (row > -np.inf)).flatten()
        if len(cand) > max(4 * kk, n // 8):
            whole.append(q)
            continue
        D[q], I[q] = (a[0] for a in _topk_full_rows(_scores(xq32[q : q + 1], tile32(cand)), ids[cand], k))
    if whole:
        w = torch.as_tensor(whole, device=xq32.device)
        Df, If = _topk_full_rows(_masked(_scores(xq32[w], tile32()), keep), ids, k)
        D[whole], I[whole] = Df, If
    return D, I, len(whole)


#: Items per block of :func:`_top_candidates`.
_TOP_BLOCK = 1024


def _top_candidates(low: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(low, kk, dim=1)``'s values and positions, (m, kk).  One query's long row goes through the maxima
    of its blocks of :data:`_TOP_BLOCK` items first: the top kk items lie in the blocks whose maximum reaches the
    kk-th largest block maximum (at least kk items reach it, one per such block), so only those blocks' items are
    ranked (~4x faster on 1M items: one pass for the maxima, then ~kk blocks).  Ties at the kk-th value may pick
    other items of the same value than torch.topk would; the screen needs only the kk-th value and kk items at or
    above it."""
    m, n = low.shape
    if m != 1 or n < 64 * _TOP_BLOCK or low.device.type != "cpu":
        return torch.topk(low, kk, dim=1)
    row = low[0]
    full = n // _TOP_BLOCK
    peaks = row[: full * _TOP_BLOCK].view(full, _TOP_BLOCK).amax(dim=1)
    if n > full * _TOP_BLOCK:
        peaks = torch.cat([peaks, row[full * _TOP_BLOCK :].amax()[None]])
    reach = torch.topk(peaks, min(kk, len(peaks))).values[-1]
    blocks = torch.nonzero(peaks >= reach).flatten()
    pos = (blocks[:, None] * _TOP_BLOCK + torch.arange(_TOP_BLOCK)).flatten()
    pos = pos[pos < n]
    vals, at = torch.topk(row[pos], min(kk, len(pos)))
    return vals[None], pos[at][None]


def _rescored(
    xq32: torch.Tensor,
    pos: torch.Tensor,
    tile32: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    keep: torch.Tensor | None,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query's candidates ``pos`` (m, c) (tile positions), re-scored in float32 by the same matrix
    product as the unscreened path (a batched matrix-vector product rounds differently on some CPUs, and exact
    copies must tie whichever path scored them); queries go in groups of _MIN_DIM so each group's candidate union
    stays small.  Candidates outside ``keep`` score -inf."""
    exact = torch.empty(pos.shape, dtype=torch.float32, device=pos.device)
    for g in range(0, len(pos), _MIN_DIM):
        union, inverse = torch.unique(pos[g : g + _MIN_DIM], return_inverse=True)
        exact[g : g + _MIN_DIM] = torch.gather(_scores(xq32[g : g + _MIN_DIM], tile32(union)), 1, inverse)
    if keep is not None:
        exact.masked_fill_(~keep[pos], -np.inf)
    return _topk_full_rows_cand(exact, ids[pos], k)


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
    low-precision copy (nb x d x 2 bytes), ``int8`` (CPU only) one of nb x (d + 4) bytes (:mod:`.screen`), that
    screens every tile; its candidates are re-scored in float32 and a query whose k-th score is not proven
    (:func:`~facesearch.indexer.screen.screen_error`, with the gallery-wide norms) re-scores every item that may
    still beat it, so the answer always equals the float32 search, ties by the smaller id; ``none`` multiplies in
    float32.

    ``search`` restricts the answer to ``rows`` (positions, gathered first: cheap when few pass) or to ``keep`` (a
    (nb,) bool mask applied to the scores: one pass over the gallery whatever the selectivity).  Results are (nq, k),
    padded with -inf / -1 when fewer than k items are eligible."""

    def __init__(
        self, ids: np.ndarray, xb: np.ndarray, device: str = "cpu", screen: str = "none", tile_rows: int = 65536,
        margin: int | None = None,
    ) -> None:  # fmt: skip
        if xb.ndim != 2 or len(ids) != xb.shape[0]:
            raise ValueError(f"{len(ids)} ids for vectors of shape {xb.shape}")
        check_screen(screen, torch.device(device), xb.shape[1])
        self.device, self.screen, self.tile_rows = torch.device(device), screen, tile_rows
        self.margin = DEFAULT_MARGIN.get(screen, 0) if margin is None else margin
        self.ids = torch.as_tensor(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        self.xb32 = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(self.device)
        self.xbs: Low | None = None
        self.norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if screen != "none" and len(ids):
            values = torch.empty(self.xb32.shape, dtype=DTYPES[screen], device=self.device)
            scale = torch.empty(len(ids), device=self.device) if screen == "int8" else None
            self.xbs = Low(values, scale)
            parts = []
            for s in range(0, len(ids), tile_rows):  # tile by tile: no float32 temporary of the whole gallery
                tile = to_low(self.xb32[s : s + tile_rows], screen)
                values[s : s + tile_rows] = tile.values
                if scale is not None and tile.scale is not None:
                    scale[s : s + tile_rows] = tile.scale
                parts.append(tile_norms(self.xb32[s : s + tile_rows], tile))
            self.norms = tuple(torch.stack(c).max() for c in zip(*parts, strict=True))  # type: ignore[assignment]
            if self.device.type == "cpu":
                batch_screen_pays(values.dtype)  # timed once per process here, at load, not inside a first query

    @property
    def nbytes(self) -> int:
        """Memory this object adds to the stored vectors (the screen's copy)."""
        return 0 if self.xbs is None else self.xbs.nbytes

    def gather(self, rows: np.ndarray) -> GallerySubset:
        """``rows`` (positions) with their screen rows gathered once, for repeated :meth:`search` es over them."""
        r = _positions(rows, self.device)
        return GallerySubset(self, r, None if self.xbs is None else self.xbs.select(r))

    def search(
        self, xq: np.ndarray, k: int, rows: np.ndarray | GallerySubset | None = None, keep: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """xq: (nq, d) float32 -> D (nq, k) float32 descending, I (nq, k) int64 ids; ``rows`` / ``keep`` restrict
        the eligible items (see the class doc); ``rows`` may be a :meth:`gather` ed subset."""
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
        gathered = None
        if isinstance(rows, GallerySubset):
            if rows.gallery is not self:
                raise ValueError("a gathered subset searches only the gallery that gathered it")
            r, gathered = rows.positions, rows.low
        elif rows is not None:
            r = _positions(rows, dev)
        if r is not None:  # the subset: only its low-precision rows when screened (float32 read in place)
            ids = ids[r]
            if xbs is None:
                xb32 = torch.index_select(xb32, 0, r)  # 1.7x faster than xb32[r] here
            elif gathered is not None:  # gathered once, contiguous: read as a stream
                xbs = gathered
            elif dev.type == "cpu" and self.norms is not None:
                fused = True
            else:
                xbs = xbs.select(r)
        keep_t = None if keep is None else torch.as_tensor(np.asarray(keep, dtype=bool), device=dev)
        nq = len(xq)
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if not len(ids) or not nq:
            return D, I
        xq32 = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(dev)
        fallbacks = 0
        # a tile's scores are (nq, tile) floats: few queries take longer tiles (one query: 64 x tile_rows rows), so
        # its per-tile steps (top-k, re-scoring, merge) run a few times, not once per 65,536 rows
        tile = self.tile_rows * max(1, _MIN_DIM // nq)
        qs = None if xbs is None else to_low(xq32, self.screen)  # the queries in the screen's precision, once
        with torch.inference_mode(), strict_matmul():
            for s in range(0, len(ids), tile):
                e = s + tile
                kt = None if keep_t is None else keep_t[s:e]
                if kt is not None and not bool(kt.any()):
                    continue
                if xbs is None:  # every tile has all the queries: unpadded (see _scores)
                    Dt, It = _topk_full_rows(_masked(_scores(xq32, xb32[s:e], pad_queries=False), kt), ids[s:e], k)
                elif r is None:
                    Dt, It, nf = _screened_tile(xq32, ids[s:e], xb32[s:e], k, self.screen, self.margin, D[:, k - 1],
                                                xbs=xbs[s:e], norms=self.norms, keep=kt, qs=qs)  # fmt: skip
                elif fused:
                    assert r is not None and qs is not None
                    low = gathered_product(qs, xbs, r[s:e])
                    Dt, It, nf = _screened_tile(xq32, ids[s:e], xb32, k, self.screen, self.margin, D[:, k - 1],
                                                norms=self.norms, rows=r[s:e], low=low, qs=qs)  # fmt: skip
                else:
                    Dt, It, nf = _screened_tile(xq32, ids[s:e], xb32, k, self.screen, self.margin, D[:, k - 1],
                                                xbs=xbs[s:e], norms=self.norms, rows=r[s:e], qs=qs)  # fmt: skip
                if xbs is not None:
                    fallbacks += nf
                D, I = merge_topk(np.concatenate([D, Dt], 1), np.concatenate([I, It], 1), k)
        if fallbacks:
            log.debug("%s screen: %d query-tile pairs fell back to the exact product", self.screen, fallbacks)
        I[np.isneginf(D)] = -1  # masked-out items that filled a short answer
        return D, I


def _positions(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Row positions as an int64 tensor on ``device`` (a view where possible)."""
    with warnings.catch_warnings():  # read-only positions (an engine's kept selection): only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)


@dataclass(frozen=True)
class GallerySubset:
    """Rows of a :class:`ResidentGallery` with their screen copy gathered once into one contiguous block
    (:meth:`ResidentGallery.gather`): searching them again streams that block instead of gathering the rows anew (a
    10 % subset of 1M rows: ~100 MB of 1 KB rows read at random, 4-5 ms a query here)."""

    gallery: ResidentGallery
    positions: torch.Tensor  # (n,) int64, the rows' positions in the gallery
    low: Low | None  # their screen rows (None: no screen, the float32 rows are gathered per search)

    @property
    def nbytes(self) -> int:
        return 8 * len(self.positions) + (0 if self.low is None else self.low.nbytes)


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
    margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search of ``xq`` against a stream of database blocks.

    xq: (nq, d) float32 queries. blocks: iterable of ``(ids (n,) int64, xb (n, d) float32 or float16)``; a block may be
    empty. k >= 1. backend: auto | faiss | torch. device: cpu | cuda | cuda:N. tile_rows: database rows per product
    (memory ~ nq * tile_rows * 4 bytes). screen: none | bf16 | fp16 (torch only; exact results, see module doc).
    margin: extra candidates per query kept by the screen (None: the screen's
    :data:`~facesearch.indexer.screen.DEFAULT_MARGIN`).
    Returns D (nq, k) float32 scores, descending, and I (nq, k) int64 ids; ties by smaller id; padding -inf / -1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    margin = DEFAULT_MARGIN.get(screen, 0) if margin is None else margin
    if tile_rows < 1 or margin < 0:
        raise ValueError(f"tile_rows must be >= 1 and margin >= 0, got {tile_rows}, {margin}")
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if xq.ndim != 2:
        raise ValueError(f"xq must be (nq, d), got shape {xq.shape}")
    check_screen(screen, torch.device(device.split(":")[0]), xq.shape[1])
    backend = resolve_backend(backend, device)
    if screen != "none" and backend != "torch":
        raise ValueError(f"screen={screen!r} needs backend='torch' (FAISS flat search is float32 only)")
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
    "GallerySubset",
    "ResidentGallery",
    "merge_topk",
    "normalize_queries",
    "resolve_backend",
    "search_exact",
]
