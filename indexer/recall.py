"""Recall of an index against exact search, counted up to ties.

A returned id is a hit when its exact score reaches the reference's k-th score: recall@k = mean over queries of
|{index top-k ids whose exact score >= (exact k-th score) - tol}| / k.  Comparing id sets instead would count a tie
broken the other way as a miss: FAISS returns equal scores largest id first, the exact search smallest id first, so
on a gallery with duplicate rows an exact index measured recall@1 = 0.

- *exact score*: recomputed in float64 from the stored vectors, for every returned id (one extra pass over the shard
  stream, shared with the exact search); so exact duplicates have bit-identical scores.
- *exact k-th score*: the k-th score of :func:`facesearch.indexer.search.search_exact`, which FAISS computes in float32.
- *tol*: :func:`tie_tolerance`, three float32 dot-product error bounds: the reference's k-th score and the scores the
  index ranked by may each be off by one bound (``gamma_d |q| max|x|``), so an exact index, whatever its summation
  order, always measures 1.0, while an approximate index is credited only for an id within ~1e-4 (d = 1024) of the
  k-th score, far below the gaps between real neighbours.
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.indexer import shards

_UNIT_ROUNDOFF_F32 = 2.0**-24

DEFINITION = (
    "query's own id removed from both lists; recall@k = mean over queries of |{index top-k ids whose exact score "
    ">= exact k-th score - tie_tolerance}| / k: ties (equal or duplicate rows) count whatever their order; exact "
    "scores recomputed in float64 from the stored vectors; tie_tolerance = 3 gamma_d |q| max|x|, gamma_d = d u / "
    "(1 - d u), u = 2^-24 (float32 rounding of the two searches; the largest over the queries is stored)"
)


def tie_tolerance(d: int, q_norms: np.ndarray, x_norm_max: float) -> np.ndarray:
    """Per-query tolerance, three float32 dot-product error bounds (Higham's ``gamma_d |q| |x|``).

    q_norms: (nq,) query L2 norms; x_norm_max: the largest database norm.  Returns (nq,) float64."""
    du = d * _UNIT_ROUNDOFF_F32
    gamma = du / (1 - du)
    return 3 * gamma * np.asarray(q_norms, np.float64) * float(x_norm_max)


def recall_up_to_ties(S_found: np.ndarray, kth: np.ndarray, k: int, tol: np.ndarray | float = 0.0) -> float:
    """Mean over queries of |{j < k: S_found[q, j] >= kth[q] - tol[q]}| / k (NaN when there are no queries).

    S_found: (nq, >= k) exact scores of the index's returned ids (NaN for a -1 id); kth: (nq,) exact k-th score of
    the reference list; tol: scalar or (nq,)."""
    if len(S_found) == 0:
        return float("nan")
    floor = np.asarray(kth, np.float64) - np.asarray(tol, np.float64)
    with np.errstate(invalid="ignore"):  # NaN compares False: a -1 id is never a hit
        hits = np.sum(S_found[:, :k] >= np.broadcast_to(floor, (len(S_found),))[:, None], axis=1)
    return float(np.mean(hits / k))


def recall_at(I_true: np.ndarray, I_found: np.ndarray, k: int) -> float:
    """Mean |true top-k ∩ found top-k| / k by ids alone (-1 ids ignored): for data without tied scores (a tie broken
    the other way counts as a miss; :func:`recall_up_to_ties` counts it)."""
    hits = [len(set(t[:k][t[:k] >= 0]) & set(f[:k][f[:k] >= 0])) for t, f in zip(I_true, I_found, strict=True)]
    return float(np.mean(hits) / k) if len(hits) else float("nan")


def drop_self(I: np.ndarray, q_ids: np.ndarray, k: int, *others: np.ndarray) -> list[np.ndarray]:
    """Remove each query's own id from its row and keep the first k, in ``I`` (nq, > k) int64 and in the arrays of
    the same shape in ``others`` (its scores).  Returns [I (nq, k), *others (nq, k)]."""
    first = np.argsort(I == q_ids[:, None], axis=1, kind="stable")[:, :k]  # stable: the others keep their order
    return [np.take_along_axis(a, first, 1) for a in (I, *others)]


class _PairScores:
    """Pass-through of a block stream that also computes, in float64, the score of every (query, id) pair of ``I``
    whose id goes by, and the largest database norm."""

    def __init__(self, xq: np.ndarray, I: np.ndarray) -> None:
        self.xq, self.I = np.asarray(xq, np.float64), I
        self.S = np.full(I.shape, np.nan)
        self.x_norm_max = 0.0

    def tap(self, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        flat_I, flat_S = self.I.reshape(-1), self.S.reshape(-1)
        q_of = np.repeat(np.arange(len(self.I)), self.I.shape[1])
        for ids, xb in blocks:
            if len(ids):
                norms = np.sqrt(np.einsum("ij,ij->i", xb, xb))  # float32: no float64 copy of the block
                self.x_norm_max = max(self.x_norm_max, float(norms.max()))
                order = np.argsort(ids)
                pos = np.minimum(np.searchsorted(ids, flat_I, sorter=order), len(ids) - 1)
                hit = np.flatnonzero((flat_I >= 0) & (ids[order[pos]] == flat_I))
                rows = np.asarray(xb[order[pos[hit]]], np.float64)
                flat_S[hit] = np.einsum("ij,ij->i", self.xq[q_of[hit]], rows)
            yield ids, xb
        self.S = flat_S.reshape(self.I.shape)


def measure_recall(
    index: Any, shards_dir: Path, xq: np.ndarray, q_ids: np.ndarray, block_rows: int, id_offset: int = 0
) -> dict[str, Any]:
    """recall@1 and recall@k (k = min(10, ntotal - 1)) of ``index`` on the queries ``xq`` (nq, d) float32 with
    index ids ``q_ids`` (nq,) int64 drawn from the shards, counted up to ties (module doc) against exact search over
    them; ``id_offset``: index id = shard id + ``id_offset``."""
    from facesearch.indexer.search import search_exact  # torch: imported only when a recall is measured

    if len(q_ids) == 0:
        return {"queries": 0}
    k = min(10, int(index.ntotal) - 1)
    if k < 1:
        return {"queries": 0}
    t0 = time.perf_counter()
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    _, I_found = index.search(xq, k + 1)
    pairs = _PairScores(xq, I_found.astype(np.int64))
    stream = shards.iter_shards(shards_dir, block_rows=block_rows, columns=[])
    blocks = pairs.tap((b.ids + id_offset, b.xb) for b in stream)
    D_true, I_true = search_exact(xq, blocks, k + 1, backend="faiss")
    _, D_true = drop_self(I_true, q_ids, k, D_true)
    _, S_found = drop_self(I_found.astype(np.int64), q_ids, k, pairs.S)
    tol = tie_tolerance(xq.shape[1], np.linalg.norm(xq.astype(np.float64), axis=1), pairs.x_norm_max)
    return {
        "queries": len(q_ids),
        "recall@1": recall_up_to_ties(S_found, D_true[:, 0], 1, tol),
        f"recall@{k}": recall_up_to_ties(S_found, D_true[:, k - 1], k, tol),
        "definition": DEFINITION,
        "tie_tolerance": float(tol.max()),
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["DEFINITION", "drop_self", "measure_recall", "recall_at", "recall_up_to_ties", "tie_tolerance"]
