"""MGMTN's group masks drawn analytically from the 5 aligned landmarks (ATTRIBUTE_MODELS.md §2).

The paper (Gao et al., 2026) derives eight group masks from a 98-keypoint annotator; ours are drawn from YuNet's five
points.  Units and frame: ``d`` = inter-ocular distance, origin ``o`` = the eyes' midpoint, ``u`` = unit vector from
landmark 0 (image-left eye) to landmark 1, ``v`` = ``u`` turned to point down the face (``u = (1, 0)`` gives
``v = (0, 1)``).  A pixel ``p`` has frame coordinates ``s = (p - o)·u / d`` and ``t = (p - o)·v / d``, so the eyes sit
at ``(±0.5, 0)``; the nose tip ``(s_n, t_n)``, mouth centre ``(s_m, t_m)`` and mouth width ``w_m`` (``d`` units) are
the other landmarks in that frame.  The groups, in :data:`GROUPS` order:

=============  =====================================================================================================
group          region (frame coordinates, units of d)
=============  =====================================================================================================
Mouth          ellipse at the mouth centre, semi-axes (0.5·w_m + 0.15, 0.22)
Ear            ellipses at (±1.05, 0.22), semi-axes (0.18, 0.32)
Lower_Face     ellipse at (s_m, t_m + 0.55), semi-axes (0.80, 0.45), below t = t_m + 0.15
Cheeks         ellipses at (±0.62, 0.50), semi-axes (0.26, 0.34), minus Nose and Mouth
Nose           trapezoid from t = 0.10 to t = t_n + 0.12, half-width 0.12 -> 0.33, its bottom centred on s_n
Eyes           ellipses at (±0.5, -0.12), semi-axes (0.40, 0.33) (covers the brows)
Hair           t < -0.55, plus the lateral strips |s| > 1.12
Object         face ellipse at (0, 0.5), semi-axes (1.0, 1.5), united with the seven groups above
=============  =====================================================================================================

Every primitive is a signed distance field (``d`` units, positive inside): exact for half-planes, the trapezoid the
minimum over its four edges, an ellipse ``R(theta) - r`` along the ray from its centre.  A mask is the indicator
anti-aliased and Gaussian-blurred, ``Phi(distance / sigma)`` (``Phi`` the normal CDF, ``sigma`` = :data:`MASK_SIGMA`
``d``), so landmark jitter of a pixel or two barely moves it.  Since ``Phi`` is increasing and ``1 - Phi(x) =
Phi(-x)``, union (pixelwise max), intersection (min) and difference (``min(A, 1 - B)``) of masks are the same
operations on distances, done there so ``Phi`` runs once per group.  Because everything lives in the landmark frame,
the masks follow any similarity transform of the landmarks, and :func:`flip_landmarks` gives exactly the mirrored
masks.  Pixel centres are at integer coordinates (the ``cv2.warpAffine`` convention the crops use).

:func:`crop_landmarks` maps source landmarks to where :func:`facesearch.model.faces.align.align_face` puts them,
:func:`template_landmarks` is the alignment target itself, :func:`mask_overlay` draws masks over a crop to check them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
import torch

from facesearch.model.faces.align import EYE_WEIGHTS, alignment_matrix, margin_geometry, template

#: The eight attribute groups of MGMTN, in mask-channel order.
GROUPS: tuple[str, ...] = ("Mouth", "Ear", "Lower_Face", "Cheeks", "Nose", "Eyes", "Hair", "Object")
#: The masks' blur, in units of the inter-ocular distance d.
MASK_SIGMA: float = 0.04

# Eyes closer than this (pixels) leave the frame undefined.
_MIN_EYE_DISTANCE = 1e-3
# The nose trapezoid's least height (d), for a nose tip at or above the eye line.
_MIN_NOSE_HEIGHT = 0.05
# Mirror order: swap the eyes (0, 1) and the mouth corners (3, 4).
_FLIP_ORDER = [1, 0, 2, 4, 3]

_Landmarks = TypeVar("_Landmarks", np.ndarray, torch.Tensor)
_Term = float | torch.Tensor  # a per-face coefficient: a float, or (N,)


def _as_landmarks(landmarks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validated (N, 5, 2) float32 tensor (on the input's device when it is a tensor)."""
    if isinstance(landmarks, torch.Tensor):
        if landmarks.is_complex() or landmarks.dtype == torch.bool:
            raise ValueError(f"landmarks must be real numbers, got dtype {landmarks.dtype}")
        lm = landmarks.detach().to(torch.float32)
    else:
        arr = np.asarray(landmarks)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"landmarks must be real numbers, got dtype {arr.dtype}")
        lm = torch.from_numpy(arr.astype(np.float32))
    if lm.shape == (5, 2):
        lm = lm[None]
    if lm.ndim != 3 or lm.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must be (N, 5, 2) or (5, 2) (x, y) points, got shape {tuple(lm.shape)}")
    if not bool(torch.isfinite(lm).all()):
        raise ValueError("landmarks contain NaN or infinity")
    eye_gap = torch.linalg.vector_norm(lm[:, 1] - lm[:, 0], dim=-1)
    if len(lm) and not bool((eye_gap >= _MIN_EYE_DISTANCE).all()):
        bad = int(torch.argmin(eye_gap))
        raise ValueError(f"the eyes coincide (landmarks 0 and 1) in face {bad}: {lm[bad].tolist()}")
    return lm


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be (height, width) with positive values, got {size}")
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class _Frame:
    """The landmark frame of N faces over the pixel grid, in units of ``unit`` d (``unit`` = sigma·sqrt 2, so a
    distance in these units is the argument of erf).  Per face (N,): origin (ox, oy) and ``e = u / d``."""

    ox: torch.Tensor
    oy: torch.Tensor
    ex: torch.Tensor
    ey: torch.Tensor
    x: torch.Tensor  # (W,) pixel-centre x
    y: torch.Tensor  # (H,) pixel-centre y
    unit: float

    @classmethod
    def of(cls, lm: torch.Tensor, size: tuple[int, int], unit: float) -> _Frame:
        (ox, oy), delta = ((lm[:, 0] + lm[:, 1]) / 2).unbind(-1), lm[:, 1] - lm[:, 0]
        ex, ey = (delta / (delta * delta).sum(-1, keepdim=True)).unbind(-1)
        grid = [torch.arange(n, dtype=lm.dtype, device=lm.device) for n in (size[1], size[0])]
        return cls(ox, oy, ex, ey, grid[0], grid[1], unit)

    def coords(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) pixel points -> their frame coordinates (s, t), each (N,), in units of d."""
        qx, qy = p[:, 0] - self.ox, p[:, 1] - self.oy
        return self.ex * qx + self.ey * qy, -self.ey * qx + self.ex * qy

    def field(self, a_s: _Term, a_t: _Term, c: _Term, out: torch.Tensor) -> torch.Tensor:
        """``a_s·s + a_t·t + c`` (coefficients in units of d: floats or (N,)) over the grid into ``out`` (N, H, W),
        in frame units.  Linear in (x, y), so one broadcast add of a row and a column."""
        k = 1.0 / self.unit
        kx, ky = k * (a_s * self.ex - a_t * self.ey), k * (a_s * self.ey + a_t * self.ex)
        kc = k * c - kx * self.ox - ky * self.oy
        row = kx[:, None] * self.x + kc[:, None]
        return torch.add(row[:, None, :], (ky[:, None] * self.y)[:, :, None], out=out)


def _ellipse(ds: torch.Tensor, dt: torch.Tensor, a: _Term, b: float, out: torch.Tensor) -> torch.Tensor:
    """Signed distance ``R(theta) - r = r (1 / rho - 1)`` (positive inside), along the ray from the centre, to the
    ellipse of semi-axes (a, b) around offsets (ds, dt) from its centre (``rho`` the ellipse-normalised radius, all
    lengths in the same unit; ``a``: a float or (N,)).  Written to ``out``; consumes ``ds`` and ``dt`` (in-place
    arithmetic: this is the hot loop).  The floors keep the centre itself (r = rho = 0) deep inside."""
    ds.square_()
    dt.square_()
    torch.add(ds, dt, out=out).clamp_min_(1e-20)  # r^2
    ds.mul_(1.0 / a[:, None, None] ** 2 if isinstance(a, torch.Tensor) else 1.0 / (a * a))
    ds.add_(dt, alpha=1.0 / (b * b)).clamp_min_(1e-30).rsqrt_().sub_(1.0)  # 1 / rho - 1
    return out.sqrt_().mul_(ds)


def _distances(lm: torch.Tensor, size: tuple[int, int], unit: float) -> torch.Tensor:
    """Signed distances (positive inside) of every group in units of ``unit`` d: (N, 5, 2) -> (N, 8, H, W)."""
    fr = _Frame.of(lm, size, unit)
    k = 1.0 / unit
    s_n, t_n = fr.coords(lm[:, 2])
    s_m, t_m = fr.coords((lm[:, 3] + lm[:, 4]) / 2)
    w_m = torch.linalg.vector_norm(lm[:, 4] - lm[:, 3], dim=-1) * torch.hypot(fr.ex, fr.ey)
    out = torch.empty((len(lm), len(GROUPS), *size), dtype=lm.dtype, device=lm.device)
    mouth, ear, lower, cheeks, nose, eyes, hair, obj = out.unbind(1)
    abs_s, ds, dt = (torch.empty_like(mouth) for _ in range(3))
    fr.field(1.0, 0.0, 0.0, abs_s).abs_()

    # Mirror-image pairs of ellipses at (±c, t0): their union is one ellipse at (c, t0) seen from (|s|, t).
    for group, (cs, ct), (a, b) in ((eyes, (0.5, -0.12), (0.40, 0.33)), (ear, (1.05, 0.22), (0.18, 0.32))):
        _ellipse(torch.sub(abs_s, k * cs, out=ds), fr.field(0.0, 1.0, -ct, dt), k * a, k * b, group)
    _ellipse(torch.sub(abs_s, k * 0.62, out=ds), fr.field(0.0, 1.0, -0.50, dt), k * 0.26, k * 0.34, cheeks)
    # Nose: t in [0.10, t_n + 0.12], sides at s = s_n·lam ± (0.12 + 0.21·lam), lam = (t - 0.10) / height; the
    # distance to a side is its horizontal offset times cos = height / |side|.
    top = 0.10
    height = torch.clamp(t_n + 0.12 - top, min=_MIN_NOSE_HEIGHT)
    side_r, side_l = torch.hypot(s_n + 0.21, height), torch.hypot(s_n - 0.21, height)
    fr.field(-height / side_r, (s_n + 0.21) / side_r, (0.12 * height - top * (s_n + 0.21)) / side_r, nose)
    torch.minimum(
        nose,
        fr.field(height / side_l, (0.21 - s_n) / side_l, (0.12 * height + top * (s_n - 0.21)) / side_l, ds),
        out=nose,
    )
    torch.minimum(nose, fr.field(0.0, 1.0, -top, ds), out=nose)
    torch.minimum(nose, fr.field(0.0, -1.0, top + height, ds), out=nose)

    _ellipse(fr.field(1.0, 0.0, -s_m, ds), fr.field(0.0, 1.0, -t_m, dt), k * (0.5 * w_m + 0.15), k * 0.22, mouth)
    # Cheeks minus (Nose or Mouth)
    torch.minimum(cheeks, torch.maximum(nose, mouth, out=ds).neg_(), out=cheeks)
    _ellipse(fr.field(1.0, 0.0, -s_m, ds), fr.field(0.0, 1.0, -t_m - 0.55, dt), k * 0.80, k * 0.45, lower)
    torch.minimum(lower, fr.field(0.0, 1.0, -t_m - 0.15, ds), out=lower)
    fr.field(0.0, -1.0, -0.55, hair)
    torch.maximum(hair, abs_s.sub_(k * 1.12), out=hair)
    _ellipse(fr.field(1.0, 0.0, 0.0, ds), fr.field(0.0, 1.0, -0.5, dt), k * 1.0, k * 1.5, obj)
    for part in (mouth, ear, lower, cheeks, nose, eyes, hair):
        torch.maximum(obj, part, out=obj)
    return out


def group_masks(landmarks: np.ndarray | torch.Tensor, size: tuple[int, int], sigma: float = MASK_SIGMA) -> torch.Tensor:
    """The eight group masks of faces whose landmarks are given in the crop's pixel coordinates.

    ``landmarks``: (N, 5, 2) (x, y) in :data:`facesearch.model.faces.align.LANDMARK_NAMES` order, numpy or torch,
    any real dtype; a single (5, 2) is taken as N = 1.  ``size``: (H, W) of the crop.  ``sigma``: blur in units of
    the inter-ocular distance.  Returns float32 (N, 8, H, W) in [0, 1], channels in :data:`GROUPS` order, on the
    landmarks' device when they are a tensor.  Raises ``ValueError`` for a wrong shape, non-finite landmarks,
    coincident eyes, a bad size or a non-positive sigma.
    """
    h, w = _check_size(size)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number (units of the inter-ocular distance), got {sigma}")
    lm = _as_landmarks(landmarks)
    if len(lm) == 0:
        return torch.zeros((0, len(GROUPS), h, w), dtype=torch.float32, device=lm.device)
    # Phi(x / sigma) = (1 + erf(x / (sigma·sqrt 2))) / 2 with the distances already in units of sigma·sqrt(2)·d,
    # in place (torch.special.ndtr is several times slower on CPU).
    return _distances(lm, (h, w), sigma * math.sqrt(2.0)).erf_().add_(1.0).mul_(0.5)


def _margin_offset(size: tuple[int, int], margin: bool) -> np.ndarray:
    return np.array(margin_geometry(size)[1] if margin else (0, 0), dtype=np.float64)


def crop_landmarks(landmarks: np.ndarray, size: tuple[int, int], margin: bool = False) -> np.ndarray:
    """Where ``align_face(image, landmarks, size, margin=margin)`` puts the source landmarks: its own map
    (:func:`alignment_matrix`: the similarity fit onto :func:`template` with :data:`EYE_WEIGHTS`, shifted by the
    margin crop's offset when ``margin``).  (5, 2) (x, y) source pixels -> (5, 2) float32 crop pixels."""
    size = _check_size(size)
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks must be 5 (x, y) points of shape (5, 2), got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("landmarks contain NaN or infinity")
    m = alignment_matrix(pts, size, EYE_WEIGHTS, margin)
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def template_landmarks(size: tuple[int, int], margin: bool = False) -> np.ndarray:
    """The alignment target in a crop of ``size`` (or in its margin crop when ``margin``): (5, 2) float32 (x, y)."""
    size = _check_size(size)
    return (template(size).astype(np.float64) + _margin_offset(size, margin)).astype(np.float32)


def flip_landmarks(landmarks: _Landmarks, width: int) -> _Landmarks:
    """Landmarks of the left-right mirrored crop (``image[:, ::-1]`` of a crop ``width`` pixels wide):
    ``x -> width - 1 - x``, eyes and mouth corners swapped so index 0 stays the image-left eye.  (..., 5, 2) numpy
    or torch in, the same type, dtype and shape out (a copy)."""
    if tuple(landmarks.shape[-2:]) != (5, 2):
        raise ValueError(f"landmarks must be (..., 5, 2) (x, y) points, got shape {tuple(landmarks.shape)}")
    out = landmarks[..., _FLIP_ORDER, :]  # advanced indexing: already a copy
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def _palette(n: int) -> np.ndarray:
    """n distinct saturated RGB colours (evenly spaced hues): (n, 3) uint8."""
    hues = np.round(np.arange(n) * 180.0 / max(n, 1)).astype(np.uint8)
    hsv = np.stack([hues, np.full(n, 230, np.uint8), np.full(n, 255, np.uint8)], axis=-1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def _panel(crop: np.ndarray, mask: np.ndarray, colour: np.ndarray, title: str, scale: int, band: int) -> np.ndarray:
    """One group's panel: the crop tinted by the mask, the 0.5 contour, the title in a band above."""
    h, w = crop.shape[:2]
    size = (w * scale, h * scale)
    big = cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    big_mask = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    alpha = 0.55 * big_mask[..., None]
    tinted = np.ascontiguousarray(np.clip(big * (1 - alpha) + colour.astype(np.float32) * alpha, 0, 255), np.uint8)
    contours, _ = cv2.findContours((big_mask > 0.5).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(tinted, contours, -1, tuple(int(c) for c in colour), 1)
    out = np.zeros((band + size[1], size[0], 3), np.uint8)
    out[band:] = tinted
    cv2.putText(out, title, (3, band - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def mask_overlay(crop: np.ndarray, masks: np.ndarray, titles: Sequence[str] | None = None) -> np.ndarray:
    """A picture to check masks by eye: uint8 RGB crop (H, W, 3) and masks (G, H, W) in [0, 1] -> uint8 RGB grid
    of G panels (4 per row), each the crop upscaled x2 with that mask tinted in its own colour, the mask's 0.5
    contour drawn and the title (default: :data:`GROUPS` for 8 masks, else ``group i``) written above."""
    crop = np.asarray(crop)
    masks = np.asarray(masks, dtype=np.float32)
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"crop must be a (H, W, 3) uint8 RGB image, got {crop.dtype} {crop.shape}")
    if masks.ndim != 3 or masks.shape[1:] != crop.shape[:2] or len(masks) == 0:
        raise ValueError(f"masks must be (G>=1, {crop.shape[0]}, {crop.shape[1]}), got {masks.shape}")
    if titles is None:
        titles = GROUPS if len(masks) == len(GROUPS) else [f"group {i}" for i in range(len(masks))]
    if len(titles) != len(masks):
        raise ValueError(f"{len(titles)} titles for {len(masks)} masks")
    scale, band, gap = 2, 18, 4
    colours = _palette(len(masks))
    panels = [_panel(crop, m, c, str(t), scale, band) for m, c, t in zip(masks, colours, titles, strict=True)]
    ph, pw = panels[0].shape[:2]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    out = np.full((rows * ph + (rows + 1) * gap, cols * pw + (cols + 1) * gap, 3), 32, np.uint8)
    for i, p in enumerate(panels):
        y, x = gap + (i // cols) * (ph + gap), gap + (i % cols) * (pw + gap)
        out[y : y + ph, x : x + pw] = p
    return out


__all__ = [
    "GROUPS",
    "MASK_SIGMA",
    "crop_landmarks",
    "flip_landmarks",
    "group_masks",
    "mask_overlay",
    "template_landmarks",
]
