"""The attribute predictors' margin crop (ATTRIBUTE_MODELS.md, "Crop with margin"): the unchanged 112x96 template
on a 128x112 canvas at offset (+8, +4), whose window is the standard aligned crop pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facesearch.model.faces.align import (
    EYE_WEIGHTS,
    MARGIN_OFFSET,
    MARGIN_SIZE,
    align_face,
    margin_geometry,
    similarity_transform,
    template,
)
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.faces.prepare import prepare_image


def test_geometry_of_the_paper_size_and_scaled_sizes() -> None:
    assert margin_geometry((112, 96)) == (MARGIN_SIZE, MARGIN_OFFSET) == ((128, 112), (8, 4))
    assert margin_geometry((56, 48)) == ((64, 56), (4, 2))
    assert margin_geometry((224, 192)) == ((256, 224), (16, 8))


def _window(crop: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    (_, _), (dx, dy) = margin_geometry(size)
    return crop[dy : dy + size[0], dx : dx + size[1]]


@pytest.mark.parametrize("size", [(112, 96), (56, 48)])
def test_window_equals_the_standard_crop_under_random_similarities(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8), (0, 0), 1.5)
    for _ in range(100):
        angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.4, 2.5)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
        pts = template((112, 96)).astype(np.float64) @ rot.T + rng.uniform(10, 150, 2) + rng.normal(0, 2, (5, 2))
        pts = pts.astype(np.float32)
        if not (0 <= pts[:, 0].min() and pts[:, 0].max() < 260 and 0 <= pts[:, 1].min() and pts[:, 1].max() < 300):
            continue
        std = align_face(image, pts, size)
        wide = align_face(image, pts, size, margin=True)
        assert wide.shape[:2] == margin_geometry(size)[0]
        np.testing.assert_array_equal(_window(wide, size), std)


def test_margin_holds_the_template_at_the_offset() -> None:
    """The fit is the standard one, translated: the landmarks of a face land on the template + (8, 4)."""
    pts = template((112, 96)) * 1.7 + np.float32([30, 40])
    m = similarity_transform(pts, template((112, 96)), EYE_WEIGHTS)
    image = np.zeros((300, 260, 3), np.uint8)
    for x, y in pts:  # a bright dot at each landmark
        cv2.circle(image, (round(float(x)), round(float(y))), 3, (255, 255, 255), -1)
    wide = align_face(image, pts, (112, 96), margin=True)
    for (x, y), (tx, ty) in zip(pts, template((112, 96)), strict=True):
        assert np.allclose(m @ np.array([x, y, 1.0]), [tx, ty], atol=1e-3)
        assert wide[round(float(ty)) + 4, round(float(tx)) + 8].max() > 200  # the dot, shifted by the offset


def test_prepare_image_margin_on_real_faces(orl_dir: Path, yunet_path: Path) -> None:
    detector = FaceDetector(yunet_path, pad=20)
    for person in ("s1", "s7", "s23"):
        path = orl_dir / person / "3.pgm"
        std = prepare_image(path, detector=detector).first()
        wide = prepare_image(path, detector=detector, margin=True).first()
        np.testing.assert_array_equal(wide.landmarks, std.landmarks)
        assert wide.crop.shape == (128, 112, 3)
        np.testing.assert_array_equal(_window(wide.crop, (112, 96)), std.crop)
        # the margin shows more of the face below the template's crop (the chin), not black padding
        assert wide.crop[116:, 8:104].mean() > 5
