"""Face detection: YuNet (``cv2.FaceDetectorYN``) behind :class:`FaceDetector`, the :class:`DetectOptions` saying which
face of a multi-face photo is kept, how sure the detector must be and how large an image it sees, and
:func:`pose_score`, which rates from the 5 landmarks how frontal a face is (1 frontal, 0 profile).

Landmarks are in the project's convention (see :mod:`facesearch.model.faces.align`): (5, 2) float32 (x, y), image-left
eye first.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facesearch.model.assets import YUNET_ENV, yunet_path

log = logging.getLogger(__name__)


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` as (H, W, 3) uint8 RGB (a grey (H, W) image is expanded); ``ValueError`` naming ``name`` otherwise."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: image must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
    return image


#: What :class:`DetectOptions.keep` accepts: the one face kept from a multi-face photo, or ``all`` of them.
KEEP_FACE: tuple[str, ...] = ("largest", "center", "score", "all")

#: Eye distance / eye-to-mouth distance of :data:`facesearch.model.faces.align.REFERENCE_112x96` (0.866): a face at
#: least this wide is frontal.
_TEMPLATE_WIDTH_RATIO = 0.866


@dataclass(frozen=True)
class DetectOptions:
    """How YuNet looks for faces and which of them are kept.

    ``score_threshold``: YuNet's minimum score in (0, 1].  ``max_side``: the longest image side YuNet sees; larger
    images are downscaled to it first (a larger value finds smaller faces, at quadratic cost).  ``keep``: one of
    :data:`KEEP_FACE`: ``largest`` box (ties: higher score), ``center`` (box centre nearest the image centre; ties:
    higher score), ``score`` (ties: larger box) or ``all`` faces, ordered as ``largest`` would rank them.  ``pad``:
    black border in pixels added (after downscaling) before detection; YuNet misses faces that fill the frame (ORL's
    92x112 images need 20).  ``nms_threshold``: YuNet's non-maximum suppression IoU.

    The default ``keep`` is ``largest`` because a gallery photo is a photo *of* someone: its subject is nearest the
    camera and so has the largest face, while YuNet's score only says how face-like a patch is.  Keeping the best score
    picked a hand, a drum or a face in the background in photos of real galleries (and not the largest face in 26 of
    349 multi-face photos); the image centre is a weaker cue (off-centre portraits, two people side by side).
    """

    score_threshold: float = 0.6
    max_side: int = 640
    keep: str = "largest"
    pad: int = 0
    nms_threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.keep not in KEEP_FACE:
            raise ValueError(f"keep must be one of {list(KEEP_FACE)}, got {self.keep!r}")
        for name in ("score_threshold", "nms_threshold"):
            value = getattr(self, name)
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if int(self.pad) < 0 or int(self.max_side) < 32:
            raise ValueError(f"pad must be >= 0 and max_side >= 32, got pad={self.pad}, max_side={self.max_side}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def select_faces(faces: np.ndarray, keep: str, image_size: tuple[int, int]) -> np.ndarray:
    """Row indices of ``faces`` ((F, 15) rows of :meth:`FaceDetector.detect_all`) that ``keep`` keeps, best first.

    One index (none when F is 0) for ``largest``, ``center`` and ``score``; all F for ``all``, largest first.
    ``image_size`` = (height, width) of the image the boxes are in (for ``center``).  Remaining ties are broken by
    position (top, then left), so the choice never depends on the detector's output order.  Returns (K,) int64.
    """
    if keep not in KEEP_FACE:
        raise ValueError(f"keep must be one of {list(KEEP_FACE)}, got {keep!r}")
    rows = np.asarray(faces, dtype=np.float64).reshape(-1, 15)
    x, y, w, h, score = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 14]
    area = w * h
    if keep == "score":
        keys: tuple[np.ndarray, ...] = (x, y, -area, -score)
    elif keep == "center":
        dist = np.hypot(x + w / 2 - image_size[1] / 2, y + h / 2 - image_size[0] / 2)
        keys = (x, y, -area, -score, dist)
    else:
        keys = (x, y, -score, -area)
    order = np.lexsort(keys).astype(np.int64)  # the last key is the primary one
    return order if keep == "all" else order[:1]


def pose_score(landmarks: np.ndarray) -> np.ndarray:
    """How frontal a face is, from its 5 landmarks: 1 frontal, falling to 0 as the head turns to profile.

    ``landmarks``: (..., 5, 2) or (..., 10) x, y in the project's order.  Returns (...) float32 (0-d for one face;
    NaN where a landmark is NaN).  ``pose_score = symmetry * width``, both in [0, 1]:

    - ``symmetry = max(0, 1 - |2 t - 1|)``, ``t`` the nose tip projected on the eye line (0 at the image-left eye,
      1 at the image-right eye): 1 with the nose midway between the eyes, 0 with the nose on or past an eye, which
      it reaches as the head turns ~55 degrees (the nose tip stands ~1/3 eye distance in front of the eyes).
    - ``width = min(1, (eye distance / eye-to-mouth distance) / 0.866)``, the eye-to-mouth distance from the eyes'
      midpoint to the mouth corners' midpoint, 0.866 the alignment template's ratio.  Turning the head shortens the
      eye distance by cos(yaw) but not the eye-to-mouth distance; close-set eyes are what over-zoom a profile's crop.

    Invariant to in-plane rotation, scale and translation.  Landmarks only (no box), so listed, sidecar and detected
    landmarks are scored alike and a shard's ``landmarks`` column gives the same score again.  Measured with YuNet on
    ORL (400 faces, frontal "with some side movement"): median 0.92, 5th percentile 0.69, faces turned ~35 degrees
    0.46-0.58; a model head turned 30 / 45 / 60 degrees scores 0.53 / 0.22 / 0.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape[-2:] != (5, 2):
        if pts.shape[-1:] != (10,):
            raise ValueError(f"landmarks must be (..., 5, 2) or (..., 10), got shape {pts.shape}")
        pts = pts.reshape(*pts.shape[:-1], 5, 2)
    left, right, nose = pts[..., 0, :], pts[..., 1, :], pts[..., 2, :]
    eye = right - left
    iod2 = (eye**2).sum(-1)
    mouth_mid = (pts[..., 3, :] + pts[..., 4, :]) / 2
    eye_mouth = np.linalg.norm(mouth_mid - (left + right) / 2, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((nose - left) * eye).sum(-1) / iod2
        symmetry = np.where(iod2 > 0, np.clip(1.0 - np.abs(2.0 * t - 1.0), 0.0, 1.0), 0.0)
        width = np.minimum(1.0, np.sqrt(iod2) / eye_mouth / _TEMPLATE_WIDTH_RATIO)
    score = symmetry * np.where(eye_mouth > 0, width, 1.0)
    score = np.where(np.isfinite(pts).all(axis=(-2, -1)), score, np.nan)
    return np.asarray(score, dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One detected face in original-image pixels: ``box`` (4,) float32 x, y, w, h; ``landmarks`` (5, 2) float32."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def pose(self) -> float:
        """:func:`pose_score` of the landmarks (1 frontal, 0 profile)."""
        return float(pose_score(self.landmarks))


@contextmanager
def _quiet_opencv() -> Iterator[None]:
    # OpenCV 5 warns on every FaceDetectorYN.create that the new graph engine ignores targets; it is harmless noise.
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


class FaceDetector:
    """YuNet face detector; :attr:`options` (a :class:`DetectOptions`) say which face(s) of an image it returns.

    ``pad`` pixels of black border are added (after any downscaling) before detection: YuNet misses faces that fill
    the frame, e.g. ORL's 92x112 images need ``pad=20``.  Images whose longer side exceeds ``max_side`` are
    downscaled first.  Coordinates are mapped back to the original image.  ``keep`` (keyword only): see
    :class:`DetectOptions`; :meth:`from_options` builds a detector from one.

    Not thread-safe (the OpenCV network keeps per-call state): create one detector per worker process or thread,
    e.g. through ``FaceDataset(detector_factory=...)``.  Not picklable for the same reason.
    """

    def __init__(
        self,
        model_path: Path | None = None,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
        pad: int = 0,
        max_side: int = 640,
        *,
        keep: str = "largest",
    ) -> None:
        path = yunet_path(model_path)  # AssetNotFoundError (a FileNotFoundError) saying where to put the file
        self.options = DetectOptions(float(score_threshold), int(max_side), keep, int(pad), float(nms_threshold))
        self.model_path = path
        self.pad = self.options.pad
        self.max_side = self.options.max_side
        with _quiet_opencv():
            self._net = cv2.FaceDetectorYN.create(
                str(path), "", (self.max_side, self.max_side), float(score_threshold), float(nms_threshold), 5000
            )

    @classmethod
    def from_options(cls, options: DetectOptions, model_path: Path | None = None) -> FaceDetector:
        """A detector with ``options`` (YuNet at ``model_path``, else :func:`facesearch.model.assets.yunet_path`)."""
        o = options
        return cls(model_path, o.score_threshold, o.nms_threshold, o.pad, o.max_side, keep=o.keep)

    def detect_all(self, image: np.ndarray) -> np.ndarray:
        """All faces in ``image`` ((H, W, 3) uint8 RGB or (H, W) grey) as (F, 15) float32 YuNet rows.

        Each row is box x, y, w, h, then 5 landmark (x, y) pairs in our order, then the score, in original pixels.
        """
        rgb = _as_rgb(image, "<array>")
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
            scale_xy = np.array([size[0] / w, size[1] / h], dtype=np.float32)
        else:
            scale_xy = np.ones(2, dtype=np.float32)
        if self.pad:
            p = self.pad
            bgr = cv2.copyMakeBorder(bgr, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._net.detect(bgr)
        if faces is None or len(faces) == 0:
            return np.zeros((0, 15), dtype=np.float32)
        faces = np.array(faces, dtype=np.float32).reshape(-1, 15)
        xy = faces[:, :14].reshape(-1, 7, 2)
        xy[:, 0] -= self.pad  # box origin
        xy[:, 2:] -= self.pad  # landmarks
        xy[:, :] /= scale_xy  # box size scales too; only positions were padded
        return faces

    def detect_faces(self, image: np.ndarray) -> list[Detection]:
        """The faces of ``image`` ((H, W, 3) uint8 RGB or (H, W) grey) that ``options.keep`` keeps, best first: at
        most one, or every face for ``all`` (see :func:`select_faces`)."""
        faces = self.detect_all(image)
        keep = select_faces(faces, self.options.keep, np.asarray(image).shape[:2])
        return [
            Detection(box=faces[i, :4].copy(), landmarks=faces[i, 4:14].reshape(5, 2).copy(), score=float(faces[i, 14]))
            for i in keep
        ]

    def detect(self, image: np.ndarray) -> Detection | None:
        """The face of ``image`` ((H, W, 3) uint8 RGB) that ``options.keep`` selects (``all``: the largest); ``None``
        when there is none."""
        found = self.detect_faces(image)
        return found[0] if found else None


__all__ = [
    "KEEP_FACE",
    "YUNET_ENV",
    "DetectOptions",
    "Detection",
    "FaceDetector",
    "pose_score",
    "select_faces",
]
