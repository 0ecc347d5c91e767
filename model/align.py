"""Face detection (YuNet via ``cv2.FaceDetectorYN``) and 5-point similarity alignment to the 112x96 template.

Landmark convention used everywhere in the project: a float32 (5, 2) array of pixel coordinates (x, y) in the order
image-left eye centre, image-right eye centre, nose tip, image-left mouth corner, image-right mouth corner.  This is
YuNet's order (its "right eye" is the subject's right, i.e. image left) and CelebA's aligned-landmark order.

Which face of a multi-face photo is used, how sure the detector must be and how large an image it sees are one frozen
:class:`DetectOptions`; :func:`pose_score` rates from the 5 landmarks how frontal a face is (1 frontal, 0 profile).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from model.images import ImageError, read_image

log = logging.getLogger(__name__)

LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

#: SphereFace/CosFace 5-point template for 112x96 (height x width) crops, (x, y) pixels, image-left first.
REFERENCE_112x96: np.ndarray = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float32,
)
REFERENCE_112x96.setflags(write=False)

#: Landmark weights that favour the eyes (see ``align_face``).  The uniform 5-point fit leaves ~2 px of systematic
#: eye residual when a detector's landmark geometry differs from the template (YuNet on ORL: eye distance / eye-mouth
#: distance 1.05 vs the template's 0.87); these weights bring the eyes within ~2 px and move the mouth ~2 px more.
EYE_WEIGHTS: np.ndarray = np.array([1.0, 1.0, 0.1, 0.1, 0.1])
EYE_WEIGHTS.setflags(write=False)

YUNET_ENV = "FACESEARCH_YUNET"
_YUNET_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/models/yunet/face_detection_yunet_s_640_640.onnx"


def template(size: tuple[int, int] = (112, 96)) -> np.ndarray:
    """The 5-point template for an aligned crop of ``size`` = (height, width): (5, 2) float32 (x, y).

    The 112x96 reference is scaled uniformly by ``min(h / 112, w / 96)`` and centred, so (56, 48) halves it and
    (112, 112) shifts it 8 px right (the ArcFace 112x112 convention) instead of stretching the face.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be (height, width) with positive values, got {size}")
    s = min(h / 112.0, w / 96.0)
    offset = np.array([(w - 96.0 * s) / 2.0, (h - 112.0 * s) / 2.0])
    return (REFERENCE_112x96.astype(np.float64) * s + offset).astype(np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping ``src`` onto ``dst``.

    ``src``, ``dst``: (N, 2) points, N >= 2; ``weights``: optional (N,) non-negative per-point weights (default
    uniform).  Returns the (2, 3) float64 matrix ``M`` minimising ``sum_i w_i |M @ [x_i, y_i, 1] - dst_i|^2``
    (Umeyama 1991, weighted), usable directly by ``cv2.warpAffine``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"src and dst must both be (N>=2, 2) arrays, got {src.shape} and {dst.shape}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(src),) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be ({len(src)},) finite, non-negative and not all zero, got {weights!r}")
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    var_s = float(w @ (xs**2).sum(axis=1))
    if not var_s > 1e-12:
        raise ValueError("src points are degenerate (all equal); a similarity transform is undefined")
    cov = (xd * w[:, None]).T @ xs
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0  # forbid reflection
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / var_s)
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def _check_landmarks(landmarks: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Validate landmarks against an image of ``shape``; returns them as (5, 2) float32."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.size != 10:
        raise ImageError(name, "bad_landmarks", f"landmarks must be 5 (x, y) points, got shape {pts.shape}")
    pts = pts.reshape(5, 2)
    if not np.isfinite(pts).all():
        raise ImageError(name, "bad_landmarks", "landmarks contain NaN or infinity")
    h, w = shape[:2]
    if (pts[:, 0] < -w).any() or (pts[:, 0] > 2 * w).any() or (pts[:, 1] < -h).any() or (pts[:, 1] > 2 * h).any():
        raise ImageError(name, "bad_landmarks", f"landmarks lie far outside the {w}x{h} image: {pts.tolist()}")
    if np.linalg.norm(pts[0] - pts[1]) < 1.0 or pts.std(axis=0).max() < 1.0:
        raise ImageError(name, "bad_landmarks", f"degenerate landmarks (eyes or all points coincide): {pts.tolist()}")
    return pts.astype(np.float32)


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: image must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
    return image


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: tuple[int, int] = (112, 96),
    weights: np.ndarray | None = EYE_WEIGHTS,
    name: str = "<array>",
) -> np.ndarray:
    """Warp ``image`` ((H, W, 3) uint8 RGB) so ``landmarks`` ((5, 2) x, y) land on :func:`template` of ``size``.

    Returns the (h, w, 3) uint8 crop.  Bilinear interpolation; pixels from outside the image are black
    (``BORDER_CONSTANT`` 0), as in the SphereFace/insightface reference crops and the detector's padding, so our crops
    look like the ones public models were trained on; replicated borders would invent smeared structure instead.
    ``weights`` ((5,)) weight the landmarks in the fit.  The project default :data:`EYE_WEIGHTS` pins the eyes to
    the template (within 2 px on real ORL faces) at the cost of ~2 px at the mouth; ``None`` = uniform, the
    SphereFace/insightface convention (eyes up to ~5 px off on ORL).  Embeddings of one index must share the choice.
    Raises :class:`ImageError` ``bad_landmarks`` for a wrong shape, non-finite, degenerate or far-away landmarks.
    """
    image = _as_rgb(image, name)
    pts = _check_landmarks(landmarks, image.shape, name)
    m = similarity_transform(pts, template(size), weights)
    h, w = int(size[0]), int(size[1])
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


#: What :class:`DetectOptions.keep` accepts: the one face kept from a multi-face photo, or ``all`` of them.
KEEP_FACE: tuple[str, ...] = ("largest", "center", "score", "all")

#: Eye distance / eye-to-mouth distance of :data:`REFERENCE_112x96` (0.866): a face at least this wide is frontal.
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


@dataclass(frozen=True)
class AlignedFace:
    """An aligned crop (h, w, 3) uint8 RGB, the (5, 2) float32 landmarks used, the detector score and box (4,) x, y,
    w, h if detected."""

    crop: np.ndarray
    landmarks: np.ndarray
    score: float | None = None
    box: np.ndarray | None = None

    @property
    def pose(self) -> float:
        """:func:`pose_score` of the landmarks (1 frontal, 0 profile)."""
        return float(pose_score(self.landmarks))


def default_yunet_path() -> Path:
    """``$FACESEARCH_YUNET`` if set, else ``<repo>/../shared/models/yunet/face_detection_yunet_s_640_640.onnx``."""
    env = os.environ.get(YUNET_ENV)
    return Path(env) if env else _YUNET_DEFAULT


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
        path = Path(model_path) if model_path is not None else default_yunet_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"YuNet model not found at {path}; pass model_path or set ${YUNET_ENV} "
                "to face_detection_yunet_s_640_640.onnx"
            )
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
        """A detector with ``options`` (YuNet at ``model_path``, default :func:`default_yunet_path`)."""
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


def _prepare(source: Path | np.ndarray, landmarks: np.ndarray | None, detector: FaceDetector | None,
             size: tuple[int, int], weights: np.ndarray | None, every: bool) -> list[AlignedFace]:  # fmt: skip
    if isinstance(source, np.ndarray):
        name, image = "<array>", _as_rgb(source, "<array>")
    else:
        name, image = str(source), read_image(source)
    if landmarks is not None:
        pts = _check_landmarks(landmarks, image.shape, name)
        return [AlignedFace(crop=align_face(image, pts, size, weights, name), landmarks=pts)]
    if detector is None:
        raise ImageError(name, "no_landmarks", "no landmarks given and no detector to find them; pass either")
    found = detector.detect_faces(image) if every else [d for d in [detector.detect(image)] if d is not None]
    if not found:
        raise ImageError(name, "no_face", f"no face found in the {image.shape[1]}x{image.shape[0]} image")
    pts_list = [_check_landmarks(det.landmarks, image.shape, name) for det in found]
    return [AlignedFace(align_face(image, pts, size, weights, name), pts, det.score, det.box)
            for det, pts in zip(found, pts_list, strict=True)]  # fmt: skip


def prepare_face(
    source: Path | np.ndarray,
    landmarks: np.ndarray | None = None,
    detector: FaceDetector | None = None,
    size: tuple[int, int] = (112, 96),
    weights: np.ndarray | None = EYE_WEIGHTS,
) -> AlignedFace:
    """Read (if a path), locate and align one face.

    With ``landmarks`` ((5, 2) x, y) they are used as given; otherwise ``detector`` finds the face its
    ``options.keep`` selects (by default the largest; for ``all`` too).  Raises :class:`ImageError`: any read error,
    ``no_landmarks`` (neither landmarks nor a detector), ``no_face``, ``bad_landmarks``.
    """
    return _prepare(source, landmarks, detector, size, weights, every=False)[0]


def prepare_faces(
    source: Path | np.ndarray,
    detector: FaceDetector | None = None,
    *,
    landmarks: np.ndarray | None = None,
    size: tuple[int, int] = (112, 96),
    weights: np.ndarray | None = EYE_WEIGHTS,
) -> list[AlignedFace]:
    """Like :func:`prepare_face`, but every face ``detector.options.keep`` keeps (several for ``all``, largest
    first); with ``landmarks`` the one face they mark.  Never empty: no face is an :class:`ImageError` ``no_face``."""
    return _prepare(source, landmarks, detector, size, weights, every=True)


__all__ = [
    "EYE_WEIGHTS",
    "KEEP_FACE",
    "LANDMARK_NAMES",
    "YUNET_ENV",
    "AlignedFace",
    "DetectOptions",
    "Detection",
    "FaceDetector",
    "REFERENCE_112x96",
    "align_face",
    "default_yunet_path",
    "pose_score",
    "prepare_face",
    "prepare_faces",
    "select_faces",
    "similarity_transform",
    "template",
]
