"""The one face path: an image (a file, its bytes or a decoded array) -> aligned face crop(s) at the model's input size.

:func:`prepare_image` is the step every caller shares (the training dataset, the indexer, the search engine and its
HTTP service, the LFW benchmark):

1. read the file without blocking and decode it with the pixel guard
   (:func:`facesearch.model.faces.images.decode_image`, ``max_pixels``);
2. find the 5 landmarks: as given (a list, a CSV), from an ``<image>.json`` sidecar, or detected by YuNet as the
   detector's :class:`facesearch.model.faces.detect.DetectOptions` say (keep mode, pad, threshold, size);
3. warp each face onto the template (:func:`facesearch.model.faces.align.align_face`).

It never raises for a bad file or a face it cannot use: the :class:`PreparedImage` holds, per face (best first), an
:class:`AlignedFace` or a :class:`FaceFailure` carrying the :class:`facesearch.model.faces.images.ImageError` with the
project's reason code (``missing``, ``not_a_file``, ``too_large``, ``truncated``, ``no_face``, ``bad_landmarks`` ...),
so a caller keeps one row per face or skips the file and counts the reason.  :func:`prepare_face` and
:func:`prepare_faces` are the raising forms for one image in hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import cv2
import numpy as np

from facesearch.model.config import INPUT_SIZE
from facesearch.model.faces.align import EYE_WEIGHTS, check_landmarks, warp_face
from facesearch.model.faces.detect import FaceDetector, _as_rgb, pose_score
from facesearch.model.faces.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, read_image_bytes
from facesearch.model.measure import stage

#: ``ImageError`` reasons of a readable image without a usable face (the others: the file itself is unusable).
FACE_REASONS: frozenset[str] = frozenset({"no_face", "no_landmarks", "bad_landmarks"})

#: What :func:`prepare_image` reads: a file path, its bytes, or a decoded (H, W, 3) RGB / (H, W) grey uint8 array.
Source: TypeAlias = str | os.PathLike[str] | bytes | np.ndarray
#: A detector, a function building one when an image first needs it (e.g. once per DataLoader worker), or none.
DetectorLike: TypeAlias = FaceDetector | Callable[[], FaceDetector | None] | None


@dataclass(frozen=True)
class AlignedFace:
    """An aligned crop (h, w, 3) uint8 RGB and the (5, 2) float32 landmarks it was aligned with; the detector's
    score and box (4,) x, y, w, h when detected (``None`` for given landmarks); ``face``: its number among the faces
    the detector kept, best first from 0."""

    crop: np.ndarray
    landmarks: np.ndarray
    score: float | None = None
    box: np.ndarray | None = None
    face: int = 0

    @property
    def pose(self) -> float:
        """:func:`facesearch.model.faces.detect.pose_score` of the landmarks (1 frontal, 0 profile)."""
        return float(pose_score(self.landmarks))


@dataclass(frozen=True)
class FaceFailure:
    """An image, or one of its detected faces, that gave no crop: ``error`` says why (its ``reason`` is one of
    :data:`facesearch.model.faces.images.REASONS`); ``score`` is the detector's for a detected face whose landmarks
    are unusable; ``face`` as in :class:`AlignedFace`."""

    error: ImageError
    score: float | None = None
    face: int = 0

    @property
    def reason(self) -> str:
        return self.error.reason

    @property
    def message(self) -> str:
        """One line naming the file, what is wrong and the reason."""
        return str(self.error)

    @property
    def crop(self) -> None:
        """No crop (so ``face.crop`` is ``None`` for every face that failed)."""
        return None

    @property
    def landmarks(self) -> None:
        return None


#: One face of a :class:`PreparedImage`.
Face: TypeAlias = AlignedFace | FaceFailure


@dataclass(frozen=True)
class PreparedImage:
    """What :func:`prepare_image` made of one image: ``faces`` (never empty; best first) -- an :class:`AlignedFace`
    per usable face and a :class:`FaceFailure` per unusable one, or one :class:`FaceFailure` when the image gave no face
    at all (unreadable, no landmarks, no face found); the decoder's ``warnings`` (with ``jpeg_warnings``) and, with
    ``keep_image``, the decoded ``image`` (H, W, 3) uint8 RGB (``None`` when it could not be decoded)."""

    name: str
    faces: tuple[AlignedFace | FaceFailure, ...]
    warnings: tuple[str, ...] = ()
    image: np.ndarray | None = None

    def first(self) -> AlignedFace:
        """The best face; raises the :class:`ImageError` of its failure."""
        face = self.faces[0]
        if isinstance(face, FaceFailure):
            raise face.error
        return face

    def aligned(self) -> list[AlignedFace]:
        """Every face; raises the :class:`ImageError` of the first that failed."""
        for face in self.faces:
            if isinstance(face, FaceFailure):
                raise face.error
        return [face for face in self.faces if isinstance(face, AlignedFace)]


def sidecar_landmarks(path: Path, name: str) -> np.ndarray:
    """The (5, 2) float32 landmarks of ``<path>.json`` (5 (x, y) points, or ``{"landmarks": ...}``).  Raises
    :class:`ImageError` naming ``name``: ``no_landmarks`` (no sidecar) or ``bad_landmarks`` (unreadable, not 5
    points)."""
    side = path.with_name(path.name + ".json")
    try:
        data = json.loads(read_image_bytes(side, side.name))
        values = data["landmarks"] if isinstance(data, dict) else data
        return np.asarray(values, dtype=np.float32).reshape(5, 2)
    except ImageError as e:
        if e.reason == "missing":
            raise ImageError(name, "no_landmarks", f"sidecar {side.name} not found") from None
        raise ImageError(name, "bad_landmarks", f"sidecar {side.name} {e.detail.split(';')[0]}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ImageError(name, "bad_landmarks", f"sidecar {side.name} has no 5 (x, y) landmarks: {e}") from None


def _name(source: Source) -> str:
    if isinstance(source, np.ndarray):
        return "<array>"
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _decode(source: Source, name: str, max_pixels: int | None, warnings: list[str] | None,
            timings: dict[str, float] | None) -> np.ndarray:  # fmt: skip
    if isinstance(source, np.ndarray):
        return _as_rgb(source, name)
    if isinstance(source, bytes):
        data = source
    else:
        with stage(timings, "read"):
            data = read_image_bytes(source, name)  # never blocks: a FIFO is not_a_file
    with stage(timings, "decode"):
        return decode_image(data, name, warnings=warnings, max_pixels=max_pixels)


def _locate(source: Source, image: np.ndarray, landmarks: np.ndarray | None, detector: DetectorLike, sidecar: bool,
            max_faces: int | None, name: str) -> list[tuple[np.ndarray, float | None, np.ndarray | None]]:  # fmt: skip
    """The faces to align, best first: (landmarks, detector score, box)."""
    if landmarks is not None:
        return [(landmarks, None, None)]
    if sidecar:
        if isinstance(source, bytes | np.ndarray):
            raise ValueError("sidecar landmarks belong to an image file: pass its path, not its bytes or pixels")
        return [(sidecar_landmarks(Path(source), name), None, None)]
    if detector is not None and not isinstance(detector, FaceDetector):
        detector = detector()  # built on first need
    if detector is None:
        raise ImageError(name, "no_landmarks", "no landmarks given and no detector to find them; pass either")
    found = detector.detect_faces(image)[:max_faces]
    if not found:
        raise ImageError(name, "no_face", f"no face found in the {image.shape[1]}x{image.shape[0]} image")
    return [(d.landmarks, d.score, d.box) for d in found]


def _align(image: np.ndarray, landmarks: np.ndarray, score: float | None, box: np.ndarray | None, face: int,
           size: tuple[int, int], weights: np.ndarray | None, name: str,
           margin: bool = False) -> AlignedFace | FaceFailure:  # fmt: skip
    """One face's crop, or its failure (so one bad face of several leaves the others and their numbers alone)."""
    try:
        pts = check_landmarks(landmarks, image.shape, name)
        return AlignedFace(warp_face(image, pts, size, weights, margin), pts, score, box, face)
    except ImageError as e:
        return FaceFailure(e, score, face)


def _unexpected(name: str, e: Exception) -> ImageError:
    detail = e.msg.strip() if isinstance(e, cv2.error) else str(e)
    return ImageError(name, "corrupt", f"the image could not be processed ({detail})")


def prepare_image(
    source: Source,
    landmarks: np.ndarray | None = None,
    detector: DetectorLike = None,
    *,
    size: tuple[int, int] = INPUT_SIZE,
    weights: np.ndarray | None = EYE_WEIGHTS,
    margin: bool = False,
    name: str | None = None,
    sidecar: bool = False,
    max_faces: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    jpeg_warnings: bool = False,
    keep_image: bool = False,
    timings: dict[str, float] | None = None,
) -> PreparedImage:
    """Read, decode, locate and align the face(s) of one image; never raises for a bad file or face.

    ``source``: a path (read without blocking), the file's bytes or a decoded (H, W, 3) RGB / (H, W) grey uint8 array.
    Landmarks: ``landmarks`` ((5, 2) x, y) as given; else with ``sidecar`` the file's ``<image>.json``; else
    ``detector`` (or a function building it on first need) finds the faces its ``options.keep`` keeps, at most
    ``max_faces`` (``None``: all it keeps; ``keep="all"`` keeps every face, largest first).  Crops are ``size`` =
    (height, width), aligned with ``weights`` (see :func:`facesearch.model.faces.align.align_face`); ``margin``: the
    attribute predictors' margin crop around them (128x112 for 112x96).  ``name`` (default:
    the path, ``<bytes>`` or ``<array>``) names the image in messages.  ``max_pixels``: the decoder's pixel guard
    (``None``: no limit).  ``jpeg_warnings``: collect libjpeg's warnings about damaged but decodable data into
    ``warnings`` (decodes take turns for it).  ``timings`` receives per-stage seconds: ``read``, ``decode`` and
    ``align`` (which includes finding the landmarks).

    Failures (:class:`FaceFailure`, reasons of :data:`facesearch.model.faces.images.REASONS`): any read or decode
    error, ``no_landmarks`` (no landmarks, no sidecar, no detector), ``no_face``, ``bad_landmarks`` (per face), and
    ``corrupt`` for anything the OS or OpenCV throws on this image.  A wrong array (not uint8, not RGB or grey) is a
    ``ValueError``: a caller's mistake, not a bad image."""
    name = _name(source) if name is None else name
    warnings: list[str] = []
    image: np.ndarray | None = None
    faces: tuple[AlignedFace | FaceFailure, ...]
    try:
        image = _decode(source, name, max_pixels, warnings if jpeg_warnings else None, timings)
        with stage(timings, "align"):
            found = _locate(source, image, landmarks, detector, sidecar, max_faces, name)
            faces = tuple(_align(image, lm, score, box, i, size, weights, name, margin)
                          for i, (lm, score, box) in enumerate(found))  # fmt: skip
    except ImageError as e:
        faces = (FaceFailure(e),)
    except (OSError, cv2.error) as e:  # one bad file never stops a caller's loop
        faces = (FaceFailure(_unexpected(name, e)),)
    return PreparedImage(name, faces, tuple(warnings), image if keep_image else None)


def prepare_face(
    source: Source,
    landmarks: np.ndarray | None = None,
    detector: DetectorLike = None,
    size: tuple[int, int] = INPUT_SIZE,
    weights: np.ndarray | None = EYE_WEIGHTS,
) -> AlignedFace:
    """The best face of one image (:func:`prepare_image` with ``max_faces=1``); raises its :class:`ImageError`."""
    return prepare_image(source, landmarks, detector, size=size, weights=weights, max_faces=1).first()


def prepare_faces(
    source: Source,
    detector: DetectorLike = None,
    *,
    landmarks: np.ndarray | None = None,
    size: tuple[int, int] = INPUT_SIZE,
    weights: np.ndarray | None = EYE_WEIGHTS,
) -> list[AlignedFace]:
    """Every face ``detector.options.keep`` keeps (several for ``all``, largest first), or with ``landmarks`` the one
    face they mark.  Never empty: raises the :class:`ImageError` of the image or of the first face that failed."""
    return prepare_image(source, landmarks, detector, size=size, weights=weights).aligned()


__all__ = [
    "FACE_REASONS",
    "AlignedFace",
    "DetectorLike",
    "Face",
    "FaceFailure",
    "PreparedImage",
    "Source",
    "prepare_face",
    "prepare_faces",
    "prepare_image",
    "sidecar_landmarks",
]
