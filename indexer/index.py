"""Index directories: shards -> FAISS index + id mapping + attribute table + ``index_info.json``.

Directory format (``build_index``)::

    index.faiss         faiss.write_index output, written atomically (tmp + fsync + rename)
    attributes.parquet  id, path, identity, one float32 column per attribute; one row per indexed vector
    index_info.json     kind, parameters, metric, d, nb, fingerprint, source, build time, peak RSS, recall, history

Id mapping: FAISS itself stores our int64 ids, so a search returns them directly: ``flat`` and ``hnsw`` are wrapped
in ``IndexIDMap2``; ``ivf-flat`` / ``ivf-pq`` store ids natively (``add_with_ids``; wrapping an IVF in an id map
would break on removal, because IVF does not renumber its internal ids). ``attributes.parquet`` lists the same id
set and is what ``LoadedIndex.ids`` reads; ``load_index`` checks both agree in size.

Recall (:mod:`indexer.recall`): queries are ``recall_sample`` rows drawn from the data (deterministic priority
sampling by hashed id); each query's own id is removed from both result lists, so recall measures the neighbours a
user would see. recall@k = mean |{index top-k ids whose exact score >= the exact k-th score}| / k, so ties (equal
scores, duplicate rows) count whatever order they come in and an exact index measures 1.0; the comparison allows
the float32 rounding of the searches (``tie_tolerance`` in ``index_info.json``). Ground truth is
:func:`indexer.search.search_exact` over the same shards.
"""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer import shards
from indexer.recall import measure_recall, recall_at
from model.fileio import atomic_write_text, atomic_write_with

KINDS = ("flat", "ivf-flat", "ivf-pq", "hnsw")
INDEX_FILE, ATTR_FILE, INFO_FILE = "index.faiss", "attributes.parquet", "index_info.json"
_FLAT_RECALL_SAMPLE = 100  # flat is exact by construction: a small sanity-check sample is enough


@dataclass(frozen=True)
class IndexConfig:
    """How to build an index. ``nlist``/``nprobe``: IVF lists and lists probed per query; ``m``/``nbits``: PQ
    sub-quantizers and bits per code (``d % m == 0``); ``hnsw_m``/``ef_construction``/``ef_search``: HNSW graph
    degree and beam widths; ``train_size``: vectors sampled to train IVF/PQ; ``block_rows``: rows streamed at a time
    (bounds memory); ``recall_sample``: queries for the recall measurement (0 = skip); ``seed``: sampling seed."""

    kind: str = "flat"
    nlist: int = 1024
    m: int = 64
    nbits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nprobe: int = 32
    train_size: int = 100_000
    block_rows: int = 65536
    recall_sample: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind {self.kind!r} is not one of {', '.join(KINDS)}")
        positive = ("nlist", "m", "hnsw_m", "ef_construction", "ef_search", "nprobe", "train_size", "block_rows")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.nbits <= 16:
            raise ValueError(f"nbits must be in 1..16, got {self.nbits}")
        if self.recall_sample < 0:
            raise ValueError(f"recall_sample must be >= 0, got {self.recall_sample}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexConfig:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown IndexConfig key(s) {unknown}; valid: {valid}")
        return cls(**data)


@dataclass(frozen=True)
class IndexInfo:
    """The content of ``index_info.json``."""

    config: dict[str, Any]
    d: int
    nb: int
    fingerprint: str
    source: dict[str, Any]
    build_seconds: float
    peak_rss_bytes: int
    recall: dict[str, Any]
    versions: dict[str, str]
    metric: str = "inner_product"
    history: tuple[dict[str, Any], ...] = ()

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(kind=self.kind, history=list(self.history))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["history"] = tuple(values.get("history", ()))
        return cls(**values)


@dataclass
class LoadedIndex:
    """A loaded index directory: the FAISS ``index`` (search parameters applied), ``ids`` (nb,) int64, ``info`` and
    the ``attributes`` table (id, path, identity, attribute columns)."""

    index: Any
    ids: np.ndarray
    info: IndexInfo
    attributes: pa.Table = field(repr=False)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """xq: (nq, d) float32 -> D (nq, k) float32, I (nq, k) int64 (our ids; -1 where fewer than k results)."""
        D, I = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
        return D, I.astype(np.int64)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import torch

    return {"faiss": faiss.__version__, "numpy": np.__version__, "pyarrow": pa.__version__, "torch": torch.__version__}


def _peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _new_index(cfg: IndexConfig, d: int) -> Any:
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if cfg.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, ip)
        hnsw.hnsw.efConstruction = cfg.ef_construction
        return faiss.IndexIDMap2(hnsw)
    quantizer = faiss.IndexFlatIP(d)  # faiss's Python wrapper keeps it alive as long as the IVF index
    if cfg.kind == "ivf-flat":
        return faiss.IndexIVFFlat(quantizer, d, cfg.nlist, ip)
    if d % cfg.m:
        raise ValueError(f"ivf-pq needs d divisible by m: d={d}, m={cfg.m}")
    return faiss.IndexIVFPQ(quantizer, d, cfg.nlist, cfg.m, cfg.nbits, ip)


def _apply_search_params(index: Any, config: dict[str, Any]) -> None:
    """Set the query-time parameters (HNSW efSearch, IVF nprobe), which FAISS does not keep in the file."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(config["ef_search"])
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = int(config["nprobe"])


def _hash_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64(id ^ seed): a deterministic pseudo-random key per id, independent of block boundaries."""
    z = ids.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.asarray(z ^ (z >> np.uint64(31)))


class _Sampler:
    """Streaming uniform sample of ``size`` rows without replacement: keep the rows with the smallest hashed keys."""

    def __init__(self, size: int, d: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.keys = np.zeros(0, np.uint64)
        self.ids = np.zeros(0, np.int64)
        self.xb = np.zeros((0, d), np.float32)

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        if self.size == 0 or len(ids) == 0:
            return
        keys = np.concatenate([self.keys, _hash_keys(ids, self.seed)])
        order = np.argsort(keys, kind="stable")[: self.size]
        self.keys = keys[order]
        self.ids = np.concatenate([self.ids, ids])[order]
        self.xb = np.concatenate([self.xb, np.asarray(xb, np.float32)])[order]


def _blocks(shards_dir: Path, block_rows: int, columns: list[str] | None = None) -> Iterator[shards.Block]:
    return shards.iter_shards(shards_dir, block_rows=block_rows, columns=[] if columns is None else columns)


def _train(index: Any, cfg: IndexConfig, shards_dir: Path, d: int) -> None:
    sampler = _Sampler(cfg.train_size, d, cfg.seed + 1)
    for b in _blocks(shards_dir, cfg.block_rows):
        sampler.add(b.ids, b.xb)
    need = cfg.nlist if cfg.kind == "ivf-flat" else max(cfg.nlist, 2**cfg.nbits)
    if len(sampler.ids) < need:
        raise ValueError(f"{cfg.kind} with nlist={cfg.nlist}, nbits={cfg.nbits} needs >= {need} training vectors, "
                         f"the shards hold {len(sampler.ids)}; lower --nlist / --nbits")  # fmt: skip
    index.train(sampler.xb)


def _attr_columns(manifest: shards.Manifest) -> list[str]:
    return ["path", "identity", *manifest.attributes]


def _write_index(index: Any, path: Path) -> None:
    atomic_write_with(path, lambda tmp: faiss.write_index(index, str(tmp)))


def _write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_info(out_dir: Path, info: IndexInfo) -> None:
    atomic_write_text(out_dir / INFO_FILE, json.dumps(info.to_dict(), indent=2) + "\n")


def _source(shards_dir: Path) -> dict[str, Any]:
    return {"shards_dir": str(Path(shards_dir).resolve()), "manifest_sha256": shards.manifest_sha256(shards_dir)}


def build_index(shards_dir: Path, out_dir: Path, cfg: IndexConfig) -> IndexInfo:
    """Stream the shard directory into a new index directory ``out_dir`` (new or empty); returns its info.

    Memory: the index itself (flat: nb * d * 4 bytes) + ``block_rows`` rows + the train/recall samples."""
    t0 = time.perf_counter()
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    manifest = shards.read_manifest(shards_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; choose a new index directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    index = _new_index(cfg, manifest.d)
    if not index.is_trained:
        _train(index, cfg, shards_dir, manifest.d)
    size = min(cfg.recall_sample, _FLAT_RECALL_SAMPLE) if cfg.kind == "flat" else cfg.recall_sample
    sampler = _Sampler(size, manifest.d, cfg.seed)
    full = shards.schema(manifest.d, manifest.dtype, manifest.attributes)
    attr_schema = pa.schema([f for f in full if f.name in ("id", *_attr_columns(manifest))])
    tmp = out_dir / (ATTR_FILE + ".tmp")
    with pq.ParquetWriter(tmp, attr_schema) as writer:
        for b in _blocks(shards_dir, cfg.block_rows, _attr_columns(manifest)):
            index.add_with_ids(np.ascontiguousarray(b.xb, dtype=np.float32), b.ids)
            sampler.add(b.ids, b.xb)
            table = b.meta.add_column(0, "id", pa.array(b.ids, pa.int64()))
            writer.write_table(table.cast(attr_schema))
    os.replace(tmp, out_dir / ATTR_FILE)
    _write_index(index, out_dir / INDEX_FILE)
    _apply_search_params(index, dataclasses.asdict(cfg))
    recall = measure_recall(index, shards_dir, sampler.xb, sampler.ids, cfg.block_rows)
    info = IndexInfo(
        config=dataclasses.asdict(cfg),
        d=manifest.d,
        nb=int(index.ntotal),
        fingerprint=manifest.fingerprint,
        source=_source(shards_dir),
        build_seconds=round(time.perf_counter() - t0, 3),
        peak_rss_bytes=_peak_rss(),
        recall=recall,
        versions=_versions(),
        history=({"op": "build", "time": _now(), "rows": int(index.ntotal), "source": str(shards_dir)},),
    )
    _write_info(out_dir, info)
    return info


def _read_info(index_dir: Path) -> IndexInfo:
    path = Path(index_dir) / INFO_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: {index_dir} is not an index directory (run facesearch index build)")
    try:
        return IndexInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"corrupt index info {path}: {e}") from e


def load_index(index_dir: Path) -> LoadedIndex:
    """Read an index directory; ``ValueError`` naming the file when one is missing, corrupt or inconsistent."""
    index_dir = Path(index_dir)
    info = _read_info(index_dir)
    for name in (INDEX_FILE, ATTR_FILE):
        if not (index_dir / name).is_file():
            raise ValueError(f"{index_dir / name} not found: the index directory is incomplete")
    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
    except RuntimeError as e:
        raise ValueError(f"corrupt FAISS index {index_dir / INDEX_FILE}: {str(e).splitlines()[0]}") from e
    try:
        attrs = pq.read_table(index_dir / ATTR_FILE)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"corrupt attribute table {index_dir / ATTR_FILE}: {e}") from e
    if attrs.num_rows != index.ntotal or info.nb != index.ntotal:
        raise ValueError(f"{index_dir}: {INDEX_FILE} holds {index.ntotal} vectors but {ATTR_FILE} has "
                         f"{attrs.num_rows} rows and {INFO_FILE} says nb={info.nb}")  # fmt: skip
    _apply_search_params(index, info.config)
    return LoadedIndex(index, attrs.column("id").to_numpy().astype(np.int64), info, attrs)


def _save(index_dir: Path, loaded: LoadedIndex, attrs: pa.Table, event: dict[str, Any]) -> IndexInfo:
    """Write index, attribute table, then info (``load_index`` detects a crash between them by the counts)."""
    _write_index(loaded.index, index_dir / INDEX_FILE)
    _write_table(attrs, index_dir / ATTR_FILE)
    info = dataclasses.replace(loaded.info, nb=int(loaded.index.ntotal), history=(*loaded.info.history, event))
    _write_info(index_dir, info)
    return info


def add_shards(index_dir: Path, shards_dir: Path, block_rows: int = 65536) -> IndexInfo:
    """Append a shard directory's rows to an index (same fingerprint and d); ids already present are skipped."""
    index_dir, shards_dir = Path(index_dir), Path(shards_dir)
    loaded = load_index(index_dir)
    manifest = shards.read_manifest(shards_dir)
    if manifest.fingerprint != loaded.info.fingerprint or manifest.d != loaded.info.d:
        raise ValueError(f"{shards_dir} was made by model {manifest.fingerprint!r} (d={manifest.d}) but the index "
                         f"{index_dir} by {loaded.info.fingerprint!r} (d={loaded.info.d}); refusing to mix "
                         "embeddings of different models")  # fmt: skip
    present = loaded.ids
    tables, added, skipped = [loaded.attributes], 0, 0
    names = loaded.attributes.column_names
    for b in _blocks(shards_dir, block_rows, [c for c in names if c != "id"]):
        new = ~np.isin(b.ids, present)
        ids, xb = b.ids[new], np.ascontiguousarray(b.xb[new], dtype=np.float32)
        skipped += int((~new).sum())
        if len(ids):
            loaded.index.add_with_ids(xb, ids)
            meta = b.meta.filter(pa.array(new)).add_column(0, "id", pa.array(ids, pa.int64()))
            tables.append(meta.select(names).cast(loaded.attributes.schema))
            present = np.concatenate([present, ids])
            added += len(ids)
    event = {"op": "add", "time": _now(), "added": added, "skipped_present": skipped, "source": _source(shards_dir)}
    return _save(index_dir, loaded, pa.concat_tables(tables), event)


def remove_ids(index_dir: Path, ids: np.ndarray) -> IndexInfo:
    """Delete ``ids`` (int64) from an index; unknown ids are ignored (the history records how many were removed).
    HNSW cannot delete in place, so its graph is rebuilt from the stored vectors without them."""
    index_dir = Path(index_dir)
    loaded = load_index(index_dir)
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    gone = np.isin(loaded.ids, ids)
    if loaded.info.kind == "hnsw":
        loaded.index = _rebuild_hnsw(loaded, ~gone)
    else:
        loaded.index.remove_ids(faiss.IDSelectorBatch(ids))
    attrs = loaded.attributes.filter(pa.array(~gone))
    assert loaded.index.ntotal == attrs.num_rows, "index and attribute table disagree after removal"
    event = {"op": "remove", "time": _now(), "requested": len(ids), "removed": int(gone.sum())}
    return _save(index_dir, loaded, attrs, event)


def _rebuild_hnsw(loaded: LoadedIndex, keep: np.ndarray) -> Any:
    old = loaded.index
    inner = faiss.downcast_index(old.index)
    xb = inner.reconstruct_n(0, int(inner.ntotal))[keep]
    id_map = faiss.vector_to_array(old.id_map).astype(np.int64)[keep]
    cfg = IndexConfig.from_dict(loaded.info.config)
    index = _new_index(cfg, loaded.info.d)
    if len(id_map):
        index.add_with_ids(np.ascontiguousarray(xb), id_map)
    _apply_search_params(index, loaded.info.config)
    return index


__all__ = [
    "ATTR_FILE",
    "INDEX_FILE",
    "INFO_FILE",
    "KINDS",
    "IndexConfig",
    "IndexInfo",
    "LoadedIndex",
    "add_shards",
    "build_index",
    "load_index",
    "measure_recall",
    "recall_at",
    "remove_ids",
]
