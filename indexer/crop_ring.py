"""Aligned crops from the decode processes to their worker through shared memory, not through pipes.

A worker that feeds a GPU receives ~25,000 crops a second from its decode processes
(:mod:`facesearch.indexer.prepare_pool`).  Sent as pickles, every 32 kB crop is read from a pipe in 64 kB pieces and
unpickled by the pool's result thread, in the worker's one Python process, whose main thread drives the GPU: the two
threads take turns on the GIL at every piece.  A :class:`CropRing` is one shared-memory segment cut into slots of
``capacity`` crops; a task takes a slot (:meth:`CropRing.take`), the decode process writes the crops it aligned
straight into it (:func:`write_crops`) and returns only their count and the small per-face records, and the worker
copies the slot's crops out in one ``memcpy`` and frees it (:meth:`CropRing.read`).

Crops that do not fit (an image with many detected faces) and every crop of a task without a slot (none free, or a
segment already closed) travel pickled as before: the ring is a fast path, never a limit.  The segment is unlinked
when its preparer closes; the multiprocessing resource tracker, shared by the worker and its spawned children,
removes it should the worker die first.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RingSlot:
    """One slot of a ring, as it travels to a decode process: the segment's ``name``, the slot's byte ``offset``,
    how many crops it holds (``capacity``) and their (h, w, 3) ``shape``."""

    name: str
    index: int
    offset: int
    capacity: int
    shape: tuple[int, int, int]


class CropRing:
    """``slots`` slots of ``capacity`` uint8 crops of ``shape`` in one shared-memory segment (made here, unlinked by
    :meth:`close`)."""

    def __init__(self, slots: int, capacity: int, shape: tuple[int, int, int]) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError(f"a crop ring needs >= 1 slot of >= 1 crop, got {slots} x {capacity}")
        self.shape = tuple(int(s) for s in shape)
        self.capacity = int(capacity)
        self.slot_bytes = self.capacity * math.prod(self.shape)
        self.shm: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
            create=True, size=slots * self.slot_bytes
        )
        self.free = list(range(slots - 1, -1, -1))

    def take(self) -> RingSlot | None:
        """A free slot, or ``None`` when all are in use (or the ring is closed): then the crops are pickled."""
        if self.shm is None or not self.free:
            return None
        i = self.free.pop()
        return RingSlot(self.shm.name, i, i * self.slot_bytes, self.capacity, self.shape)  # type: ignore[arg-type]

    def read(self, slot: RingSlot, n: int) -> np.ndarray:
        """A copy of the first ``n`` crops a decode process wrote into ``slot`` (n, h, w, 3); frees the slot."""
        assert self.shm is not None and slot.name == self.shm.name and 0 <= n <= slot.capacity, (slot, n)
        view = np.ndarray((n, *self.shape), np.uint8, buffer=self.shm.buf, offset=slot.offset)
        out = view.copy()
        del view  # no view may outlive the segment's close
        self.release(slot)
        return out

    def release(self, slot: RingSlot) -> None:
        """Give ``slot`` back unread (its task failed or sent no crops through it)."""
        if self.shm is not None and slot.name == self.shm.name and slot.index not in self.free:
            self.free.append(slot.index)

    def close(self) -> None:
        """Unlink the segment (decode processes still attached keep their mapping until they let go of it)."""
        if self.shm is None:
            return
        shm, self.shm = self.shm, None
        shm.close()
        shm.unlink()


def open_ring(slots: int, capacity: int, shape: tuple[int, int, int], where: str = "/dev/shm") -> CropRing | None:
    """A ring of ``slots`` slots, fewer where the shared-memory file system (``where``) has less than twice its size
    free (a container's default /dev/shm is 64 MB: a segment past it would fail with SIGBUS on a write, not at
    creation), or ``None`` (with a warning) when not even one slot fits or the segment cannot be made."""
    try:
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    slot_bytes = capacity * math.prod(shape)
    if free is not None:
        slots = min(slots, free // 2 // max(1, slot_bytes))
    if slots < 1:
        log.warning("%s has %s bytes free: aligned crops travel pickled (slower on a GPU worker)", where, free)
        return None
    try:
        return CropRing(int(slots), capacity, shape)
    except OSError as e:
        log.warning("no shared memory for the aligned crops (%s): they travel pickled", e)
        return None


# --- in a decode process -------------------------------------------------------------------------------------------

#: The segments this process has attached, newest last; a few are kept (a worker running two shards at a time has
#: two rings), older ones let go.
_ATTACHED: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()
_KEEP_ATTACHED = 4


def _attach(name: str) -> shared_memory.SharedMemory | None:
    shm = _ATTACHED.get(name)
    if shm is not None:
        _ATTACHED.move_to_end(name)
        return shm
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:  # its preparer closed meanwhile (a failed shard): the crops go pickled
        return None
    _ATTACHED[name] = shm
    for old in [n for n in _ATTACHED if n != name and _unlinked(n)]:  # a closed preparer's: free its memory now
        _ATTACHED.pop(old).close()
    while len(_ATTACHED) > _KEEP_ATTACHED:
        _ATTACHED.popitem(last=False)[1].close()
    return shm


def _unlinked(name: str) -> bool:
    """Whether segment ``name`` was unlinked by its ring (Linux: its /dev/shm entry is gone; elsewhere: unknown,
    treated as still in use)."""
    return os.path.isdir("/dev/shm") and not os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))


def write_crops(slot: RingSlot | None, crops: list[np.ndarray]) -> int:
    """Write the first crops of ``crops`` (each (h, w, 3) uint8 of the slot's shape) into ``slot``; returns how many
    went there (0 without a slot or when its segment is gone); the caller sends the rest pickled."""
    if slot is None or not crops:
        return 0
    shm = _attach(slot.name)
    if shm is None:
        return 0
    n = min(len(crops), slot.capacity)
    view = np.ndarray((slot.capacity, *slot.shape), np.uint8, buffer=shm.buf, offset=slot.offset)
    for j in range(n):
        view[j] = crops[j]
    del view
    return n


__all__ = ["CropRing", "RingSlot", "open_ring", "write_crops"]
