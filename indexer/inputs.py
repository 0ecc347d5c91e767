"""Which images an embed job reads: the ordered input list from a folder tree, a list CSV, a MegaFace devkit JSON or
a CelebA root, and the state of those files (to notice, on resume, inputs changed since their shard was embedded).

:func:`list_inputs` is pure and deterministic (a function of the files and lists it reads); ``id`` is an item's
position.  An image folder's identities come from its sub-folders, or from a CelebA-style identity file
(``000001.jpg 2880`` per line) naming its images; a CelebA root (``img_align_celeba/``) gives identities and, when its
``list_landmarks_align_celeba.txt`` is there, landmarks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facesearch.model.faces.datasets import IMAGE_SUFFIXES, read_celeba, read_identity_file, read_list

log = logging.getLogger(__name__)

#: How the input of a job is given (``EmbedConfig.format``).
INPUT_FORMATS: tuple[str, ...] = ("images", "list", "devkit", "celeba")
#: The image folder of a CelebA root.
CELEBA_IMAGES = "img_align_celeba"


@dataclass(frozen=True)
class InputItem:
    """One planned image: ``id`` its int64 row id, ``path`` the file, ``rel`` the path relative to the image root,
    ``landmarks`` (5, 2) float32 or ``None`` (sidecar or detection)."""

    id: int
    path: Path
    rel: str
    identity: str | None = None
    landmarks: np.ndarray | None = None


def walk_images(root: Path) -> list[Path]:
    """Image files under ``root`` (by suffix), hidden folders skipped, in sorted relative-path order.  Only names are
    listed (nothing is opened): a FIFO or socket named like an image is listed and fails as ``not_a_file`` when read."""
    if not root.is_dir():
        raise FileNotFoundError(f"input image folder {root} does not exist or is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_devkit(path: Path) -> tuple[list[str], list[str | None]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"devkit list {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"devkit list {path} is not valid JSON: {e}") from None
    paths = data.get("path") if isinstance(data, dict) else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f'devkit list {path} must be a JSON object {{"path": [...], "id": [...]?}}')
    ids = data.get("id") or [None] * len(paths)
    if len(ids) != len(paths):
        raise ValueError(f"devkit list {path}: {len(ids)} ids for {len(paths)} paths")
    return paths, [None if i is None else str(i) for i in ids]


def _key(path: Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def _named_folder(folder: Path, identities: Path) -> list[tuple[Path, str | None, np.ndarray | None]]:
    """The images of ``folder`` (walked as ever), each with its identity from the identity file (``None`` when the
    file does not name it); listed files absent from the folder are not rows (logged)."""
    files = walk_images(folder)
    named = {_key(s.path): s.identity for s in read_identity_file(identities, folder)}
    rows: list[tuple[Path, str | None, np.ndarray | None]] = [(p, named.get(_key(p)), None) for p in files]
    absent = len(named) - sum(_key(p) in named for p in files)
    if absent:
        log.info("%s names %d images that are not in %s (not embedded)", identities, absent, folder)
    return rows


def list_inputs(
    format: str,
    input: Path,
    root: Path,
    landmarks: Path | None = None,
    identities: Path | None = None,
) -> list[InputItem]:
    """The ordered input list; ``id`` = position, ``rel`` = the path relative to ``root``.

    ``images``: the tree under ``input`` in sorted relative-path order (hidden folders skipped), identity = the
    parent folder (``None`` for top-level files), or with ``identities`` the identity file's label (``None`` for an
    image it does not name).  ``list`` (CSV) and ``devkit`` (JSON) keep their order.  ``celeba``: the CelebA root
    ``input`` (:func:`facesearch.model.faces.datasets.read_celeba`, in its lists' order; ``identities`` replaces
    ``identity_CelebA.txt``).  A ``landmarks`` CSV overrides the landmarks of the images it names (by path)."""
    rows: list[tuple[Path, str | None, np.ndarray | None]]
    if format == "images" and identities is not None:
        rows = _named_folder(input, identities)
    elif format == "images":
        rows = [(p, p.parent.name if p.parent != input else None, None) for p in walk_images(input)]
    elif format == "list":
        if not input.is_file():
            raise FileNotFoundError(f"input list {input} not found")
        rows = [(s.path, s.identity, s.landmarks) for s in read_list(input, root)]
    elif format == "celeba":
        rows = [(s.path, s.identity, s.landmarks) for s in read_celeba(input, identities=identities)]
    elif format == "devkit":
        paths, ids = _read_devkit(input)
        rows = [(root / p, i, None) for p, i in zip(paths, ids, strict=True)]
    else:
        raise ValueError(f"format must be one of {list(INPUT_FORMATS)}, got {format!r}")
    known: dict[str, np.ndarray] = {}
    if landmarks is not None:
        if not landmarks.is_file():
            raise FileNotFoundError(f"landmarks CSV {landmarks} not found")
        known = {_key(s.path): s.landmarks for s in read_list(landmarks) if s.landmarks is not None}
    items = []
    for i, (path, identity, lm) in enumerate(rows):
        lm = known.get(_key(path), lm)
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        # Absolute: Dask workers open the file, and they do not share the driver's working directory.
        path = Path(path).absolute()
        items.append(InputItem(i, path, rel, identity, None if lm is None else np.asarray(lm, np.float32)))
    return items


def _file_state(path: Path) -> str:
    """``size mtime_ns`` of the file (following links), or why there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"error {e.errno}"
    return f"{st.st_size} {st.st_mtime_ns}"


def inputs_digest(items: Sequence[InputItem], sidecars: bool = False) -> str:
    """A digest of the state of ``items``' files: each one's relative path, size and modification time in
    nanoseconds (and its ``<image>.json`` sidecar's with ``sidecars``), from one ``stat`` per file.  Writing a file
    changes its mtime, so a shard whose digest differs from the one recorded when it was embedded has changed inputs
    (a file rewritten with the same size within the filesystem's mtime resolution is the blind spot)."""
    h = hashlib.blake2b(digest_size=16)
    for it in items:
        state = _file_state(it.path)
        if sidecars:
            state += " " + _file_state(it.path.with_name(it.path.name + ".json"))
        h.update(f"{it.rel}\t{state}\n".encode())
    return h.hexdigest()


__all__ = ["CELEBA_IMAGES", "INPUT_FORMATS", "InputItem", "inputs_digest", "list_inputs", "walk_images"]
