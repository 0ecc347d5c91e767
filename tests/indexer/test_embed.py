"""Planning (pure) and the per-shard function, without Dask: ORL faces, synthetic faces with landmarks, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facesearch.indexer.embed import EmbedConfig, InputItem, build_detector, embed_partition, plan_inputs, plan_shards
from facesearch.model.faces.align import align_face
from facesearch.model.faces.images import read_image
from facesearch.model.inference import Embedder


def test_plan_shards() -> None:
    assert plan_shards(0, 5) == [range(0, 0)]
    assert plan_shards(10, 5) == [range(0, 5), range(5, 10)]
    assert plan_shards(11, 5) == [range(0, 5), range(5, 10), range(10, 11)]
    with pytest.raises(ValueError):
        plan_shards(3, 0)


def test_plan_inputs_all_formats(tmp_path: Path, synth_data: Path) -> None:
    tree = tmp_path / "tree"
    for rel in ("b/2.jpg", "b/10.jpg", "a/x.png", "top.pgm", ".hidden/h.jpg", "a/notes.txt"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"")
    cfg = EmbedConfig(input=tree, checkpoint=tmp_path / "c", out=tmp_path / "o")
    items = plan_inputs(cfg)
    assert [(it.id, it.rel, it.identity) for it in items] == [
        (0, "a/x.png", "a"), (1, "b/10.jpg", "b"), (2, "b/2.jpg", "b"), (3, "top.pgm", None)]  # fmt: skip
    assert plan_inputs(cfg) == items  # deterministic
    mega = synth_data / "megaface"
    devkit = EmbedConfig(input=mega / "templatelists/facescrub_features_list.json", root=mega / "facescrub",
                         format="devkit", landmarks=mega / "facescrub_landmarks.csv", checkpoint=tmp_path / "c",
                         out=tmp_path / "o")  # fmt: skip
    items = plan_inputs(devkit)
    listed = json.loads(devkit.input.read_text())
    assert [it.rel for it in items] == listed["path"] and [it.identity for it in items] == listed["id"]
    assert all(it.landmarks is not None and it.landmarks.shape == (5, 2) for it in items)  # matched by path
    casia = EmbedConfig(input=synth_data / "casia/landmarks.csv", format="list", checkpoint=tmp_path / "c",
                        out=tmp_path / "o")  # fmt: skip
    items = plan_inputs(casia)
    assert items[0].rel.count("/") == 1 and all(it.landmarks is not None for it in items)
    with pytest.raises(ValueError, match="format must be one of"):
        EmbedConfig(input=tree, checkpoint=tree, out=tree, format="zip")
    with pytest.raises(ValueError, match="unknown EmbedConfig key"):
        EmbedConfig.from_dict({"input": tree, "checkpoint": tree, "out": tree, "shards": 3})


def test_embed_partition_orl_and_bad_files(tmp_path: Path, ckpt: Path, orl_dir: Path, yunet_path: Path) -> None:
    root = tmp_path / "in"
    shutil.copytree(orl_dir / "s1", root / "s1")
    (root / "bad").mkdir()
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/text.jpg").write_text("<html>not found</html>")
    (root / "bad/trunc.pgm").write_bytes((orl_dir / "s2/1.pgm").read_bytes()[:500])
    (root / "bad/noface.png").write_bytes(cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))[1].tobytes())
    cfg = EmbedConfig(input=root, checkpoint=ckpt, out=tmp_path / "out", detector_pad=20, batch_size=3,
                      detector_model=yunet_path, device="cpu")  # fmt: skip
    items = plan_inputs(cfg)
    embedder = Embedder(ckpt, "cpu", batch_size=3)
    timings: dict[str, float] = {}
    table = embed_partition(items, embedder, build_detector(cfg), cfg, timings)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert table.num_rows == len(items) == 14 and table.column("id").to_pylist() == list(range(14))
    assert {p: rows[p]["status"] for p in rows if p.startswith("bad/")} == {
        "bad/empty.jpg": "empty", "bad/noface.png": "no_face", "bad/text.jpg": "not_an_image",
        "bad/trunc.pgm": "truncated"}  # fmt: skip
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 10 and all(r["det_score"] > 0.5 and r["identity"] == "s1" for r in ok)
    assert all(r["embedding"] is None and r["error"] for r in rows.values() if r["status"] != "ok")
    x = np.array([r["embedding"] for r in ok], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=2e-3)  # float16 storage
    assert set(timings) == {"read", "decode", "align", "wait", "infer"}
    # Batch boundaries are fixed per shard: another batch size for the prefetcher gives the same crops, and the
    # model alone on those crops gives the same embeddings (float16 rounding of identical float32 values).
    crops = np.stack([align_face(read_image(root / r["path"]), np.array(r["landmarks"]).reshape(5, 2), (56, 48))
                      for r in ok])  # fmt: skip
    ref, _ = Embedder(ckpt, "cpu", batch_size=len(crops)).embed_crops(crops)
    np.testing.assert_allclose(x, ref.astype(np.float16).astype(np.float32), atol=2e-3)


def test_embed_partition_landmarks_and_sidecars(tmp_path: Path, ckpt: Path, synth_data: Path) -> None:
    mega = synth_data / "megaface"
    src = EmbedConfig(input=mega / "templatelists/facescrub_features_list.json", root=mega / "facescrub",
                      format="devkit", landmarks=mega / "facescrub_landmarks.csv", checkpoint=ckpt,
                      out=tmp_path / "o", dtype="float32")  # fmt: skip
    items = plan_inputs(src)[:6]
    embedder = Embedder(ckpt, "cpu")
    table = embed_partition(items, embedder, None, src)
    assert table.column("status").to_pylist() == ["ok"] * 6 and table.column("det_score").null_count == 6
    # the same images through JSON sidecars give the same rows
    root = tmp_path / "side"
    for it in items:
        (root / it.rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(it.path, root / it.rel)
        (root / (it.rel + ".json")).write_text(json.dumps({"landmarks": it.landmarks.tolist()}))  # type: ignore[union-attr]
    (root / items[0].rel).with_name("lonely.png").write_bytes(items[0].path.read_bytes())
    side = EmbedConfig(input=root, checkpoint=ckpt, out=tmp_path / "o2", sidecars=True, dtype="float32")
    side_items = plan_inputs(side)
    table2 = embed_partition(side_items, embedder, None, side)
    by_path = {r["path"]: r for r in table2.to_pylist()}
    for r in table.to_pylist():
        assert by_path[r["path"]]["embedding"] == r["embedding"]
    lonely = [r for r in by_path.values() if r["path"].endswith("lonely.png")]
    assert [r["status"] for r in lonely] == ["no_landmarks"]
    assert embed_partition([], embedder, None, side).num_rows == 0
    assert isinstance(side_items[0], InputItem)


def test_embed_partition_rows_do_not_depend_on_decode_threads(tmp_path: Path, ckpt: Path, synth_data: Path) -> None:
    casia = synth_data / "casia"
    one = EmbedConfig(input=casia / "landmarks.csv", root=casia, format="list", checkpoint=ckpt, out=tmp_path / "o",
                      batch_size=16, dtype="float32", threads_per_worker=1)  # fmt: skip
    items = plan_inputs(one)[:50]
    embedder = Embedder(ckpt, "cpu", precision="fp32")
    timings: dict[str, float] = {}
    a = embed_partition(items, embedder, None, one)
    b = embed_partition(items, embedder, None, one.replace(threads_per_worker=4), timings)
    assert a.equals(b), "decode threads must not change a shard's rows"
    assert {"read", "decode", "align", "infer"} <= set(timings) and all(v >= 0 for v in timings.values())


def test_embed_refuses_a_decompression_bomb_from_its_header(tmp_path: Path, ckpt: Path, yunet_path: Path) -> None:
    """A 12,000 x 12,000 PNG of a few hundred kB is a failed 'too_large' row, not gigabytes of decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" * 12_001) for _ in range(12_000)) + z.flush()
    (tmp_path / "in").mkdir()
    ihdr = struct.pack(">IIBBBBB", 12_000, 12_000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    (tmp_path / "in/bomb.png").write_bytes(png)
    cfg = EmbedConfig(input=tmp_path / "in", checkpoint=ckpt, out=tmp_path / "out", detector_model=yunet_path,
                      device="cpu")  # fmt: skip
    table = embed_partition(plan_inputs(cfg), Embedder(ckpt, "cpu"), build_detector(cfg), cfg)
    (row,) = table.to_pylist()
    assert row["status"] == "too_large" and "refused before decoding" in row["error"] and row["embedding"] is None
