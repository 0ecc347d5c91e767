"""MGMTN's analytic group masks (ATTRIBUTE_MODELS.md §2): shape and range, a direct float64 reference, landmarks in
their groups, Object covering every group, equivariance under similarity transforms and mirror images, the crop
landmarks that alignment produces, the margin crop's geometry, the overlay picture and input validation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facesearch.model.faces.align import align_face, margin_geometry, template
from facesearch.model.faces.masks import (
    GROUPS,
    MASK_SIGMA,
    crop_landmarks,
    flip_landmarks,
    group_masks,
    mask_overlay,
    template_landmarks,
)

FACE = (112, 96)  # the aligned face crop; its margin crop is 128x112
SIZE = margin_geometry(FACE)[0]
G = {name: i for i, name in enumerate(GROUPS)}


def _similarity(rng: np.random.Generator, angle_deg: float, scale: tuple[float, float], shift: float) -> np.ndarray:
    """A random similarity (2, 3) about the margin crop's centre: rotation within ±angle_deg, scale in ``scale``,
    shift within ±shift px."""
    angle = np.deg2rad(rng.uniform(-angle_deg, angle_deg))
    k = rng.uniform(*scale)
    rot = k * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([(SIZE[1] - 1) / 2, (SIZE[0] - 1) / 2])
    return np.hstack([rot, (centre - rot @ centre + rng.uniform(-shift, shift, 2))[:, None]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


def _perturbed(n: int, seed: int) -> np.ndarray:
    """(n, 5, 2) template landmarks of the margin crop under a random similarity (rotation ±10°, scale 0.9-1.1),
    each point then jittered by up to ±2 px."""
    rng = np.random.default_rng(seed)
    base = template_landmarks(FACE, margin=True)
    out = [_apply(_similarity(rng, 10.0, (0.9, 1.1), 0.0), base) + rng.uniform(-2, 2, (5, 2)) for _ in range(n)]
    return np.stack(out).astype(np.float32)


def _bilinear(image: np.ndarray, x: float, y: float) -> float:
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    patch = image[y0 : y0 + 2, x0 : x0 + 2].astype(np.float64)
    return float(
        patch[0, 0] * (1 - fx) * (1 - fy)
        + patch[0, 1] * fx * (1 - fy)
        + patch[1, 0] * (1 - fx) * fy
        + patch[1, 1] * fx * fy
    )


def _reference(lm: np.ndarray, size: tuple[int, int], sigma: float = MASK_SIGMA) -> np.ndarray:
    """The masks straight from ATTRIBUTE_MODELS.md §2 in float64 numpy, one primitive at a time: unions as pixelwise
    max of masks, differences as min(A, 1 - B), each mirror pair as two ellipses.  (5, 2) -> (8, H, W)."""
    lm = lm.astype(np.float64)
    o, u = (lm[0] + lm[1]) / 2, lm[1] - lm[0]
    d = np.linalg.norm(u)
    u = u / d
    v = np.array([-u[1], u[0]])
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    s, t = ((xx - o[0]) * u[0] + (yy - o[1]) * u[1]) / d, ((xx - o[0]) * v[0] + (yy - o[1]) * v[1]) / d
    (s_n, t_n), (s_m, t_m) = ((p - o) @ np.stack([u, v], 1) / d for p in (lm[2], (lm[3] + lm[4]) / 2))
    w_m = float(np.linalg.norm(lm[4] - lm[3]) / d)

    def phi(dist: np.ndarray) -> np.ndarray:
        return torch.special.ndtr(torch.from_numpy(dist / sigma)).numpy()

    def ellipse(cs: float, ct: float, a: float, b: float) -> np.ndarray:
        ds, dt = s - cs, t - ct
        r, rho = np.hypot(ds, dt), np.hypot(ds / a, dt / b)
        return phi(np.where(rho > 0, r / np.maximum(rho, 1e-300), min(a, b)) - r)

    def pair(cs: float, ct: float, a: float, b: float) -> np.ndarray:
        return np.maximum(ellipse(-cs, ct, a, b), ellipse(cs, ct, a, b))

    t_bot = max(t_n + 0.12, 0.15)
    lam = (t - 0.10) / (t_bot - 0.10)
    half, centre = 0.12 + 0.21 * lam, s_n * lam
    cos = (t_bot - 0.10) / np.hypot([s_n + 0.21, s_n - 0.21], t_bot - 0.10)
    nose = np.minimum.reduce(
        [phi(t - 0.10), phi(t_bot - t), phi((centre + half - s) * cos[0]), phi((s - centre + half) * cos[1])]
    )
    mouth = ellipse(s_m, t_m, 0.5 * w_m + 0.15, 0.22)
    cheeks = np.minimum(np.minimum(pair(0.62, 0.50, 0.26, 0.34), 1 - nose), 1 - mouth)
    lower = np.minimum(ellipse(s_m, t_m + 0.55, 0.80, 0.45), phi(t - (t_m + 0.15)))
    hair = np.maximum.reduce([phi(-0.55 - t), phi(s - 1.12), phi(-s - 1.12)])
    parts = [mouth, pair(1.05, 0.22, 0.18, 0.32), lower, cheeks, nose, pair(0.5, -0.12, 0.40, 0.33), hair]
    return np.stack([*parts, np.maximum.reduce([ellipse(0.0, 0.5, 1.0, 1.5), *parts])])


def test_shape_dtype_and_range() -> None:
    lm = template_landmarks(FACE, margin=True)
    masks = group_masks(lm, SIZE)
    assert masks.shape == (1, len(GROUPS), *SIZE) and masks.dtype == torch.float32
    assert bool(((masks >= 0) & (masks <= 1)).all())
    batch = group_masks(torch.from_numpy(_perturbed(3, 0)).double(), SIZE)  # any float dtype, torch in
    assert batch.shape == (3, 8, *SIZE) and batch.dtype == torch.float32
    torch.testing.assert_close(group_masks(lm[None].astype(np.float64), SIZE), masks)
    assert group_masks(np.zeros((0, 5, 2), np.float32), SIZE).shape == (0, 8, *SIZE)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_direct_reference(seed: int) -> None:
    """The fast path (distances combined in place, mirror pairs seen from |s|) equals the literal recipe.  Tolerance
    1e-4: float32 distances in units of sigma (~1e-5 off) through Phi, whose slope is at most 0.4."""
    lms = np.concatenate([template_landmarks(FACE, margin=True)[None], _perturbed(3, seed)])
    masks = group_masks(lms, SIZE).numpy()
    for lm, got in zip(lms, masks, strict=True):
        np.testing.assert_allclose(got, _reference(lm, SIZE), atol=1e-4, rtol=0)


def test_every_landmark_lies_in_its_group() -> None:
    lms = np.concatenate([template_landmarks(FACE, margin=True)[None], _perturbed(200, 7)])
    owners = [G["Eyes"], G["Eyes"], G["Nose"], G["Mouth"], G["Mouth"]]
    for lo in range(0, len(lms), 50):
        masks = group_masks(lms[lo : lo + 50], SIZE).numpy()
        for lm, m in zip(lms[lo : lo + 50], masks, strict=True):
            for (x, y), g in zip(lm, owners, strict=True):
                assert _bilinear(m[g], x, y) > 0.5, (GROUPS[g], lm.tolist())


def test_object_covers_every_group() -> None:
    masks = group_masks(np.concatenate([template_landmarks(FACE, margin=True)[None], _perturbed(8, 3)]), SIZE)
    assert bool((masks[:, G["Object"], None] >= masks[:, :7] - 1e-6).all())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_masks_follow_a_similarity_transform(seed: int) -> None:
    """Masks of transformed landmarks = the original masks warped by the same transform, compared where the warp
    reads from inside the original image; bilinear resampling of the soft masks moves the 0.5 level by a fraction of
    a pixel, hence IoU > 0.95 rather than equality."""
    rng = np.random.default_rng(seed)
    m = _similarity(rng, 15.0, (0.9, 1.1), 4.0)
    lm = template_landmarks(FACE, margin=True)
    masks = group_masks(lm, SIZE)[0].numpy()
    moved = group_masks(_apply(m, lm), SIZE)[0].numpy()
    h, w = SIZE

    def warp(image: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    valid = warp(np.ones(SIZE, np.float32)) > 0.999
    for g, name in enumerate(GROUPS):
        a, b = warp(masks[g]) > 0.5, moved[g] > 0.5
        union = (a | b)[valid].sum()
        assert union > 100, name  # a meaningful region to compare
        assert (a & b)[valid].sum() / union > 0.95, name


@pytest.mark.parametrize("seed", [0, 1])
def test_flip_gives_the_mirrored_masks(seed: int) -> None:
    lms = np.concatenate([template_landmarks(FACE, margin=True)[None], _perturbed(4, seed)])
    w = SIZE[1]
    flipped = group_masks(flip_landmarks(lms, w), SIZE)
    torch.testing.assert_close(flipped, group_masks(lms, SIZE).flip(-1), atol=1e-4, rtol=0)
    # numpy and torch, (5, 2) and (N, 5, 2); flipping twice is the identity; index 0 stays the image-left eye
    np.testing.assert_allclose(flip_landmarks(flip_landmarks(lms, w), w), lms, atol=1e-4)
    one = flip_landmarks(torch.from_numpy(lms[0]), w)
    assert isinstance(one, torch.Tensor) and one.shape == (5, 2)
    np.testing.assert_allclose(one.numpy(), flip_landmarks(lms, w)[0])
    assert (one[0, 0] < one[1, 0]).item() and (one[3, 0] < one[4, 0]).item()


def _source_landmarks(seed: int) -> np.ndarray:
    """A face in a 300x260 image: the template scaled x1.7, rotated, shifted, with 2 px of noise per point."""
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(rng.uniform(-20, 20))
    rot = 1.7 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = template(FACE).astype(np.float64) @ rot.T + rng.uniform(40, 70, 2) + rng.normal(0, 2, (5, 2))
    return pts.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_landmarks_is_where_align_face_puts_the_landmarks(seed: int) -> None:
    """A Gaussian dot painted at each source landmark peaks, after ``align_face(margin=True)``, at
    ``crop_landmarks``: argmax within 1 px (whole pixels), intensity centroid within 0.3 px (a symmetric blob keeps
    its centre under a similarity; the 0.3 covers uint8 quantisation and the bilinear warp)."""
    pts = _source_landmarks(seed)
    want = crop_landmarks(pts, FACE, margin=True)
    assert want.dtype == np.float32 and want.shape == (5, 2)
    yy, xx = np.mgrid[0:300, 0:260]
    for (x, y), (wx, wy) in zip(pts, want, strict=True):
        dot = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2))
        image = np.repeat((255 * dot).astype(np.uint8)[..., None], 3, axis=2)
        crop = align_face(image, pts, FACE, margin=True)[..., 0].astype(np.float64)
        iy, ix = np.unravel_index(np.argmax(crop), crop.shape)
        assert abs(ix - wx) <= 1.0 and abs(iy - wy) <= 1.0
        weights = np.where(crop > 0.1 * crop.max(), crop, 0.0)
        cy, cx = np.mgrid[0 : crop.shape[0], 0 : crop.shape[1]]
        centroid = np.array([(weights * cx).sum(), (weights * cy).sum()]) / weights.sum()
        np.testing.assert_allclose(centroid, [wx, wy], atol=0.3)
    offset = np.float32(margin_geometry(FACE)[1])
    np.testing.assert_allclose(crop_landmarks(pts, FACE), want - offset, atol=1e-4)


def test_template_landmarks_are_the_alignment_target() -> None:
    for size in (FACE, (56, 48), (112, 112)):
        np.testing.assert_allclose(crop_landmarks(template(size), size), template(size), atol=1e-4)
        np.testing.assert_allclose(template_landmarks(size), template(size))
        offset = np.float32(margin_geometry(size)[1])
        np.testing.assert_allclose(template_landmarks(size, margin=True), template(size) + offset, atol=1e-5)
        np.testing.assert_allclose(
            crop_landmarks(template(size), size, margin=True), template(size) + offset, atol=1e-4
        )
    np.testing.assert_allclose(template_landmarks(FACE, margin=True)[0], [38.2946, 55.6963], atol=1e-4)


def test_margin_crop_geometry() -> None:
    """At the template of the 128x112 margin crop the lower face reaches the double chin's fold (y ~ 123, at least
    y >= 118) and hair covers the top rows; the face crop's last row (y = 115) is inside Lower_Face."""
    masks = group_masks(template_landmarks(FACE, margin=True), SIZE)[0].numpy() > 0.5
    rows = np.nonzero(masks[G["Lower_Face"]].any(axis=1))[0]
    assert rows.max() >= 118 and masks[G["Lower_Face"], 115, 56]
    assert masks[G["Hair"], :20].all()
    assert not masks[G["Hair"], 50:100, 30:80].any()  # not over the face
    assert masks[G["Object"]].mean() > 0.5


def test_landmarks_of_real_faces_lie_in_their_groups(orl_dir: Path, yunet_path: Path) -> None:
    from facesearch.model.faces.detect import FaceDetector
    from facesearch.model.faces.prepare import prepare_image

    detector = FaceDetector(yunet_path, pad=20)
    owners = [G["Eyes"], G["Eyes"], G["Nose"], G["Mouth"], G["Mouth"]]
    for person in ("s1", "s7", "s23"):
        face = prepare_image(orl_dir / person / "3.pgm", detector=detector, margin=True).first()
        lm = crop_landmarks(face.landmarks, FACE, margin=True)
        np.testing.assert_allclose(lm[:2], template_landmarks(FACE, margin=True)[:2], atol=2.5)  # eyes pinned
        masks = group_masks(lm, face.crop.shape[:2])[0].numpy()
        for (x, y), g in zip(lm, owners, strict=True):
            assert _bilinear(masks[g], x, y) > 0.5, (person, GROUPS[g])


def test_mask_overlay_draws_one_panel_per_group() -> None:
    rng = np.random.default_rng(0)
    crop = cv2.GaussianBlur(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), (0, 0), 2.0)
    masks = group_masks(template_landmarks(FACE, margin=True), SIZE)[0].numpy()
    pic = mask_overlay(crop, masks)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
    assert pic.shape[0] > 2 * SIZE[0] and pic.shape[1] > 4 * SIZE[1]
    # panels: 4 per row, each the x2 crop under an 18 px title band, 4 px gaps
    ph, pw = 18 + 2 * SIZE[0], 2 * SIZE[1]
    panels = [
        pic[4 + r * (ph + 4) : 4 + r * (ph + 4) + ph, 4 + c * (pw + 4) : 4 + c * (pw + 4) + pw]
        for r in (0, 1)
        for c in range(4)
    ]
    assert len({p.tobytes() for p in panels}) == len(GROUPS)  # every group looks different
    assert panels[0][:18].max() > 200  # a title was written
    mouth = panels[G["Mouth"]][18:]
    assert np.abs(mouth.astype(int) - cv2.resize(crop, (pw, 2 * SIZE[0])).astype(int)).max() > 50  # tinted
    assert mask_overlay(crop, masks[:3], ["a", "b", "c"]).shape[1] < pic.shape[1]
    with pytest.raises(ValueError, match="titles"):
        mask_overlay(crop, masks, ["only one"])
    with pytest.raises(ValueError, match="masks must be"):
        mask_overlay(crop, masks[:, :-1])
    with pytest.raises(ValueError, match="uint8"):
        mask_overlay(crop.astype(np.float32), masks)


@pytest.mark.parametrize(
    ("landmarks", "match"),
    [
        (np.zeros((4, 2)), r"\(N, 5, 2\) or \(5, 2\)"),
        (np.zeros((2, 5, 3)), r"\(N, 5, 2\) or \(5, 2\)"),
        (np.full((5, 2), np.nan), "NaN or infinity"),
        (np.where(np.arange(10).reshape(5, 2) == 3, np.inf, 1.0) * template(FACE), "NaN or infinity"),
        (np.repeat(template(FACE)[:1], 5, axis=0), "eyes coincide"),
        (np.array([["a", "b"]] * 5), "real numbers"),
    ],
)
def test_bad_landmarks_are_rejected(landmarks: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_masks(landmarks, SIZE)


def test_bad_arguments_are_rejected() -> None:
    lm = template_landmarks(FACE, margin=True)
    with pytest.raises(ValueError, match="size must be"):
        group_masks(lm, (0, 112))
    with pytest.raises(ValueError, match="sigma must be"):
        group_masks(lm, SIZE, sigma=0.0)
    with pytest.raises(ValueError, match="eyes coincide"):  # the bad face is named in a batch
        group_masks(np.stack([lm, np.repeat(lm[:1], 5, axis=0)]), SIZE)
    with pytest.raises(ValueError, match=r"\(\.\.\., 5, 2\)"):
        flip_landmarks(np.zeros((4, 2)), 112)
    with pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        crop_landmarks(np.zeros((6, 2)), FACE)
    with pytest.raises(ValueError, match="NaN or infinity"):
        crop_landmarks(np.full((5, 2), np.nan), FACE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_equal_the_cpu_masks() -> None:
    lms = torch.from_numpy(_perturbed(16, 5))
    on_gpu = group_masks(lms.cuda(), SIZE)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), group_masks(lms, SIZE), atol=1e-4, rtol=0)
