"""Query inputs and result tables: what ``facesearch search`` reads and writes, usable without a terminal.

Queries come as embeddings (:func:`read_query_embeddings`: a ``.npy`` (nq, d) array, a Parquet file with an
``embedding`` column, or a shard directory), as images (:func:`query_images`, embedded by
:meth:`facesearch.engine.search.SearchEngine.embed_images`) or as gallery ids (:func:`parse_ids`,
:func:`id_queries`: each query is the id's stored vector).  Answers become one row per hit
(:func:`results_table`) or one JSON-ready record per query (:func:`results_records`).

Every reader raises ``ValueError`` naming the input (the file, the row) for bad data, before any index is loaded.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facesearch.engine.search import QueryResult, SearchEngine
from facesearch.indexer import shards
from facesearch.indexer.inputs import walk_images
from facesearch.indexer.search import normalize_queries
from facesearch.model.faces.datasets import IMAGE_SUFFIXES

#: The fixed columns of :func:`results_table` (attribute columns follow them).
RESULT_COLUMNS = ("query", "rank", "id", "path", "identity", "score")


def read_query_embeddings(path: Path) -> tuple[np.ndarray, list[str]]:
    """Query embeddings and a name per row from ``path``: a ``.npy`` (nq, d) array of real numbers (rows named
    ``<file>[i]``), a ``.parquet`` file with an ``embedding`` column of number lists (named by its ``path`` column,
    else by row number), or a shard directory (named by path).

    Returns ``(x, names)``: x (nq, d) in its stored precision (the search scales rows before rounding them to
    float32; a null Parquet row becomes NaN, which :func:`prepare_queries` refuses by row).  A file that cannot be
    read as one of these, or that holds no rows, is a ``ValueError`` naming it."""
    path = Path(path)
    if path.is_dir():
        block = shards.read_all(path, columns=["path"])
        x, names = block.xb, [str(p) for p in block.meta.column("path").to_pylist()]
    elif path.suffix == ".npy":
        x, names = _read_npy(path)
    elif path.suffix == ".parquet":
        x, names = _read_parquet(path)
    else:
        raise ValueError(f"{path}: embeddings must be .npy, .parquet or a shard directory")
    if not len(x):
        raise ValueError(f"{path} holds no query rows")
    return x, names


def _read_npy(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:  # numpy's errors do not name the file
        raise ValueError(f"{path}: not a readable .npy array of numbers ({_reason(e)})") from e
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not _real(x.dtype):
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{path}: expected an (n, d) array of real embeddings, got {what}")
    return x, [f"{path.name}[{i}]" for i in range(len(x))]


def _real(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))


def _read_parquet(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid says "Parquet magic bytes not found", not which file
        raise ValueError(f"{path}: not a readable Parquet file ({_reason(e)})") from e
    if "embedding" not in table.column_names:
        raise ValueError(f"{path}: no 'embedding' column (have {table.column_names})")
    column = table.column("embedding")
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):  # fmt: skip
        raise ValueError(f"{path}: the 'embedding' column must hold a list of numbers per row, got {column.type}")
    rows = column.to_pylist()
    d = max((len(r) for r in rows if r is not None), default=0)
    try:
        x = np.asarray([[np.nan] * d if r is None else r for r in rows], dtype=np.float64).reshape(len(rows), d)
    except (ValueError, TypeError):
        raise ValueError(f"{path}: the 'embedding' rows must all hold {d} numbers") from None
    names = table.column("path").to_pylist() if "path" in table.column_names else range(len(x))
    return x, [str(n) for n in names]


def _reason(e: BaseException) -> str:
    """An error in one line: an ``OSError`` as ``<file>: <reason>``, anything else as its text."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 is not None else "")
    else:
        text = str(e)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def prepare_queries(x: np.ndarray, d: int, source: str | Path) -> np.ndarray:
    """Query rows checked against an index of dimension ``d`` and L2-normalised, as the search itself does, so that
    a bad row is reported with its ``source`` (the file it came from).

    x: (nq, d) real -> (nq, d) float32, C-contiguous.  A wrong d, or a row with NaN or infinite values or all zeros,
    is a ``ValueError`` naming ``source`` (and the row)."""
    if x.shape[1] != d:
        raise ValueError(f"{source}: queries have d={x.shape[1]} but the index holds d={d}")
    try:
        return normalize_queries(x)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def query_images(path: Path) -> list[Path]:
    """The probe images at ``path``: the file itself, or every image file under a folder (sorted, recursive).  A file
    that is not an image, or a folder without any, is a ``ValueError`` naming it and the image suffixes."""
    path = Path(path)
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path}: not an image file (suffixes {suffixes})")
        return [path]
    files = walk_images(path)
    if not files:
        raise ValueError(f"{path}: no image files in this folder (suffixes {suffixes})")
    return files


def parse_ids(text: str) -> list[int]:
    """Comma-separated gallery ids (``"5, 77"`` -> ``[5, 77]``); anything else (an empty item, a non-integer) is a
    ``ValueError`` quoting ``text``."""
    tokens = [t.strip() for t in text.split(",")]
    try:
        if not all(tokens):
            raise ValueError("empty id")
        return [int(t) for t in tokens]
    except ValueError:
        raise ValueError(f"expected comma-separated integer ids such as 5,77, got {text!r}") from None


def id_queries(engine: SearchEngine, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Queries "by id": each id's stored vector, with its stored attributes for the soft mode.

    Returns ``(xq, probe_attributes, names)`` as :meth:`SearchEngine.embed_images` does: xq (nq, d) float32,
    probe_attributes (nq, len(engine.attribute_names)) float32, names ``"id <id>"``.  An id that is not in the index
    is an :class:`facesearch.engine.search.UnknownIdError` (a ``ValueError``) naming it."""
    rows = engine.rows(ids)
    xq, names = engine.vectors(ids), [f"id {i}" for i in ids]
    probe_attributes = np.stack([engine.columns[a][rows] for a in engine.attribute_names], axis=1)
    return xq, probe_attributes, names


def results_table(names: Sequence[str], results: Sequence[QueryResult]) -> pa.Table:
    """One row per hit: :data:`RESULT_COLUMNS` (query name, rank from 1, gallery id, path, identity, score), then one
    column per attribute of the hits.  ``names`` and ``results`` pair up one to one (a ``ValueError`` otherwise)."""
    cols: dict[str, list[Any]] = {c: [] for c in RESULT_COLUMNS}
    for name, res in zip(names, results, strict=True):
        for r, h in enumerate(res.hits, 1):
            for key, value in zip(RESULT_COLUMNS, (name, r, h.id, h.path, h.identity, h.score), strict=True):
                cols[key].append(value)
            for a, v in h.attributes.items():
                cols.setdefault(a, []).append(v)
    return pa.table(cols)


def results_records(names: Sequence[str], results: Sequence[QueryResult]) -> list[dict[str, Any]]:
    """One JSON-ready record per query: ``{"query": name, "hits": [...], "strategy": ..., ...}`` (see
    :meth:`QueryResult.to_dict`).  ``names`` and ``results`` pair up one to one (a ``ValueError`` otherwise)."""
    return [{"query": n, **r.to_dict()} for n, r in zip(names, results, strict=True)]


__all__ = [
    "RESULT_COLUMNS",
    "id_queries",
    "parse_ids",
    "prepare_queries",
    "query_images",
    "read_query_embeddings",
    "results_records",
    "results_table",
]
