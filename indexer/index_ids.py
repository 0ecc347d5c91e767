"""Index ids when several shard directories go into one index: offsets, the record of where each id came from,
and what counts as a collision.

Every ``facesearch embed`` output numbers its rows from 0, so two galleries share ids.  An index id is the shard
row's id plus the source's *id offset*: 0 by default, ``id_offset=N`` explicitly, or with ``fresh_ids`` the
smallest offset >= 0 that puts every new id after the largest id the index ever held (ids of removed rows are not
handed out again).  An add may take only some rows (``shard_ids``: :class:`RowSelection`, e.g. enrolling some
images of a probe set); their ids are still shard id + offset, so a shard set's rows keep one numbering however
many adds bring them in.  ``index_info.json``'s ``sources`` records each shard directory added (its manifest's
SHA-256, path, the id mode asked for and the offset it gave, how many rows were selected, and the shard and index id
ranges it brought), so index id -> (shard directory, shard id) is ``id - id_offset`` in the source whose index id
range holds it (:func:`trace_id`).

An id already in the index is the *same row* when path, identity and embedding agree (cosine >= ``SAME_COSINE``
between the stored vector and the new one as the index would store it: the same photo embedded on another device
or rounded to float16 stays above 0.999, two photos of one person stay well below it); it is then skipped.  A
different row with a taken id is a collision: an error naming the ids, never a silent skip.  The same shard
directory (same manifest SHA-256) added again keeps the offset it was added with, so re-running an ``index add`` is
harmless; giving it another explicit offset is refused (every face would be indexed twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from facesearch.indexer.index_check import StoredVectors
from facesearch.indexer.shards import Block

SAME_COSINE = 0.99
_INT64_MAX = 2**63 - 1
ID_MODES = ("as-is", "offset", "fresh")


def known_sources(info: Any) -> list[dict[str, Any]]:
    """The shard directories in an index (``IndexInfo.sources``; for an index written before sources were recorded,
    its build source and the sources of its add events, all with offset 0)."""
    if info.sources:
        return [dict(s) for s in info.sources]
    old = [dict(info.source)] if info.source else []
    old += [dict(e["source"]) for e in info.history if e.get("op") == "add" and isinstance(e.get("source"), dict)]
    return [{**s, "id_offset": 0} for s in old]


def trace_id(info: Any, index_id: int) -> tuple[dict[str, Any], int] | None:
    """(source record, shard row id) of an index id, from ``sources`` (None when no recorded range holds it)."""
    for source in reversed(known_sources(info)):
        lo, hi = source.get("index_ids") or (0, 0)
        if lo <= index_id < hi:
            return source, index_id - int(source["id_offset"])
    return None


@dataclass(frozen=True)
class AddPlan:
    """How to map a shard directory's ids: ``offset``, why (``note``), the earlier add of the same shard set, and the
    id mode asked for (:data:`ID_MODES`: shard ids ``as-is``, an explicit ``offset``, ``fresh`` ids)."""

    offset: int
    note: str
    prior: dict[str, Any] | None = None
    mode: str = "as-is"


def next_free_id(info: Any, held: np.ndarray) -> int:
    """One more than the largest id the index holds or ever held."""
    top = max(int(held.max()) if len(held) else -1, info.max_id if info.max_id is not None else -1)
    return top + 1


def shard_span(manifest: Any) -> tuple[int, int] | None:
    """[smallest, largest] planned shard id of the shards that hold rows (None when none does)."""
    full = [e for e in manifest.shards if e.rows]
    return (min(e.id_lo for e in full), max(e.id_hi for e in full) - 1) if full else None


def plan_add(info: Any, held: np.ndarray, manifest: Any, shards_dir: Path, sha: str, id_offset: int | None,
             fresh_ids: bool, take: RowSelection | None = None) -> AddPlan:  # fmt: skip
    """The offset for adding the rows ``take`` selects (default: all) of the shard set ``shards_dir`` (``manifest``,
    whose SHA-256 is ``sha``) to an index with ``info`` holding ids ``held``; refuses one that would put an id
    outside 0..2^63-1."""
    span = (take or RowSelection(None)).span(shard_span(manifest))
    plan = _plan(info, held, span[0] if span else None, shards_dir, sha, id_offset, fresh_ids)
    if span is not None:
        check_id_range(span[0], span[1], plan.offset, shards_dir)
    return plan


def _plan(info: Any, held: np.ndarray, shard_lo: int | None, shards_dir: Path, sha: str, id_offset: int | None,
          fresh_ids: bool) -> AddPlan:  # fmt: skip
    if id_offset is not None and fresh_ids:
        raise ValueError("give an id offset or fresh ids, not both")
    if id_offset is not None and not -_INT64_MAX - 1 <= id_offset <= _INT64_MAX:
        raise ValueError(f"{shards_dir}: id offset {id_offset} is not a 64-bit integer (ids must lie in 0..2^63-1)")
    mode = "fresh" if fresh_ids else "as-is" if id_offset is None else "offset"
    sources = known_sources(info)
    prior = next((s for s in sources if s.get("manifest_sha256") == sha), None)
    if prior is not None:
        off = int(prior.get("id_offset", 0))
        if id_offset is not None and id_offset != off:
            raise ValueError(f"{shards_dir} (manifest SHA-256 {sha[:12]}…) was already added to this index with id "
                             f"offset {off}; adding it again with offset {id_offset} would index each of its faces "
                             "twice (remove its ids first to re-add it elsewhere)")  # fmt: skip
        return AddPlan(off, f"already added with id offset {off}", prior, mode)
    if id_offset is not None:
        return AddPlan(int(id_offset), f"id offset {id_offset} (given)", mode=mode)
    if not fresh_ids:
        return AddPlan(0, "ids as in the shards (offset 0)", mode=mode)
    here = str(Path(shards_dir).resolve())
    same_dir = next((s for s in reversed(sources) if s.get("shards_dir") == here), None)
    if same_dir is not None:  # the directory grew since (a resumed or extended embed): keep its numbering
        off = int(same_dir.get("id_offset", 0))
        return AddPlan(off, f"fresh ids: offset {off}, as when this directory was added before", mode=mode)
    off = max(0, next_free_id(info, held) - shard_lo) if shard_lo is not None else 0
    top = next_free_id(info, held) - 1
    return AddPlan(off, f"fresh ids: offset {off} (ids after the index's largest, {top})", mode=mode)


def check_id_range(lo: int, hi: int, offset: int, shards_dir: Path) -> None:
    """Index ids ``[lo + offset, hi + offset]`` must be int64 and >= 0 (FAISS answers -1 for "no result")."""
    if lo + offset < 0 or hi + offset > _INT64_MAX:
        raise ValueError(f"{shards_dir}: ids {lo}..{hi} with id offset {offset} give ids outside 0..2^63-1")


def _short(ids: list[int], count: int) -> str:
    return ", ".join(map(str, ids)) + (f" … ({count} in all)" if count > len(ids) else "")


class RowSelection:
    """The shard rows an add takes: every row (``shard_ids`` None) or those whose shard id (before the offset) is in
    ``shard_ids``, any order, repeats ignored.  :meth:`take` filters the streamed blocks and remembers which listed
    ids it met, so an id the shard set lacks (or whose row failed to embed) is an error naming it, not a silent
    skip."""

    def __init__(self, shard_ids: Sequence[int] | np.ndarray | None) -> None:
        self.wanted: np.ndarray | None = None
        if shard_ids is not None:
            raw = np.asarray(shard_ids)
            values = raw.tolist() if raw.dtype in (object, np.uint64) and raw.ndim == 1 else []
            big = [v for v in values if isinstance(v, int) and not -_INT64_MAX - 1 <= v <= _INT64_MAX]
            if big:  # numpy holds an int beyond int64 as an object (or uint64) array
                raise ValueError(f"shard ids are 64-bit integers; {big[0]} is out of range")
            if raw.ndim != 1 or (raw.size and not np.issubdtype(raw.dtype, np.integer)):
                raise ValueError(f"shard_ids must be a 1-d sequence of integer ids, got {raw.dtype} of shape "
                                 f"{raw.shape}")  # fmt: skip
            self.wanted = np.unique(raw.astype(np.int64))
        self.found = np.zeros(0 if self.wanted is None else len(self.wanted), bool)

    @property
    def selected(self) -> int | None:
        """How many distinct shard ids were asked for (None: every row)."""
        return None if self.wanted is None else len(self.wanted)

    def span(self, full: tuple[int, int] | None) -> tuple[int, int] | None:
        """[smallest, largest] shard id taken: ``full`` (the shard set's) for every row, else the selection's."""
        if self.wanted is None:
            return full
        return (int(self.wanted[0]), int(self.wanted[-1])) if len(self.wanted) else None

    def take(self, b: Block) -> Block:
        if self.wanted is None:
            return b
        if not len(self.wanted):
            return Block(b.ids[:0], b.xb[:0], b.meta.slice(0, 0))
        pos = np.minimum(np.searchsorted(self.wanted, b.ids), len(self.wanted) - 1)
        hit = self.wanted[pos] == b.ids
        self.found[pos[hit]] = True
        return b if hit.all() else Block(b.ids[hit], b.xb[hit], b.meta.filter(pa.array(hit)))

    def raise_if_missing(self, shards_dir: Path) -> None:
        if self.wanted is not None and not self.found.all():
            missing = self.wanted[~self.found]
            raise ValueError(f"{shards_dir} has no row with an embedding for {len(missing)} of the {len(self.wanted)} "
                             f"shard id(s) asked for: {_short(missing[:5].tolist(), len(missing))} (ids as in the "
                             "shards, before any offset; a row that failed to embed has none)")  # fmt: skip


class IdCheck:
    """Streams the new rows of an add past the index as loaded: splits each block into new rows and rows already
    indexed unchanged, and collects collisions (taken ids of different rows) and ids repeated in the shards."""

    def __init__(self, held: np.ndarray, attrs: pa.Table, index: Any) -> None:
        self.held = np.asarray(held, np.int64)
        self.order = np.argsort(self.held, kind="stable")
        self.attrs, self.index = attrs, index
        self._paths: np.ndarray | None = None
        self._identities: np.ndarray | None = None
        self._vectors: StoredVectors | None = None
        self.seen: list[np.ndarray] = []
        self.collided: list[int] = []
        self.collisions = 0
        self.example = ""
        self.repeated: list[int] = []
        self.repeats = 0
        self.same = 0

    def _lookups(self) -> tuple[np.ndarray, np.ndarray, StoredVectors]:
        if self._vectors is None:
            self._paths = np.asarray(self.attrs.column("path").to_pylist(), dtype=object)
            self._identities = np.asarray(self.attrs.column("identity").to_pylist(), dtype=object)
            self._vectors = StoredVectors(self.index)
        assert self._paths is not None and self._identities is not None, "built together"
        return self._paths, self._identities, self._vectors

    def new_rows(self, ids: np.ndarray, meta: pa.Table, xb: np.ndarray) -> np.ndarray:
        """ids (n,) int64 index ids, meta with path / identity, xb (n, d) -> (n,) bool: rows to add."""
        uniq, counts = np.unique(ids, return_counts=True)
        again = uniq[counts > 1]
        if self.seen:
            again = np.concatenate([again, ids[np.isin(ids, np.concatenate(self.seen))]])
        self.repeated += again[: max(0, 5 - len(self.repeated))].tolist()
        self.repeats += len(again)
        self.seen.append(ids)
        if not len(self.held) or not len(ids):
            return np.ones(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.held, ids, sorter=self.order), len(self.held) - 1)
        present = self.held[self.order[pos]] == ids
        if not present.any():
            return ~present
        paths, identities, vectors = self._lookups()
        rows = self.order[pos[present]]
        new_path = np.asarray(meta.column("path").to_pylist(), dtype=object)[present]
        new_ident = np.asarray(meta.column("identity").to_pylist(), dtype=object)[present]
        old, new = vectors.get(ids[present]), vectors.as_stored(xb[present])
        cos = np.einsum("ij,ij->i", old, new) / np.maximum(
            np.linalg.norm(old, axis=1) * np.linalg.norm(new, axis=1), 1e-12
        )
        same = (paths[rows] == new_path) & (identities[rows] == new_ident) & (cos >= SAME_COSINE)
        self.same += int(same.sum())
        bad = np.flatnonzero(~same)
        if len(bad):
            if not self.example:
                b, r = bad[0], rows[bad[0]]
                if paths[r] != new_path[b]:
                    what = f"path {paths[r]!r} in the index, {new_path[b]!r} in the shards"
                elif identities[r] != new_ident[b]:
                    what = f"identity {identities[r]!r} in the index, {new_ident[b]!r} in the shards"
                else:
                    what = f"the same path but embeddings at cosine {cos[b]:.3f}"
                self.example = f"id {int(ids[present][b])}: {what}"
            self.collided += ids[present][bad][: 5 - len(self.collided)].tolist()
            self.collisions += len(bad)
        return ~present

    def raise_if_bad(self, shards_dir: Path, index_dir: Path, offset: int, next_free: int) -> None:
        if self.repeated:
            ids = _short(self.repeated, self.repeats)
            raise ValueError(f"{shards_dir} holds the same id more than once (ids {ids} after id offset {offset}): "
                             "the shard set is damaged")  # fmt: skip
        if self.collisions:
            raise ValueError(f"{self.collisions} id(s) of {shards_dir} (with id offset {offset}) are taken in "
                             f"{index_dir} by different rows: {_short(self.collided, self.collisions)} (e.g. "
                             f"{self.example}); every embed output numbers its rows from 0, so a second gallery "
                             f"needs its own ids: add it with --fresh-ids or --id-offset {next_free}")  # fmt: skip


def source_record(shards_dir: Path, sha: str, manifest: Any, offset: int, index_ids: tuple[int, int] | None,
                  rows: int, skipped: int, op: str, time: str, mode: str | None = None,
                  selected: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``sources`` entry of one add (or the build): where the rows came from and how their ids were mapped;
    ``index_ids``: the half-open range [lo, hi) of the index ids it brought (None: no rows); ``mode``: the id mode
    asked for (:data:`ID_MODES`; default: ``offset`` for a non-zero offset, else ``as-is``); ``selected``: how many
    shard ids the add was limited to (None: every row)."""
    return {
        "op": op,
        "time": time,
        "shards_dir": str(Path(shards_dir).resolve()),
        "manifest_sha256": sha,
        "embed_id_offset": int(getattr(manifest, "id_offset", 0)),
        "id_mode": mode if mode is not None else "offset" if offset else "as-is",
        "id_offset": int(offset),
        "rows_selected": selected,
        "shard_ids": [index_ids[0] - offset, index_ids[1] - offset] if index_ids else None,
        "index_ids": list(index_ids) if index_ids else None,
        "rows": int(rows),
        "skipped_present": int(skipped),
    }


__all__ = [
    "ID_MODES",
    "SAME_COSINE",
    "AddPlan",
    "IdCheck",
    "RowSelection",
    "check_id_range",
    "known_sources",
    "next_free_id",
    "plan_add",
    "shard_span",
    "source_record",
    "trace_id",
]
