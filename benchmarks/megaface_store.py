"""The distractor rows of a MegaFace run in memory: decoded once, from the start of the run, for every size.

A run streams its distractors once per size, each size a selection of the same shard directory's rows.  Decoding the
embeddings is the costly part of reading them (float16 lists: ~4 s of one core per 1M x 1024 rows), and a size of 10
distractors used to decode the whole directory to find its 10 rows.  :class:`DecodedShards` decodes every ok row once,
in the stored precision, into one array whose pages are mapped in bulk; it starts on a background thread when the run
starts, so the probes, the lists and the first tiles' scoring overlap it, and readers wait only for the rows they need.

    store = DecodedShards(shard_dir, attributes=("Male",))            # decoding starts here
    store.wait(1000)                                                  # rows [0, 1000) are in store.rows
    store.close()                                                     # a run that ends early stops it
"""

from __future__ import annotations

import mmap
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facesearch.indexer import shards

#: Rows per streamed block (one Parquet row group of the project's shards).
BLOCK_ROWS = 16384


def shard_attributes(meta: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The attribute columns ``names`` of an Arrow table as float32 arrays (null -> NaN)."""
    return {a: meta.column(a).to_numpy(zero_copy_only=False).astype(np.float32) for a in names}


class Arena:
    """Anonymous memory for one array, its pages mapped in bulk on request (where the kernel can): on a VM, faulting
    2 GB in one 4 KiB page at a time cost ~4 s of kernel time against ~0.5 s in bulk (``MADV_POPULATE_WRITE``)."""

    POPULATE_WRITE = 23  # MADV_POPULATE_WRITE (Linux >= 5.14); Python 3.11's mmap does not name it

    def __init__(self, nbytes: int) -> None:
        self.map = mmap.mmap(-1, max(nbytes, 1))
        self.bulk = hasattr(self.map, "madvise") and sys.platform.startswith("linux")

    def array(self, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(self.map, dtype=dtype, count=shape[0] * shape[1]).reshape(shape)

    def populate(self, start: int, length: int) -> None:
        """Map the pages of [start, start + length) now (a no-op where the kernel cannot)."""
        if not self.bulk or length <= 0:
            return
        page = mmap.PAGESIZE
        lo = start // page * page
        try:
            self.map.madvise(self.POPULATE_WRITE, lo, min(len(self.map), start + length) - lo)
        except (OSError, ValueError):  # an older kernel: pages fault in on first write, as usual
            self.bulk = False


def ok_ids(directory: Path, manifest: shards.Manifest | None = None) -> np.ndarray:
    """The ids of a shard directory's ok rows, in order (reading only the ``id`` and ``status`` columns)."""
    manifest = manifest or shards.read_manifest(directory)
    parts = [np.zeros(0, np.int64)]
    for entry in manifest.shards:
        path = Path(directory) / entry.file
        try:
            t = pq.read_table(path, columns=["id", "status"])
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"cannot read shard {path}: {e}") from e
        ok = pc.equal(t.column("status"), "ok").to_numpy(zero_copy_only=False)
        parts.append(t.column("id").to_numpy()[ok].astype(np.int64, copy=False))
    return np.concatenate(parts)


#: The most memory a run's decoded store may take (1M x 1024 float16 rows: 2 GiB); a larger directory is decoded per
#: size, as it streams.
STORE_LIMIT_BYTES = 3 << 30


def fits(directory: Path, limit_bytes: int = STORE_LIMIT_BYTES) -> bool:
    """Whether a shard directory's ok rows, in their stored precision, fit ``limit_bytes`` (from its manifest)."""
    manifest = shards.read_manifest(directory)
    itemsize = 2 if manifest.dtype == "float16" else 4
    return sum(e.ok_rows for e in manifest.shards) * manifest.d * itemsize <= limit_bytes


class DecodedShards:
    """Every ok row of a shard directory (:attr:`ids`, in order) decoded in the stored precision into :attr:`rows`,
    with the ``attributes`` columns in :attr:`attrs`, by a background thread started here.  :meth:`wait` blocks until
    rows [0, upto) are in; an error reading the shards (or rows that are no longer those listed here: the directory
    changed) is raised there."""

    def __init__(self, directory: Path, attributes: Sequence[str] = ()) -> None:
        self.directory, self.attributes = Path(directory), tuple(attributes)
        manifest = shards.read_manifest(self.directory)
        self.ids = ok_ids(self.directory, manifest)
        self.dtype = np.dtype(np.float16 if manifest.dtype == "float16" else np.float32)
        n, d = len(self.ids), manifest.d
        self.arena = Arena(n * d * self.dtype.itemsize)
        self.rows = self.arena.array((n, d), self.dtype)
        self.attrs = {a: np.full(n, np.nan, np.float32) for a in self.attributes}
        self.filled = 0
        self._done = False
        self._stop = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._decode, name="decode-shards", daemon=True)
        self._thread.start()

    def _decode(self) -> None:
        pos, row_bytes = 0, self.rows.shape[1] * self.dtype.itemsize
        try:
            blocks = shards.iter_shards(self.directory, BLOCK_ROWS, columns=list(self.attributes),
                                        dtype=self.dtype.type, threads=False, joined=False)  # fmt: skip
            for block in blocks:
                if self._stop:
                    return
                m = len(block)
                if not np.array_equal(block.ids, self.ids[pos : pos + m]):
                    raise ValueError(f"its ok rows changed while the run read them (ids {int(block.ids[0])}.. are not "
                                     f"the ones listed at the start)")  # fmt: skip
                self.arena.populate(pos * row_bytes, m * row_bytes)
                self.rows[pos : pos + m] = block.xb
                for name, values in shard_attributes(block.meta, self.attributes).items():
                    self.attrs[name][pos : pos + m] = values
                pos += m
                with self._cond:
                    self.filled = pos
                    self._cond.notify_all()
            if pos != len(self.ids):
                raise ValueError(f"{len(self.ids) - pos} of its ok rows listed at the start are gone")
        except BaseException as e:  # handed to the reader
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    @property
    def done(self) -> bool:
        """Whether the decoding thread has ended (all rows in, or an error to raise in :meth:`wait`)."""
        return self._done

    def wait(self, upto: int) -> None:
        """Return once rows [0, ``upto``) are decoded; a ``ValueError`` naming the directory if they cannot be."""
        with self._cond:
            while self.filled < upto and not self._done:
                self._cond.wait()
            if self.filled >= upto:
                return
            if self._error is not None:
                raise ValueError(f"cannot read the distractor shards {self.directory}: {self._error}") from self._error
            raise ValueError(f"the distractor shards {self.directory} were closed before row {upto} was read")

    def close(self) -> None:
        """Stop decoding after the current block (a run that ends early); rows already in stay readable."""
        self._stop = True


__all__ = ["BLOCK_ROWS", "STORE_LIMIT_BYTES", "Arena", "DecodedShards", "fits", "ok_ids", "shard_attributes"]
