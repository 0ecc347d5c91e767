"""Alignment: the similarity fit against known transforms, warps against the template, and YuNet on real ORL faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facesearch.model.faces.align import (
    EYE_WEIGHTS,
    FaceDetector,
    REFERENCE_112x96,
    align_face,
    prepare_face,
    similarity_transform,
    template,
)
from facesearch.model.faces.images import ImageError, read_image

cv2.setNumThreads(1)


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, [[tx], [ty]]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]


@pytest.mark.parametrize("angle,scale,tx,ty", [(0, 1, 0, 0), (17.5, 2.3, -40.0, 12.5), (-120, 0.4, 300, -7)])
def test_similarity_recovers_known_transform(angle: float, scale: float, tx: float, ty: float) -> None:
    src = np.random.default_rng(3).uniform(0, 200, size=(5, 2))
    m_true = _similarity(angle, scale, tx, ty)
    m = similarity_transform(src, _apply(m_true, src))
    assert m.shape == (2, 3) and m.dtype == np.float64
    np.testing.assert_allclose(m, m_true, atol=1e-6)  # exact data: only float64 rounding error


def test_similarity_least_squares_and_no_reflection() -> None:
    src = REFERENCE_112x96.astype(np.float64)
    mirrored = src * [-1, 1] + [96, 0]
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0, "a reflection must never be returned"
    noisy = _apply(_similarity(5, 1.5, 3, 4), src) + np.random.default_rng(0).normal(0, 0.5, (5, 2))
    m = similarity_transform(src, noisy)
    # Least squares: the residual gradient w.r.t. the 4 similarity parameters vanishes (normal equations).
    r = _apply(m, src) - noisy
    jac = np.stack([np.c_[src[:, 0], src[:, 1]], np.c_[-src[:, 1], src[:, 0]], [[1, 0]] * 5, [[0, 1]] * 5])
    np.testing.assert_allclose((jac * r).sum(axis=(1, 2)), 0, atol=1e-9)
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), src)


def _umeyama(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Umeyama's weighted SVD solution with reflections forbidden (the reference the closed form replaced)."""
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd((xd * w[:, None]).T @ xs)
    d = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / (w @ (xs**2).sum(axis=1))
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def test_closed_form_similarity_equals_umeyama() -> None:
    """The closed-form 2D fit is Umeyama's optimum: random, mirrored and collinear points, uniform and eye weights."""
    rng = np.random.default_rng(9)
    for trial in range(200):
        src = rng.uniform(-50, 250, (5, 2))
        dst = rng.uniform(0, 112, (5, 2)) if trial % 3 else src * [-1, 1] + rng.normal(0, 3, (5, 2))
        if trial % 7 == 0:
            src[:, 1] = 2 * src[:, 0] + 1  # collinear source points
        for w in (np.ones(5), np.asarray(EYE_WEIGHTS, np.float64)):
            np.testing.assert_allclose(similarity_transform(src, dst, w), _umeyama(src, dst, w), rtol=1e-9,
                                       atol=1e-9)  # fmt: skip


def test_template_sizes() -> None:
    np.testing.assert_allclose(template(), REFERENCE_112x96)
    np.testing.assert_allclose(template((56, 48)), REFERENCE_112x96 / 2, atol=1e-5)
    # (112, 112): the same face centred, i.e. shifted 8 px right (the ArcFace 112x112 convention).
    np.testing.assert_allclose(template((112, 112)), REFERENCE_112x96 + np.array([8, 0]), atol=1e-5)


def _landmark_image(pts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Black RGB image with a smooth Gaussian blob (sigma 2.5 px) centred on each landmark, one colour channel each."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    img = np.zeros((*shape, 3))
    for k, (x, y) in enumerate(pts):
        img[..., k % 3] += 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.5**2))
    return np.clip(img, 0, 255).astype(np.uint8)


def _blob_centres(crop: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Intensity centroid of each blob in a 9x9 window around its expected position."""
    out = []
    for k, (x, y) in enumerate(near):
        x0, y0 = round(x) - 4, round(y) - 4
        win = crop[y0 : y0 + 9, x0 : x0 + 9, k % 3].astype(np.float64)
        yy, xx = np.mgrid[y0 : y0 + 9, x0 : x0 + 9]
        out.append([(win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()])
    return np.array(out)


@pytest.mark.parametrize("size", [(112, 96), (56, 48)])
def test_align_puts_landmarks_on_template(size: tuple[int, int]) -> None:
    # Landmarks spaced so blobs of the same channel never share a window (eyes 1+2 and nose/mouths differ).
    m = _similarity(-12, 2.7, 60, 35)
    pts = _apply(m, REFERENCE_112x96)
    img = _landmark_image(pts, (360, 320))
    crop = align_face(img, pts.astype(np.float32), size)
    assert crop.shape == (*size, 3) and crop.dtype == np.uint8
    found = _blob_centres(crop, template(size))
    # 0.5 px as the issue asks; measured 0.005 px (112x96) and 0.04 px (56x48): bilinear resampling and 8-bit
    # quantisation of a blob shrunk 2.7-5.4x move its centroid only slightly.
    assert np.abs(found - template(size)).max() < 0.5


@pytest.mark.parametrize(
    "landmarks",
    [np.zeros((4, 2)), np.full((5, 2), np.nan), np.full((5, 2), 50.0), np.full((5, 2), 1e6), np.ones((5, 3))],
)
def test_bad_landmarks(landmarks: np.ndarray) -> None:
    with pytest.raises(ImageError) as info:
        align_face(np.zeros((100, 100, 3), np.uint8), landmarks)
    assert info.value.reason == "bad_landmarks"


def test_prepare_face_needs_landmarks_or_detector() -> None:
    img = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ImageError) as info:
        prepare_face(img)
    assert info.value.reason == "no_landmarks"
    face = prepare_face(img, REFERENCE_112x96 / 2)
    assert face.crop.shape == (112, 96, 3) and face.score is None


def test_missing_model_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACESEARCH_YUNET", str(tmp_path / "none.onnx"))
    with pytest.raises(FileNotFoundError, match=r"none\.onnx.*FACESEARCH_YUNET"):
        FaceDetector()


def test_no_face(yunet_path: Path) -> None:
    detector = FaceDetector(yunet_path)
    flat = np.full((120, 100, 3), 128, np.uint8)
    assert detector.detect(flat) is None
    with pytest.raises(ImageError) as info:
        prepare_face(flat, detector=detector)
    assert info.value.reason == "no_face"


@pytest.fixture(scope="module")
def orl_faces(orl_dir: Path, yunet_path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (112, 92, 3) uint8, detected landmarks (5, 2)) for all 40 ORL s*/1.pgm, padded by 20 px."""
    detector = FaceDetector(yunet_path, pad=20)
    out = []
    for i in range(1, 41):
        img = read_image(orl_dir / f"s{i}" / "1.pgm")
        det = detector.detect(img)
        assert det is not None, f"YuNet must find the face in s{i}/1.pgm with 20 px padding"
        assert det.score >= 0.6 and det.box.dtype == np.float32 and det.landmarks.shape == (5, 2)
        assert 0 <= det.box[0] and det.box[0] + det.box[2] <= 92 + 20, "box mapped back to original pixels"
        out.append((img, det.landmarks))
    return out


def _eye_errors(faces: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray | None) -> np.ndarray:
    """Per image, the worse eye's distance (px) from its template position after the alignment transform."""
    ref = template()
    errs = []
    for _, lm in faces:
        moved = _apply(similarity_transform(lm, ref, weights), lm)
        errs.append(np.linalg.norm(moved[:2] - ref[:2], axis=1).max())
    return np.array(errs)


def test_orl_alignment_eyes_near_template(orl_faces: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for img, lm in orl_faces:
        face = prepare_face(img, lm)
        assert face.crop.shape == (112, 96, 3) and face.crop.dtype == np.uint8
    # The project default weights the eyes (EYE_WEIGHTS), so prepare_face's crops are the eye-pinned ones below.
    # The uniform 5-point fit (the SphereFace/insightface convention) cannot put the eyes exactly on
    # the template: YuNet's ORL landmarks have eye distance / eye-to-mouth distance ~1.05 vs the template's 0.87, so
    # each eye keeps ~2 px of systematic residual.  Measured: max 4.8 px, mean 2.4 px.  Tolerances: max 5.5, mean 3.
    uniform = _eye_errors(orl_faces, None)
    assert uniform.max() < 5.5 and uniform.mean() < 3.0, f"max {uniform.max():.2f} mean {uniform.mean():.2f}"
    # Favouring the eyes meets the 2 px (measured: max 1.8 px, mean 1.0 px).
    eyes = _eye_errors(orl_faces, EYE_WEIGHTS)
    assert eyes.max() < 2.0, f"max {eyes.max():.2f} mean {eyes.mean():.2f}"


def test_orl_redetection_on_crops(orl_faces: list[tuple[np.ndarray, np.ndarray]], yunet_path: Path) -> None:
    # Independent check that the warp moved the image content where the matrix says: re-detect on the aligned crop
    # (upscaled 2x and padded, as YuNet needs context).  YuNet's landmark noise at this scale is ~3 px (measured
    # max 5.9, mean 3.3 px vs the transformed landmarks), so the tolerance is 8 px, ~1/4 of the eye distance: it
    # catches mirrored, rotated or shifted crops, not sub-pixel errors (the blob test covers those).
    detector = FaceDetector(yunet_path, pad=40)
    ref = template()
    errs = []
    for img, lm in orl_faces:
        crop = align_face(img, lm)
        det = detector.detect(cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC))
        assert det is not None, "the aligned crop must still contain a detectable face"
        moved = _apply(similarity_transform(lm, ref), lm)
        errs.append(np.linalg.norm(det.landmarks[:2] / 2 - moved[:2], axis=1).max())
    assert max(errs) < 8.0, f"re-detected eyes {np.round(errs, 2)} px from the transformed landmarks"


def test_large_image_downscaled(orl_dir: Path, yunet_path: Path) -> None:
    img = read_image(orl_dir / "s1" / "1.pgm")
    big = cv2.resize(cv2.copyMakeBorder(img, 20, 20, 20, 20, cv2.BORDER_CONSTANT), None, fx=8, fy=8)
    small = FaceDetector(yunet_path, pad=20).detect(img)
    large = FaceDetector(yunet_path, max_side=320).detect(big)
    assert small is not None and large is not None
    # Same face found in both; mapped back, the landmarks agree to within the detector's ~2-3 px noise at ORL scale.
    back = (large.landmarks - 8 * 20) / 8
    assert np.abs(back - small.landmarks).max() < 4.0
