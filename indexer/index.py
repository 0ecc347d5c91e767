"""Index directories: shards -> FAISS index + id mapping + attribute table + ``index_info.json``.

Files of a generation (layout, atomic updates, the pointer ``CURRENT``: :mod:`facesearch.indexer.index_store`)::

    index.faiss         faiss.write_index output
    attributes.parquet  id, path, identity, one float32 column per attribute; one row per indexed vector
    index_info.json     kind, parameters, metric, d, nb, fingerprint, attribute_source (where the attribute
                        columns came from: the model's own head or an attribute predictor), sources (shard
                        directories and their id offsets), build time, peak RSS, recall, history, size + SHA-256 of
                        the two files above

Every build and update writes a whole new generation and switches ``CURRENT`` to it in one rename, so a killed
``add`` / ``remove`` leaves the index as it was before or after, never in between; the directory's lock
(:mod:`facesearch.indexer.locks`) keeps a second writer out and names the one inside.

Checks: shards are verified against their manifest (size, SHA-256) before they are read, and a NaN or infinite embedding
is refused naming its shard and id.  ``add`` refuses shards of another model (fingerprint, d) and shards whose attribute
columns came from another filler than the index's (another predictor fingerprint, or a predictor vs the model's own
head: :attr:`facesearch.indexer.manifest.Manifest.attribute_provenance`), naming both.  :func:`load_index` refuses, with
one line naming the file, an index whose files disagree: sizes (and SHA-256 of ``index_info.json`` and
``attributes.parquet``, read anyway) against the records, the FAISS header (kind, d, metric, nlist, ntotal) against
``index_info.json``, the attribute table's rows and ids against the index (:mod:`facesearch.indexer.index_check`).
``verify=True`` adds the SHA-256 of ``index.faiss`` and a NaN / inf scan of the stored vectors (measured at 1M x 1024
float32, a 4.1 GB file, on this 2-core machine: read_index 5.0 s, SHA-256 5.5 s, scan 1.1 s, so they are not run at
every open).

Id mapping: FAISS itself stores our int64 ids, so a search returns them directly: ``flat`` and ``hnsw`` are wrapped
in ``IndexIDMap2``; ``ivf-flat`` / ``ivf-pq`` store ids natively (``add_with_ids``; wrapping an IVF in an id map
would break on removal, because IVF does not renumber its internal ids).  ``attributes.parquet`` lists the same id
set and is what ``LoadedIndex.ids`` reads.  Index id = shard id + the source's id offset
(:mod:`facesearch.indexer.index_ids`: ``id_offset``, ``fresh_ids``, ``shard_ids`` subsets, collisions).

Recall (:mod:`facesearch.indexer.recall`): queries are ``recall_sample`` rows drawn from the data (deterministic
priority sampling by hashed id); each query's own id is removed from both result lists, so recall measures the
neighbours a user would see. recall@k = mean |{index top-k ids whose exact score >= the exact k-th score}| / k, so ties
(equal scores, duplicate rows) count whatever order they come in and an exact index measures 1.0; the comparison allows
the float32 rounding of the searches (``tie_tolerance`` in ``index_info.json``). Ground truth is
:func:`facesearch.indexer.search.search_exact` over the same shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facesearch.indexer import shards
from facesearch.indexer.faiss_import import faiss
from facesearch.indexer.index_check import check_block_finite, check_consistency, check_finite, check_shards
from facesearch.indexer.index_ids import (
    IdCheck,
    RowSelection,
    check_id_range,
    known_sources,
    next_free_id,
    plan_add,
    shard_span,
    source_record,
)
from facesearch.indexer.index_info import KINDS, IndexConfig, IndexInfo, LoadedIndex, apply_search_params, new_index
from facesearch.indexer.index_store import (
    ATTR_FILE,
    INDEX_FILE,
    INFO_FILE,
    Layout,
    NewGeneration,
    check_digest,
    check_size,
    current_layout,
    is_empty_for_build,
    is_index_directory,
    read_with_retry,
    remove_leftovers,
)
from facesearch.indexer.locks import directory_lock
from facesearch.indexer.manifest import describe_attribute_source, same_attribute_source
from facesearch.indexer.recall import measure_recall, recall_at
from facesearch.model.measure import peak_rss_bytes
from facesearch.model.provenance import provenance, versions

log = logging.getLogger(__name__)
_FLAT_RECALL_SAMPLE = 100  # flat is exact by construction: a small sanity-check sample is enough


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    """Our version and the libraries' (the provenance record's, by distribution name), plus ``faiss`` under the name
    ``index_info.json`` always had it."""
    return {**versions(), "faiss": faiss.__version__}


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


def _train(index: Any, cfg: IndexConfig, shards_dir: Path, manifest: shards.Manifest) -> None:
    sampler = _Sampler(cfg.train_size, manifest.d, cfg.seed + 1)
    for b in _blocks(shards_dir, cfg.block_rows):
        check_block_finite(b, manifest, shards_dir)
        sampler.add(b.ids, b.xb)
    need = cfg.nlist if cfg.kind == "ivf-flat" else max(cfg.nlist, 2**cfg.nbits)
    if len(sampler.ids) < need:
        raise ValueError(f"{cfg.kind} with nlist={cfg.nlist}, nbits={cfg.nbits} needs >= {need} training vectors, "
                         f"the shards hold {len(sampler.ids)}; lower --nlist / --nbits")  # fmt: skip
    index.train(sampler.xb)


def _attr_columns(manifest: shards.Manifest) -> list[str]:
    return ["path", "identity", *manifest.attributes]


def _source(shards_dir: Path) -> dict[str, Any]:
    return {"shards_dir": str(Path(shards_dir).resolve()), "manifest_sha256": shards.manifest_sha256(shards_dir)}


def _build_into(
    gen: NewGeneration, shards_dir: Path, manifest: shards.Manifest, cfg: IndexConfig, id_offset: int, t0: float
) -> IndexInfo:
    """Build the index of ``shards_dir`` into the new generation ``gen``'s files; returns its info."""
    index = new_index(cfg, manifest.d)
    if not index.is_trained:
        _train(index, cfg, shards_dir, manifest)
    size = min(cfg.recall_sample, _FLAT_RECALL_SAMPLE) if cfg.kind == "flat" else cfg.recall_sample
    sampler = _Sampler(size, manifest.d, cfg.seed)
    full = shards.schema(manifest.d, manifest.dtype, manifest.attributes)
    attr_schema = pa.schema([f for f in full if f.name in ("id", *_attr_columns(manifest))])
    check = IdCheck(np.zeros(0, np.int64), attr_schema.empty_table(), index)
    lo, hi = np.iinfo(np.int64).max, -1
    with pq.ParquetWriter(gen.path(ATTR_FILE), attr_schema) as writer:
        for b in _blocks(shards_dir, cfg.block_rows, _attr_columns(manifest)):
            check_block_finite(b, manifest, shards_dir)
            ids = b.ids + id_offset
            check.new_rows(ids, b.meta, b.xb)  # only looks for repeated ids: the index is new
            index.add_with_ids(np.ascontiguousarray(b.xb, dtype=np.float32), ids)
            sampler.add(ids, b.xb)
            writer.write_table(b.meta.add_column(0, "id", pa.array(ids, pa.int64())).cast(attr_schema))
            if len(ids):
                lo, hi = min(lo, int(ids.min())), max(hi, int(ids.max()))
    check.raise_if_bad(shards_dir, gen.directory, id_offset, 0)
    gen.record(ATTR_FILE)
    faiss.write_index(index, str(gen.path(INDEX_FILE)))
    gen.record(INDEX_FILE)
    apply_search_params(index, dataclasses.asdict(cfg))
    recall = measure_recall(index, shards_dir, sampler.xb, sampler.ids, cfg.block_rows, id_offset)
    now, nb, sha = _now(), int(index.ntotal), shards.manifest_sha256(shards_dir)
    span = (lo, hi + 1) if hi >= 0 else None
    return IndexInfo(
        config=dataclasses.asdict(cfg),
        d=manifest.d,
        nb=nb,
        fingerprint=manifest.fingerprint,
        source=_source(shards_dir),
        build_seconds=round(time.perf_counter() - t0, 3),
        peak_rss_bytes=peak_rss_bytes(),
        recall=recall,
        versions=_versions(),
        history=({"op": "build", "time": now, "rows": nb, "source": str(shards_dir), "id_offset": id_offset},),
        sources=(source_record(shards_dir, sha, manifest, id_offset, span, nb, 0, "build", now),),
        max_id=hi if hi >= 0 else None,
        files=dict(gen.records),
        provenance=provenance(),
        attribute_source=manifest.attribute_provenance,
    )


def _refuse_non_empty(out_dir: Path) -> None:
    """A build needs a new or empty directory (what a killed build left there, and the lock, do not count)."""
    if out_dir.exists() and not is_empty_for_build(out_dir):
        raise ValueError(f"{out_dir} is not empty; choose a new index directory")


def build_index(shards_dir: Path, out_dir: Path, cfg: IndexConfig, id_offset: int = 0) -> IndexInfo:
    """Stream the shard directory into a new index directory ``out_dir`` (new or empty); returns its info.
    ``id_offset``: index id = shard id + ``id_offset``.  The shards are verified against their manifest first.

    Memory: the index itself (flat: nb * d * 4 bytes) + ``block_rows`` rows + the train/recall samples."""
    t0 = time.perf_counter()
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    manifest = shards.read_manifest(shards_dir)
    _refuse_non_empty(out_dir)
    span = shard_span(manifest)
    if span is not None:
        check_id_range(span[0], span[1], id_offset, shards_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with directory_lock(out_dir), directory_lock(shards_dir, shared=True):
        _refuse_non_empty(out_dir)  # again, now that no other writer can be in it
        manifest = shards.read_manifest(shards_dir)  # again: an embed job may have finished meanwhile
        check_shards(shards_dir)
        with NewGeneration(out_dir) as gen:
            info = _build_into(gen, shards_dir, manifest, cfg, id_offset, t0)
            gen.commit(info.to_dict())
    return info


def _read_info(layout: Layout) -> IndexInfo:
    path = layout.path(INFO_FILE)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} not found: the index directory is incomplete") from None
    if layout.info_record is not None:
        if len(raw) != layout.info_record.get("size"):
            raise ValueError(f"{path} is {len(raw)} bytes but {layout.directory / 'CURRENT'} records "
                             f"{layout.info_record.get('size')}: the file was changed after it was "
                             "written")  # fmt: skip
        check_digest(path, layout.info_record, raw)
    try:
        return IndexInfo.from_dict(json.loads(raw.decode("utf-8")))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"corrupt index info {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _read_attributes(path: Path, record: dict[str, Any] | None) -> pa.Table:
    """The attribute table; with a record, hashed from the bytes read for parsing (no second read)."""
    try:
        if record is None:
            return pq.read_table(path)
        raw = path.read_bytes()
        check_digest(path, record, raw)
        return pq.read_table(pa.BufferReader(raw))
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"corrupt attribute table {path}: {str(e).splitlines()[0]}") from e


def _load(layout: Layout, verify: bool) -> LoadedIndex:
    info = _read_info(layout)
    if layout.generation is not None and set(info.files) != {INDEX_FILE, ATTR_FILE}:
        raise ValueError(f"{layout.path(INFO_FILE)} records no size / SHA-256 of {INDEX_FILE} and {ATTR_FILE}")
    for name in (INDEX_FILE, ATTR_FILE):
        if not layout.path(name).is_file():
            raise ValueError(f"{layout.path(name)} not found: the index directory is incomplete")
        if name in info.files:
            check_size(layout.path(name), info.files[name])
    index_path = layout.path(INDEX_FILE)
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        raise ValueError(f"corrupt FAISS index {index_path}: {str(e).splitlines()[0]}") from e
    attrs = _read_attributes(layout.path(ATTR_FILE), info.files.get(ATTR_FILE))
    ids = check_consistency(index, attrs, info, layout.files_dir)
    if verify:
        if INDEX_FILE in info.files:
            check_digest(index_path, info.files[INDEX_FILE])
        check_finite(index, index_path)
    apply_search_params(index, info.config)
    return LoadedIndex(index, ids, info, attrs)


def load_index(index_dir: Path, verify: bool = False) -> LoadedIndex:
    """Read an index directory (either layout: :mod:`facesearch.indexer.index_store`); a one-line ``ValueError`` naming
    the file when one is missing, damaged or disagrees with the others (the checks: module doc).  ``verify`` also
    checks the SHA-256 of ``index.faiss`` and scans the stored vectors for NaN / inf (seconds per GB)."""
    return read_with_retry(Path(index_dir), lambda layout: _load(layout, verify))


def _save(index_dir: Path, loaded: LoadedIndex, attrs: pa.Table, event: dict[str, Any],
          sources: tuple[dict[str, Any], ...] | None = None) -> IndexInfo:  # fmt: skip
    """Write the updated index as a new generation and switch to it
    (:class:`facesearch.indexer.index_store.NewGeneration`)."""
    with NewGeneration(index_dir) as gen:
        pq.write_table(attrs, gen.path(ATTR_FILE))
        gen.record(ATTR_FILE)
        faiss.write_index(loaded.index, str(gen.path(INDEX_FILE)))
        gen.record(INDEX_FILE)
        held = attrs.column("id").to_numpy()
        top = max(next_free_id(loaded.info, loaded.ids) - 1, int(held.max()) if len(held) else -1)
        info = dataclasses.replace(
            loaded.info,
            nb=int(loaded.index.ntotal),
            history=(*loaded.info.history, {**event, "provenance": provenance()}),
            sources=tuple(known_sources(loaded.info) if sources is None else sources),
            max_id=top if top >= 0 else None,
            files=dict(gen.records),
        )
        gen.commit(info.to_dict())
    return info


@dataclass(frozen=True)
class AddResult:
    """What :func:`add_to_index` did: the index's ``info`` after it, rows ``added`` and ``skipped_present`` (already
    indexed, identical), the ``id_offset`` used and why (``note``), ``changed`` (False: nothing was written), and
    ``prior``: the earlier add of the same shard set, if any."""

    info: IndexInfo
    added: int
    skipped_present: int
    id_offset: int
    note: str
    changed: bool
    prior: dict[str, Any] | None = None


def _append(loaded: LoadedIndex, shards_dir: Path, manifest: shards.Manifest, offset: int, block_rows: int,
            index_dir: Path, take: RowSelection) -> tuple[list[np.ndarray], int, pa.Table]:  # fmt: skip
    """Add the selected shard rows not yet indexed to ``loaded.index`` (in memory); (added id arrays, skipped,
    attrs)."""
    names = loaded.attributes.column_names
    check = IdCheck(loaded.ids, loaded.attributes, loaded.index)
    tables, added = [loaded.attributes], []
    for b in map(take.take, _blocks(shards_dir, block_rows, [c for c in names if c != "id"])):
        check_block_finite(b, manifest, shards_dir)
        ids = b.ids + offset
        new = check.new_rows(ids, b.meta, b.xb)
        if check.collisions or check.repeated or not new.any():  # after a collision: only count the others
            continue
        loaded.index.add_with_ids(np.ascontiguousarray(b.xb[new], dtype=np.float32), ids[new])
        meta = b.meta.filter(pa.array(new)).add_column(0, "id", pa.array(ids[new], pa.int64()))
        tables.append(meta.select(names).cast(loaded.attributes.schema))
        added.append(ids[new])
    take.raise_if_missing(shards_dir)
    check.raise_if_bad(shards_dir, index_dir, offset, next_free_id(loaded.info, loaded.ids))
    return added, check.same, pa.concat_tables(tables)


def add_to_index(index_dir: Path, shards_dir: Path, block_rows: int = 65536, *, id_offset: int | None = None,
                 fresh_ids: bool = False, shard_ids: np.ndarray | None = None) -> AddResult:  # fmt: skip
    """Append a shard directory's rows to an index (same fingerprint and d), as index id = shard id + offset.

    The offset: ``id_offset``, or with ``fresh_ids`` one that puts the first new id right after every id the index
    ever held (the rest follow in shard id order), else 0; a shard set added before keeps its offset
    (:func:`facesearch.indexer.index_ids.plan_add`).  ``shard_ids`` (int64, ids as in the shards): add only those
    rows (enrolling part of a set); one the shards lack is a ``ValueError``.  Rows already indexed unchanged (same
    id, path, identity and embedding) are skipped; a taken id of a different row, or an id twice in the shards, is a
    ``ValueError`` naming the shard directory and the ids, and nothing is written.  The shards are verified against
    their manifest and NaN / inf embeddings refused first.  Nothing to add: nothing is written (``changed`` False)."""
    index_dir, shards_dir = Path(index_dir), Path(shards_dir)
    manifest = shards.read_manifest(shards_dir)
    current_layout(index_dir)  # "not an index directory" before anything else
    with directory_lock(index_dir), directory_lock(shards_dir, shared=True):
        remove_leftovers(index_dir)  # of a killed writer, even when this add turns out to change nothing
        manifest = shards.read_manifest(shards_dir)  # again: an embed job may have finished meanwhile
        loaded = load_index(index_dir)
        if manifest.fingerprint != loaded.info.fingerprint or manifest.d != loaded.info.d:
            raise ValueError(f"{shards_dir} was made by model {manifest.fingerprint!r} (d={manifest.d}) but the "
                             f"index {index_dir} by {loaded.info.fingerprint!r} (d={loaded.info.d}); refusing to "
                             "mix embeddings of different models")  # fmt: skip
        _check_attribute_source(manifest, loaded.info, shards_dir, index_dir)
        take, sha = RowSelection(shard_ids), shards.manifest_sha256(shards_dir)
        plan = plan_add(loaded.info, loaded.ids, manifest, shards_dir, sha, id_offset, fresh_ids, take)
        check_shards(shards_dir)
        parts, skipped, attrs = _append(loaded, shards_dir, manifest, plan.offset, block_rows, index_dir, take)
        new_ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if not len(new_ids):
            log.info("%s: nothing to add from %s (%d rows already indexed; %s)", index_dir, shards_dir, skipped,
                     plan.note)  # fmt: skip
            return AddResult(loaded.info, 0, skipped, plan.offset, plan.note, False, plan.prior)
        now = _now()
        span_new = (int(new_ids.min()), int(new_ids.max()) + 1)
        record = source_record(shards_dir, sha, manifest, plan.offset, span_new, len(new_ids), skipped, "add", now,
                               plan.mode, take.selected)  # fmt: skip
        event = {"op": "add", "time": now, "added": len(new_ids), "skipped_present": skipped, "id_mode": plan.mode,
                 "id_offset": plan.offset, "rows_selected": take.selected, "source": _source(shards_dir)}  # fmt: skip
        info = _save(index_dir, loaded, attrs, event, (*known_sources(loaded.info), record))
    return AddResult(info, len(new_ids), skipped, plan.offset, plan.note, True, plan.prior)


def _check_attribute_source(manifest: shards.Manifest, info: IndexInfo, shards_dir: Path, index_dir: Path) -> None:
    """Refuse shards whose attribute columns came from another filler than the index's (the probabilities of two
    predictors, or of a predictor and the model's head, are not comparable in one filter)."""
    theirs, ours = manifest.attribute_provenance, info.attribute_provenance
    if not same_attribute_source(theirs, ours):
        hint = (f"embed them with --attributes-from {ours['path']}" if ours.get("source") == "predictor"
                and ours.get("path") else "embed them again the way the index's were")  # fmt: skip
        raise ValueError(f"{shards_dir}'s attribute columns come from {describe_attribute_source(theirs)} but the "
                         f"index {index_dir}'s from {describe_attribute_source(ours)}; refusing to mix attribute "
                         f"probabilities of different predictors ({hint}, or build a new index)")  # fmt: skip


def add_shards(index_dir: Path, shards_dir: Path, block_rows: int = 65536, *, id_offset: int | None = None,
               fresh_ids: bool = False, shard_ids: np.ndarray | None = None) -> IndexInfo:  # fmt: skip
    """:func:`add_to_index`, returning only the index's info afterwards."""
    return add_to_index(index_dir, shards_dir, block_rows, id_offset=id_offset, fresh_ids=fresh_ids,
                        shard_ids=shard_ids).info  # fmt: skip


def remove_ids(index_dir: Path, ids: np.ndarray) -> IndexInfo:
    """Delete ``ids`` (int64) from an index; unknown ids are ignored (the history records how many were removed).
    HNSW cannot delete in place, so its graph is rebuilt from the stored vectors without them.  Removed ids are
    not handed out again by fresh ids (``max_id``)."""
    index_dir = Path(index_dir)
    current_layout(index_dir)
    with directory_lock(index_dir):
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
    index = new_index(cfg, loaded.info.d)
    if len(id_map):
        index.add_with_ids(np.ascontiguousarray(xb), id_map)
    apply_search_params(index, loaded.info.config)
    return index


__all__ = [
    "ATTR_FILE",
    "INDEX_FILE",
    "INFO_FILE",
    "KINDS",
    "AddResult",
    "IndexConfig",
    "IndexInfo",
    "LoadedIndex",
    "add_shards",
    "add_to_index",
    "build_index",
    "is_index_directory",
    "load_index",
    "measure_recall",
    "recall_at",
    "remove_ids",
]
