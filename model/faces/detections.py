"""The detection cache: faces without landmarks are detected once per image, before the steps that use them, into
a :class:`DetectionCache` kept beside the run (``detections.jsonl``, keyed by path, size and mtime), so later epochs,
resumed runs, ``attributes train`` / ``label`` and other runs sharing the file never detect an image twice.

:func:`attach_detections` fills the cache for some datasets (in DataLoader worker processes) and hands each
:class:`facesearch.model.faces.datasets.FaceDataset` what was found; :func:`detect_file` is the per-file step.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facesearch.model.assets import find_yunet, yunet_help, yunet_path
from facesearch.model.faces.datasets import FILE_REASONS, Detected, FaceDataset, Failure, Sample
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.faces.images import ImageError, read_image
from facesearch.model.fileio import atomic_write_text

log = logging.getLogger(__name__)

#: The cache's file name in a run's output folder.
DETECTIONS = "detections.jsonl"


def detector_factory(samples: Sequence[Sample]) -> Callable[[], FaceDetector] | None:
    """``FaceDetector`` (YuNet with its defaults) if some sample lacks landmarks and the model file exists, else None
    (with a warning when detection was needed)."""
    if all(s.landmarks is not None for s in samples):
        return None
    found = find_yunet()
    if found is not None and found.is_file():
        return FaceDetector
    where = f"no YuNet model is at {found}" if found is not None else "no YuNet model was found"
    log.warning("some images have no landmarks and %s: they will be skipped (%s)", where, yunet_help())
    return None


def _detector_settings() -> dict[str, Any]:
    """What cached detections depend on besides the model file: ``FaceDetector``'s default settings (training
    detects with the defaults), so a changed default invalidates the cache."""
    params = inspect.signature(FaceDetector.__init__).parameters
    return {k: repr(p.default) for k, p in params.items() if k not in ("self", "model_path")}


def detector_identity(model_path: Path | None = None) -> dict[str, Any]:
    """The identity of the default detector: model file name and content hash, and its settings."""
    path = yunet_path(model_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return {"model": path.name, "sha256": digest, "settings": _detector_settings()}


#: Failures that are a property of the file's content, so they are cached with its size and mtime; ``missing`` and
#: ``unreadable`` are not (a file may appear, a permission may change).
_CACHED_FAILURES = frozenset(FILE_REASONS - {"missing", "unreadable", "not_a_file"} | {"no_face"})


class DetectionCache:
    """Face detections of image files, one JSON line per file after a header naming the detector (JSON lines, written
    atomically).  An entry is used only while the file has the same size and mtime, so a changed image is detected
    again; a file made by another detector (model or settings) is ignored (and replaced on save), and so are rows
    cut short by a kill.  Processes sharing one file never corrupt it (atomic replace); the last to save wins.
    Row: ``path`` (absolute), ``size``, ``mtime_ns``, ``landmarks`` [10] (x1, y1, ... in our order), ``box`` [4],
    ``score`` — or ``reason`` and ``message`` (``no_face`` or a file-content failure) with null landmarks."""

    VERSION = 1

    def __init__(self, path: Path, detector: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.detector = json.loads(json.dumps(dict(detector)))  # as it reads back from the file
        self._rows: dict[str, tuple[int, int, str]] = {}  # abs path -> (size, mtime_ns, JSON line)
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cannot read the detection cache %s (%s): detecting again", self.path, e)
            return
        if not lines or _json(lines[0]) != {"version": self.VERSION, "detector": self.detector}:
            if lines:
                log.info("%s was written by another detector or version: detecting again", self.path)
            return
        bad = 0
        for line in lines[1:]:
            row = _json(line)
            try:
                self._rows[row["path"]] = (int(row["size"]), int(row["mtime_ns"]), line)
            except (TypeError, KeyError, ValueError):
                bad += 1
        if bad:
            log.warning("%s: %d damaged rows ignored (those images are detected again)", self.path, bad)

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, path: Path | str) -> Detected | None:
        """What was found in ``path`` if it is cached and the file is unchanged, else None."""
        key = os.path.abspath(path)
        row = self._rows.get(key)
        if row is None:
            return None
        try:
            st = os.stat(key)
        except OSError:
            return None
        if (row[0], row[1]) != (st.st_size, st.st_mtime_ns):
            return None
        return _detected(json.loads(row[2]))

    def put(self, row: Mapping[str, Any]) -> bool:
        """Remember a row of :func:`detect_file` if it is cacheable (the file was there, the outcome depends only on
        its content); returns whether it was kept."""
        if row["size"] is None or (row["reason"] is not None and row["reason"] not in _CACHED_FAILURES):
            return False
        self._rows[row["path"]] = (row["size"], row["mtime_ns"], json.dumps(row))
        return True

    def save(self) -> None:
        header = json.dumps({"version": self.VERSION, "detector": self.detector})
        atomic_write_text(self.path, "".join([header + "\n", *(line + "\n" for _, _, line in self._rows.values())]))


def _json(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _detected(row: Mapping[str, Any]) -> Detected:
    if row["landmarks"] is None:
        return (str(row["reason"]), str(row["message"]))
    return np.asarray(row["landmarks"], dtype=np.float32).reshape(5, 2)


def detect_file(path: str, detector: FaceDetector) -> dict[str, Any]:
    """Detect the best face of the image file ``path`` -> a :class:`DetectionCache` row (size and mtime are taken
    before reading, so a file changed meanwhile is detected again next time)."""
    row: dict[str, Any] = dict.fromkeys(("size", "mtime_ns", "landmarks", "box", "score", "reason", "message"))
    row["path"] = path
    try:
        st = os.stat(path)
        row.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        image = read_image(path)
        found = detector.detect(image)
        if found is None:
            raise ImageError(path, "no_face", f"no face found in the {image.shape[1]}x{image.shape[0]} image")
    except ImageError as e:
        row.update(reason=e.reason, message=str(e))
        return row
    except FileNotFoundError:
        row.update(size=None, reason="missing", message=f"{path}: no such file [missing]")
        return row
    except (OSError, cv2.error) as e:  # one file's decoder or OS error must not stop the pass
        row.update(size=None, reason="unreadable", message=f"{path}: {e} [unreadable]")
        return row
    row.update(landmarks=[float(v) for v in found.landmarks.reshape(-1)], box=[float(v) for v in found.box],
               score=float(found.score))  # fmt: skip
    return row


class _DetectFiles(Dataset[dict[str, Any]]):
    """Runs :func:`detect_file` over ``paths``, one detector per process (DataLoader workers)."""

    def __init__(self, paths: Sequence[str], factory: Callable[[], FaceDetector]) -> None:
        self.paths, self.factory = list(paths), factory
        self._detector: FaceDetector | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_detector": None, "_pid": -1}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._detector is None or self._pid != os.getpid():
            self._detector, self._pid = self.factory(), os.getpid()
        return detect_file(self.paths[i], self._detector)


@dataclass(frozen=True)
class DetectStats:
    """One detection pass: ``images`` needing detection, ``cached`` found in the cache, ``new`` detected now,
    ``failed`` of those with no usable face or file, ``seconds``."""

    images: int
    cached: int
    new: int
    failed: int
    seconds: float

    def record(self) -> dict[str, Any]:
        rate = self.new / self.seconds if self.seconds > 0 else 0.0
        counts = {"images": self.images, "cached": self.cached, "new": self.new, "failed": self.failed}
        return {**{f"detect_{k}": v for k, v in counts.items()}, "detect_seconds": round(self.seconds, 3),
                "detect_images_per_s": rate}  # fmt: skip


def attach_detections(
    datasets: Sequence[FaceDataset],
    cache: DetectionCache,
    workers: int = 0,
    only: Sequence[Iterable[int] | None] | None = None,
    save_every_s: float = 60.0,
) -> DetectStats:
    """Detect every face of ``datasets`` that has no landmarks and is not in ``cache`` (restricted to the indices
    ``only[i]`` of dataset ``i`` when given), save the cache, and give each dataset its ``detections``.  Detection
    runs in ``workers`` DataLoader processes with the datasets' ``detector_factory``; the cache is saved every
    ``save_every_s`` seconds, so a killed pass keeps most of its work.  Missing files are left to the dataset (they
    fail as ``missing`` when read, and are not cached: they may appear)."""
    t0 = time.perf_counter()
    wanted: dict[str, None] = {}
    for k, ds in enumerate(datasets):
        idx = range(len(ds)) if only is None or only[k] is None else sorted(set(only[k] or ()))
        wanted.update((str(ds.samples[i].path), None) for i in idx if ds.samples[i].landmarks is None)
    found: dict[str, Detected] = {}
    for p in wanted:
        hit = cache.lookup(p)
        if hit is not None:
            found[p] = hit
    todo = [p for p in wanted if p not in found and os.path.exists(p)]
    factory = next((ds.detector_factory for ds in datasets if ds.detector_factory is not None), None)
    failed = 0
    if todo and factory is not None:
        failed = _detect_into(cache, found, todo, factory, workers, save_every_s)
    for ds in datasets:
        ds.detections = {**ds.detections, **{str(s.path): found[str(s.path)] for s in ds.samples if
                                              str(s.path) in found}}  # fmt: skip
    new = len(todo) if factory is not None else 0
    return DetectStats(len(wanted), len(wanted) - len(todo), new, failed, time.perf_counter() - t0)


def _detect_into(
    cache: DetectionCache,
    found: dict[str, Detected],
    todo: Sequence[str],
    factory: Callable[[], FaceDetector],
    workers: int,
    save_every_s: float,
) -> int:
    """Detect ``todo`` into ``cache`` and ``found``; returns how many have no usable face or file."""
    # A private generator: a DataLoader iterator otherwise draws from the global RNG, so a run that detects
    # would get another dropout stream than the same run on a filled cache.
    loader = DataLoader(_DetectFiles([os.path.abspath(p) for p in todo], factory), batch_size=16, num_workers=workers,
                        collate_fn=list, generator=torch.Generator())  # fmt: skip
    done = failed = 0
    saved = time.perf_counter()
    for rows in loader:
        for p, row in zip(todo[done : done + len(rows)], rows, strict=True):
            failed += row["reason"] is not None
            if cache.put(row):
                found[p] = _detected(row)
        done += len(rows)
        if time.perf_counter() - saved > save_every_s:
            cache.save()
            saved = time.perf_counter()
            log.info("detected %d of %d faces (cache %s)", done, len(todo), cache.path)
    cache.save()
    return failed


def known_failures(ds: FaceDataset) -> list[Failure]:
    """The samples of ``ds`` that its ``detections`` already mark as failed (no face, an unusable file)."""
    out = []
    for i, s in enumerate(ds.samples):
        found = ds.detections.get(str(s.path)) if s.landmarks is None else None
        if isinstance(found, tuple):
            out.append(Failure(i, str(s.path), *found))
    return out


__all__ = [
    "DETECTIONS",
    "DetectStats",
    "DetectionCache",
    "attach_detections",
    "detect_file",
    "detector_factory",
    "detector_identity",
    "known_failures",
]
