"""What an index is: its build config (:class:`IndexConfig`), the content of ``index_info.json``
(:class:`IndexInfo`), a loaded index (:class:`LoadedIndex`), and the FAISS objects a config makes."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from facesearch.indexer.faiss_import import faiss
from facesearch.indexer.manifest import model_source

KINDS = ("flat", "ivf-flat", "ivf-pq", "hnsw")


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
    """The content of ``index_info.json``.  ``sources``: one record per shard directory built or added (path,
    manifest SHA-256, id offset, shard and index id ranges: :func:`facesearch.indexer.index_ids.source_record`);
    ``max_id``: the largest id the index ever held (fresh ids start above it); ``files``: size and SHA-256 of the
    generation's
    ``index.faiss`` and ``attributes.parquet`` (empty for an index written before checksums); ``provenance``: what
    built it (:func:`facesearch.model.provenance.provenance`; each later ``add`` / ``remove`` event in ``history``
    carries its own; empty for an index written before it); ``attribute_source``: where the attribute columns came
    from, the shard manifest's record (:attr:`facesearch.indexer.manifest.Manifest.attribute_provenance`: the
    identity model's own head or an attribute predictor's key, fingerprint, path, input and calibration; empty for an
    index written before it, read through :attr:`attribute_provenance`)."""

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
    sources: tuple[dict[str, Any], ...] = ()
    max_id: int | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    attribute_source: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    @property
    def attribute_provenance(self) -> dict[str, Any]:
        """Where the attribute columns came from: the recorded ``attribute_source``, else (an index from before the
        record) the model's own head, :func:`facesearch.indexer.manifest.model_source` of ``fingerprint``."""
        return dict(self.attribute_source) if self.attribute_source else model_source(self.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(kind=self.kind, history=list(self.history), sources=list(self.sources))
        if not self.attribute_source:
            del data["attribute_source"]  # an index from before the record reads as before
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["history"] = tuple(values.get("history", ()))
        values["sources"] = tuple(values.get("sources", ()))
        info = cls(**values)
        if not isinstance(info.config, dict) or "kind" not in info.config:
            raise ValueError("config.kind is missing")
        return info


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


def new_index(cfg: IndexConfig, d: int) -> Any:
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


def apply_search_params(index: Any, config: dict[str, Any]) -> None:
    """Set the query-time parameters (HNSW efSearch, IVF nprobe), which FAISS does not keep in the file."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(config["ef_search"])
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = int(config["nprobe"])


__all__ = ["KINDS", "IndexConfig", "IndexInfo", "LoadedIndex", "apply_search_params", "new_index"]
