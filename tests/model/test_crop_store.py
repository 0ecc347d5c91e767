"""The crop store: its layout, crops equal to the dataset's, bit-identical batches and training losses with and
without it (bad files included), reuse, a killed build that resumes, refusals of changed inputs or geometry, the
``--crop-store`` option, and detected faces (YuNet from ``../shared``, skipped when absent)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import facesearch.cli.train  # noqa: F401  (registers `train` on the click group)
from facesearch.cli._app import main
from facesearch.model.faces import crop_store
from facesearch.model.faces.align import REFERENCE_112x96
from facesearch.model.faces.crop_store import CropStoreError, StoredFaceDataset, ensure_crop_store
from facesearch.model.faces.datasets import FaceItem, Failure
from facesearch.model.train import train
from facesearch.model.train_config import StageConfig, TrainConfig
from facesearch.model.trainer_data import StepBatchSampler, TrainingData, prepare_data, train_loader, with_crop_store

torch.set_num_threads(1)


def make_casia(root: Path, identities: int = 4, per_identity: int = 6, seed: int = 0) -> Path:
    """A CASIA-style folder of seeded 120x100 PNGs (smooth noise, so alignment interpolates real structure) whose
    ``landmarks.csv`` is the template jittered by 2 px (every crop is a true warp), and two bad files: ``id01/002``
    is not an image, ``id02/000`` is truncated."""
    rng = np.random.default_rng(seed)
    rows = ["path,identity," + ",".join(f"{a}{i}" for i in range(1, 6) for a in "xy")]
    for k in range(identities):
        (root / f"id{k:02d}").mkdir(parents=True, exist_ok=True)
        for j in range(per_identity):
            small = rng.integers(0, 256, (15, 12, 3), dtype=np.uint8)
            image = cv2.resize(small, (100, 120), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(root / f"id{k:02d}/{j:03d}.png"), image)
            lm = REFERENCE_112x96 + rng.normal(0, 2, (5, 2))
            rows.append(f"id{k:02d}/{j:03d}.png,id{k:02d}," + ",".join(f"{v:.3f}" for v in lm.reshape(-1)))
    (root / "landmarks.csv").write_text("\n".join(rows) + "\n")
    (root / "id01" / "002.png").write_bytes(b"<html>not an image</html>")
    (root / "id02" / "000.png").write_bytes((root / "id02" / "001.png").read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def casia(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_casia(tmp_path_factory.mktemp("data") / "casia")


def data_of(casia: Path, margin: bool = False) -> TrainingData:
    return prepare_data(casia, "casia", None, (56, 48), ("Male",), holdout_per_identity=1, margin=margin)


def small_config(data: Path, out: Path, **changes: object) -> TrainConfig:
    """A tiny Fast model (width 1/8, 56x48 input) for CPU tests, flips and dropout on."""
    base: dict[str, object] = dict(
        data=data, out=out, arch="fast", width=0.125, input_size=(56, 48), embedding_dim=32, attribute_hidden=16,
        batch_size=8, num_workers=0, precision="fp32", device="cpu", dropout=0.3, stages=(StageConfig(5, 0.05),),
        log_every=1, val_every=0, checkpoint_every=0, attributes=("Male",),
    )  # fmt: skip
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_the_store_holds_the_datasets_crops_and_failures(casia: Path, tmp_path: Path) -> None:
    data = data_of(casia)
    store, stats = ensure_crop_store(tmp_path / "store", [data.train, data.val], chunk_rows=5)
    assert (stats.rows, stats.built, stats.reused, stats.failed) == (24, 24, 0, 2)
    meta = json.loads((tmp_path / "store" / "store.json").read_text())
    assert meta["complete"] and meta["version"] == crop_store.VERSION and meta["rows"] == 24
    assert meta["geometry"]["size"] == meta["geometry"]["crop_size"] == [56, 48] and not meta["geometry"]["margin"]
    assert meta["failed"] == {"not_an_image": 1, "truncated": 1} and meta["provenance"]["facesearch"]
    assert not (tmp_path / "store" / "parts").exists(), "the part files go once the index has the statuses"
    raw = np.memmap(tmp_path / "store" / "crops.u8", np.uint8, "r", shape=(24, 56, 48, 3))  # the documented layout
    index = pq.read_table(tmp_path / "store" / "index.parquet").to_pylist()
    assert [r["path"] for r in index] == sorted(os.path.abspath(s.path) for s in data.train.samples + data.val.samples)
    for ds in (data.train, data.val):
        stored = StoredFaceDataset(ds, store)
        for i in range(len(ds)):
            a, b = ds[i], stored[i]
            row = index[int(stored.rows[i])]
            assert row["path"] == os.path.abspath(ds.samples[i].path) and row["source"] == "given"
            if isinstance(a, Failure):
                assert b == a and row["status"] == a.reason and row["message"] == a.message
                assert not raw[int(stored.rows[i])].any()
            else:
                assert isinstance(b, FaceItem) and b.image.dtype == np.uint8 and b.image.flags.writeable
                assert np.array_equal(a.image, b.image) and np.array_equal(raw[int(stored.rows[i])], a.image)
                assert (a.identity, a.index) == (b.identity, b.index) and row["status"] == "ok"
                np.testing.assert_array_equal(a.attributes, b.attributes)


def test_batches_are_bit_identical_with_and_without_the_store(casia: Path, tmp_path: Path) -> None:
    """The first 6 steps (flips on, a second epoch, the bad files in their batches) of the training DataLoader:
    images, labels, indices and failures equal exactly, with and without DataLoader workers."""
    data = data_of(casia)
    stored, _ = with_crop_store(data, tmp_path / "store")
    sampler = StepBatchSampler(len(data.train), 8, seed=3, start=0, stop=6, flip=True)
    plain = list(train_loader(data.train, sampler, 0, False))
    failures = 0
    for workers in (0, 2):
        for a, b in zip(plain, train_loader(stored.train, sampler, workers, False), strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.identities, b.identities)
            assert torch.equal(a.indices, b.indices) and a.failures == b.failures
            torch.testing.assert_close(a.attributes, b.attributes, rtol=0, atol=0, equal_nan=True)
            failures += len(a.failures)
    assert failures > 0 and any(bool(s[1]) for s in sampler.batch(0)), "the bad files and flips are exercised"


def test_training_is_the_same_with_the_store_and_reuses_it(casia: Path, tmp_path: Path) -> None:
    """Training losses (dropout, flips, skipped files) are equal exactly with the store, which a second run reuses;
    ``skipped.jsonl`` lists the same files.  The exact equality is the point: the same bytes enter the same
    float operations in the same order on one thread."""
    plain = small_config(casia, tmp_path / "plain")
    cached = small_config(casia, tmp_path / "cached", crop_store=tmp_path / "store")
    a, b = train(plain), train(cached)
    assert train_losses(plain.out) == train_losses(cached.out) and len(train_losses(plain.out)) == 5
    assert a.skipped_summary == b.skipped_summary and "2 of 24 files" in a.skipped_summary
    assert (plain.out / "skipped.jsonl").read_text() == (cached.out / "skipped.jsonl").read_text()
    assert a.final["val_top1"] == b.final["val_top1"]
    event = next(r for r in map(json.loads, (cached.out / "metrics.jsonl").read_text().splitlines())
                 if r["event"] == "crop_store")  # fmt: skip
    assert (event["crop_store_rows"], event["crop_store_built"], event["crop_store_failed"]) == (24, 24, 2)
    again = cached.replace(out=tmp_path / "again")
    train(again)
    assert train_losses(again.out) == train_losses(plain.out)
    event = next(r for r in map(json.loads, (again.out / "metrics.jsonl").read_text().splitlines())
                 if r["event"] == "crop_store")  # fmt: skip
    assert (event["crop_store_built"], event["crop_store_reused"]) == (0, 24)
    assert TrainConfig.from_dict(json.loads((again.out / "train_config.json").read_text())) == again


def test_a_killed_build_resumes_where_it_stopped(casia: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_of(casia)
    datasets = [data.train, data.val]
    real = crop_store._ChunkWriter.__getitem__
    made: list[int] = []

    def dying(self: crop_store._ChunkWriter, c: int) -> list[tuple[str, str]]:
        if c == 2:
            raise KeyboardInterrupt  # killed while making chunk 2
        made.append(c)
        return real(self, c)

    monkeypatch.setattr(crop_store._ChunkWriter, "__getitem__", dying)
    with pytest.raises(KeyboardInterrupt):
        ensure_crop_store(tmp_path / "store", datasets, chunk_rows=5)
    assert made == [0, 1] and not json.loads((tmp_path / "store" / "store.json").read_text())["complete"]
    assert sorted(p.name for p in (tmp_path / "store" / "parts").iterdir()) == ["chunk-00000.json", "chunk-00001.json"]
    made.clear()
    monkeypatch.setattr(crop_store._ChunkWriter, "__getitem__", lambda self, c: made.append(c) or real(self, c))
    store, stats = ensure_crop_store(tmp_path / "store", datasets, chunk_rows=99)  # a resume keeps its chunk size
    assert made == [2, 3, 4] and (stats.built, stats.reused) == (14, 10)
    fresh, _ = ensure_crop_store(tmp_path / "fresh", datasets, workers=2, chunk_rows=7)
    assert np.array_equal(store.crops(), fresh.crops()) and store.failures == fresh.failures
    assert store.digest == fresh.digest


def test_changed_inputs_and_geometry_are_refused(casia: Path, tmp_path: Path) -> None:
    data = make_casia(tmp_path / "casia", identities=3, per_identity=4)
    with_crop_store(data_of(data), tmp_path / "store")
    with pytest.raises(CropStoreError, match=r"holds 56x48 template crops .*; this run needs 64x56 margin crops"):
        with_crop_store(data_of(data, margin=True), tmp_path / "store")
    st = os.stat(data / "id00" / "001.png")
    os.utime(data / "id00" / "001.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    shutil.copy(data / "id00" / "002.png", data / "id00" / "009.png")
    with pytest.raises(CropStoreError) as err:
        with_crop_store(data_of(data), tmp_path / "store")
    message = str(err.value)
    assert "was made from other inputs: 1 file(s) added (e.g. " in message and "id00/009.png" in message
    assert "1 file(s) changed size or mtime (e.g. " in message and "id00/001.png" in message
    assert "delete it to rebuild" in message
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CropStoreError, match=r"is not a crop store \(no store.json\) and not empty"):
        ensure_crop_store(tmp_path / "other", [data_of(data).train])


def test_margin_crops_and_views_train_the_same(casia: Path, tmp_path: Path) -> None:
    plain = small_config(casia, tmp_path / "plain", crop="views", stages=(StageConfig(3, 0.05),))
    cached = plain.replace(out=tmp_path / "cached", crop_store=tmp_path / "store")
    train(plain)
    train(cached)
    assert train_losses(plain.out) == train_losses(cached.out)
    meta = json.loads((tmp_path / "store" / "store.json").read_text())
    assert meta["geometry"]["margin"] and meta["geometry"]["crop_size"] == [64, 56]


def test_cli_crop_store(casia: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(casia), "--arch", "fast", "--width", "0.125", "--input-size", "56x48",
            "--embedding-dim", "32", "--stage1-iterations", "2", "--stage2-iterations", "0", "--batch-size", "8",
            "--workers", "0", "--precision", "fp32", "--device", "cpu", "--no-attributes"]  # fmt: skip
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run"), "--crop-store", str(tmp_path / "store")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "store" / "store.json").read_text())["complete"]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["crop_store"] == str(tmp_path / "store")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x").write_text("x")
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run2"), "--crop-store", str(bad)])
    assert r.exit_code != 0 and "is not a crop store" in r.output and "Traceback" not in r.output, r.output


@pytest.fixture
def yunet(monkeypatch: pytest.MonkeyPatch, yunet_path: Path) -> Path:
    monkeypatch.setenv("FACESEARCH_YUNET", str(yunet_path))
    return yunet_path


@pytest.mark.slow  # generates the synthetic set, detects 24 faces with YuNet, trains twice (~4 s on 2 cores)
def test_detected_faces_train_the_same(synth_data: Path, tmp_path: Path, yunet: Path) -> None:
    """Synthetic faces without landmarks: the store holds the crops of the detection cache's landmarks (and the
    images where detection failed), and training gives the same losses."""
    for folder in sorted(p for p in (synth_data / "casia").iterdir() if p.is_dir())[:3]:
        shutil.copytree(folder, tmp_path / "casia" / folder.name)
    plain = small_config(tmp_path / "casia", tmp_path / "plain", stop_at=3)
    cached = plain.replace(out=tmp_path / "cached", crop_store=tmp_path / "store")
    train(plain)
    train(cached)
    assert train_losses(plain.out) == train_losses(cached.out)
    rows = pq.read_table(tmp_path / "store" / "index.parquet").to_pylist()
    assert len(rows) == 24 and {r["source"] for r in rows} <= {"detected", "failed"}
    assert sum(r["source"] == "detected" and r["status"] == "ok" for r in rows) >= 20
    assert all(len(r["landmarks"]) == 10 for r in rows if r["source"] == "detected")
    data = data_of(tmp_path / "casia")
    with pytest.raises(CropStoreError, match="with other landmarks or detections"):  # no detections attached
        with_crop_store(data, tmp_path / "store")
