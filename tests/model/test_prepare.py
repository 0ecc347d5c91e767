"""The one face path (:func:`prepare_image`): every outcome on real ORL faces with YuNet and on synthetic faces, each
compared with the low-level pieces it is built from (read_image + detector + align_face) as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facesearch.model.faces.align import EYE_WEIGHTS, align_face
from facesearch.model.faces.datasets import FaceDataset, FaceItem, read_list
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.faces.images import ImageError, read_image
from facesearch.model.faces.prepare import (
    FACE_REASONS,
    AlignedFace,
    FaceFailure,
    prepare_face,
    prepare_faces,
    prepare_image,
)

cv2.setNumThreads(1)
SIZE = (56, 48)


@pytest.fixture(scope="module")
def detector(yunet_path: Path) -> FaceDetector:
    return FaceDetector(yunet_path, pad=20)  # ORL's 92x112 faces fill the frame: YuNet needs the border


def _failure(prepared_faces: tuple[AlignedFace | FaceFailure, ...]) -> FaceFailure:
    assert len(prepared_faces) == 1 and isinstance(prepared_faces[0], FaceFailure), prepared_faces
    return prepared_faces[0]


def test_detected_orl_face_matches_the_low_level_reference(orl_dir: Path, detector: FaceDetector) -> None:
    path = orl_dir / "s1" / "1.pgm"
    timings: dict[str, float] = {}
    prepared = prepare_image(path, detector=detector, size=SIZE, timings=timings)
    (face,) = prepared.faces
    assert isinstance(face, AlignedFace) and prepared.name == str(path) and prepared.image is None
    assert set(timings) == {"read", "decode", "align"} and all(t >= 0 for t in timings.values())
    image = read_image(path)
    found = detector.detect(image)
    assert found is not None
    np.testing.assert_array_equal(face.crop, align_face(image, found.landmarks, SIZE, EYE_WEIGHTS))
    np.testing.assert_array_equal(face.landmarks, found.landmarks)
    np.testing.assert_array_equal(face.box, found.box)
    assert face.crop.shape == (*SIZE, 3) and face.crop.dtype == np.uint8 and face.score == found.score > 0.5
    assert face.face == 0 and 0.5 < face.pose <= 1.0
    # The same image as bytes, as a decoded array, and with the detected landmarks given: the same crop.
    from_bytes = prepare_image(path.read_bytes(), detector=detector, size=SIZE).first()
    from_array = prepare_image(image, detector=detector, size=SIZE).first()
    given = prepare_image(path, found.landmarks, size=SIZE).first()
    for other in (from_bytes, from_array, given):
        np.testing.assert_array_equal(other.crop, face.crop)
    assert given.score is None and given.box is None  # given landmarks carry no detection
    np.testing.assert_array_equal(prepare_face(path, detector=detector, size=SIZE).crop, face.crop)


def test_keep_all_numbers_the_faces_largest_first(orl_dir: Path, yunet_path: Path) -> None:
    canvas = np.zeros((300, 420, 3), np.uint8)
    big = cv2.resize(read_image(orl_dir / "s1" / "1.pgm"), None, fx=1.6, fy=1.6, interpolation=cv2.INTER_CUBIC)
    canvas[40 : 40 + big.shape[0], 20 : 20 + big.shape[1]] = big
    canvas[90:202, 280:372] = read_image(orl_dir / "s2" / "1.pgm")
    every = FaceDetector(yunet_path, keep="all")
    prepared = prepare_image(canvas, detector=every, size=SIZE)
    assert [f.face for f in prepared.faces] == [0, 1] and all(isinstance(f, AlignedFace) for f in prepared.faces)
    left, right = prepared.aligned()
    assert left.box is not None and right.box is not None and left.box[0] < 200 < right.box[0]  # the larger first
    assert [f.crop.shape for f in prepare_faces(canvas, every, size=SIZE)] == [(*SIZE, 3)] * 2
    (first,) = prepare_image(canvas, detector=every, size=SIZE, max_faces=1).faces
    assert isinstance(first, AlignedFace)
    np.testing.assert_array_equal(first.crop, left.crop)


def test_file_failures_are_typed_and_never_raise(orl_dir: Path, detector: FaceDetector, tmp_path: Path) -> None:
    data = (orl_dir / "s1" / "1.pgm").read_bytes()
    (tmp_path / "cut.pgm").write_bytes(data[:500])
    (tmp_path / "page.jpg").write_text("<html>not found</html>")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    expected = {"cut.pgm": "truncated", "page.jpg": "not_an_image", "empty.jpg": "empty", "folder.jpg": "not_a_file",
                "missing.jpg": "missing"}  # fmt: skip
    for name, reason in expected.items():
        prepared = prepare_image(tmp_path / name, detector=detector, name=f"in/{name}", keep_image=True)
        failure = _failure(prepared.faces)
        assert failure.reason == reason and failure.message.startswith(f"in/{name}: ") and prepared.image is None
        assert failure.crop is None and failure.landmarks is None and failure.score is None
        with pytest.raises(ImageError) as info:
            prepared.first()
        assert info.value is failure.error
    too_large = _failure(prepare_image(orl_dir / "s1" / "1.pgm", detector=detector, max_pixels=5000).faces)
    assert too_large.reason == "too_large" and "5,000" in too_large.message


def test_face_failures(orl_dir: Path, detector: FaceDetector) -> None:
    flat = np.full((120, 100, 3), 128, np.uint8)
    kept = prepare_image(flat, detector=detector, keep_image=True)
    assert _failure(kept.faces).reason == "no_face" and kept.image is not None  # the decoded image, for a fallback
    assert _failure(prepare_image(flat).faces).reason == "no_landmarks"
    bad = np.full((5, 2), np.nan, np.float32)
    assert _failure(prepare_image(orl_dir / "s1" / "1.pgm", bad).faces).reason == "bad_landmarks"
    assert {"no_face", "no_landmarks", "bad_landmarks"} == FACE_REASONS
    with pytest.raises(ImageError, match=r"no_face"):
        prepare_face(flat, detector=detector)
    with pytest.raises(ValueError, match="uint8"):  # a caller's mistake is not a bad image: it raises
        prepare_image(flat.astype(np.float32), detector=detector)


def test_the_detector_is_built_only_when_an_image_needs_it(orl_dir: Path, yunet_path: Path) -> None:
    built: list[FaceDetector] = []

    def factory() -> FaceDetector:
        built.append(FaceDetector(yunet_path, pad=20))
        return built[-1]

    image = read_image(orl_dir / "s3" / "1.pgm")
    landmarks = FaceDetector(yunet_path, pad=20).detect(image)
    assert landmarks is not None
    assert isinstance(prepare_image(image, landmarks.landmarks, factory).faces[0], AlignedFace) and not built
    assert isinstance(prepare_image(image, None, factory).faces[0], AlignedFace) and len(built) == 1


def test_synthetic_faces_listed_sidecar_and_dataset_agree(synth_data: Path, tmp_path: Path) -> None:
    """Listed landmarks, the same landmarks in a JSON sidecar and the training dataset give one crop."""
    samples = read_list(synth_data / "casia" / "landmarks.csv")[:6]
    assert all(s.landmarks is not None for s in samples)
    dataset = FaceDataset(samples, size=SIZE)
    for i, s in enumerate(samples):
        listed = prepare_image(s.path, s.landmarks, size=SIZE).first()
        copy = tmp_path / f"{i}{s.path.suffix}"
        copy.write_bytes(s.path.read_bytes())
        Path(f"{copy}.json").write_text(json.dumps({"landmarks": s.landmarks.tolist()}))  # type: ignore[union-attr]
        side = prepare_image(copy, sidecar=True, size=SIZE).first()
        item = dataset[i]
        assert isinstance(item, FaceItem)
        np.testing.assert_array_equal(side.crop, listed.crop)
        np.testing.assert_array_equal(item.image, listed.crop)
    lonely = tmp_path / f"lonely{samples[0].path.suffix}"
    lonely.write_bytes(samples[0].path.read_bytes())
    missing = _failure(prepare_image(lonely, sidecar=True, name="lonely").faces)
    assert missing.reason == "no_landmarks" and "sidecar" in missing.message
    Path(f"{lonely}.json").write_text("[1, 2, 3]")
    assert _failure(prepare_image(lonely, sidecar=True).faces).reason == "bad_landmarks"
    with pytest.raises(ValueError, match="sidecar"):
        prepare_image(lonely.read_bytes(), sidecar=True)
