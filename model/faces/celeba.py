"""CelebA's text lists: ``list_attr_celeba.txt``, ``list_landmarks_align_celeba.txt``, ``identity_CelebA.txt`` and
``list_eval_partition.txt``, read into :class:`facesearch.model.faces.samples.Sample` lists.

A root may hold only some of them (an identity file alone is enough for identity training); a counted list holding
fewer rows than its count line is a partial copy, read with a warning; a flat image folder named by an identity file
is read by :func:`read_identity_file`.  Every bad line raises ``ValueError`` naming the file and line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facesearch.model.faces.samples import Sample, _parse_float

log = logging.getLogger(__name__)


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


__all__ = ["read_celeba", "read_identity_file"]
