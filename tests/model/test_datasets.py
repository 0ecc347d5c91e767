"""Dataset readers on small files in each layout, FaceDataset failures, collation, SkipReport and the hold-out split."""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facesearch.model.faces.align import FaceDetector, REFERENCE_112x96
from facesearch.model.faces.datasets import (
    FaceDataset,
    FaceItem,
    Failure,
    Sample,
    SkipReport,
    collate_faces,
    read_attribute_labels,
    read_casia,
    read_celeba,
    read_list,
    split_holdout,
    write_attribute_labels,
)

# Landmarks of a face filling a 128x128 image: the 112x96 template scaled by 1.1 and shifted by (10, 4).
LM = REFERENCE_112x96 * 1.1 + np.array([10, 4], dtype=np.float32)


def _write_jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


def _lm_cells(lm: np.ndarray = LM) -> str:
    return ",".join(f"{v:.2f}" for v in lm.reshape(-1))


def test_read_casia(tmp_path: Path) -> None:
    for ident, n in [("0000045", 2), ("0000099", 1)]:
        for k in range(n):
            _write_jpeg(tmp_path / ident / f"{k + 1:03d}.jpg", seed=k)
    (tmp_path / "0000099" / "notes.txt").write_text("not an image")
    (tmp_path / "landmarks.csv").write_text(
        f"path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,Male\n0000045/002.jpg,{_lm_cells()},1\n"
    )
    samples = read_casia(tmp_path)
    assert [(s.path.relative_to(tmp_path).as_posix(), s.identity) for s in samples] == [
        ("0000045/001.jpg", "0000045"),
        ("0000045/002.jpg", "0000045"),
        ("0000099/001.jpg", "0000099"),
    ]
    assert samples[0].landmarks is None
    assert samples[1].landmarks is not None
    np.testing.assert_allclose(samples[1].landmarks, LM, atol=0.006)
    assert samples[1].attributes == {"Male": 1.0}
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_casia(tmp_path / "nothere")
    (tmp_path / "blank").mkdir()
    with pytest.raises(ValueError, match=r"blank has no <identity>/<image> files"):
        read_casia(tmp_path / "blank")


def test_read_list_with_and_without_landmarks(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("path,identity\nimg/1.jpg,alice\nimg/2.jpg,\n")
    samples = read_list(tmp_path / "a.csv")
    assert [s.path for s in samples] == [tmp_path / "img/1.jpg", tmp_path / "img/2.jpg"]
    assert [s.identity for s in samples] == ["alice", None]
    assert samples[0].landmarks is None and samples[0].attributes is None
    (tmp_path / "b.csv").write_text(
        "path,identity,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5,Male,Chubby\n"
        f"1.jpg,bob,{_lm_cells()},1,0.25\n"
        "2.jpg,bob,,,,,,,,,,,0,\n"
    )
    samples = read_list(tmp_path / "b.csv", root=Path("/data"))
    assert samples[0].path == Path("/data/1.jpg")
    assert samples[0].landmarks is not None and samples[0].landmarks.dtype == np.float32
    np.testing.assert_allclose(samples[0].landmarks, LM, atol=0.006)
    assert samples[0].attributes == {"Male": 1.0, "Chubby": 0.25}
    assert samples[1].landmarks is None and samples[1].attributes == {"Male": 0.0}  # empty = unknown


@pytest.mark.parametrize(
    "text,match",
    [
        ("file,identity\na.jpg,x\n", r"b\.csv:1: .*'path'"),
        ("path,x1,y1\na.jpg,1,2\n", r"b\.csv:1: landmark columns"),
        ("path,identity\na.jpg,x\n,y\n", r"b\.csv:3: empty path"),
        (f"path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\na.jpg,{_lm_cells()}\nb.jpg,1,2,3,,,,,,,\n", r"b\.csv:3: .*ten"),
        ("path,identity,Male\na.jpg,x,1\nb.jpg,x,yes\n", r"b\.csv:3: attribute Male must be a number"),
        ("path,identity,Male\na.jpg,x,-1\n", r"b\.csv:2: attribute Male must be in \[0, 1\]"),
        ("path,identity\na.jpg,x,extra\n", r"b\.csv:2: more cells"),
    ],
)
def test_read_list_errors_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "b.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_list(tmp_path / "b.csv")


def _write_celeba(root: Path, attr_rows: list[str] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    names = "5_o_Clock_Shadow Big_Nose Male "  # the real header ends with a space
    rows = attr_rows or ["000001.jpg -1  1  1", "000002.jpg  1 -1 -1", "000003.jpg -1 -1  1"]
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{names}\n" + "\n".join(rows) + "\n")
    lm_header = (
        "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    )
    lm_rows = [f"00000{i}.jpg 69  109  106  113   77  142   73  152  108  154" for i in (1, 2, 3)]
    (root / "list_landmarks_align_celeba.txt").write_text(f"3\n{lm_header}\n" + "\n".join(lm_rows) + "\n")
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 2\n")
    (root / "identity_CelebA.txt").write_text("000001.jpg 2880\n000002.jpg 2937\n000003.jpg 2880\n")


def test_read_celeba(tmp_path: Path) -> None:
    _write_celeba(tmp_path)
    samples = read_celeba(tmp_path)
    assert [s.path for s in samples] == [tmp_path / "img_align_celeba" / f"00000{i}.jpg" for i in (1, 2, 3)]
    assert [s.identity for s in samples] == ["2880", "2937", "2880"]
    assert samples[0].attributes == {"5_o_Clock_Shadow": 0.0, "Big_Nose": 1.0, "Male": 1.0}
    assert samples[0].landmarks is not None
    np.testing.assert_array_equal(samples[0].landmarks, [[69, 109], [106, 113], [77, 142], [73, 152], [108, 154]])
    assert [s.path.name for s in read_celeba(tmp_path, partition=2)] == ["000003.jpg"]
    with pytest.raises(ValueError, match="partition"):
        read_celeba(tmp_path, partition=3)
    (tmp_path / "identity_CelebA.txt").unlink()
    (tmp_path / "list_landmarks_align_celeba.txt").unlink()
    assert all(s.identity is None and s.landmarks is None for s in read_celeba(tmp_path))


@pytest.mark.parametrize(
    "rows,match",
    [
        (["000001.jpg -1 1 1", "000002.jpg 1 -1"], r"list_attr_celeba\.txt:4: expected a file name and 3 values"),
        (["000001.jpg -1 1 1", "000002.jpg 1 0 1"], r"list_attr_celeba\.txt:4: attribute values must be 1 or -1"),
        (["000001.jpg -1 1 1", "000001.jpg 1 1 1"], r"list_attr_celeba\.txt:4: duplicate"),
    ],
)
def test_read_celeba_errors(tmp_path: Path, rows: list[str], match: str) -> None:
    _write_celeba(tmp_path, rows)
    with pytest.raises(ValueError, match=match):
        read_celeba(tmp_path)


def test_read_celeba_count_mismatch(tmp_path: Path) -> None:
    _write_celeba(tmp_path)
    text = (tmp_path / "list_landmarks_align_celeba.txt").read_text()
    (tmp_path / "list_landmarks_align_celeba.txt").write_text("4" + text[1:])
    with pytest.raises(ValueError, match=r"list_landmarks_align_celeba\.txt:1: declares 4 rows but has 3"):
        read_celeba(tmp_path)


def test_attribute_labels_round_trip(tmp_path: Path) -> None:
    labels = {"bob": {"Male": 1.0, "Chubby": 0.3}, "alice": {"Male": 0.0}}
    write_attribute_labels(tmp_path / "labels.csv", labels, ["Male", "Chubby"])
    assert (tmp_path / "labels.csv").read_text().splitlines() == ["identity,Male,Chubby", "alice,0.0,", "bob,1.0,0.3"]
    assert read_attribute_labels(tmp_path / "labels.csv") == labels
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.csv").write_text("identity,Male\nbob,1\nbob,0\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: duplicate identity"):
        read_attribute_labels(tmp_path / "bad.csv")


def _mixed_dataset(tmp_path: Path, **kwargs: object) -> FaceDataset:
    _write_jpeg(tmp_path / "good.jpg")
    (tmp_path / "text.jpg").write_text("hello\n")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    samples = [
        Sample(tmp_path / "good.jpg", "a", LM, {"Male": 1.0}),
        Sample(tmp_path / "text.jpg", "b", LM),
        Sample(tmp_path / "cut.jpg", "a", LM),
        Sample(tmp_path / "missing.jpg", "c", LM),
        Sample(tmp_path / "good.jpg", "zz", None),  # no landmarks and no detector factory
        Sample(tmp_path / "good.jpg", None, LM, {"Big_Nose": 0.0}),
    ]
    return FaceDataset(samples, identity_index={"a": 0, "b": 1}, attributes=["Male", "Big_Nose"], **kwargs)  # type: ignore[arg-type]


def test_face_dataset_failures_and_collate(tmp_path: Path) -> None:
    ds = _mixed_dataset(tmp_path)
    items = [ds[i] for i in range(len(ds))]
    reasons = [it.reason if isinstance(it, Failure) else None for it in items]
    assert reasons == [None, "not_an_image", "truncated", "missing", "no_landmarks", None]
    first = items[0]
    assert isinstance(first, FaceItem) and first.image.shape == (112, 96, 3) and first.image.dtype == np.uint8
    assert first.identity == 0 and first.index == 0
    np.testing.assert_array_equal(first.attributes, np.array([1.0, np.nan], np.float32))
    batch = collate_faces(items)
    assert batch.images.shape == (2, 112, 96, 3) and batch.images.dtype == torch.uint8
    assert batch.identities.tolist() == [0, -1] and batch.indices.tolist() == [0, 5]
    assert batch.attributes.dtype == torch.float32 and batch.attributes[1, 1] == 0.0
    assert [f.index for f in batch.failures] == [1, 2, 3, 4]
    empty = collate_faces(batch.failures)
    assert empty.images.shape[0] == 0 and len(empty.failures) == 4


def test_face_dataset_cache_and_dataloader(tmp_path: Path) -> None:
    ds = _mixed_dataset(tmp_path, cache=True, cache_size=3)
    a = ds[0]
    assert isinstance(a, FaceItem) and isinstance(ds[0], FaceItem)
    assert ds[0].image is a.image, "second read comes from the cache"  # type: ignore[union-attr]
    for i in range(len(ds)):
        ds[i]
    assert len(ds._cache) == 3
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_faces, num_workers=0)
    batches = list(loader)
    assert sum(len(b.indices) for b in batches) == 2 and sum(len(b.failures) for b in batches) == 4


def test_skip_report(tmp_path: Path) -> None:
    report = SkipReport(total=10)
    assert report.summary() == "skipped 0 of 10 files"
    report.add([Failure(1, "a.jpg", "truncated", "m"), Failure(2, "b.jpg", "not_an_image", "m")])
    report.add([Failure(1, "a.jpg", "truncated", "m"), Failure(3, "c.jpg", "truncated", "m")])  # a.jpg again
    assert report.summary() == "skipped 3 of 10 files: 2 truncated, 1 not_an_image"
    report.write_jsonl(tmp_path / "skipped.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["a.jpg", "b.jpg", "c.jpg"] and rows[0]["reason"] == "truncated"


def test_split_holdout() -> None:
    samples = [Sample(Path(f"{ident}/{k}.jpg"), ident) for ident, n in [("a", 3), ("b", 1), ("c", 4)] for k in range(n)]
    samples.append(Sample(Path("unknown.jpg")))
    train, val = split_holdout(samples, seed=0)
    assert sorted(s.identity or "" for s in val) == ["a", "c"], "single-image identity b stays in train"
    assert len(train) + len(val) == len(samples) and {s.identity for s in train} == {"a", "b", "c", None}
    assert split_holdout(samples, seed=0) == (train, val), "deterministic"
    # The choice for one identity does not depend on the others.
    _, val_a = split_holdout([s for s in samples if s.identity == "a"], seed=0)
    assert val_a == [s for s in val if s.identity == "a"]
    picks = {tuple(s.path.name for s in split_holdout(samples, seed=seed)[1]) for seed in range(8)}
    assert len(picks) > 1, "the seed changes the choice"
    _, val2 = split_holdout(samples, per_identity=2)
    assert sorted(s.identity or "" for s in val2) == ["a", "a", "c", "c"]


def test_face_dataset_detects_in_workers(orl_dir: Path, yunet_path: Path) -> None:
    samples = [Sample(orl_dir / f"s{i}" / "1.pgm", f"s{i}") for i in (1, 2, 3)]
    factory = functools.partial(FaceDetector, yunet_path, pad=20)
    ds = FaceDataset(samples, detector_factory=factory)
    assert isinstance(ds[0], FaceItem) and ds._detector is not None
    assert pickle.loads(pickle.dumps(ds))._detector is None, "live detectors are not shipped to workers"
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_faces, num_workers=1)
    (batch,) = list(loader)
    assert batch.images.shape == (3, 112, 96, 3) and not batch.failures
    assert batch.identities.tolist() == [0, 1, 2]
