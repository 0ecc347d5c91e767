"""5-point similarity alignment onto the 112x96 template: :func:`template`, :func:`similarity_transform`,
:func:`align_face`.

Landmark convention used everywhere in the project: a float32 (5, 2) array of pixel coordinates (x, y) in the order
image-left eye centre, image-right eye centre, nose tip, image-left mouth corner, image-right mouth corner.  This is
YuNet's order (its "right eye" is the subject's right, i.e. image left) and CelebA's aligned-landmark order.

These are the low-level pieces.  Turning an image into aligned crops (read, decode, find the landmarks, align) is
:func:`facesearch.model.faces.prepare.prepare_image`, the one path every caller takes; its raising forms
:func:`prepare_face` / :func:`prepare_faces` and :class:`AlignedFace` stay importable from here.  Detection (YuNet,
:class:`DetectOptions`, :func:`pose_score`) lives in :mod:`facesearch.model.faces.detect`; its public names are
re-exported here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from facesearch.model.config import INPUT_SIZE
from facesearch.model.faces.detect import (
    KEEP_FACE,
    YUNET_ENV,
    Detection,
    DetectOptions,
    FaceDetector,
    _as_rgb,
    pose_score,
    select_faces,
)
from facesearch.model.faces.images import ImageError

if TYPE_CHECKING:  # re-exported lazily (see __getattr__): prepare imports this module
    from facesearch.model.faces.prepare import AlignedFace, prepare_face, prepare_faces

log = logging.getLogger(__name__)

LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")

#: The (height, width) frame of :data:`REFERENCE_112x96`; the default crop size is the model's
#: :data:`facesearch.model.config.INPUT_SIZE`.
REFERENCE_SIZE: tuple[int, int] = (112, 96)
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


#: The margin crop of attribute predictors (ATTRIBUTE_MODELS.md, "Crop with margin"): a 128x112 canvas holding the
#: unchanged 112x96 template shifted by MARGIN_OFFSET = (+8, +4) px (x, y), so the chin (y ~ 111 in the identity
#: crop) and a double chin's lower fold (y ~ 118) fit.  Other crop sizes scale both with the template.
MARGIN_SIZE: tuple[int, int] = (128, 112)
MARGIN_OFFSET: tuple[int, int] = (8, 4)


def margin_geometry(size: tuple[int, int] = INPUT_SIZE) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) of the margin canvas, (x, y) offset of the ``size`` crop's window inside it) for a face
    crop of ``size``: :data:`MARGIN_SIZE` and :data:`MARGIN_OFFSET` scaled as :func:`template` scales the face (to
    whole pixels, so the window is an exact slice)."""
    h, w = int(size[0]), int(size[1])
    s = min(h / REFERENCE_SIZE[0], w / REFERENCE_SIZE[1])
    dx, dy = round(MARGIN_OFFSET[0] * s), round(MARGIN_OFFSET[1] * s)
    extra_h = round((MARGIN_SIZE[0] - REFERENCE_SIZE[0]) * s)
    extra_w = round((MARGIN_SIZE[1] - REFERENCE_SIZE[1]) * s)
    return (h + extra_h, w + extra_w), (dx, dy)


def window_offsets(size: tuple[int, int] = INPUT_SIZE) -> tuple[tuple[int, int], ...]:
    """The LNets+ANet patch windows (ATTRIBUTE_MODELS.md §1): (x, y) offsets of ``size`` windows inside the margin
    canvas of ``size`` — its four corners, then the centred window (the standard aligned crop, pixel for pixel).
    For 112x96: (0, 0), (16, 0), (0, 16), (16, 16), (8, 4)."""
    (ch, cw), centre = margin_geometry(size)
    dx, dy = cw - int(size[1]), ch - int(size[0])
    return (0, 0), (dx, 0), (0, dy), (dx, dy), centre


def cut_windows(crops: np.ndarray, size: tuple[int, int], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """``size`` windows of margin crops: (B, H, W, C) and one (x, y) offset per crop -> (B, h, w, C), a copy."""
    h, w = int(size[0]), int(size[1])
    if len(offsets) != len(crops):
        raise ValueError(f"{len(offsets)} offsets for {len(crops)} crops")
    out = np.empty((len(crops), h, w, *crops.shape[3:]), dtype=crops.dtype)
    for i, (x, y) in enumerate(offsets):
        if not (0 <= x <= crops.shape[2] - w and 0 <= y <= crops.shape[1] - h):
            raise ValueError(f"window ({x}, {y}) of {h}x{w} does not fit a {crops.shape[1]}x{crops.shape[2]} crop")
        out[i] = crops[i, y : y + h, x : x + w]
    return out


def template(size: tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    """The 5-point template for an aligned crop of ``size`` = (height, width): (5, 2) float32 (x, y).

    The 112x96 reference is scaled uniformly by ``min(h / 112, w / 96)`` and centred, so (56, 48) halves it and
    (112, 112) shifts it 8 px right (the ArcFace 112x112 convention) instead of stretching the face.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be (height, width) with positive values, got {size}")
    ref_h, ref_w = REFERENCE_SIZE
    s = min(h / ref_h, w / ref_w)
    offset = np.array([(w - ref_w * s) / 2.0, (h - ref_h * s) / 2.0])
    return (REFERENCE_112x96.astype(np.float64) * s + offset).astype(np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping ``src`` onto ``dst``.

    ``src``, ``dst``: (N, 2) points, N >= 2; ``weights``: optional (N,) non-negative per-point weights (default
    uniform).  Returns the (2, 3) float64 matrix ``M`` minimising ``sum_i w_i |M @ [x_i, y_i, 1] - dst_i|^2``,
    usable directly by ``cv2.warpAffine``.

    In the plane a rotation with uniform scale is multiplication by one complex number ``a + ib``, so the fit is
    closed-form: with the weighted centroids removed, ``a + ib = sum w conj(s) d / sum w |s|^2`` -- the same
    optimum as Umeyama's (1991) SVD solution with reflections forbidden, without the SVD (this runs once per face
    in the embedding pipeline).
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
    var_s = float(w @ (xs * xs).sum(axis=1))
    if not var_s > 1e-12:
        raise ValueError("src points are degenerate (all equal); a similarity transform is undefined")
    a = float(w @ (xd[:, 0] * xs[:, 0] + xd[:, 1] * xs[:, 1])) / var_s
    b = float(w @ (xd[:, 1] * xs[:, 0] - xd[:, 0] * xs[:, 1])) / var_s
    m = np.array([[a, -b, 0.0], [b, a, 0.0]])
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def check_landmarks(landmarks: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Validate landmarks against an image of ``shape`` ((H, W, ...)); returns them as (5, 2) float32.  Raises
    :class:`ImageError` ``bad_landmarks`` for a wrong shape, non-finite, degenerate or far-away landmarks."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.size != 10:
        raise ImageError(name, "bad_landmarks", f"landmarks must be 5 (x, y) points, got shape {pts.shape}")
    pts = pts.reshape(5, 2)
    xy = pts.tolist()  # ten numbers: plain floats check faster than numpy's per-call overhead
    if not all(math.isfinite(v) for p in xy for v in p):
        raise ImageError(name, "bad_landmarks", "landmarks contain NaN or infinity")
    h, w = shape[:2]
    if any(x < -w or x > 2 * w or y < -h or y > 2 * h for x, y in xy):
        raise ImageError(name, "bad_landmarks", f"landmarks lie far outside the {w}x{h} image: {xy}")
    spread = max(_std([p[0] for p in xy]), _std([p[1] for p in xy]))
    if math.hypot(xy[0][0] - xy[1][0], xy[0][1] - xy[1][1]) < 1.0 or spread < 1.0:
        raise ImageError(name, "bad_landmarks", f"degenerate landmarks (eyes or all points coincide): {xy}")
    return pts.astype(np.float32)


def _std(v: list[float]) -> float:
    """Population standard deviation (``np.std``'s default) of a few numbers."""
    mean = sum(v) / len(v)
    return math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))


def alignment_matrix(
    landmarks: np.ndarray, size: tuple[int, int] = INPUT_SIZE, weights: np.ndarray | None = EYE_WEIGHTS,
    margin: bool = False,
) -> np.ndarray:  # fmt: skip
    """The (2, 3) float64 map :func:`align_face` warps with: the similarity fit of ``landmarks`` ((5, 2) source
    pixels) onto :func:`template` of ``size``, translated by the margin canvas's whole-pixel offset with ``margin``
    (so the window is the standard crop).  ``M @ [x, y, 1]`` is where a source point lands in the crop."""
    m = similarity_transform(np.asarray(landmarks, np.float64), template(size), weights).astype(np.float64)
    if margin:
        dx, dy = margin_geometry(size)[1]
        m[0, 2] += dx
        m[1, 2] += dy
    return m


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: tuple[int, int] = INPUT_SIZE,
    weights: np.ndarray | None = EYE_WEIGHTS,
    name: str = "<array>",
    margin: bool = False,
) -> np.ndarray:
    """Warp ``image`` ((H, W, 3) uint8 RGB) so ``landmarks`` ((5, 2) x, y) land on :func:`template` of ``size``.

    ``margin``: the margin crop of attribute predictors instead: the same warp on a larger canvas
    (:func:`margin_geometry`: 128x112 for 112x96) with the ``size`` crop's window at offset (+8, +4), so
    ``crop[4:116, 8:104]`` of a margin crop is the standard crop.

    Returns the (h, w, 3) uint8 crop.  Bilinear interpolation; pixels from outside the image are black
    (``BORDER_CONSTANT`` 0), as in the SphereFace/insightface reference crops and the detector's padding, so our crops
    look like the ones public models were trained on; replicated borders would invent smeared structure instead.
    ``weights`` ((5,)) weight the landmarks in the fit.  The project default :data:`EYE_WEIGHTS` pins the eyes to
    the template (within 2 px on real ORL faces) at the cost of ~2 px at the mouth; ``None`` = uniform, the
    SphereFace/insightface convention (eyes up to ~5 px off on ORL).  Embeddings of one index must share the choice.
    Raises :class:`ImageError` ``bad_landmarks`` for a wrong shape, non-finite, degenerate or far-away landmarks.
    """
    image = _as_rgb(image, name)
    return warp_face(image, check_landmarks(landmarks, image.shape, name), size, weights, margin)


def warp_face(image: np.ndarray, pts: np.ndarray, size: tuple[int, int] = INPUT_SIZE,
              weights: np.ndarray | None = EYE_WEIGHTS, margin: bool = False) -> np.ndarray:  # fmt: skip
    """:func:`align_face` on an RGB image and landmarks already checked (:func:`check_landmarks`)."""
    m = alignment_matrix(pts, size, weights, margin)
    h, w = margin_geometry(size)[0] if margin else (int(size[0]), int(size[1]))
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


_PREPARE_NAMES = ("AlignedFace", "prepare_face", "prepare_faces")


def __getattr__(name: str) -> Any:
    """The prepare step's names, importable from here as they were before it had its own module."""
    if name in _PREPARE_NAMES:
        from facesearch.model.faces import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EYE_WEIGHTS",
    "KEEP_FACE",
    "LANDMARK_NAMES",
    "MARGIN_OFFSET",
    "MARGIN_SIZE",
    "REFERENCE_SIZE",
    "YUNET_ENV",
    "AlignedFace",
    "DetectOptions",
    "Detection",
    "FaceDetector",
    "REFERENCE_112x96",
    "align_face",
    "alignment_matrix",
    "check_landmarks",
    "cut_windows",
    "margin_geometry",
    "pose_score",
    "prepare_face",
    "prepare_faces",
    "select_faces",
    "similarity_transform",
    "template",
    "warp_face",
    "window_offsets",
]
