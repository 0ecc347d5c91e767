"""Which face of a multi-face photo is kept (largest / center / score / all), the detection threshold and size, and
the landmark pose score: pure checks on YuNet-format rows and a 3D model head, then YuNet on composites of real ORL
faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facesearch.model.faces.align import (
    KEEP_FACE,
    DetectOptions,
    FaceDetector,
    REFERENCE_112x96,
    pose_score,
    prepare_face,
    prepare_faces,
    select_faces,
)
from facesearch.model.faces.images import ImageError, read_image

cv2.setNumThreads(1)


def _row(x: float, y: float, w: float, h: float, score: float) -> np.ndarray:
    """A YuNet-format row (box, 5 landmarks, score) with template landmarks scaled into the box."""
    lm = REFERENCE_112x96 * [w / 96, h / 112] + [x, y]
    return np.array([x, y, w, h, *lm.reshape(-1), score], np.float32)


def test_options_validate_and_default_to_largest() -> None:
    assert DetectOptions().keep == "largest" and KEEP_FACE == ("largest", "center", "score", "all")
    with pytest.raises(ValueError, match=r"keep must be one of \['largest', 'center', 'score', 'all'\], got 'best'"):
        DetectOptions(keep="best")
    for bad in ({"score_threshold": 0.0}, {"score_threshold": 1.5}, {"nms_threshold": -1.0}):
        with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
            DetectOptions(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_side >= 32"):
        DetectOptions(max_side=16)
    with pytest.raises(ValueError, match="pad must be >= 0"):
        DetectOptions(pad=-1)
    assert DetectOptions(keep="all", pad=20).to_dict() == {"score_threshold": 0.6, "max_side": 640, "keep": "all",
                                                          "pad": 20, "nms_threshold": 0.3}  # fmt: skip


def test_select_faces_on_rows() -> None:
    # big (left, lower score), best scored (top right), small at the centre of a 640x480 image
    rows = np.stack([_row(20, 100, 200, 240, 0.70), _row(500, 20, 90, 110, 0.95), _row(290, 190, 60, 100, 0.80)])
    size = (480, 640)
    assert select_faces(rows, "largest", size).tolist() == [0]
    assert select_faces(rows, "score", size).tolist() == [1]
    assert select_faces(rows, "center", size).tolist() == [2]
    assert select_faces(rows, "all", size).tolist() == [0, 1, 2]  # largest first
    for perm in ([2, 0, 1], [1, 2, 0]):  # the choice never depends on the detector's output order
        for keep in KEEP_FACE:
            assert np.array_equal(np.array(perm)[select_faces(rows[perm], keep, size)], select_faces(rows, keep, size))
    assert select_faces(np.zeros((0, 15), np.float32), "largest", size).dtype == np.int64
    assert select_faces(np.zeros((0, 15)), "all", size).tolist() == []
    # ties: equal boxes -> higher score; equal scores -> larger box; equal everything -> top, then left
    tie = np.stack([_row(0, 0, 100, 100, 0.7), _row(300, 0, 100, 100, 0.9)])
    assert select_faces(tie, "largest", size).tolist() == [1]
    same = np.stack([_row(0, 0, 50, 50, 0.9), _row(300, 0, 100, 100, 0.9)])
    assert select_faces(same, "score", size).tolist() == [1]
    twins = np.stack([_row(300, 200, 80, 80, 0.9), _row(100, 200, 80, 80, 0.9), _row(100, 50, 80, 80, 0.9)])
    assert select_faces(twins, "largest", size).tolist() == [2]
    centred = np.stack([_row(280, 200, 80, 80, 0.6), _row(280, 200, 80, 80, 0.9)])
    assert select_faces(centred, "center", size).tolist() == [1]
    with pytest.raises(ValueError, match="keep must be one of"):
        select_faces(rows, "first", size)


def _model_head(
    yaw_deg: float, roll_deg: float = 0.0, scale: float = 1.0, shift: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """The 5 template landmarks made left-right symmetric (eyes +-17.6, mouth corners +-14.6 px around the nose; the
    template is off by ~0.1 px) on a model head (depth in front of the eyes: nose tip 12 px, about a third of the
    35 px eye distance; mouth corners 3 px), turned by ``yaw`` about the vertical axis and projected orthographically,
    then rolled, scaled and shifted in the image plane."""
    xyz = np.array([[-17.6, 0, 0], [17.6, 0, 0], [0, 20.1, 12], [-14.6, 40.7, 3], [14.6, 40.7, 3]])
    a = np.deg2rad(yaw_deg)
    x = xyz[:, 0] * np.cos(a) + xyz[:, 2] * np.sin(a)
    pts = np.c_[x, xyz[:, 1]]
    r = np.deg2rad(roll_deg)
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    return (pts @ rot.T) * scale + shift


def test_pose_score_model_head() -> None:
    yaws = np.arange(0, 91, 5)
    scores = pose_score(np.stack([_model_head(float(y)) for y in yaws]))
    assert scores.shape == (len(yaws),) and scores.dtype == np.float32
    assert scores[0] > 0.99, "the template itself is frontal"
    assert np.all(np.diff(scores) <= 1e-6), f"turning further never raises the score: {scores.round(2)}"
    # The numbers the docstring quotes (30 / 45 / 60 degrees), to 0.02: they depend on the model head's depths only.
    np.testing.assert_allclose(pose_score(np.stack([_model_head(y) for y in (30, 45, 60)])), [0.53, 0.22, 0.0],
                               atol=0.02)  # fmt: skip
    assert scores[yaws >= 60].max() == 0.0, "profile"
    # invariant to roll, scale, translation and mirroring (a face turned left scores as one turned right)
    one = float(pose_score(_model_head(25)))
    assert float(pose_score(_model_head(-25))) == pytest.approx(one, abs=1e-6)
    assert float(pose_score(_model_head(25, roll_deg=40, scale=3.5, shift=(400, -7)))) == pytest.approx(one, abs=1e-5)
    # (10,) rows, (5, 2) one face -> 0-d, NaN landmarks -> NaN, degenerate eyes -> 0
    assert pose_score(_model_head(0).reshape(10)).shape == ()
    batch = np.stack([_model_head(0).reshape(10), np.full(10, np.nan), np.zeros(10)])
    got = pose_score(batch)
    assert got[0] > 0.99 and np.isnan(got[1]) and got[2] == 0.0
    with pytest.raises(ValueError, match=r"\(\.\.\., 5, 2\) or \(\.\.\., 10\)"):
        pose_score(np.zeros((3, 4)))


@pytest.fixture(scope="module")
def orl_images(orl_dir: Path) -> dict[str, np.ndarray]:
    return {f"s{s}/{i}": read_image(orl_dir / f"s{s}" / f"{i}.pgm") for s in range(1, 41) for i in range(1, 11)}


def test_pose_score_orl(orl_images: dict[str, np.ndarray], yunet_path: Path) -> None:
    detector = FaceDetector(yunet_path, pad=20)
    pose = {}
    for name in [f"s{s}/1" for s in range(1, 41)] + ["s1/5", "s4/10", "s26/5", "s26/10"]:
        found = detector.detect(orl_images[name])
        assert found is not None, name
        pose[name] = found.pose
    frontal = np.array([pose[f"s{s}/1"] for s in range(1, 41)])
    # Measured: median 0.93, min 0.69 over the 40 frontal faces; the four visibly turned (~35 degrees) 0.46-0.58.
    assert np.median(frontal) > 0.85 and frontal.min() > 0.6, frontal.round(2)
    for turned, front in (("s1/5", "s1/1"), ("s4/10", "s4/1"), ("s26/5", "s26/1"), ("s26/10", "s26/1")):
        assert pose[turned] < 0.65 and pose[turned] < pose[front] - 0.2, (turned, pose[turned], pose[front])
    face = prepare_face(orl_images["s4/10"], detector=detector)
    assert face.pose == pytest.approx(pose["s4/10"]) and face.box is not None


def _face(img: np.ndarray, scale: float, angle: float = 0.0) -> np.ndarray:
    out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    if angle:
        h, w = out.shape[:2]
        out = cv2.warpAffine(out, cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0), (w, h))
    return out


@pytest.fixture(scope="module")
def composite(orl_images: dict[str, np.ndarray]) -> np.ndarray:
    """640x480 black canvas: a large face tilted 55 degrees at the left (YuNet score ~0.79, the largest box), a
    crisp mid-sized face at the top right (~0.93, the best score) and a small face at the centre (~0.90)."""
    canvas = np.zeros((480, 640, 3), np.uint8)
    big = _face(orl_images["s6/1"], 3.0, 55)
    canvas[40 : 40 + big.shape[0], 20 : 20 + big.shape[1]] = big
    top = _face(orl_images["s21/1"], 1.2)
    canvas[30 : 30 + top.shape[0], 500 : 500 + top.shape[1]] = top
    canvas[240 - 56 : 240 + 56, 320 - 46 : 320 + 46] = orl_images["s37/1"]
    return canvas


def _where(box: np.ndarray) -> str:
    cx = box[0] + box[2] / 2
    return "left" if cx < 250 else "right" if cx > 450 else "centre"


def test_keep_chooses_differently_on_a_composite(composite: np.ndarray, yunet_path: Path) -> None:
    rows = FaceDetector(yunet_path).detect_all(composite)
    assert len(rows) == 3, rows[:, 14]
    chosen = {}
    for keep in ("largest", "center", "score"):
        found = FaceDetector(yunet_path, keep=keep).detect(composite)
        assert found is not None
        chosen[keep] = _where(found.box)
    assert chosen == {"largest": "left", "center": "centre", "score": "right"}
    # The default is the largest face (it was the best scored one, here the top right face).
    default = FaceDetector(yunet_path).detect(composite)
    assert default is not None and _where(default.box) == "left"
    all_faces = FaceDetector.from_options(DetectOptions(keep="all"), yunet_path).detect_faces(composite)
    assert [_where(d.box) for d in all_faces] == ["left", "right", "centre"]  # largest first
    crops = prepare_faces(composite, FaceDetector(yunet_path, keep="all"), size=(56, 48))
    assert len(crops) == 3 and all(c.crop.shape == (56, 48, 3) for c in crops)
    assert [c.score for c in crops] == [d.score for d in all_faces]
    one = prepare_face(composite, detector=FaceDetector(yunet_path, keep="all"), size=(56, 48))
    np.testing.assert_array_equal(one.crop, crops[0].crop)  # prepare_face keeps the first of "all"
    # One face per photo for the single-face modes.
    assert len(prepare_faces(composite, FaceDetector(yunet_path, keep="score"))) == 1


def test_threshold_and_size(composite: np.ndarray, orl_images: dict[str, np.ndarray], yunet_path: Path) -> None:
    # A stricter threshold drops the tilted face (~0.79): the largest remaining one is the top right face.
    strict = FaceDetector.from_options(DetectOptions(score_threshold=0.85), yunet_path)
    assert len(strict.detect_all(composite)) == 2
    found = strict.detect(composite)
    assert found is not None and _where(found.box) == "right" and found.score >= 0.85
    # A 92x112 face in a 1600x1200 photo: downscaled to 640 it is too small for YuNet; at 1280 it is found.
    big = np.zeros((1200, 1600, 3), np.uint8)
    big[600:712, 800:892] = orl_images["s1/1"]
    assert FaceDetector.from_options(DetectOptions(max_side=640), yunet_path).detect(big) is None
    found = FaceDetector.from_options(DetectOptions(max_side=1280), yunet_path).detect(big)
    assert found is not None and 790 < found.box[0] < 830 and 600 < found.box[1] < 630  # original pixels
    with pytest.raises(ImageError) as info:
        prepare_faces(np.zeros((64, 64, 3), np.uint8), FaceDetector(yunet_path, keep="all"))
    assert info.value.reason == "no_face"


def test_detector_keeps_old_signature(yunet_path: Path) -> None:
    det = FaceDetector(yunet_path, 0.7, 0.4, 5, 320)  # positional, as callers outside this package use it
    assert det.options == DetectOptions(score_threshold=0.7, max_side=320, keep="largest", pad=5, nms_threshold=0.4)
    assert det.pad == 5 and det.max_side == 320
    assert FaceDetector.from_options(det.options, yunet_path).options == det.options
