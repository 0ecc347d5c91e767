"""Procedural face rendering: identities carrying the paper's seven attributes, drawn with per-image nuisance.

Everything is drawn in a canonical face frame whose unit is the mean inter-ocular distance: the eye line is y = 0,
x grows to the image right, y grows downwards (eyes at y = 0, nose tip ~0.6, mouth ~1.05, chin ~1.65).  One 2x3
affine (in-plane rotation, scale, yaw-like horizontal squeeze, translation) maps that frame to pixels, so polygons are
filled straight at the target size and the five landmarks are exact: they are the same canonical points pushed
through the same affine.  Yaw also shifts each part sideways in proportion to its depth (the nose most).

The seven attributes' traits (see :mod:`facesearch.model.faces.synth_identity`) are shapes several pixels across with
shading contrast, so they survive blur, noise and JPEG at the scale attribute predictors see them (the margin crop of
:func:`facesearch.model.faces.align.align_face`, ~35 px between the eyes, down to ~2 face units below the eye line):

- Pointy_Nose: a narrow tip hanging below the nostrils in a V, outlined by its shadow, under a lit ridge down the
  nose; a round nose has a broad, shiny bulb over a U-shaped shadow and no ridge (``_draw_nose``).
- Chubby: a fuller, rounder lower face outline, lighter cheek pads beside the mouth with a jowl crease under each, a
  wider neck (``_face_outline``, ``_draw_face``).
- Double_Chin: a fold of skin hanging below the chin, a dark crease between the two and its shadow on the neck
  (``_draw_body``, ``_draw_face``).
- High_Cheekbones: the outline widens at the cheekbones and hollows below; a highlight along each cheekbone over a
  contour shadow running from in front of the ear towards the mouth corner.  Low cheekbones: a low, rosy blush.
- Big_Nose, Narrow_Eyes, Male: wider and longer nose; narrower lid opening; jaw, brows, hair and stubble.

Colours are BGR (OpenCV order); images are ``(height, width, 3) uint8``; landmarks ``(5, 2) float32`` in the order
image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import cv2
import numpy as np

from facesearch.model.faces.synth_identity import Colour, Identity

__all__ = ["CELEBA_EYES", "CELEBA_SIZE", "MAX_SIDE", "encode_image", "render_face"]

#: CelebA's aligned canvas (width, height) and where its eye centres sit.
CELEBA_SIZE: tuple[int, int] = (178, 218)
CELEBA_EYES: tuple[tuple[float, float], tuple[float, float]] = ((69.0, 111.0), (108.0, 111.0))
#: Largest canvas side: the noise bank below must be bigger than any canvas.
MAX_SIDE = 512

# Depth of each part in face units: under yaw a part shifts sideways by depth * sin(yaw).
_D_EYE, _D_NOSE, _D_MOUTH, _D_CHEEK, _D_HAIR = 0.10, 0.28, 0.12, 0.05, -0.05
_SCLERA: Colour = (214.0, 222.0, 228.0)
_DARK: Colour = (22.0, 20.0, 26.0)
_RED: Colour = (70.0, 60.0, 200.0)
_U13 = np.linspace(0.0, 1.0, 13)  # parameter along lids and brows
_T17 = np.linspace(np.pi, 2.0 * np.pi, 17)  # upper half circle (hair)
_SIDES = (-1.0, 1.0)  # image-left, image-right
_FLIP = (np.array((-1.0, 1.0)), np.array((1.0, 1.0)))  # multiply a right-side part by these for both sides

Polys = np.ndarray | list[np.ndarray]  # one (n, 2) polygon or several drawn in one call


def _taper(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float], w0: float, n: int = 9) -> np.ndarray:
    """A band along the quadratic Bezier a-b-c, ``w0`` wide at ``a`` narrowing to a point at ``c``: ``(2n, 2)``."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pa, pb, pc = np.array(a), np.array(b), np.array(c)
    mid = (1 - t) ** 2 * pa + 2 * (1 - t) * t * pb + t**2 * pc
    d = 2 * (1 - t) * (pb - pa) + 2 * t * (pc - pb)
    nrm = np.stack([-d[:, 1], d[:, 0]], axis=1) / np.linalg.norm(d, axis=1, keepdims=True)
    off = nrm * (0.5 * w0 * (1.0 - t) ** 0.8)
    return np.concatenate([mid + off, (mid - off)[::-1]])


#: The shadow under a cheekbone (right side; x in face half-widths): from in front of the ear towards the mouth.
_CONTOUR = _taper((0.99, 0.4), (0.72, 0.58), (0.46, 0.88), 0.15)


class _Expr(NamedTuple):
    smile: float  # 0 neutral .. 1 broad smile (corners up, mouth wider)
    opening: float  # lip gap in face units
    eye_mult: float  # multiplies the identity's eye aperture


def _shade(c: Colour, k: float) -> Colour:
    return (min(255.0, c[0] * k), min(255.0, c[1] * k), min(255.0, c[2] * k))


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


@functools.cache
def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _ellipse(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0, n: int = 20) -> np.ndarray:
    """``(n, 2) float64`` points of an ellipse with semi-axes ``ax, ay`` rotated by ``angle`` radians."""
    u = _unit_circle(n) * (ax, ay)
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        u = u @ np.array([[c, s], [-s, c]])
    return u + np.array((cx, cy))


@functools.cache
def _noise_bank() -> np.ndarray:
    """``(MAX_SIDE + 128, MAX_SIDE + 128, 3) float32`` standard normals, fixed for every process (determinism)."""
    return np.random.default_rng(0x5EED).standard_normal((MAX_SIDE + 128, MAX_SIDE + 128, 3), dtype=np.float32)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random ``(h, w, 3) float32`` window of the noise bank (cheaper than drawing fresh normals per image)."""
    bank = _noise_bank()
    oy, ox = (int(v) for v in rng.integers(0, bank.shape[0] - MAX_SIDE, size=2))
    return bank[oy : oy + h, ox : ox + w]


class _Canvas:
    """An image plus the affine from face units to pixels; draws canonical polygons with sub-pixel precision."""

    def __init__(self, img: np.ndarray, affine: np.ndarray, yaw_s: float) -> None:
        self.img = img
        self.affine = affine  # (2, 3) float64
        self.yaw_s = yaw_s
        self.unit_px = float(math.sqrt(abs(np.linalg.det(affine[:, :2]))))
        self._mats: dict[tuple[float, float], np.ndarray] = {}
        self._fixed: dict[float, np.ndarray] = {}  # per depth: the fixed-point affine of ``fixed``

    def _mat(self, depth: float, scale: float) -> np.ndarray:
        """The affine of a part at ``depth`` (yaw shifts it by depth * sin(yaw) first), times ``scale``."""
        m = self._mats.get((depth, scale))
        if m is None:
            m = self.affine.copy()
            m[:, 2] += self.affine[:, 0] * (depth * self.yaw_s)
            m = self._mats[(depth, scale)] = m * scale
        return m

    def px(self, pts: np.ndarray, depth: float = 0.0) -> np.ndarray:
        """Canonical ``(n, 2)`` points -> pixel ``(n, 2) float64``."""
        return cv2.transform(np.asarray(pts, np.float64).reshape(-1, 1, 2), self._mat(depth, 1.0)).reshape(-1, 2)

    def fixed(self, polys: Polys, depth: float = 0.0) -> list[np.ndarray]:
        """Polygons in OpenCV's fixed point (4 fractional bits, drawn with shift=4), rounded to nearest on screen.

        ``cv2.transform`` is several times cheaper than numpy matrix maths on a few dozen points.
        """
        m = self._fixed.get(depth)
        if m is None:  # +0.5 then truncate = round
            m = self._fixed[depth] = self._mat(depth, 16.0) + np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]])
        polys = [polys] if isinstance(polys, np.ndarray) else polys
        return [cv2.transform(np.asarray(p, np.float64).reshape(-1, 1, 2), m).astype(np.int32) for p in polys]

    def fill(self, polys: Polys, colour: Colour, depth: float = 0.0) -> None:
        cv2.fillPoly(self.img, self.fixed(polys, depth), colour, cv2.LINE_AA, 4)

    def line(self, polys: Polys, colour: Colour, width: float, depth: float = 0.0) -> None:
        thick = max(1, round(width * self.unit_px))
        cv2.polylines(self.img, self.fixed(polys, depth), False, colour, thick, cv2.LINE_AA, 4)


def _pose(
    rng: np.random.Generator, idn: Identity, width: int, height: int, aligned: bool, k: float
) -> tuple[np.ndarray, float]:
    """The ``(2, 3)`` affine face units -> pixels and sin(yaw) of one image."""
    yaw = math.radians(float(rng.uniform(-25.0, 25.0)) * k)
    squeeze = np.diag([math.cos(yaw), 1.0])
    if aligned:  # CelebA: a similarity puts the (yawed) eye centres on the template, plus a little jitter
        jit = rng.normal(0.0, 1.2 * k, size=(2, 2))
        t1, t2 = (complex(*(np.array(CELEBA_EYES[i]) + jit[i])) for i in (0, 1))
        ex = _D_EYE * math.sin(yaw)
        z1, z2 = complex(math.cos(yaw) * (ex - idn.eye_e), 0.0), complex(math.cos(yaw) * (ex + idn.eye_e), 0.0)
        a = (t2 - t1) / (z2 - z1)
        rot, origin = (
            np.array([[a.real, -a.imag], [a.imag, a.real]]),
            np.array([(t1 - a * z1).real, (t1 - a * z1).imag]),
        )
    else:
        theta = math.radians(min(20.0, max(-20.0, float(rng.normal(0.0, 7.0 * k)))))
        scale = 0.29 * min(width, height) * math.exp(float(rng.normal(0.0, 0.07 * k)))
        c, s = math.cos(theta), math.sin(theta)
        rot = scale * np.array([[c, -s], [s, c]])
        origin = np.array([width * 0.5, height * 0.41]) + rng.normal(0.0, 0.03 * k, size=2) * (width, height)
    return np.concatenate([rot @ squeeze, origin[:, None]], axis=1), math.sin(yaw)


def _expression(rng: np.random.Generator, k: float) -> _Expr:
    r, a, b = (float(v) for v in rng.random(3))
    smile, opening = 0.0, 0.0
    if r < 0.35 * k:
        smile = 0.3 + 0.7 * a
    elif r < 0.5 * k:
        smile, opening = 0.5 * a, 0.08 + 0.14 * b
    eye_mult = min(1.2, max(0.6, float(rng.normal(1.0, 0.08 * k)) - 0.15 * smile))
    return _Expr(smile, opening, eye_mult)


def _draw_background(cv: _Canvas, rng: np.random.Generator) -> None:
    h, w = cv.img.shape[:2]
    cv2.rectangle(cv.img, (0, 0), (w, h), tuple(rng.uniform(25.0, 230.0, size=3).tolist()), -1)
    for _ in range(int(rng.integers(0, 4))):  # clutter: a few random quadrilaterals
        quad = rng.uniform(-0.2, 1.2, size=(4, 2)) * (w, h)
        cv2.fillPoly(cv.img, [np.rint(quad * 16).astype(np.int32)], tuple(rng.uniform(0, 255, 3).tolist()), 8, 4)


@functools.lru_cache(maxsize=64)
def _face_outline(idn: Identity, n: int = 64) -> np.ndarray:
    """``(n, 2)`` outline (read-only, cached per person): an ellipse on top, a superellipse jaw below, the cheekbone
    bump with the hollow under it (High_Cheekbones) and lower-cheek fullness (Chubby)."""
    c, s = _unit_circle(n).T
    lower = s > 0
    x = np.where(lower, np.sign(c) * np.abs(c) ** (2.0 / idn.jaw_sq), 0.97 * c) * idn.face_w
    y = np.where(lower, idn.chin_y * s, idn.face_top * s)
    yl = np.clip(y / idn.chin_y, 0.0, 1.0)
    x = x * (1.0 - (1.0 - idn.jaw_w) * yl**1.5)
    cb, f = idn.cheek_bone, idn.fullness
    x = x * (1.0 + 0.07 * cb * np.exp(-(((y - 0.3) / 0.22) ** 2)) - 0.04 * cb * np.exp(-(((y - 0.95) / 0.25) ** 2)))
    x = x * (1.0 + 0.12 * f * np.exp(-(((y - 1.0) / 0.4) ** 2)))
    out = np.stack([x, y], axis=1)
    out.setflags(write=False)
    return out


def _chin_fold(idn: Identity) -> float:
    """Size of the second chin, 0 (none) .. ~1.3, from ``double_chin`` (values under 0.15 draw nothing)."""
    return min(1.3, max(0.0, (idn.double_chin - 0.15) / 0.7))


def _draw_body(cv: _Canvas, idn: Identity, rng: np.random.Generator) -> None:
    """Shoulders, hair behind the head, neck, ears and the second chin (everything the face covers)."""
    w, c, skin = idn.face_w, idn.chin_y, idn.skin
    cv.fill(_ellipse(0.0, c + 1.5, 2.4, 1.0), tuple(rng.uniform(20.0, 235.0, 3).tolist()))
    if idn.hair_style == 1:
        cv.fill(_ellipse(0.0, 0.2, 1.36 * w, c + 0.45, n=28), _shade(idn.hair, 0.85), _D_HAIR)
    nw = 0.45 * w * (1.0 + 0.2 * idn.fullness)
    cv.fill(np.array([(-nw, 0.6), (nw, 0.6), (nw * 1.1, c + 0.9), (-nw * 1.1, c + 0.9)]), _shade(skin, 0.78))
    cv.fill([_ellipse(sx * 0.97 * w, 0.22, 0.13 * idn.ear, 0.28 * idn.ear, n=14) for sx in _SIDES], _shade(skin, 0.9))
    k = _chin_fold(idn)
    if k > 0.0:  # the second chin: a fold of lit skin hanging below the chin, casting a shadow on the neck
        ax, top, bottom = (0.5 + 0.12 * k) * idn.jaw_w * w, c - 0.3, c + 0.05 + 0.13 * k
        fold = _ellipse(0.0, 0.5 * (top + bottom), ax, 0.5 * (bottom - top), n=24)
        cv.fill(fold + np.array((0.0, 0.045)), _shade(skin, 0.6))
        cv.fill(fold, _shade(skin, 0.94))


def _draw_face(cv: _Canvas, idn: Identity, rng: np.random.Generator) -> None:
    """Skin, stubble tone, cheeks (blush, Chubby's pads and jowls, High_Cheekbones' contour), chin crease, moles.

    The shaped features are drawn over the stubble's tone and under its dots, so a beard does not hide them.
    """
    skin, outline = idn.skin, _face_outline(idn)
    cv.fill(outline, skin)
    region = None
    if idn.stubble > 0.0:
        region = outline[: len(outline) // 2]
        region = region[region[:, 1] > idn.nose_y + 0.14]
        cv.fill(region, _shade(skin, 1.0 - 0.12 * idn.stubble))
    cb, f, w = idn.cheek_bone, idn.fullness, idn.face_w
    cheeks = [_ellipse(sx * 0.57 * w, 0.62 - 0.3 * cb, 0.17, 0.15, -sx * 0.2, 16) for sx in _SIDES]
    cv.fill(cheeks, _mix(skin, _RED, 0.12 * (1.0 - cb)), _D_CHEEK)
    if f > 0.05:  # full cheeks: a rounded pad beside the mouth, bounded below by a jowl crease
        mx, my = idn.mouth_w, idn.mouth_y
        pad = _ellipse(mx + 0.22, my - 0.15, 0.26, 0.2, -0.3, 16)
        cv.fill([pad * s for s in _FLIP], _mix(skin, (245.0, 245.0, 250.0), 0.13 * f), _D_CHEEK)
        jowl = np.array([(mx + 0.5, my - 0.12), (mx + 0.38, my + 0.06), (mx + 0.2, my + 0.17), (mx + 0.02, my + 0.2)])
        cv.line([jowl * s for s in _FLIP], _shade(skin, 1.0 - 0.26 * f), 0.045, _D_CHEEK)
    if cb > 0.05:  # cheekbone contour: shadow from the ear towards the mouth corner under a lit cheekbone ridge
        contour = _CONTOUR * (w, 1.0)
        cv.fill([contour * s for s in _FLIP], _shade(skin, 1.0 - 0.2 * cb), _D_CHEEK)
        ridge = _ellipse(0.7 * w, 0.4, 0.18, 0.065, -0.7, 14)
        cv.fill([ridge * s for s in _FLIP], _mix(skin, (245.0, 245.0, 250.0), 0.32 * cb), _D_CHEEK)
    k = _chin_fold(idn)
    if k > 0.0:  # the crease between the chin and the second chin
        cv.line(outline[11:22], _shade(skin, 1.0 - 0.3 * min(1.0, k)), 0.05)
    if region is not None:  # stubble dots
        h, w = cv.img.shape[:2]
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, cv.fixed(region), 255, cv2.LINE_8, 4)
        dots = (mask > 0) & (_noise(rng, h, w)[..., 0] > 1.9 - 0.8 * idn.stubble)
        cv.img[dots] = (cv.img[dots] * 0.7).astype(np.uint8)
    if idn.moles:
        cv.fill([_ellipse(mx * idn.face_w, my, mr, mr, n=10) for mx, my, mr in idn.moles], _shade(skin, 0.45), _D_CHEEK)


def _draw_hair(cv: _Canvas, idn: Identity) -> None:
    """Hair in front of the face: cap down to the hairline, strands, sideburns or side curtains."""
    w, top, hair = idn.face_w, idn.face_top, idn.hair
    vol = 0.18 if idn.hair_style == 1 else 0.1
    outer = np.stack([(1.07 + vol) * w * np.cos(_T17), -0.1 + (top + vol) * np.sin(_T17)], axis=1)
    xs = np.linspace(0.96 * w, -0.96 * w, 13)
    inner = np.stack([xs, idn.hairline + (-0.2 - idn.hairline) * np.abs(xs / (0.96 * w)) ** 2.5], axis=1)
    cv.fill(np.concatenate([outer, inner]), hair, _D_HAIR)
    strands = [outer[3:14] * np.array((f, 0.98)) + np.array((0.0, 0.02 - 0.04 * f)) for f in (0.93, 0.85, 0.77)]
    cv.line(strands, _shade(hair, 0.7), 0.02, _D_HAIR)
    if idn.hair_style == 1:  # side curtains
        side = np.array([(0.9 * w, -0.5), (1.3 * w, -0.4), (1.38 * w, idn.chin_y + 0.4), (0.9 * w, 1.0)])
        cv.fill([side * np.array((sx, 1.0)) for sx in _SIDES], hair, _D_HAIR)
    else:  # sideburns
        side = np.array([(0.96 * w, -0.3), (1.02 * w, -0.3), (1.0 * w, 0.2), (0.93 * w, 0.15)])
        cv.fill([side * np.array((sx, 1.0)) for sx in _SIDES], _shade(hair, 0.9), _D_HAIR)


def _draw_eyes(cv: _Canvas, idn: Identity, ex: _Expr) -> None:
    """Brows, sclera, iris and pupil clipped to the lids, glint and lid lines; the iris centre is the landmark.

    Both eyes are built first and drawn together, one OpenCV call per layer (they never overlap).
    """
    ew, ap, ri, u = idn.eye_w, idn.eye_ap * ex.eye_mult, 0.5 * idn.eye_w, _U13
    bump = np.sin(np.pi * u)
    layers: dict[str, list[np.ndarray]] = {k: [] for k in ("sclera", "iris", "pupil", "glint", "up", "lo", "brow")}
    for sx in _SIDES:
        cx = sx * idn.eye_e
        xs = cx + ew * (2.0 * u - 1.0)
        tilt = -sx * idn.eye_tilt * (xs - cx)
        up, lo = tilt - ap * ew * bump**0.8, tilt + 0.7 * ap * ew * bump
        layers["up"].append(np.stack([xs, up], axis=1))
        layers["lo"].append(np.stack([xs, lo], axis=1))
        layers["sclera"].append(np.concatenate([layers["up"][-1], layers["lo"][-1][::-1]]))
        for name, r, off in (("iris", ri, 0.0), ("pupil", 0.42 * ri, 0.0), ("glint", 0.14 * ri, 0.3)):
            disc = _ellipse(cx + off * ri, -off * ri, r, r, n=18)
            disc[:, 1] = np.clip(disc[:, 1], np.interp(disc[:, 0], xs, up), np.interp(disc[:, 0], xs, lo))
            layers[name].append(disc)
        bx, by = cx + sx * (0.48 * u - 0.22), idn.brow_y - idn.brow_arch * np.sin(np.pi * u**0.8)
        th = idn.brow_th * (1.0 - 0.5 * u)
        layers["brow"].append(np.concatenate([np.stack([bx, by - th / 2], 1), np.stack([bx, by + th / 2], 1)[::-1]]))
    cv.fill(layers["sclera"], _SCLERA, _D_EYE)
    cv.fill(layers["iris"], idn.iris, _D_EYE)
    cv.fill(layers["pupil"], _DARK, _D_EYE)
    cv.fill(layers["glint"], (250.0, 250.0, 250.0), _D_EYE)
    cv.line(layers["up"], _DARK, 0.025 + 0.03 * idn.makeup, _D_EYE)
    cv.line([p[2:-2] - np.array((0.0, 0.07)) for p in layers["up"]], _shade(idn.skin, 0.82), 0.015, _D_EYE)
    cv.line([p[1:-1] for p in layers["lo"]], _shade(idn.skin, 0.8), 0.012, _D_EYE)
    cv.fill(layers["brow"], _mix(idn.hair, _DARK, 0.45), _D_EYE)


def _draw_nose(cv: _Canvas, idn: Identity) -> None:
    """Bridge shadows, alae, nostrils, then the tip (``nose_point``: 0 a broad shiny bulb, 1 a narrow point hanging
    over the nostrils) over its shadow, the lit ridge of a pointed nose and the tip highlight."""
    ny, nw, p, skin = idn.nose_y, idn.nose_w, idn.nose_point, idn.skin
    bridge = np.array([(0.1, 0.02), (0.12, 0.6 * ny), (0.75 * nw, ny - 0.1)])
    cv.line([bridge * f for f in _FLIP], _shade(skin, 0.86), 0.03, _D_NOSE)
    ala = _ellipse(0.0, 0.0, 0.34 * nw, 0.42 * nw, n=14)
    centre = np.array((0.82 * nw, ny - 0.01))
    cv.fill([(ala + centre) * f for f in _FLIP], _shade(skin, 0.88), _D_NOSE)
    cv.line([(ala[[9, 10, 11, 12, 13, 0, 1, 2]] + centre) * f for f in _FLIP], _shade(skin, 0.66), 0.022, _D_NOSE)
    nx, nrx = 0.45 * nw, 0.28 * nw * (1.0 - 0.3 * p)
    nost = [_ellipse(sx * nx, ny + 0.035, nrx, 0.12 * nw, sx * (0.2 + 0.5 * p), 14) for sx in _SIDES]
    cv.fill(nost, _shade(skin, 0.35), _D_NOSE)
    rx, ry = nw * (0.6 - 0.3 * p), nw * (0.5 + 0.4 * p)
    tip = _ellipse(0.0, 0.0, rx, ry, n=20)
    tip[:, 0] *= 1.0 - 0.9 * p * np.clip(tip[:, 1] / ry, 0.0, 1.0)  # pinch the lower half into a point
    tip += np.array((0.0, ny + 0.02 + 0.08 * p - ry))
    cv.fill(tip * (1.2, 1.0) + (0.0, 0.035), _shade(skin, 0.55), _D_NOSE)
    cv.fill(tip, _mix(skin, (250.0, 250.0, 250.0), 0.18 * (1.0 - p)), _D_NOSE)  # a shiny bulb when round
    ridge = np.array([(0.0, 0.12), (0.0, ny - 0.6 * ry)])  # a sharp lit ridge down to a pointed tip
    cv.line(ridge, _mix(skin, (250.0, 250.0, 250.0), 0.55 * p), 0.06, _D_NOSE)
    hl = 0.03 + 0.1 * nw * (1.0 - 0.5 * p)
    cv.fill(_ellipse(0.0, ny - 0.04 + 0.03 * p, hl, hl * (1.0 + p), n=12), _shade(skin, 1.16), _D_NOSE)


def _mouth_corners(idn: Identity, ex: _Expr) -> tuple[float, float]:
    """Half-width and corner height of the mouth (face units)."""
    return idn.mouth_w * (1.0 + 0.12 * ex.smile), idn.mouth_y - 0.07 * ex.smile


def _draw_mouth(cv: _Canvas, idn: Identity, ex: _Expr) -> None:
    """Lips, an open mouth with teeth, the lip line and smile folds; the corners are landmarks."""
    mw, cy = _mouth_corners(idn, ex)
    x = np.linspace(-mw, mw, 15)
    r = 1.0 - (x / mw) ** 2
    line = idn.mouth_y - 0.07 * ex.smile * (1.0 - r)
    upb, lot = line - 0.4 * ex.opening * r, line + 0.6 * ex.opening * r
    upt = upb - idn.lip_up * np.sqrt(r) * (1.0 - 0.35 * np.exp(-((x / 0.12) ** 2)))
    lob = lot + idn.lip_lo * np.sqrt(r)

    def band(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([np.stack([x, a], axis=1), np.stack([x, b], axis=1)[::-1]])

    if ex.smile > 0.3:
        fold = np.array([(idn.nose_w + 0.08, idn.nose_y), (mw + 0.07, idn.mouth_y + 0.05)])
        cv.line([fold * np.array((sx, 1.0)) for sx in _SIDES], _shade(idn.skin, 0.84), 0.02, _D_MOUTH)
    if ex.opening > 0.0:
        cv.fill(band(upb, lot), (40.0, 30.0, 70.0), _D_MOUTH)
        cv.fill(band(upb, upb + 0.4 * (lot - upb)), (205.0, 215.0, 220.0), _D_MOUTH)
    cv.fill(band(upt, upb), idn.lip, _D_MOUTH)
    cv.fill(band(lot, lob), _shade(idn.lip, 1.08), _D_MOUTH)
    cv.line(np.stack([x, line], axis=1), _shade(idn.lip, 0.5), 0.018, _D_MOUTH)
    assert abs(line[0] - cy) < 1e-9, "mouth corner must match the landmark"


def _landmarks(cv: _Canvas, idn: Identity, ex: _Expr) -> np.ndarray:
    mw, cy = _mouth_corners(idn, ex)
    pts = [
        cv.px(np.array([[-idn.eye_e, 0.0], [idn.eye_e, 0.0]]), _D_EYE),
        cv.px(np.array([[0.0, idn.nose_y]]), _D_NOSE),
        cv.px(np.array([[-mw, cy], [mw, cy]]), _D_MOUTH),
    ]
    return np.concatenate(pts).astype(np.float32)


def _occlude(cv: _Canvas, rng: np.random.Generator) -> None:
    """A random bar (hand, scarf, sunglasses-like) or blob over part of the face."""
    cx, cy, w, h, ang = rng.uniform((-0.9, -0.6, 0.6, 0.15, 0.0), (0.9, 1.8, 1.8, 0.5, np.pi))
    colour = tuple(rng.uniform(0.0, 255.0, 3).tolist())
    if rng.random() < 0.5:
        c, s = math.cos(ang), math.sin(ang)
        corners = np.array([(-w, -h), (w, -h), (w, h), (-w, h)]) * 0.5 @ np.array([[c, s], [-s, c]]) + (cx, cy)
        cv.fill(corners, colour)
    else:
        cv.fill(_ellipse(cx, cy, w * 0.4, h * 1.2, ang, 16), colour)


def _photometric(img: np.ndarray, rng: np.random.Generator, k: float) -> np.ndarray:
    """Brightness, contrast, colour cast, a lighting gradient and Gaussian sensor noise; ``(h, w, 3) uint8``.

    Written with OpenCV calls: numpy broadcasting over a trailing axis of 3 is several times slower on 128x128 images.
    """
    h, w = img.shape[:2]
    phi, grad, sigma = (float(v) for v in rng.uniform((0.0, 0.0, 0.0), (2.0 * np.pi, 0.45 * k, 6.0 * k)))
    contrast, bright = math.exp(float(rng.normal(0.0, 0.12 * k))), float(rng.normal(0.0, 14.0 * k))
    cast = 1.0 + rng.normal(0.0, 0.04 * k, size=3)
    affine = np.concatenate([np.diag(contrast * cast), ((128.0 * (1.0 - contrast) + bright) * cast)[:, None]], 1)
    out = cv2.transform(img, affine)  # saturates to uint8, like an over-exposed camera
    gx = np.linspace(-1.0, 1.0, w, dtype=np.float32) * np.float32(grad * math.cos(phi))
    gy = np.linspace(-1.0, 1.0, h, dtype=np.float32) * np.float32(grad * math.sin(phi))
    plane = 1.0 + gy[:, None] + gx[None, :]
    f = cv2.multiply(out, cv2.merge([plane, plane, plane]), dtype=cv2.CV_32F)
    if sigma > 0.0:
        f = cv2.scaleAdd(_noise(rng, h, w), sigma, f)
    np.maximum(f, 0.0, out=f)
    return cv2.convertScaleAbs(f)  # rounds and saturates at 255


def render_face(
    idn: Identity, rng: np.random.Generator, width: int, height: int, aligned: bool = False, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of ``idn``; all per-image nuisance comes from ``rng``.

    ``aligned`` puts the eyes on CelebA's template (for a 178x218 canvas); otherwise the face is placed freely (about
    60-70% of the width) with rotation, scale and translation jitter.  ``strength`` scales every nuisance (0 = a clean
    frontal neutral render).  Returns ``(image (height, width, 3) uint8 BGR, landmarks (5, 2) float32 pixels)``.
    """
    if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
        raise ValueError(f"canvas {width}x{height} out of range; each side must be in [8, {MAX_SIDE}]")
    k = float(strength)
    affine, yaw_s = _pose(rng, idn, width, height, aligned, k)
    ex = _expression(rng, k)
    cv = _Canvas(np.empty((height, width, 3), np.uint8), affine, yaw_s)
    _draw_background(cv, rng)
    _draw_body(cv, idn, rng)
    _draw_face(cv, idn, rng)
    _draw_hair(cv, idn)
    _draw_eyes(cv, idn, ex)
    _draw_nose(cv, idn)
    _draw_mouth(cv, idn, ex)
    img = cv2.GaussianBlur(cv.img, (0, 0), 0.011 * cv.unit_px)  # soften the vector look
    cv.img = img
    if rng.random() < 0.12 * k:
        _occlude(cv, rng)
    if rng.random() < 0.3 * k:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.4, 1.3)) * min(width, height) / 128.0)
    return _photometric(img, rng, k), _landmarks(cv, idn, ex)


def encode_image(img: np.ndarray, ext: str, rng: np.random.Generator, strength: float = 1.0) -> bytes:
    """Encode ``img (h, w, 3) uint8 BGR`` as ``.jpg`` (random quality: compression is a nuisance) or ``.png``.

    PNG images (FaceScrub style) usually went through a JPEG round trip first, as the originals did.
    """
    k = min(1.0, float(strength))
    if ext == ".png":
        if rng.random() < 0.6 * k:
            _, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
            img = np.asarray(cv2.imdecode(buf, cv2.IMREAD_COLOR))
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif ext == ".jpg":
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(round(95 - 35 * k), 96))])
    else:
        raise ValueError(f"unknown image extension {ext!r}; valid: ['.jpg', '.png']")
    assert ok, "OpenCV failed to encode an in-memory image"
    return bytes(buf)
