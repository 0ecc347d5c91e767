"""What a loaded index must agree with, and what is stored in it: the checks
:func:`facesearch.indexer.index.load_index` runs at every open, the full scan of ``verify``, and access to the stored
ids and vectors by id.

At open (cheap: a few passes over the ids, no pass over the vectors): the FAISS file's own header (kind, d, metric,
nlist / PQ shape, ntotal) must match ``index_info.json``; the attribute table must have its id / path / identity
columns, as many rows as the index vectors, unique ids, and exactly the index's id set.  Full (``verify``): every
stored vector (flat, HNSW, IVF-flat) or every codebook and coarse centroid (IVF-PQ, whose codes are bytes) finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facesearch.indexer import shards
from facesearch.indexer.faiss_import import faiss

METRICS = {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}
_SCAN_ROWS = 65536


def inner_index(index: Any) -> Any:
    """The index an ``IndexIDMap2`` wraps (flat, HNSW), or ``index`` itself (IVF)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def index_kind(index: Any) -> str:
    """flat | hnsw | ivf-flat | ivf-pq, from the FAISS classes (``?`` for anything else)."""
    inner = inner_index(index)
    if isinstance(index, faiss.IndexIDMap2) and isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIDMap2) and isinstance(inner, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivf-pq"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf-flat"
    return f"? ({type(index).__name__})"


def _flat_storage(index: Any) -> np.ndarray | None:
    """(ntotal, d) float32 view of the vectors of a flat or HNSW index (row i = id_map[i]); None for IVF."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    if not isinstance(inner, faiss.IndexFlat):
        return None
    n, d = int(inner.ntotal), int(inner.d)
    return faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)


def _invlist(invlists: Any, lno: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes) of inverted list ``lno`` (FAISS's contrib helper, imported after :mod:`faiss_import`)."""
    from faiss.contrib.inspect_tools import get_invlist as _get

    return _get(invlists, lno)  # type: ignore[no-any-return]


def _ivf_lists(index: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, list numbers, offsets) of every vector of an IVF index."""
    ids, lists, offsets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lno in range(int(index.nlist)):
        n = int(index.invlists.list_size(lno))
        if n:
            ids.append(_invlist(index.invlists, lno)[0].astype(np.int64))
            lists.append(np.full(n, lno, np.int64))
            offsets.append(np.arange(n, dtype=np.int64))
    return np.concatenate(ids), np.concatenate(lists), np.concatenate(offsets)


def stored_ids(index: Any) -> np.ndarray:
    """Every id the index holds, int64 (flat / HNSW: in storage order; IVF: list by list)."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    if isinstance(index, faiss.IndexIVF):
        return _ivf_lists(index)[0]
    raise ValueError(f"unsupported FAISS index type {type(index).__name__}")


class StoredVectors:
    """The vectors an index holds for given ids, as the index stores them (IVF-PQ: decoded), and new vectors as
    the index would store them (:meth:`as_stored`), so that "is this the row already indexed" compares like with
    like.  Built once from the index as it is; later additions are not seen."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.where: tuple[np.ndarray, np.ndarray] | None = None
        if _flat_storage(index) is not None:
            self.ids = stored_ids(index)  # flat / HNSW: row i of the storage holds id_map[i], and adds append
        else:
            self.ids, lists, offsets = _ivf_lists(index)  # IVF: (list, offset) of each id; adds append to lists
            self.where = (lists, offsets)
        self.order = np.argsort(self.ids, kind="stable")

    def get(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 ids, all held -> (n, d) float32."""
        pos = self.order[np.searchsorted(self.ids, ids, sorter=self.order)]
        assert np.array_equal(self.ids[pos], ids), "StoredVectors.get: an id is not in the index"
        if self.where is None:  # a fresh view: an add since __init__ may have moved the storage
            xb = _flat_storage(self.index)
            assert xb is not None, "flat or HNSW storage"
            return np.array(xb[pos], np.float32)
        assert self.where is not None, "IVF lookups are built in __init__"
        lists, offsets = self.where
        out = np.zeros((len(ids), int(self.index.d)), np.float32)
        for r, p in enumerate(pos):
            self.index.reconstruct_from_offset(int(lists[p]), int(offsets[p]), faiss.swig_ptr(out[r]))
        return out

    def as_stored(self, xb: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(xb, dtype=np.float32)
        return self.index.sa_decode(self.index.sa_encode(x)) if isinstance(self.index, faiss.IndexIVFPQ) else x


def check_consistency(index: Any, attrs: pa.Table, info: Any, files_dir: Path) -> np.ndarray:
    """Raise a one-line ``ValueError`` naming the file when the FAISS header, the attribute table and ``info``
    (an :class:`facesearch.indexer.index.IndexInfo`) disagree; returns the attribute table's ids (nb,) int64."""
    where, table, info_file = files_dir / "index.faiss", files_dir / "attributes.parquet", files_dir / "index_info.json"
    kind, metric = index_kind(index), METRICS.get(int(index.metric_type), str(index.metric_type))
    for what, have, said in (("kind", kind, info.kind), ("d", int(index.d), info.d), ("metric", metric, info.metric)):
        if have != said:
            raise ValueError(f"{where} holds a {kind} index with d={index.d}, metric {metric}, but {info_file} says "
                             f"{what} {said}: the files do not belong together")  # fmt: skip
    if isinstance(index, faiss.IndexIVF):
        shape = {"nlist": int(index.nlist)}
        if isinstance(index, faiss.IndexIVFPQ):
            shape.update(m=int(index.pq.M), nbits=int(index.pq.nbits))
        for name, have_value in shape.items():
            if int(info.config.get(name, have_value)) != have_value:
                raise ValueError(f"{where} has {name}={have_value} but {info_file} says {info.config[name]}")
    if attrs.num_rows != index.ntotal or info.nb != index.ntotal:
        raise ValueError(f"{files_dir}: index.faiss holds {index.ntotal} vectors but attributes.parquet has "
                         f"{attrs.num_rows} rows and index_info.json says nb={info.nb}")  # fmt: skip
    missing = [c for c in ("id", "path", "identity") if c not in attrs.column_names]
    if missing:
        raise ValueError(f"{table} lacks the column(s) {missing}: it is not an attribute table of an index")
    if not pa.types.is_integer(attrs.schema.field("id").type):
        raise ValueError(f"{table}: the id column is {attrs.schema.field('id').type}, not int64")
    if attrs.column("id").null_count:
        raise ValueError(f"{table}: {attrs.column('id').null_count} row(s) have no id")
    ids = attrs.column("id").to_numpy().astype(np.int64)
    held = stored_ids(index)
    if not np.array_equal(ids, held):  # same order is the rule (both are appended and filtered together)
        a, b = np.sort(ids), np.sort(held)
        dup = a[1:][a[1:] == a[:-1]]
        if len(dup):
            raise ValueError(f"{table} lists id {int(dup[0])} twice ({len(dup)} repeated id(s))")
        if not np.array_equal(a, b):
            odd = np.setdiff1d(a, b)
            odd = odd if len(odd) else np.setdiff1d(b, a)
            raise ValueError(f"{table} and {where} hold different ids (e.g. {int(odd[0])}; {len(odd)} differ): the "
                             "files do not belong together")  # fmt: skip
    elif len(ids) > 1 and len(pc.unique(attrs.column("id"))) != len(ids):
        raise ValueError(f"{table} lists some id twice: the index is damaged")
    return ids


def check_shards(shards_dir: Path) -> None:
    """Refuse a shard directory whose files differ from its manifest (size, SHA-256, rows), naming the first."""
    problems = shards.verify_shards(shards_dir)
    if problems:
        more = f" (and {len(problems) - 1} more damaged shard(s))" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}; refusing to index it: re-create the shards with facesearch embed")


def check_block_finite(b: shards.Block, manifest: shards.Manifest, shards_dir: Path) -> None:
    """Refuse a block with a NaN / inf embedding, naming the shard file and the row id."""
    if np.isfinite(b.xb.sum(dtype=np.float64)):  # one reduction; the row scan only when it trips
        return
    rows = np.flatnonzero(~np.isfinite(b.xb).all(axis=1))
    bad = int(b.ids[rows[0]])
    entry = next((e for e in manifest.shards if e.id_lo <= bad < e.id_hi), None)
    where = shards_dir / entry.file if entry is not None else shards_dir
    raise ValueError(f"{where}: the embedding of row id {bad} has NaN or infinite values ({len(rows)} such row(s) "
                     "in this block); refusing to index it: re-create the shards with facesearch embed")  # fmt: skip


def _first_bad(x: np.ndarray) -> int | None:
    """Row of the first non-finite value in (n, d) float32, scanning in blocks (None when all are finite)."""
    for lo in range(0, len(x), _SCAN_ROWS):
        block = x[lo : lo + _SCAN_ROWS]
        if not np.isfinite(block.sum(dtype=np.float64)):
            rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
            return lo + int(rows[0]) if len(rows) else lo  # a float64 overflow of finite values: report the block
    return None


def check_finite(index: Any, where: Path) -> None:
    """``ValueError`` naming the id (or the codebook) when a stored vector holds NaN or inf."""
    xb = _flat_storage(index)
    if xb is not None:
        bad = _first_bad(xb)
        if bad is not None:
            raise ValueError(f"{where}: the stored vector of id {int(stored_ids(index)[bad])} has NaN or infinite "
                             "values: the index is damaged")  # fmt: skip
        return
    coarse = _flat_storage(faiss.downcast_index(index.quantizer))
    parts: list[tuple[str, np.ndarray]] = [("coarse centroids", coarse if coarse is not None else np.zeros((0, 1)))]
    if isinstance(index, faiss.IndexIVFPQ):
        parts.append(("PQ codebooks", faiss.vector_to_array(index.pq.centroids).reshape(1, -1)))
    for what, x in parts:
        if _first_bad(x) is not None:
            raise ValueError(f"{where}: the {what} hold NaN or infinite values: the index is damaged")
    if isinstance(index, faiss.IndexIVFFlat):
        invlists: Any = index.invlists
        for lno in range(int(index.nlist)):
            if invlists.list_size(lno):
                ids, codes = _invlist(invlists, lno)
                bad = _first_bad(codes.view(np.float32).reshape(len(ids), int(index.d)))
                if bad is not None:
                    raise ValueError(f"{where}: the stored vector of id {int(ids[bad])} has NaN or infinite "
                                     "values: the index is damaged")  # fmt: skip


__all__ = [
    "METRICS",
    "StoredVectors",
    "check_block_finite",
    "check_consistency",
    "check_finite",
    "check_shards",
    "index_kind",
    "inner_index",
    "stored_ids",
]
