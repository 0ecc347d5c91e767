"""Read, decode and align the images of a shard: on threads of the worker, or in decode processes beside it.

One image's work is :func:`prepare_item`: the one face path (:func:`facesearch.model.faces.prepare.prepare_image`),
then, when an attribute predictor reads its own crop, :func:`predictor_crops` on the same decoded pixels.  It runs

* on ``threads`` of the embedding worker (:class:`ThreadPreparer`), the detector shared (YuNet is not thread-safe, so
  detection keeps one thread).  Threads scale poorly: libjpeg's damaged-data warnings are collected through one
  process-wide stderr redirect, so decodes take turns, and the Python between the OpenCV calls holds the GIL;
* or in ``processes`` spawned beside the worker (:class:`ProcessPreparer`), each with its own YuNet built on first
  need.  This is how a GPU worker is fed: the GPU infers ~10x faster than one core decodes and aligns.

Both return the same :class:`~facesearch.model.faces.prepare.PreparedImage` for an item (the same function on the
same bytes; tests compare the shards byte for byte), in item order, with per-stage seconds.  A process pool serves
every shard its worker runs until the job ends (:func:`process_pool`, :func:`close_pools`; its processes also leave
as soon as their worker dies) and needs a worker that may have children: a daemonic process (a Dask worker started
with ``distributed.worker.daemon: true``, the default of an external cluster) falls back to threads with a
warning.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.indexer.crop_ring import CropRing, RingSlot, open_ring, write_crops
from facesearch.indexer.inputs import InputItem
from facesearch.model.faces.detect import DetectOptions, FaceDetector
from facesearch.model.faces.prepare import AlignedFace, FaceFailure, PreparedImage, prepare_image
from facesearch.model.measure import stage
from facesearch.model.predictors import InputSpec

log = logging.getLogger(__name__)

#: Faces past the 1000th of one image are dropped (the embed module's ``FACE_STRIDE``; repeated here, not imported,
#: to keep this module below the embed module).
MAX_FACES = 1000

Prepared = tuple[PreparedImage, list[np.ndarray | None]]


@dataclass(frozen=True)
class PrepareSpec:
    """How a shard's images are prepared (picklable: it travels to the decode processes): identity crops of ``size``,
    landmarks from ``sidecars`` when asked, the attribute predictor's crops when it has a ``predictor_spec``, YuNet
    with ``detect_options`` (and ``detector_model``) for items without landmarks."""

    size: tuple[int, int]
    sidecars: bool = False
    predictor_spec: InputSpec | None = None
    detect_options: DetectOptions | None = None
    detector_model: Path | None = None


def predictor_crops(image: PreparedImage, spec: InputSpec, input_size: tuple[int, int]) -> list[np.ndarray | None]:
    """Per face of ``image`` (prepared with ``keep_image``), the crop an attribute predictor of input ``spec`` reads,
    or ``None`` for a failed face: the one face path (:func:`facesearch.model.faces.prepare.prepare_image`) again,
    on the already decoded pixels (not the file: nothing is read or decoded twice) with the face's own landmarks, at
    ``spec``'s size and margin.  When ``spec`` asks for the identity crop itself (``input_size``, no margin), that crop
    is reused."""
    out: list[np.ndarray | None] = []
    for face in image.faces:
        if isinstance(face, FaceFailure) or image.image is None:
            out.append(None)
        elif not spec.margin and spec.size == tuple(input_size):
            out.append(face.crop)
        else:
            again = prepare_image(image.image, face.landmarks, size=spec.size, margin=spec.margin,
                                  name=image.name).faces[0]  # fmt: skip
            if isinstance(again, FaceFailure):  # not expected: the same landmarks aligned this image's identity crop
                log.warning("%s: no attribute crop: %s", image.name, again.message)
            out.append(again.crop)
    return out


def prepare_item(item: InputItem, spec: PrepareSpec, detector: object, timings: dict[str, float]) -> Prepared:
    """One item -> its prepared image (decoded pixels dropped) and, per face, the predictor's crop (``None`` without a
    predictor).  ``detector``: a :class:`FaceDetector`, a function building one on first need, or ``None``."""
    return _prepare(str(item.path), item.landmarks, item.rel, spec, detector, timings)


def _prepare(path: str, landmarks: np.ndarray | None, rel: str, spec: PrepareSpec, detector: object,
             timings: dict[str, float]) -> Prepared:  # fmt: skip
    keep = spec.predictor_spec is not None
    image = prepare_image(path, landmarks, detector, size=spec.size, name=rel,  # type: ignore[arg-type]
                          sidecar=spec.sidecars, max_faces=MAX_FACES, jpeg_warnings=True, keep_image=keep,
                          timings=timings)  # fmt: skip
    if spec.predictor_spec is None:
        return image, [None] * len(image.faces)
    with stage(timings, "align"):
        crops = predictor_crops(image, spec.predictor_spec, spec.size)
    return dataclasses.replace(image, image=None), crops  # the decoded pixels are not kept past here


# --- in a decode process -------------------------------------------------------------------------------------------

_CHILD_DETECTORS: dict[tuple[DetectOptions, Path | None], FaceDetector] = {}


def _child_init(parent: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only compete
    # A pool's processes block on its task queue, whose write end they hold too: when the worker that owns them is
    # killed (a Dask nanny stopping it, SIGKILL) nothing wakes them.  Leave as soon as the parent is gone.
    threading.Thread(target=_exit_with_parent, args=(parent,), name="decode-orphan-watch", daemon=True).start()


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def _child_detector(spec: PrepareSpec) -> FaceDetector:
    assert spec.detect_options is not None, "items without landmarks need the detection options"
    key = (spec.detect_options, spec.detector_model)
    if key not in _CHILD_DETECTORS:
        _CHILD_DETECTORS[key] = FaceDetector.from_options(spec.detect_options, spec.detector_model)
    return _CHILD_DETECTORS[key]


#: What travels between a worker and its decode processes: small Python objects, the crops through a shared-memory
#: slot.  An item goes as (path, landmarks, rel); a piece's results come back as :data:`Packed` -- the slot and how
#: many of the piece's aligned crops the process wrote into it (:mod:`facesearch.indexer.crop_ring`), the crops that
#: did not fit in one (F, h, w, 3) array (or ``None``), per item (name, warnings, faces, predictor crops) with a face
#: as (landmarks, score, box, face) when aligned (its crop is the next, slot first) or (error, score, face) when
#: failed, and the piece's summed stage seconds.  Pickling an InputItem (its Path) and a PreparedImage per image
#: cost the worker ~60 us an image on an H200's host, on the thread that drives the GPU; reading pickled crops from
#: the pipes cost more.
Packed = tuple[RingSlot | None, int, np.ndarray | None,
               list[tuple[str, tuple[str, ...], list[tuple[Any, ...]], list[Any]]], dict[str, float]]  # fmt: skip


def _prepare_in_child(items: Sequence[tuple[str, np.ndarray | None, str]], spec: PrepareSpec,
                      slot: RingSlot | None = None) -> Packed:  # fmt: skip
    timings: dict[str, float] = {}
    build = (lambda: _child_detector(spec)) if spec.detect_options is not None else None
    crops: list[np.ndarray] = []
    meta = []
    for path, landmarks, rel in items:
        image, attr_crops = _prepare(path, landmarks, rel, spec, build, timings)
        faces: list[tuple[Any, ...]] = []
        for face in image.faces:
            if isinstance(face, FaceFailure):
                faces.append((face.error, face.score, face.face))
            else:
                crops.append(face.crop)
                faces.append((face.landmarks, face.score, face.box, face.face))
        meta.append((image.name, image.warnings, faces, attr_crops))
    in_ring = write_crops(slot, crops)
    rest = crops[in_ring:]
    return slot, in_ring, (np.stack(rest) if rest else None), meta, timings


def unpack(packed: Packed, ring: CropRing | None = None) -> tuple[list[Prepared], dict[str, float]]:
    """The prepared items of a :data:`Packed` piece (crops are views of one array: the slot's, copied out of
    ``ring`` and the slot freed, then those that travelled pickled) and its stage seconds."""
    slot, in_ring, rest, meta, timings = packed
    crops = rest
    if slot is not None:
        assert ring is not None, "crops in a shared-memory slot need their ring"
        shared = ring.read(slot, in_ring)
        crops = shared if rest is None else np.concatenate([shared, rest])
    out: list[Prepared] = []
    j = 0
    for name, warnings, faces, attr_crops in meta:
        built: list[AlignedFace | FaceFailure] = []
        for face in faces:
            if len(face) == 3:
                built.append(FaceFailure(*face))
            else:
                assert crops is not None, "an aligned face without its crop"
                built.append(AlignedFace(crops[j], *face))
                j += 1
        out.append((PreparedImage(name, tuple(built), warnings), attr_crops))
    return out, timings


# --- the preparers -------------------------------------------------------------------------------------------------

_POOLS: dict[int, ProcessPoolExecutor] = {}


def process_pool(processes: int) -> ProcessPoolExecutor | None:
    """This process's pool of ``processes`` spawned decode processes (made on first use, kept for the next shards),
    or ``None`` when this process may not have children (daemonic)."""
    if multiprocessing.current_process().daemon:
        log.warning("decode processes need a worker that may start processes; this one is daemonic (a Dask worker "
                    "with distributed.worker.daemon=true): decoding on threads instead")  # fmt: skip
        return None
    if processes not in _POOLS:
        ctx = multiprocessing.get_context("spawn")  # not fork: the worker holds threads, maybe a CUDA context
        _POOLS[processes] = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_child_init,
                                                initargs=(os.getpid(),))  # fmt: skip
    return _POOLS[processes]


def close_pools() -> int:
    """Stop this process's decode processes (the end of a job: a worker that closes with them running waits for
    their exit); returns how many pools were closed."""
    n = len(_POOLS)
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()
    return n


def auto_processes(device_type: str, cores: int | None = None, gpus: int = 1) -> int:
    """Decode processes a worker starts when none are asked for: on a GPU, one per core of its share of the machine
    but one (the worker's own thread feeds the GPU); on the CPU none (the CPU workers already fill the cores)."""
    if device_type != "cuda":
        return 0
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, gpus) - 1)


def _add_seconds(into: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v


class Preparer:
    """Prepares chunks of items in the background, ``depth`` chunks ahead of the consumer."""

    def __init__(self, spec: PrepareSpec, depth: int = 1) -> None:
        self.spec = spec
        self.depth = depth

    def _submit(self, chunk: Sequence[InputItem]) -> list[Future[Any]]:
        raise NotImplementedError

    def _result(self, done: Any) -> tuple[list[Prepared], dict[str, float]]:
        """A finished future's value -> its prepared items and stage seconds."""
        raise NotImplementedError

    def chunks(self, chunks: Sequence[Sequence[InputItem]], timings: dict[str, float]) -> Iterator[list[Prepared]]:
        """Each chunk's prepared items in order; stage seconds are added to ``timings``."""
        pending: list[list[Future[Any]]] = []
        nxt = 0
        for _ in range(len(chunks)):
            while nxt < len(chunks) and len(pending) <= self.depth:
                pending.append(self._submit(chunks[nxt]))
                nxt += 1
            with stage(timings, "wait"):  # the consumer stalled: preparation is the bottleneck
                values = [future.result() for future in pending.pop(0)]
            prepared: list[Prepared] = []
            for value in values:
                items, local = self._result(value)
                prepared.extend(items)
                _add_seconds(timings, local)
            yield prepared

    def close(self) -> None:
        """Free this preparer's threads (a process pool is kept for the worker's next shard)."""


class ThreadPreparer(Preparer):
    """Items on ``threads`` threads of this process, one chunk ahead; with a ``detector`` on one thread."""

    def __init__(self, spec: PrepareSpec, threads: int, detector: FaceDetector | None) -> None:
        super().__init__(spec, depth=1)
        self.detector = detector
        self.pool = ThreadPoolExecutor(max_workers=1 if detector is not None else max(1, threads),
                                       thread_name_prefix="embed-decode")  # fmt: skip
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-prefetch")

    def _one(self, item: InputItem) -> tuple[Prepared, dict[str, float]]:
        local: dict[str, float] = {}  # per item: no two threads add to one counter
        return prepare_item(item, self.spec, self.detector, local), local

    def _submit(self, chunk: Sequence[InputItem]) -> list[Future[Any]]:
        return [self.prefetch.submit(lambda: list(self.pool.map(self._one, chunk)))]

    def _result(self, done: Any) -> tuple[list[Prepared], dict[str, float]]:
        timings: dict[str, float] = {}
        for _, local in done:
            _add_seconds(timings, local)
        return [prepared for prepared, _ in done], timings

    def close(self) -> None:
        self.prefetch.shutdown()
        self.pool.shutdown()


class ProcessPreparer(Preparer):
    """Items in a pool of decode processes, ``depth`` chunks ahead, each chunk cut into one piece per process (one
    task per piece: every process busy, and few round trips through the parent, whose one thread also feeds the
    model)."""

    def __init__(self, spec: PrepareSpec, pool: Executor, processes: int, depth: int = 4) -> None:
        super().__init__(spec, depth=depth)
        self.pool = pool
        self.processes = processes
        self.ring: CropRing | None = None
        self.ring_tried = False  # the ring is opened at the first chunk (its slots are sized by its pieces)

    def _submit(self, chunk: Sequence[InputItem]) -> list[Future[Any]]:
        piece = max(1, -(-len(chunk) // self.processes))
        if not self.ring_tried:
            # A slot per piece in flight (depth + 1 chunks pending, one more being consumed), sized by the first
            # chunk's pieces with room for some images with two faces.
            self.ring_tried = True
            self.ring = open_ring((self.depth + 2) * self.processes, piece + piece // 4 + 2, (*self.spec.size, 3))
        small = [(str(it.path), it.landmarks, it.rel) for it in chunk]
        futures = []
        for i in range(0, len(small), piece):
            slot = self.ring.take() if self.ring is not None else None
            futures.append(self.pool.submit(_prepare_in_child, small[i : i + piece], self.spec, slot))
        return futures

    def _result(self, done: Any) -> tuple[list[Prepared], dict[str, float]]:
        return unpack(done, self.ring)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()


def make_preparer(spec: PrepareSpec, processes: int, threads: int, detector: FaceDetector | None) -> Preparer:
    """Processes when ``processes`` > 0 and this process may start them, else threads."""
    pool = process_pool(processes) if processes > 0 else None
    if pool is None:
        return ThreadPreparer(spec, threads, detector)
    return ProcessPreparer(spec, pool, processes)


__all__ = [
    "PrepareSpec",
    "Preparer",
    "ProcessPreparer",
    "ThreadPreparer",
    "auto_processes",
    "close_pools",
    "make_preparer",
    "predictor_crops",
    "prepare_item",
    "process_pool",
]
