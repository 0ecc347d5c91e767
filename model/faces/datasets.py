"""The torch ``FaceDataset`` over aligned crops, its batches, and the accounting of files that cannot be used.

``FaceDataset`` turns a :class:`facesearch.model.faces.samples.Sample` into an aligned (h, w, 3) uint8 crop, or into a
``Failure`` for a bad file so that one broken image never stops an epoch.  ``SkipReport`` counts the failures.  The
readers (:mod:`facesearch.model.faces.samples`: list CSV, CASIA folders, labels CSV;
:mod:`facesearch.model.faces.celeba`: CelebA's lists) are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import zlib
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
from torch.utils.data import Dataset

from facesearch.model.config import ATTRIBUTES, INPUT_SIZE
from facesearch.model.faces.align import margin_geometry
from facesearch.model.faces.celeba import read_celeba, read_identity_file
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.faces.images import ImageError
from facesearch.model.faces.prepare import FaceFailure, prepare_image
from facesearch.model.faces.samples import (
    IMAGE_SUFFIXES,
    LANDMARK_COLUMNS,
    Sample,
    read_attribute_labels,
    read_casia,
    read_list,
    write_attribute_labels,
)
from facesearch.model.fileio import atomic_write_text

log = logging.getLogger(__name__)

#: What face detection found for one file: its (5, 2) float32 landmarks, or ``(reason, message)`` why there are none.
Detected: TypeAlias = np.ndarray | tuple[str, str]

#: ``ImageError`` reasons meaning the file itself is unusable (the others: a readable image without a usable face).
FILE_REASONS: frozenset[str] = frozenset(
    {
        "missing",
        "unreadable",
        "not_a_file",
        "too_large",
        "empty",
        "not_an_image",
        "unsupported_format",
        "truncated",
        "corrupt",
    }
)


def stat_failures(samples: Sequence[Sample]) -> list[Failure]:
    """The samples whose file cannot be read, found with one ``stat`` each (no decoding, so cheap for 200k files):
    ``missing``, ``unreadable`` (no permission), ``not_a_file`` (a folder, FIFO, device) or ``empty``; ``index`` is
    into ``samples``."""
    out = []
    for i, s in enumerate(samples):
        reason, detail = "", ""
        try:
            st = os.stat(s.path)
        except FileNotFoundError:
            reason, detail = "missing", "no such file; expected an image file"
        except OSError as e:
            reason, detail = "unreadable", f"cannot stat ({e.strerror}); expected a readable image file"
        else:
            if not stat.S_ISREG(st.st_mode):
                reason, detail = "not_a_file", "not a regular file; expected an image file"
            elif st.st_size == 0:
                reason, detail = "empty", "zero-byte file; expected an image file"
        if reason:
            out.append(Failure(i, str(s.path), reason, str(ImageError(s.path, reason, detail))))
    return out


@dataclass(frozen=True)
class FaceItem:
    """An aligned face: ``image`` (h, w, 3) uint8 RGB; ``identity`` class id or -1; ``attributes`` (M,) float32
    with NaN = unknown; ``index`` into the dataset."""

    image: np.ndarray
    identity: int
    attributes: np.ndarray
    index: int


@dataclass(frozen=True)
class Failure:
    """A sample that could not be turned into a face; ``reason`` is an ``ImageError`` reason code."""

    index: int
    path: str
    reason: str
    message: str


class FaceDataset(Dataset["FaceItem | Failure"]):
    """Aligned face crops from ``samples``; ``__getitem__`` returns a ``FaceItem`` or, for a bad file, a ``Failure``.

    Every sample goes through :func:`facesearch.model.faces.prepare.prepare_image` (the one face path).  Samples with
    landmarks are aligned directly; the others are detected with a detector built lazily, once per process
    (DataLoader workers), by ``detector_factory`` — unless ``detections`` (keyed by ``str(sample.path)``)
    already holds what detection found for the file: its (5, 2) float32 landmarks, or ``(reason, message)`` of why it
    has none (see :class:`facesearch.model.faces.detections.DetectionCache`).  ``identity_index`` maps identity names
    to class ids (default: sorted names of ``samples``; names not in it get -1).  ``cache=True`` keeps up to
    ``cache_size`` results (crops and failures) in a per-process LRU; with ``persistent_workers=True`` it spans epochs.
    ``margin``: the attribute predictors' margin crop around the ``size`` template (:attr:`crop_size`, 128x112 for
    112x96) instead of the template crop itself.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: tuple[int, int] = INPUT_SIZE,
        identity_index: Mapping[str, int] | None = None,
        attributes: Sequence[str] = ATTRIBUTES,
        detector_factory: Callable[[], FaceDetector] | None = None,
        cache: bool = False,
        cache_size: int = 4096,
        detections: Mapping[str, Detected] | None = None,
        margin: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.size = (int(size[0]), int(size[1]))
        self.margin = margin
        if identity_index is None:
            names = sorted({s.identity for s in self.samples if s.identity is not None})
            identity_index = {name: i for i, name in enumerate(names)}
        self.identity_index = dict(identity_index)
        self.attributes = tuple(attributes)
        self.detector_factory = detector_factory
        self.detections: Mapping[str, Detected] = {} if detections is None else detections
        self.cache_size = cache_size if cache else 0
        self._cache: OrderedDict[int, np.ndarray | Failure] = OrderedDict()
        self._detector: FaceDetector | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the crops this dataset gives: ``size``, or its margin canvas with ``margin``."""
        return margin_geometry(self.size)[0] if self.margin else self.size

    def __getstate__(self) -> dict[str, object]:
        # Live OpenCV detectors cannot be pickled; each worker builds its own.
        state = self.__dict__.copy()
        state.update(_detector=None, _pid=-1, _cache=OrderedDict())
        return state

    def _get_detector(self) -> FaceDetector | None:
        if self.detector_factory is None:
            return None
        if self._detector is None or self._pid != os.getpid():
            self._detector, self._pid = self.detector_factory(), os.getpid()
        return self._detector

    def _crop(self, index: int) -> np.ndarray | Failure:
        sample = self.samples[index]
        landmarks = sample.landmarks
        if landmarks is None:
            found = self.detections.get(str(sample.path))
            if isinstance(found, tuple):
                return Failure(index, str(sample.path), *found)
            landmarks = found
        face = prepare_image(
            sample.path, landmarks, self._get_detector, size=self.size, max_faces=1, margin=self.margin
        ).faces[0]
        if isinstance(face, FaceFailure):  # one broken file never stops an epoch
            return Failure(index, str(sample.path), face.reason, face.message)
        return face.crop

    def __getitem__(self, index: int) -> FaceItem | Failure:
        index = int(index)
        crop = self._cache.get(index) if self.cache_size else None
        if crop is None:
            crop = self._crop(index)
            if self.cache_size:
                self._cache[index] = crop
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        elif self.cache_size:
            self._cache.move_to_end(index)
        if isinstance(crop, Failure):
            return crop
        sample = self.samples[index]
        known = sample.attributes or {}
        attrs = np.array([known.get(a, np.nan) for a in self.attributes], dtype=np.float32)
        identity = -1 if sample.identity is None else self.identity_index.get(sample.identity, -1)
        return FaceItem(crop, identity, attrs, index)


@dataclass
class FaceBatch:
    """Collated faces: ``images`` (B, h, w, 3) uint8, ``identities`` (B,) int64, ``attributes`` (B, M) float32,
    ``indices`` (B,) int64; ``failures`` are the items dropped from the tensors."""

    images: torch.Tensor
    identities: torch.Tensor
    attributes: torch.Tensor
    indices: torch.Tensor
    failures: list[Failure]


def collate_faces(items: Sequence[FaceItem | Failure]) -> FaceBatch:
    """DataLoader ``collate_fn``: stack the ``FaceItem``s, keep the ``Failure``s aside (B may be 0)."""
    faces = [it for it in items if isinstance(it, FaceItem)]
    failures = [it for it in items if isinstance(it, Failure)]
    images = np.stack([f.image for f in faces]) if faces else np.zeros((0, 0, 0, 3), dtype=np.uint8)
    attributes = np.stack([f.attributes for f in faces]) if faces else np.zeros((0, 0), dtype=np.float32)
    return FaceBatch(
        images=torch.from_numpy(images),
        identities=torch.tensor([f.identity for f in faces], dtype=torch.int64),
        attributes=torch.from_numpy(attributes),
        indices=torch.tensor([f.index for f in faces], dtype=torch.int64),
        failures=failures,
    )


class SkipReport:
    """Failures seen so far (one per path) out of ``total`` files."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.failures: dict[str, Failure] = {}
        self._reasons: Counter[str] = Counter()

    def add(self, failures: Iterable[Failure]) -> None:
        for failure in failures:
            if failure.path not in self.failures:
                self.failures[failure.path] = failure
                self._reasons[failure.reason] += 1

    def __len__(self) -> int:
        return len(self.failures)

    def counts(self) -> Counter[str]:
        return Counter(self._reasons)

    def unreadable(self) -> int:
        """How many of the failures are unusable files (:data:`FILE_REASONS`), not images without a usable face."""
        return sum(n for reason, n in self._reasons.items() if reason in FILE_REASONS)

    def summary(self) -> str:
        """One line, e.g. ``skipped 4 of 100 files: 3 truncated, 1 not_an_image``."""
        n = len(self.failures)
        head = f"skipped {n} of {self.total} files" if self.total is not None else f"skipped {n} files"
        reasons = sorted(self.counts().items(), key=lambda kv: (-kv[1], kv[0]))
        return head + (": " + ", ".join(f"{c} {r}" for r, c in reasons) if reasons else "")

    def write_jsonl(self, path: Path) -> None:
        """One JSON object per failure (index, path, reason, message), written atomically."""
        lines = [json.dumps(asdict(f)) + "\n" for f in self.failures.values()]
        atomic_write_text(Path(path), "".join(lines))


def split_holdout(samples: Sequence[Sample], per_identity: int = 1, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold ``per_identity`` images of each identity out for validation -> (train, val), original order kept.

    Only identities with more than ``per_identity`` images give any away, so every identity stays in train; samples
    without identity stay in train.  The choice per identity depends only on (seed, identity, its images), so it is
    stable when other identities are added.
    """
    if per_identity < 0:
        raise ValueError(f"per_identity must be >= 0, got {per_identity}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.identity is not None:
            groups[s.identity].append(i)
    held: set[int] = set()
    for identity, idx in groups.items():
        if len(idx) > per_identity:
            rng = np.random.default_rng([seed, zlib.crc32(identity.encode("utf-8"))])
            held.update(idx[j] for j in rng.choice(len(idx), size=per_identity, replace=False))
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


__all__ = [
    "FILE_REASONS",
    "IMAGE_SUFFIXES",
    "LANDMARK_COLUMNS",
    "Detected",
    "FaceBatch",
    "FaceDataset",
    "FaceItem",
    "Failure",
    "Sample",
    "SkipReport",
    "collate_faces",
    "read_attribute_labels",
    "read_casia",
    "read_celeba",
    "read_identity_file",
    "read_list",
    "split_holdout",
    "stat_failures",
    "write_attribute_labels",
]
