"""The detection cache: training detects each image once (not once per epoch), keeps the results beside the run, reuses
them on resume and later epochs, re-detects a changed file, and ``facesearch attributes`` shares the mechanism.

Synthetic faces without their landmark file, detected with the real YuNet model from ``../shared`` (skipped when
absent).  Detections are counted by wrapping ``FaceDetector.detect`` (no DataLoader workers, so every call is in this
process)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facesearch.model.faces.align import FaceDetector
from facesearch.model.faces.images import read_image
from facesearch.model.train import train
from facesearch.model.train_config import StageConfig, TrainConfig

torch.set_num_threads(1)


class Counter:
    def __init__(self) -> None:
        self.calls = 0


@pytest.fixture
def detections(monkeypatch: pytest.MonkeyPatch, yunet_path: Path) -> Counter:
    """Counts ``FaceDetector.detect`` calls; YuNet from the shared folder is the default model."""
    monkeypatch.setenv("FACESEARCH_YUNET", str(yunet_path))
    counter, real = Counter(), FaceDetector.detect

    def counting(self: FaceDetector, image: np.ndarray):  # type: ignore[no-untyped-def]
        counter.calls += 1
        return real(self, image)

    monkeypatch.setattr(FaceDetector, "detect", counting)
    return counter


def casia_without_landmarks(synth_data: Path, dst: Path, identities: int = 6) -> Path:
    """The first ``identities`` synthetic CASIA folders (8 images each), without ``landmarks.csv``: detect them all."""
    for folder in sorted(p for p in (synth_data / "casia").iterdir() if p.is_dir())[:identities]:
        shutil.copytree(folder, dst / folder.name)
    return dst


def config(data: Path, out: Path, **changes: object) -> TrainConfig:
    """48 images, 1 held out per identity: 42 training images = 3 steps of 14 per epoch, so every epoch visits all."""
    base: dict[str, object] = dict(
        data=data, out=out, arch="fast", width=0.125, input_size=(56, 48), embedding_dim=32, attribute_hidden=16,
        batch_size=14, num_workers=0, precision="fp32", device="cpu", stages=(StageConfig(12, 0.05),), log_every=3,
        val_every=0, checkpoint_every=0,
    )  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def cache_rows(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["detector"]["model"] == "face_detection_yunet_s_640_640.onnx", "header first"
    return [json.loads(line) for line in lines[1:]]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_each_image_is_detected_once_across_epochs_and_resumes(synth_data: Path, tmp_path: Path,
                                                               detections: Counter) -> None:  # fmt: skip
    data = casia_without_landmarks(synth_data, tmp_path / "casia")
    cfg = config(data, tmp_path / "run")
    first = train(cfg.replace(stop_at=6))  # two epochs and a validation
    assert first.step == 6
    assert detections.calls == 48, "42 training + 6 held-out images, each detected once, not once per epoch"
    cache = cfg.out / "detections.jsonl"
    rows = cache_rows(cache)
    found_faces = [r for r in rows if r["landmarks"] is not None]
    assert len(rows) == 48 and len(found_faces) >= 46, "YuNet finds (nearly) every synthetic face"
    assert all(r["reason"] == "no_face" for r in rows if r["landmarks"] is None)
    # What the cache holds is exactly what the detector finds (float32 round trip through JSON is exact).
    row = found_faces[0]
    found = FaceDetector().detect(read_image(row["path"]))
    assert found is not None
    np.testing.assert_array_equal(np.array(row["landmarks"], np.float32).reshape(5, 2), found.landmarks)
    detections.calls = 0

    second = train(cfg.replace(resume=True, stop_at=9))
    assert second.step == 9 and detections.calls == 0, "a resumed run reuses the cache"
    assert len(cache_rows(cache)) == 48, "the cache survives the resume"

    # A changed image (new size and mtime) is detected again; the others are not.
    changed = data / "0000002" / "003.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    third = train(cfg.replace(resume=True))
    assert third.complete and detections.calls == 1
    detect_records = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    detect_records = [r for r in detect_records if r["event"] == "detect"]
    assert [r["detect_new"] for r in detect_records] == [48, 0, 1]

    # The same cache shared by another run gives the same data, hence the same losses, with no detection at all.
    detections.calls = 0
    other = train(cfg.replace(out=tmp_path / "other", detections=cache, stop_at=6))
    assert other.step == 6 and detections.calls == 0
    assert losses(tmp_path / "other") == losses(cfg.out)[:2]


def test_a_face_not_found_is_cached_as_such(synth_data: Path, tmp_path: Path, detections: Counter) -> None:
    data = casia_without_landmarks(synth_data, tmp_path / "casia")
    blank = data / "0000001" / "001.jpg"
    img = np.full((96, 96, 3), 128, np.uint8)
    assert cv2.imwrite(str(blank), img)
    cfg = config(data, tmp_path / "run", stop_at=3)
    result = train(cfg)
    assert "no_face" in result.skipped_summary
    (row,) = [r for r in cache_rows(cfg.out / "detections.jsonl") if r["path"] == os.path.abspath(blank)]
    assert row["reason"] == "no_face" and row["landmarks"] is None
    detections.calls = 0
    train(cfg.replace(resume=True, stop_at=6))
    assert detections.calls == 0, "a face that is not there is not looked for again"


def test_a_corrupt_cache_is_rebuilt_not_fatal(synth_data: Path, tmp_path: Path, detections: Counter) -> None:
    data = casia_without_landmarks(synth_data, tmp_path / "casia", identities=3)
    cache = tmp_path / "shared-cache.jsonl"
    cache.write_text('{"version": 1, "detector": {"model": "other.onnx"}}\n{"path": "x"}\n')  # another detector
    cfg = config(data, tmp_path / "run", batch_size=7, stages=(StageConfig(3, 0.05),), detections=cache)
    train(cfg)
    assert detections.calls == 24 and len(cache_rows(cache)) == 24
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:10]) + "\n" + lines[10][:20])  # a line cut short
    detections.calls = 0
    train(cfg.replace(out=tmp_path / "run2"))
    assert detections.calls == 15, "the 9 intact rows are reused, the cut row and the rest are detected again"


def test_attribute_labelling_detects_once_with_a_cache(synth_data: Path, tmp_path: Path, ckpt: Path,
                                                       detections: Counter) -> None:  # fmt: skip
    from facesearch.model.attributes import LabelConfig, label_identities

    data = casia_without_landmarks(synth_data, tmp_path / "casia", identities=4)
    cfg = LabelConfig(classifier=ckpt, data=data, out=tmp_path / "labels.csv", device="cpu", batch_size=16)
    result = label_identities(cfg)
    assert result.skipped <= 1 and result.identities == 4, "YuNet finds (nearly) every synthetic face"
    assert detections.calls == 32 and (tmp_path / "labels.detections.jsonl").is_file()
    labels = result.labels.read_text()
    detections.calls = 0
    again = label_identities(cfg)
    assert detections.calls == 0 and again.identities == 4 and again.labels.read_text() == labels


def test_attribute_classifier_training_uses_the_run_cache(synth_data: Path, tmp_path: Path,
                                                          detections: Counter) -> None:  # fmt: skip
    from facesearch.model.attributes import AttributeTrainConfig, train_attribute_classifier

    from .test_datasets_celeba import celeba_copy

    root = celeba_copy(synth_data, tmp_path / "celeba", n=40,
                       lists=("list_attr_celeba.txt", "identity_CelebA.txt"))  # fmt: skip
    cfg = AttributeTrainConfig(data=root, out=tmp_path / "attr", width=0.125, input_size=(56, 48), iterations=4,
                               batch_size=16, device="cpu", num_workers=0)  # fmt: skip
    assert train_attribute_classifier(cfg).complete
    n = detections.calls
    assert 0 < n <= 40 and len(cache_rows(tmp_path / "attr" / "detections.jsonl")) == n
    detections.calls = 0
    cache = tmp_path / "attr" / "detections.jsonl"
    again = train_attribute_classifier(dataclasses.replace(cfg, out=tmp_path / "attr2", detections=cache))
    assert again.complete and detections.calls == 0, "a second classifier on the same images reuses the cache"


def test_cli_labels_a_flat_folder_named_by_an_identity_file(synth_data: Path, tmp_path: Path, ckpt: Path,
                                                            detections: Counter) -> None:  # fmt: skip
    from click.testing import CliRunner

    import facesearch.cli.attributes  # noqa: F401  (registers `attributes`)
    from facesearch.cli._app import main

    from .test_datasets_celeba import celeba_copy

    root = celeba_copy(synth_data, tmp_path / "celeba", n=30, lists=("identity_CelebA.txt",))
    args = ["attributes", "label", "--classifier", str(ckpt), "--data", str(root / "img_align_celeba"), "--identities",
            str(root / "identity_CelebA.txt"), "--out", str(tmp_path / "labels.csv"), "--device", "cpu"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "from 30 images" in r.output and detections.calls == 30
    assert (tmp_path / "labels.detections.jsonl").is_file()
    for f in sorted((root / "img_align_celeba").iterdir())[3:]:
        f.unlink()
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "only 3 of 30 listed images are readable" in r.output, r.output
    assert "Traceback" not in r.output
