"""Dataset readers (CASIA folders, the generic list CSV, CelebA) and the torch ``FaceDataset`` over aligned crops.

Readers return plain ``Sample`` lists; ``FaceDataset`` turns a sample into an aligned (h, w, 3) uint8 crop, or into
a ``Failure`` for a bad file so that one broken image never stops an epoch.  ``SkipReport`` counts the failures.
"""

from __future__ import annotations

import csv
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

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from model.align import FaceDetector, prepare_face
from model.config import ATTRIBUTES
from model.fileio import atomic_write_text
from model.images import ImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp"}
)
LANDMARK_COLUMNS: tuple[str, ...] = tuple(f"{axis}{i}" for i in range(1, 6) for axis in "xy")


@dataclass(frozen=True, eq=False)
class Sample:
    """One image: ``landmarks`` (5, 2) float32 (x, y) in our order or ``None`` (detect); ``attributes`` 0/1 or
    probabilities, a missing name meaning unknown.

    Equality compares landmarks with ``np.array_equal`` (the generated ``__eq__`` would raise on arrays).
    """

    path: Path
    identity: str | None = None
    landmarks: np.ndarray | None = None
    attributes: Mapping[str, float] | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        a, b = self.landmarks, other.landmarks
        same_lm = (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
        return same_lm and (self.path, self.identity, self.attributes) == (other.path, other.identity, other.attributes)

    def __hash__(self) -> int:
        return hash((self.path, self.identity))


def _parse_float(value: str, what: str, where: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{where}: {what} must be a number, got {value!r}") from None
    if not np.isfinite(x):
        raise ValueError(f"{where}: {what} must be finite, got {value!r}")
    return x


def _parse_attributes(row: Mapping[str, str], names: Sequence[str], where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        cell = (row.get(name) or "").strip()
        if cell:
            value = _parse_float(cell, f"attribute {name}", where)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}: attribute {name} must be in [0, 1] (0/1 or a probability), got {cell!r}")
            out[name] = value
    return out


def read_list(path: Path, root: Path | None = None) -> list[Sample]:
    """Read the project's generic list CSV.

    Header required.  Columns: ``path`` (required, relative to ``root``, default the CSV's folder), ``identity``
    (optional), landmarks ``x1,y1,...,x5,y5`` (optional: all ten columns or none; a row with all ten empty has no
    landmarks), and any other column is an attribute (0/1 or probability, empty = unknown).
    Raises ``ValueError`` naming the file and line for a bad header or row.
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    with open(path, newline="", encoding="utf-8-sig") as f:  # tolerate a spreadsheet BOM
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        if "path" not in header:
            raise ValueError(f"{path}:1: header must have a 'path' column, got {header}")
        present = [c for c in LANDMARK_COLUMNS if c in header]
        if present and len(present) != len(LANDMARK_COLUMNS):
            missing = [c for c in LANDMARK_COLUMNS if c not in header]
            raise ValueError(f"{path}:1: landmark columns must be all of x1,y1..x5,y5 or none; missing {missing}")
        attr_names = [h for h in header if h not in ("path", "identity", *LANDMARK_COLUMNS)]
        samples = [_list_row(row, root, attr_names, bool(present), f"{path}:{reader.line_num}") for row in reader]
    return samples


def _list_row(row: dict[str, str], root: Path, attr_names: list[str], has_lm: bool, where: str) -> Sample:
    if None in row:
        raise ValueError(f"{where}: more cells than header columns")
    rel = (row.get("path") or "").strip()
    if not rel:
        raise ValueError(f"{where}: empty path")
    landmarks = None
    if has_lm:
        cells = [(row.get(c) or "").strip() for c in LANDMARK_COLUMNS]
        if any(cells):
            if not all(cells):
                raise ValueError(f"{where}: landmarks must have all ten values x1..y5 or none")
            values = [_parse_float(c, "landmark", where) for c in cells]
            landmarks = np.array(values, dtype=np.float32).reshape(5, 2)
    identity = (row.get("identity") or "").strip() or None
    attributes = _parse_attributes(row, attr_names, where) if attr_names else None
    return Sample(root / rel, identity, landmarks, attributes)


def read_casia(root: Path) -> list[Sample]:
    """CASIA-WebFace layout: ``root/<identity>/<image>``, one folder per identity, files sorted.

    ``root/landmarks.csv`` (generic list format, paths relative to ``root``), if present, supplies landmarks and
    attributes for the images it lists.  Raises ``FileNotFoundError`` / ``ValueError`` for a missing or empty root.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CASIA root {root} does not exist or is not a directory")
    extra: dict[Path, Sample] = {}
    if (root / "landmarks.csv").is_file():
        extra = {s.path: s for s in read_list(root / "landmarks.csv", root)}
    samples: list[Sample] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                known = extra.pop(file, None)
                lm, attrs = (known.landmarks, known.attributes) if known else (None, None)
                samples.append(Sample(file, folder.name, lm, attrs))
    if not samples:
        raise ValueError(f"CASIA root {root} has no <identity>/<image> files (suffixes {sorted(IMAGE_SUFFIXES)})")
    if extra:
        log.warning("%s/landmarks.csv lists %d files not found under identity folders", root, len(extra))
    return samples


@dataclass(frozen=True)
class _Table:
    """A CelebA text table: ``rows`` {file: (line number, values)} in file order; ``declared`` the count line (the
    counted lists only) and ``lines`` the number of data lines (a repeated identical row counts once more here)."""

    path: Path
    header: list[str]
    rows: dict[str, tuple[int, list[str]]]
    declared: int | None
    lines: int


def _read_celeba_table(path: Path, counted: bool, width: int | None) -> _Table:
    """Read an optional count line + header line, then ``file v1 ...`` rows.  A row repeated verbatim is read once
    (with a warning); the same file with other values is an error naming both lines.  More rows than the count line
    declares is an error; fewer is accepted here (see :func:`_check_counts`)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start}); expected CelebA's text lists") from None
    header: list[str] = []
    start = 0
    if counted:
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise ValueError(f"{path}:1: expected the row count, got {lines[0][:40] if lines else 'an empty file'!r}")
        header, start = lines[1].split(), 2
    width = len(header) if width is None else width
    rows: dict[str, tuple[int, list[str]]] = {}
    repeats: list[tuple[int, int]] = []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        cells = line.split()
        if not cells:
            continue
        if len(cells) != width + 1:
            raise ValueError(f"{path}:{lineno}: expected a file name and {width} values, got {len(cells)} cells")
        if cells[0] in rows:
            first, values = rows[cells[0]]
            if values != cells[1:]:
                raise ValueError(f"{path}:{lineno}: duplicate file {cells[0]} (first on line {first}) with different "
                                 f"values")  # fmt: skip
            repeats.append((lineno, first))
            continue
        rows[cells[0]] = (lineno, cells[1:])
    if repeats:
        where = ", ".join(f"line {a} = line {b}" for a, b in repeats[:3]) + (", ..." if len(repeats) > 3 else "")
        log.warning("%s: %d repeated row(s) read once (%s)", path, len(repeats), where)
    declared = int(lines[0]) if counted else None
    if declared is not None and declared < len(rows) + len(repeats):
        raise ValueError(f"{path}:1: declares {declared} rows but has {len(rows) + len(repeats)}")
    if not rows:
        raise ValueError(f"{path} has no rows")
    return _Table(Path(path), header, rows, declared, len(rows) + len(repeats))


def _check_counts(attributes: _Table | None, landmarks: _Table | None) -> None:
    """A counted list with fewer rows than its count line is a partial copy (e.g. the first 1,000 rows of the real
    list, whose count line still says 202599): read, with a warning.  But the two counted lists of one root describe
    the same data set, so a partial list whose count disagrees with the other list's is an error (a wrong or damaged
    file, not a subset)."""
    tables = [t for t in (attributes, landmarks) if t is not None]
    for table in tables:
        assert table.declared is not None, "counted lists have a count line"
        if table.declared == table.lines:
            continue
        other = next((t for t in tables if t is not table and t.declared != table.declared), None)
        if other is not None:
            raise ValueError(f"{table.path}:1: declares {table.declared} rows but has {table.lines}, and "
                             f"{other.path.name} declares {other.declared}: not lists of one data set")  # fmt: skip
        log.warning("%s declares %d rows but holds %d: reading it as a partial copy", table.path, table.declared,
                    table.lines)  # fmt: skip


def _read_partition(path: Path) -> dict[str, int]:
    """``list_eval_partition.txt`` -> {file: 0 train / 1 val / 2 test}."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: it assigns the images to train/val/test; to use every image "
                                f"without it, pass --split all (partition=None)")  # fmt: skip
    table = _read_celeba_table(path, counted=False, width=1)
    out = {}
    for file, (lineno, (value,)) in table.rows.items():
        if value not in ("0", "1", "2"):
            raise ValueError(f"{path}:{lineno}: the split must be 0, 1 or 2, got {value!r}")
        out[file] = int(value)
    return out


def _identity_table(path: Path) -> dict[str, tuple[int, str]]:
    """An identity file (``identity_CelebA.txt``: ``000001.jpg 2880`` per line) -> {file: (line, identity)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"identity file {path} does not exist")
    return {file: (lineno, values[0]) for file, (lineno, values) in _read_celeba_table(path, False, 1).rows.items()}


def read_identity_file(path: Path, images: Path) -> list[Sample]:
    """A flat image folder ``images`` named by an identity file (CelebA's ``identity_CelebA.txt`` format: ``file
    identity`` per line, whitespace-separated, file names relative to ``images``), in file order, no landmarks.

    Rows for images that are not in the folder are kept (the training readability check counts them); a row repeated
    verbatim is read once; a bad line raises ``ValueError`` naming the file and line."""
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist or is not a directory")
    return [Sample(images / file, identity) for file, (_, identity) in _identity_table(path).items()]


def read_celeba(root: Path, partition: int | None = None, identities: Path | None = None) -> list[Sample]:
    """The real CelebA layout under ``root`` (aligned images in ``img_align_celeba/``, CelebA's landmark order = ours).

    ``list_attr_celeba.txt`` (±1 -> 1/0) and ``identity_CelebA.txt`` (or the file ``identities``): at least one;
    without the attribute list the identity file gives the images (identity training needs nothing else).
    ``list_landmarks_align_celeba.txt`` (optional: without it the faces are detected); ``list_eval_partition.txt``
    (needed only when ``partition`` in 0 train / 1 val / 2 test is given).  Counted lists holding fewer rows than
    their count line are read as partial copies (a warning).  Raises ``ValueError`` naming the file and line.
    """
    root = Path(root)
    if partition not in (None, 0, 1, 2):
        raise ValueError(f"partition must be None, 0 (train), 1 (val) or 2 (test), got {partition!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root {root} does not exist or is not a directory")
    attr_path, lm_path = root / "list_attr_celeba.txt", root / "list_landmarks_align_celeba.txt"
    id_path = root / "identity_CelebA.txt" if identities is None else Path(identities)
    if not attr_path.is_file() and not id_path.is_file():
        raise FileNotFoundError(f"{root} is not a CelebA root: it has neither list_attr_celeba.txt (attributes) nor "
                                f"{id_path.name} (identities)")  # fmt: skip
    attrs = _read_celeba_table(attr_path, counted=True, width=None) if attr_path.is_file() else None
    lms = _read_celeba_table(lm_path, counted=True, width=10) if lm_path.is_file() else None
    _check_counts(attrs, lms)
    idents = _identity_table(id_path) if identities is not None or id_path.is_file() else {}
    parts = _read_partition(root / "list_eval_partition.txt") if partition is not None else None
    files = list(attrs.rows if attrs is not None else idents)
    if parts is not None:
        unlisted = sum(f not in parts for f in files)
        if unlisted:
            log.warning("%s: %d images are not in list_eval_partition.txt (in no split)", root, unlisted)
        files = [f for f in files if parts.get(f) == partition]
    samples = [_celeba_sample(root, file, attrs, lms, idents) for file in files]
    if lms is not None and len(lms.rows) != len(attrs.rows if attrs is not None else idents):
        log.warning("%s: %d landmark rows for %d images", root, len(lms.rows), len(attrs.rows if attrs else idents))
    return samples


def _celeba_sample(
    root: Path, file: str, attrs: _Table | None, lms: _Table | None, idents: Mapping[str, tuple[int, str]]
) -> Sample:
    values: dict[str, float] | None = None
    if attrs is not None:
        lineno, cells = attrs.rows[file]
        if any(v not in ("1", "-1") for v in cells):
            raise ValueError(f"{attrs.path}:{lineno}: attribute values must be 1 or -1, got {cells}")
        values = {n: 1.0 if v == "1" else 0.0 for n, v in zip(attrs.header, cells, strict=True)}
    pts = None
    if lms is not None and file in lms.rows:
        lm_line, lm = lms.rows[file]
        where = f"{lms.path}:{lm_line}"
        pts = np.array([_parse_float(v, "landmark", where) for v in lm], dtype=np.float32).reshape(5, 2)
    ident = idents[file][1] if file in idents else None
    return Sample(root / "img_align_celeba" / file, ident, pts, values)


def read_attribute_labels(path: Path) -> dict[str, dict[str, float]]:
    """Per-identity attribute labels CSV ``identity,<attr>,...`` -> {identity: {attr: value}}; empty = unknown."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:  # tolerate a spreadsheet BOM
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        if not header or header[0] != "identity":
            raise ValueError(f"{path}:1: header must start with 'identity', got {header}")
        labels: dict[str, dict[str, float]] = {}
        for row in reader:
            where = f"{path}:{reader.line_num}"
            identity = (row.get("identity") or "").strip()
            if None in row or not identity:
                raise ValueError(f"{where}: expected an identity and at most {len(header) - 1} values")
            if identity in labels:
                raise ValueError(f"{where}: duplicate identity {identity!r}")
            labels[identity] = _parse_attributes(row, header[1:], where)
    return labels


def write_attribute_labels(path: Path, labels: Mapping[str, Mapping[str, float]], attributes: Sequence[str]) -> None:
    """Write per-identity labels (columns ``identity`` + ``attributes``; absent = empty cell) atomically."""
    lines = [",".join(["identity", *attributes])]
    for identity in sorted(labels):
        row = labels[identity]
        lines.append(",".join([identity, *("" if row.get(a) is None else repr(float(row[a])) for a in attributes)]))
    atomic_write_text(Path(path), "\n".join(lines) + "\n")


#: What face detection found for one file: its (5, 2) float32 landmarks, or ``(reason, message)`` why there are none.
Detected: TypeAlias = np.ndarray | tuple[str, str]

#: ``ImageError`` reasons meaning the file itself is unusable (the others: a readable image without a usable face).
FILE_REASONS: frozenset[str] = frozenset(
    {"missing", "unreadable", "empty", "not_an_image", "unsupported_format", "truncated", "corrupt"}
)


def stat_failures(samples: Sequence[Sample]) -> list[Failure]:
    """The samples whose file cannot be read, found with one ``stat`` each (no decoding, so cheap for 200k files):
    ``missing``, ``unreadable`` (not a regular file, no permission) or ``empty``; ``index`` is into ``samples``."""
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
                reason, detail = "unreadable", "not a regular file; expected an image file"
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

    Samples with landmarks are aligned directly; the others are detected with a detector built lazily, once per
    process (DataLoader workers), by ``detector_factory`` — unless ``detections`` (keyed by ``str(sample.path)``)
    already holds what detection found for the file: its (5, 2) float32 landmarks, or ``(reason, message)`` of why it
    has none (see :class:`model.trainer_data.DetectionCache`).  ``identity_index`` maps identity names to class ids
    (default: sorted names of ``samples``; names not in it get -1).  ``cache=True`` keeps up to ``cache_size``
    results (crops and failures) in a per-process LRU; with ``persistent_workers=True`` it spans epochs.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: tuple[int, int] = (112, 96),
        identity_index: Mapping[str, int] | None = None,
        attributes: Sequence[str] = ATTRIBUTES,
        detector_factory: Callable[[], FaceDetector] | None = None,
        cache: bool = False,
        cache_size: int = 4096,
        detections: Mapping[str, Detected] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.size = (int(size[0]), int(size[1]))
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
        try:
            detector = None if landmarks is not None else self._get_detector()
            return prepare_face(sample.path, landmarks, detector, self.size).crop
        except ImageError as exc:
            return Failure(index, str(sample.path), exc.reason, str(exc))
        except (OSError, cv2.error) as exc:  # anything the OS or a decoder throws for one file must not stop an epoch
            return Failure(index, str(sample.path), "corrupt", f"{sample.path}: {exc}")

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
