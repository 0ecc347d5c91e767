"""The crop store: the aligned crops of a training set, made once through :class:`FaceDataset` and memory-mapped by
the training data loader, so a step reads ``H x W x 3`` bytes instead of decoding and aligning an image.

A store is a directory:

* ``crops.u8`` -- N x H x W x 3 uint8 RGB, raw and C-ordered (``np.memmap(path, np.uint8, "r", shape=(N, H, W, 3))``);
  row ``r`` is the crop of index row ``r`` (zeros for a row without one).
* ``index.parquet`` -- one row per crop: ``row``, ``path`` (absolute), ``identity``, ``size`` and ``mtime_ns`` of the
  file, ``source`` and ``landmarks`` (what the crop was aligned with: ``given`` with the sample, ``detected`` by the
  detection cache, ``failed`` detection, ``none``), ``status`` (``ok`` or the ``ImageError`` reason; null while
  building) and ``message``.
* ``store.json`` -- format version, crop geometry (size, margin, crop size, template hash), row count, the inputs
  digest (SHA-256 over every row's path, size, mtime and landmarks), counts, ``complete``, provenance.

Rows are the distinct (path, landmarks) of the datasets' samples in path order, so every split of the same files (any
seed or hold-out) shares one store.  The crops are what ``dataset[i]`` returns -- :func:`prepare_image`, the one face
path, with the run's landmarks and detections -- so a store-backed dataset gives the same bytes, and the same
failures, as the dataset it stands for.

Building is atomic and resumable: ``store.json`` (``complete: false``) and ``index.parquet`` first, then chunks of
rows, each written into its region of ``crops.u8`` and synced before its statuses go to ``parts/chunk-NNNNN.json``
(atomically); a killed build resumes at the chunks without a part file.  Last the index gets its statuses and
``store.json`` says ``complete: true``.  A store made from other inputs (a file added, removed or changed in size or
mtime, other landmarks or detections) or with another geometry is refused with what differs.  One process builds a
store at a time (a lock file); the others wait, then reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from facesearch.model.faces.align import EYE_WEIGHTS, REFERENCE_112x96
from facesearch.model.faces.datasets import Detected, FaceDataset, FaceItem, Failure, Sample
from facesearch.model.fileio import atomic_write_text, atomic_write_with
from facesearch.model.provenance import provenance

log = logging.getLogger(__name__)

VERSION = 1
CROPS, INDEX, META, PARTS, LOCK = "crops.u8", "index.parquet", "store.json", "parts", ".lock"
#: Rows per build chunk: the unit of resumption and of work per worker process (512 x 112 x 96 x 3 = 16.5 MB).
CHUNK_ROWS = 512

#: (absolute path, landmarks source, landmarks as float32 bytes): what identifies a crop.
Key = tuple[str, str, bytes]


class CropStoreError(ValueError):
    """A store that cannot serve these datasets: another format version or geometry, other inputs, a damaged file."""


@dataclass(frozen=True)
class CropGeometry:
    """The crops of a store: ``size`` (height, width) of the template, ``margin`` (the margin canvas around it),
    ``crop_size`` (height, width) stored, ``template`` a hash of the alignment template and landmark weights."""

    size: tuple[int, int]
    margin: bool
    crop_size: tuple[int, int]
    template: str

    @classmethod
    def of(cls, dataset: FaceDataset) -> CropGeometry:
        digest = hashlib.sha256(np.ascontiguousarray(REFERENCE_112x96, np.float64).tobytes()
                                + np.ascontiguousarray(EYE_WEIGHTS, np.float64).tobytes()).hexdigest()[:16]  # fmt: skip
        return cls(tuple(dataset.size), dataset.margin, tuple(dataset.crop_size), digest)  # type: ignore[arg-type]

    def describe(self) -> str:
        h, w = self.crop_size
        kind = f"margin crops around {self.size[0]}x{self.size[1]}" if self.margin else "template crops"
        return f"{h}x{w} {kind} (template {self.template})"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CropGeometry:
        """The geometry of :meth:`to_dict` (as ``store.json`` holds it)."""
        (h, w), (ch, cw) = d["size"], d["crop_size"]
        return cls((int(h), int(w)), bool(d["margin"]), (int(ch), int(cw)), str(d["template"]))


@dataclass(frozen=True)
class StoreInput:
    """What one row is made from: the file ``path`` (absolute) with its ``size`` and ``mtime_ns`` (None: not there);
    ``source`` of the landmarks (``given``, ``detected``, ``failed``, ``none``) and ``landmarks``, their (5, 2)
    float32 bytes (empty without); ``identity`` for the record only."""

    path: str
    identity: str | None
    size: int | None
    mtime_ns: int | None
    source: str
    landmarks: bytes

    @property
    def key(self) -> Key:
        return (self.path, self.source, self.landmarks)


@dataclass(frozen=True)
class BuildStats:
    """One :func:`ensure_crop_store`: ``rows`` in the store, ``built`` now, ``reused`` from before (a complete store
    or a killed build's chunks), ``failed`` rows without a crop, ``seconds`` (digest and build)."""

    rows: int
    built: int
    reused: int
    failed: int
    seconds: float

    def record(self) -> dict[str, Any]:
        rate = self.built / self.seconds if self.built and self.seconds > 0 else 0.0
        counts = {"rows": self.rows, "built": self.built, "reused": self.reused, "failed": self.failed}
        return {**{f"crop_store_{k}": v for k, v in counts.items()}, "crop_store_seconds": round(self.seconds, 3),
                "crop_store_images_per_s": rate}  # fmt: skip


def _key(sample: Sample, detections: Mapping[str, Detected]) -> Key:
    """The key of the crop ``FaceDataset`` makes of ``sample``: its own landmarks, else what its detections hold."""
    path = os.path.abspath(sample.path)
    if sample.landmarks is not None:
        return path, "given", np.ascontiguousarray(sample.landmarks, np.float32).tobytes()
    found = detections.get(str(sample.path))
    if found is None:
        return path, "none", b""
    if isinstance(found, tuple):
        return path, "failed", b""
    return path, "detected", np.ascontiguousarray(found, np.float32).tobytes()


def store_inputs(datasets: Sequence[FaceDataset]) -> tuple[list[StoreInput], list[tuple[int, int]]]:
    """The rows a store of ``datasets`` holds, in key order, and for each the (dataset, index) that makes it; one
    ``stat`` per row."""
    first: dict[Key, tuple[int, int, Sample]] = {}
    for k, ds in enumerate(datasets):
        for i, s in enumerate(ds.samples):
            first.setdefault(_key(s, ds.detections), (k, i, s))
    rows, refs = [], []
    for key in sorted(first):
        k, i, sample = first[key]
        size: int | None
        mtime: int | None
        try:
            st = os.stat(key[0])
            size, mtime = int(st.st_size), int(st.st_mtime_ns)
        except OSError:
            size = mtime = None
        rows.append(StoreInput(key[0], sample.identity, size, mtime, key[1], key[2]))
        refs.append((k, i))
    return rows, refs


def _digest(rows: Sequence[StoreInput]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.path}\t{r.size}\t{r.mtime_ns}\t{r.source}\t{r.landmarks.hex()}\n".encode())
    return h.hexdigest()


class CropStore:
    """A complete store at ``root`` (see the module docstring): ``geometry``, ``rows``, ``digest`` and ``failures``
    {row: (reason, message)}; :meth:`crops` is the (N, H, W, 3) uint8 memory map, opened once per process."""

    def __init__(self, root: Path, meta: Mapping[str, Any], keys: Sequence[Key]) -> None:
        self.root = Path(root)
        self.geometry = CropGeometry.from_dict(meta["geometry"])
        self.rows, self.digest = int(meta["rows"]), str(meta["digest"])
        index = pq.read_table(self.root / INDEX, columns=["status", "message"]).to_pydict()
        self.failures = {r: (s, m) for r, (s, m) in enumerate(zip(index["status"], index["message"], strict=True))
                         if s != "ok"}  # fmt: skip
        self._row_of = {key: r for r, key in enumerate(keys)}
        self._crops: np.ndarray | None = None
        self._pid = -1
        h, w = self.geometry.crop_size
        expected, size = self.rows * h * w * 3, (self.root / CROPS).stat().st_size
        if size != expected or len(index["status"]) != self.rows:
            raise CropStoreError(f"crop store {self.root} is damaged: {CROPS} is {size} bytes and the index has "
                                 f"{len(index['status'])} rows, expected {expected} bytes ({self.rows} x {h} x {w} "
                                 f"x 3) and {self.rows} rows; delete it to rebuild")  # fmt: skip

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self) -> dict[str, Any]:
        # The map is reopened in each worker process; the key table is only needed where datasets are made.
        return {**self.__dict__, "_crops": None, "_pid": -1, "_row_of": {}}

    def crops(self) -> np.ndarray:
        """(N, H, W, 3) uint8, read-only."""
        if self._crops is None or self._pid != os.getpid():
            h, w = self.geometry.crop_size
            if self.rows == 0:  # an empty file cannot be mapped
                self._crops = np.zeros((0, h, w, 3), np.uint8)
            else:
                self._crops = np.memmap(self.root / CROPS, np.uint8, "r", shape=(self.rows, h, w, 3))
            self._pid = os.getpid()
        return self._crops

    def rows_of(self, dataset: FaceDataset) -> np.ndarray:
        """(len(dataset),) int64: the store row of each sample of ``dataset``."""
        out = np.empty(len(dataset), np.int64)
        for i, s in enumerate(dataset.samples):
            row = self._row_of.get(_key(s, dataset.detections))
            if row is None:
                raise CropStoreError(f"sample {i} ({s.path}) with its landmarks is not in crop store {self.root}; "
                                     f"open it with the datasets it is to serve (ensure_crop_store)")  # fmt: skip
            out[i] = row
        return out


class StoredFaceDataset(FaceDataset):
    """``base`` (same samples, labels and failures) with its crops read from ``store`` instead of decoded and aligned:
    the bytes ``base`` would make, so batches are bit-identical."""

    def __init__(self, base: FaceDataset, store: CropStore) -> None:
        super().__init__(base.samples, base.size, base.identity_index, base.attributes, base.detector_factory,
                         base.cache_size > 0, base.cache_size, base.detections, base.margin)  # fmt: skip
        if CropGeometry.of(base) != store.geometry:
            raise CropStoreError(f"crop store {store.root} holds {store.geometry.describe()}; this dataset gives "
                                 f"{CropGeometry.of(base).describe()}")  # fmt: skip
        self.store = store
        self.rows = store.rows_of(base)

    def _crop(self, index: int) -> np.ndarray | Failure:
        row = int(self.rows[index])
        failed = self.store.failures.get(row)
        if failed is not None:
            return Failure(index, str(self.samples[index].path), *failed)
        return np.array(self.store.crops()[row])


class _ChunkWriter(Dataset[list[tuple[str, str]]]):
    """Item ``c``: make the crops of rows ``c * chunk .. (c + 1) * chunk - 1`` with their datasets, write them into
    their region of ``crops.u8``, sync it, and return each row's (status, message)."""

    def __init__(self, path: Path, datasets: Sequence[FaceDataset], refs: Sequence[tuple[int, int]], chunk: int,
                 crop_size: tuple[int, int]) -> None:  # fmt: skip
        self.path, self.datasets, self.refs, self.chunk, self.crop_size = path, list(datasets), refs, chunk, crop_size

    def __len__(self) -> int:
        return -(-len(self.refs) // self.chunk)

    def __getitem__(self, c: int) -> list[tuple[str, str]]:
        lo, hi = c * self.chunk, min(len(self.refs), (c + 1) * self.chunk)
        block = np.zeros((hi - lo, *self.crop_size, 3), np.uint8)
        status = []
        for r in range(lo, hi):
            k, i = self.refs[r]
            item = self.datasets[k][i]
            if isinstance(item, Failure):
                status.append((item.reason, item.message))
                continue
            assert isinstance(item, FaceItem) and item.image.shape == block.shape[1:], "a crop of the store's geometry"
            block[r - lo] = item.image
            status.append(("ok", ""))
        data, offset = memoryview(block.tobytes()), lo * block[0].nbytes if len(block) else 0
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while data:  # pwrite may write less than asked
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
            os.fdatasync(fd)
        except OSError as e:
            raise OSError(f"cannot write rows {lo}..{hi - 1} of {self.path}: {e.strerror}") from e
        finally:
            os.close(fd)
        return status


def _as_is(x: Any) -> Any:
    return x


def _write_index(root: Path, rows: Sequence[StoreInput], status: Sequence[tuple[str, str]] | None) -> None:
    lm = [np.frombuffer(r.landmarks, np.float32).tolist() if r.landmarks else None for r in rows]
    table = pa.table({
        "row": pa.array(range(len(rows)), pa.int64()), "path": [r.path for r in rows],
        "identity": pa.array([r.identity for r in rows], pa.string()), "size": pa.array([r.size for r in rows],
        pa.int64()), "mtime_ns": pa.array([r.mtime_ns for r in rows], pa.int64()),
        "source": [r.source for r in rows], "landmarks": pa.array(lm, pa.list_(pa.float32())),
        "status": pa.array([s for s, _ in status] if status else [None] * len(rows), pa.string()),
        "message": pa.array([m for _, m in status] if status else [None] * len(rows), pa.string()),
    })  # fmt: skip
    atomic_write_with(root / INDEX, lambda tmp: pq.write_table(table, tmp))


def _read_meta(root: Path) -> dict[str, Any] | None:
    path = root / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CropStoreError(f"crop store {root}: {META} is unreadable ({e}); delete it to rebuild") from None
    if not isinstance(meta, dict) or not {"version", "geometry", "digest", "rows"} <= set(meta):
        raise CropStoreError(f"crop store {root}: {META} lacks version, geometry, digest or rows; delete the directory "
                             f"to rebuild")  # fmt: skip
    return meta


def _explain(root: Path, rows: Sequence[StoreInput]) -> str:
    """What differs between the store's inputs and ``rows``: files added, removed, changed, other landmarks."""
    try:
        old = {r["path"]: r for r in pq.read_table(root / INDEX).to_pylist()}
    except (OSError, pa.ArrowException) as e:
        return f"its inputs digest differs ({INDEX} unreadable: {e})"
    new = {r.path: r for r in rows}
    lm = {p: (r["source"], np.asarray(r["landmarks"] or [], np.float32).tobytes()) for p, r in old.items()}
    parts = {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed size or mtime": sorted(p for p in set(new) & set(old)
                                        if (old[p]["size"], old[p]["mtime_ns"]) != (new[p].size, new[p].mtime_ns)),
        "with other landmarks or detections": sorted(p for p in set(new) & set(old)
                                                     if lm[p] != (new[p].source, new[p].landmarks)),
    }  # fmt: skip
    said = [f"{len(v)} file(s) {k} (e.g. {', '.join(v[:2])})" for k, v in parts.items() if v]
    return "; ".join(said) or "the same files in another order or multiplicity"


def _check(root: Path, meta: Mapping[str, Any], geometry: CropGeometry, rows: Sequence[StoreInput],
           digest: str) -> None:  # fmt: skip
    """Raise :class:`CropStoreError` unless the store at ``root`` (``meta``) was made for these rows and geometry."""
    if meta["version"] != VERSION:
        raise CropStoreError(f"crop store {root} has format version {meta['version']}; this facesearch reads version "
                             f"{VERSION}: delete it to rebuild")  # fmt: skip
    if meta["geometry"] != geometry.to_dict():
        old = CropGeometry.from_dict(meta["geometry"])
        raise CropStoreError(f"crop store {root} holds {old.describe()}; this run needs {geometry.describe()}: "
                             f"delete it to rebuild, or choose another directory")  # fmt: skip
    if meta["digest"] != digest:
        raise CropStoreError(f"crop store {root} was made from other inputs: {_explain(root, rows)}; delete it to "
                             f"rebuild, or choose another directory")  # fmt: skip


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building crop store %s: waiting for it", root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _done_part(root: Path, c: int, lo: int, hi: int) -> list[tuple[str, str]] | None:
    """Chunk ``c``'s statuses if its part file is whole, else None (the chunk is made again)."""
    try:
        part = json.loads((root / PARTS / f"chunk-{c:05d}.json").read_text(encoding="utf-8"))
        status = [(str(s), str(m)) for s, m in part["status"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return status if part.get("rows") == [lo, hi] and len(status) == hi - lo else None


def _build(root: Path, meta: dict[str, Any], rows: Sequence[StoreInput], refs: Sequence[tuple[int, int]],
           datasets: Sequence[FaceDataset], workers: int) -> tuple[int, int]:  # fmt: skip
    """Make the chunks without a part file, then finish the store; returns (rows built now, rows reused)."""
    chunk, (h, w) = int(meta["chunk_rows"]), meta["geometry"]["crop_size"]
    fd = os.open(root / CROPS, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != len(rows) * h * w * 3:
            os.ftruncate(fd, len(rows) * h * w * 3)
    finally:
        os.close(fd)
    (root / PARTS).mkdir(exist_ok=True)
    bounds = [(lo, min(len(rows), lo + chunk)) for lo in range(0, len(rows), chunk)]
    status: list[list[tuple[str, str]] | None] = [_done_part(root, c, lo, hi) for c, (lo, hi) in enumerate(bounds)]
    todo = [c for c, s in enumerate(status) if s is None]
    reused = sum(hi - lo for (lo, hi), s in zip(bounds, status, strict=True) if s is not None)
    writer = _ChunkWriter(root / CROPS, datasets, refs, chunk, (h, w))
    # A private generator: a DataLoader iterator otherwise draws from the global RNG (the run's dropout stream).
    loader = DataLoader(writer, batch_size=None, sampler=todo, num_workers=min(workers, len(todo)),
                        collate_fn=_as_is, generator=torch.Generator())  # fmt: skip
    t0 = time.perf_counter()
    for n, (c, got) in enumerate(zip(todo, loader, strict=True), 1):
        atomic_write_text(root / PARTS / f"chunk-{c:05d}.json", json.dumps({"rows": list(bounds[c]), "status": got}))
        status[c] = got
        if n % 20 == 0:
            log.info("crop store %s: %d of %d chunks (%.0f s)", root, n, len(todo), time.perf_counter() - t0)
    done = [s for part in status if part is not None for s in part]
    assert len(done) == len(rows), "every chunk has its statuses"
    _write_index(root, rows, done)
    failed: dict[str, int] = {}
    for s, _ in done:
        if s != "ok":
            failed[s] = failed.get(s, 0) + 1
    atomic_write_text(root / META, json.dumps({**meta, "complete": True, "ok": len(rows) - sum(failed.values()),
                                               "failed": failed}, indent=1) + "\n")  # fmt: skip
    shutil.rmtree(root / PARTS, ignore_errors=True)
    return len(rows) - reused, reused


def ensure_crop_store(root: Path, datasets: Sequence[FaceDataset], workers: int = 0,
                      chunk_rows: int = CHUNK_ROWS) -> tuple[CropStore, BuildStats]:  # fmt: skip
    """The store at ``root`` of the crops ``datasets`` make (all of the same geometry; their ``detections`` attached),
    built first if ``root`` is new or empty, finished first if a build was killed.  Chunks of ``chunk_rows`` rows are
    made in ``workers`` DataLoader processes (0: this one).  Raises :class:`CropStoreError` for a store of other
    inputs or geometry (saying what differs) and for a non-empty directory that is not a store."""
    if not datasets or chunk_rows < 1:
        raise ValueError(f"need at least one dataset and chunk_rows >= 1, got {len(datasets)} and {chunk_rows}")
    geometry = CropGeometry.of(datasets[0])
    for ds in datasets[1:]:
        if CropGeometry.of(ds) != geometry:
            raise ValueError(f"one store holds one geometry: {geometry.describe()} vs {CropGeometry.of(ds).describe()}")
    t0 = time.perf_counter()
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CropStoreError(f"crop store {root} is a file; expected a directory (new, empty or a crop store)")
    rows, refs = store_inputs(datasets)
    digest = _digest(rows)
    meta = _read_meta(root)
    built = 0
    if meta is None or not meta.get("complete"):  # build or finish it (a complete store needs no lock: read-only use)
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            meta = _read_meta(root)  # another process may have built it meanwhile
            if meta is None:
                others = [p.name for p in root.iterdir() if p.name != LOCK and not p.name.endswith(".tmp")]
                if others:
                    raise CropStoreError(f"{root} is not a crop store (no {META}) and not empty (holds "
                                         f"{sorted(others)[:3]}); choose a new or empty directory")  # fmt: skip
                sources = {s: sum(r.source == s for r in rows) for s in sorted({r.source for r in rows})}
                meta = {"version": VERSION, "geometry": geometry.to_dict(), "rows": len(rows), "digest": digest,
                        "sources": sources, "chunk_rows": chunk_rows, "opencv": cv2.__version__, "complete": False,
                        "provenance": provenance()}  # fmt: skip
                atomic_write_text(root / META, json.dumps(meta, indent=1) + "\n")
                _write_index(root, rows, None)
            _check(root, meta, geometry, rows, digest)
            if not meta.get("complete"):
                built, _ = _build(root, meta, rows, refs, datasets, workers)
                meta = _read_meta(root)
                assert meta is not None, "a built store has its store.json"
    _check(root, meta, geometry, rows, digest)
    if meta.get("opencv") != cv2.__version__:  # the warp's rounding may differ between versions
        log.warning("crop store %s was made with OpenCV %s, this is %s: its crops may differ from fresh ones in the "
                    "last bit (delete it to rebuild)", root, meta.get("opencv"), cv2.__version__)  # fmt: skip
    store = CropStore(root, meta, [r.key for r in rows])
    stats = BuildStats(len(rows), built, len(rows) - built, len(store.failures), time.perf_counter() - t0)
    log.info("crop store %s: %d rows (%d built now, %d failed) in %.1f s", root, len(rows), built,
             len(store.failures), stats.seconds)  # fmt: skip
    return store, stats


__all__ = [
    "CHUNK_ROWS",
    "VERSION",
    "BuildStats",
    "CropGeometry",
    "CropStore",
    "CropStoreError",
    "StoreInput",
    "StoredFaceDataset",
    "ensure_crop_store",
    "store_inputs",
]
