"""The :class:`Sample` record (one image: path, identity, landmarks, attribute labels) and the readers of the
project's generic formats: the list CSV, CASIA-WebFace folders and the per-identity attribute labels CSV.

CelebA's text lists are read by :mod:`facesearch.model.faces.celeba`; :mod:`facesearch.model.faces.datasets` turns
samples into aligned crops.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facesearch.model.fileio import atomic_write_text

log = logging.getLogger(__name__)

#: File suffixes (lower case) of the formats :func:`facesearch.model.faces.images.decode_image` reads: JPEG, PNG,
#: PBM/PGM/PPM/PNM, BMP, TIFF and WebP.  The one list: folder walks, probe folders and LFW image keys all use it.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp"}
)
LANDMARK_COLUMNS: tuple[str, ...] = tuple(f"{axis}{i}" for i in range(1, 6) for axis in "xy")


@dataclass(frozen=True, eq=False)
class Sample:
    """One image: ``landmarks`` (5, 2) float32 (x, y) in our order or ``None`` (detect); ``attributes`` 0/1 or
    probabilities, or for a categorical attribute its class as a float (``2.0``), a missing name meaning unknown.

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


def _parse_attributes(
    row: Mapping[str, str], names: Sequence[str], where: str, categorical: Sequence[str] = ()
) -> dict[str, float]:
    """The known attributes of one row: binary/probability columns as floats in [0, 1], ``categorical`` columns as
    their class ``float(k)``; an empty cell (or -1 in a categorical column) is unknown and left out."""
    out: dict[str, float] = {}
    for name in names:
        cell = (row.get(name) or "").strip()
        if name in categorical:
            k = _parse_class(cell, name, where)
            if k is not None:
                out[name] = float(k)
        elif cell:
            value = _parse_float(cell, f"attribute {name}", where)
            if not 0.0 <= value <= 1.0:
                hint = ""
                if value >= 2 and value == int(value):  # a class index in a column nobody declared categorical
                    hint = f" (a categorical column? declare it: --categorical {name})"
                raise ValueError(
                    f"{where}: attribute {name} must be in [0, 1] (0/1 or a probability), got {cell!r}{hint}"
                )
            out[name] = value
    return out


def _parse_class(cell: str, name: str, where: str) -> int | None:
    """A categorical cell: an integer class >= 0, or ``None`` for unknown (empty or -1)."""
    try:
        k = int(cell) if cell else -1
    except ValueError:
        k = -2
    if k < -1:
        raise ValueError(
            f"{where}: categorical attribute {name} must be an integer class >= 0 (empty or -1 = unknown), got {cell!r}"
        )
    return None if k == -1 else k


def read_list(path: Path, root: Path | None = None, categorical: Sequence[str] = ()) -> list[Sample]:
    """Read the project's generic list CSV.

    Header required.  Columns: ``path`` (required, relative to ``root``, default the CSV's folder), ``identity``
    (optional), landmarks ``x1,y1,...,x5,y5`` (optional: all ten columns or none; a row with all ten empty has no
    landmarks), and any other column is an attribute: 0/1 or probability (empty = unknown), or, for the columns named
    in ``categorical``, an integer class >= 0 (empty or -1 = unknown) kept as ``float(class)`` in
    ``Sample.attributes`` (databases with multi-class labels, e.g. a hair colour, for multi-task training).
    Raises ``ValueError`` naming the file and line for a bad header or row, and naming the file and its attribute
    columns for a ``categorical`` name that is not one of them.
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
        cats = [str(c) for c in ([categorical] if isinstance(categorical, str) else categorical)]
        unknown = [c for c in cats if c not in attr_names]
        if unknown:
            raise ValueError(
                f"{path}: categorical column(s) {unknown} are not attribute columns of this file; it has {attr_names}"
            )
        samples = [_list_row(row, root, attr_names, bool(present), f"{path}:{reader.line_num}", cats) for row in reader]
    return samples


def _list_row(
    row: dict[str, str], root: Path, attr_names: list[str], has_lm: bool, where: str, categorical: Sequence[str] = ()
) -> Sample:
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
    attributes = _parse_attributes(row, attr_names, where, categorical) if attr_names else None
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


__all__ = [
    "IMAGE_SUFFIXES",
    "LANDMARK_COLUMNS",
    "Sample",
    "read_attribute_labels",
    "read_casia",
    "read_list",
    "write_attribute_labels",
]
