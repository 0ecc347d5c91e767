"""Detection options in the embedder: which face of a multi-face photo becomes the row, one row per face with
``keep_face="all"`` (unique, deterministic ids), the options in the manifest's provenance and on resume, the optional
``face`` / ``pose_score`` columns (and an output from before them resuming without them), and the CLI flags.  Real
ORL faces, a composite photo of three of them, and an in-process Dask cluster as ``--scheduler``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facesearch.indexer.embed import (
    DETECTION_FIELDS,
    FACE_STRIDE,
    EmbedConfig,
    build_detector,
    embed_partition,
    plan_inputs,
    row_id,
    shard_id_range,
)
from facesearch.indexer.pipeline import run_embed
from facesearch.indexer.shards import (
    LEGACY_MANIFEST,
    MANIFEST,
    read_all,
    read_manifest,
    schema,
    shard_name,
    take_rows,
    write_manifest,
    write_shard,
)
from facesearch.model.faces.align import DetectOptions, pose_score
from facesearch.model.faces.images import read_image
from facesearch.model.inference import Embedder

cv2.setNumThreads(1)


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """An in-process cluster (one worker thread) used as an external ``--scheduler``."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c:
        yield c.scheduler_address


def _face(img: np.ndarray, scale: float, angle: float = 0.0) -> np.ndarray:
    out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    if angle:
        h, w = out.shape[:2]
        out = cv2.warpAffine(out, cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0), (w, h))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, orl_dir: Path, yunet_path: Path) -> Path:
    """``a/group.png``: a 640x480 photo of three ORL faces (largest: tilted 55 degrees at the left, YuNet score
    ~0.79; best scored ~0.93 at the top right; a small one at the centre); ``b/1.pgm``: one ORL face; ``c/none.png``:
    no face.  Image ids 0, 1, 2."""
    root = tmp_path_factory.mktemp("photos") / "in"
    orl = {k: read_image(orl_dir / k) for k in ("s6/1.pgm", "s21/1.pgm", "s37/1.pgm")}
    canvas = np.zeros((480, 640, 3), np.uint8)
    big = _face(orl["s6/1.pgm"], 3.0, 55)
    canvas[40 : 40 + big.shape[0], 20 : 20 + big.shape[1]] = big
    top = _face(orl["s21/1.pgm"], 1.2)
    canvas[30 : 30 + top.shape[0], 500 : 500 + top.shape[1]] = top
    canvas[240 - 56 : 240 + 56, 320 - 46 : 320 + 46] = orl["s37/1.pgm"]
    for rel in ("a", "b", "c"):
        (root / rel).mkdir(parents=True)
    cv2.imwrite(str(root / "a/group.png"), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    shutil.copy(orl_dir / "s2/1.pgm", root / "b/1.pgm")
    cv2.imwrite(str(root / "c/none.png"), np.full((64, 64, 3), 128, np.uint8))
    return root


def _cfg(root: Path, ckpt: Path, out: Path, yunet: Path, **kw: object) -> EmbedConfig:
    return EmbedConfig(input=root, checkpoint=ckpt, out=out, detector_pad=20, detector_model=yunet, batch_size=2,
                       device="cpu", precision="fp32", dtype="float32", **kw)  # type: ignore[arg-type]  # fmt: skip


def test_config_fields(tmp_path: Path) -> None:
    cfg = EmbedConfig(input=tmp_path, checkpoint=tmp_path, out=tmp_path)
    assert (cfg.det_threshold, cfg.det_size, cfg.keep_face) == (0.6, 640, "largest")
    assert cfg.replace(keep_face="all", detector_pad=20, det_size=1280).detect_options == DetectOptions(
        score_threshold=0.6, max_side=1280, keep="all", pad=20
    )
    assert set(DETECTION_FIELDS) <= set(cfg.content_dict()), "detection options change rows: compared on resume"
    with pytest.raises(ValueError, match=r"keep_face must be one of \['largest', 'center', 'score', 'all'\]"):
        cfg.replace(keep_face="biggest")
    with pytest.raises(ValueError, match="det_threshold must be in"):
        cfg.replace(det_threshold=0.0)
    with pytest.raises(ValueError, match="det_size must be >= 32"):
        cfg.replace(det_size=8)
    assert row_id(7, 0, "largest") == 7 and row_id(7, 3, "all") == 7 * FACE_STRIDE + 3 == 7003
    assert shard_id_range(range(5, 10), "all") == (5000, 10000) and shard_id_range(range(5, 10), "score") == (5, 10)
    with pytest.raises(ValueError, match="face index"):
        row_id(1, FACE_STRIDE, "all")


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def _check_optional_columns(table: pa.Table, keep: str) -> None:
    """``pose_score`` is what :func:`pose_score` computes from the row's stored landmarks (null for a failed row);
    ``face`` (``keep="all"`` only) is the face index of the row's id."""
    assert table.column_names[-2:] == (["face", "pose_score"] if keep == "all" else ["error", "pose_score"])
    rows = _rows(table)
    for r in rows:
        want = None if r["landmarks"] is None else float(pose_score(np.array(r["landmarks"], np.float32)))
        assert r["pose_score"] == want and (want is None) == (r["status"] != "ok"), r
    if keep == "all":
        assert [r["face"] for r in rows] == [r["id"] % FACE_STRIDE for r in rows]


def test_embed_partition_keep_modes(photos: Path, ckpt: Path, yunet_path: Path, tmp_path: Path) -> None:
    embedder = Embedder(ckpt, "cpu", precision="fp32")
    tables = {}
    for keep in ("largest", "score", "center", "all"):
        cfg = _cfg(photos, ckpt, tmp_path / keep, yunet_path, keep_face=keep)
        tables[keep] = embed_partition(plan_inputs(cfg), embedder, build_detector(cfg), cfg)
    for keep in ("largest", "score", "center"):
        rows = _rows(tables[keep])
        assert [r["id"] for r in rows] == [0, 1, 2] and [r["status"] for r in rows] == ["ok", "ok", "no_face"]
    group = {k: np.array(_rows(tables[k])[0]["landmarks"]).reshape(5, 2) for k in ("largest", "score", "center")}
    assert group["largest"][:, 0].mean() < 250 < group["center"][:, 0].mean() < 450 < group["score"][:, 0].mean()
    rows = _rows(tables["all"])
    # One row per face, largest first; every image keeps at least one row; ids unique and increasing.
    assert [r["id"] for r in rows] == [0, 1, 2, 1000, 2000]
    assert [r["path"] for r in rows] == ["a/group.png"] * 3 + ["b/1.pgm", "c/none.png"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["no_face"] and rows[4]["embedding"] is None
    # face 0 is the face "largest" keeps, with the same crop and so the same embedding, up to float32 rounding (the
    # crop is in a batch of 3 here and of 2 there, which changes the CPU kernels' summation order: measured 1e-8)
    largest = _rows(tables["largest"])
    assert rows[0]["landmarks"] == largest[0]["landmarks"] and rows[0]["det_score"] == largest[0]["det_score"]
    np.testing.assert_allclose(rows[0]["embedding"], largest[0]["embedding"], atol=1e-5)
    assert {tuple(rows[k]["landmarks"]) for k in (1, 2)} == {
        tuple(_rows(tables["score"])[0]["landmarks"]), tuple(_rows(tables["center"])[0]["landmarks"])}  # fmt: skip
    np.testing.assert_allclose(rows[3]["embedding"], largest[1]["embedding"], atol=1e-5)  # one face: the same row
    for keep, table in tables.items():
        _check_optional_columns(table, keep)
    assert [r["face"] for r in rows] == [0, 1, 2, 0, 0]
    cfg = _cfg(photos, ckpt, tmp_path / "again", yunet_path, keep_face="all")
    assert embed_partition(plan_inputs(cfg), embedder, build_detector(cfg), cfg).equals(tables["all"])
    # the schema of an output from before the optional columns, for resuming one
    old = embed_partition(plan_inputs(cfg), embedder, build_detector(cfg), cfg, columns=())
    assert old.equals(tables["all"].drop_columns(["face", "pose_score"]))
    # the pose score of the ok rows, from the stored landmarks: the upright frontal faces score high (measured 0.83,
    # 0.84, 1.0); YuNet's landmarks on the face tilted 55 degrees are less regular (0.51)
    pose = pose_score(np.array([r["landmarks"] for r in rows[:4]]))
    assert 0.3 < pose[0] <= 1 and pose[1:].min() > 0.75, pose


def test_run_embed_all_faces(photos: Path, ckpt: Path, yunet_path: Path, scheduler: str, tmp_path: Path) -> None:
    out = tmp_path / "all"
    cfg = _cfg(photos, ckpt, out, yunet_path, keep_face="all", shard_rows=2, scheduler=scheduler)
    result = run_embed(cfg)
    assert (result.rows, result.ok_rows, result.images) == (5, 4, 3)
    man = read_manifest(out)
    assert [(e.id_lo, e.id_hi, e.rows) for e in man.shards] == [(0, 2000, 4), (2000, 3000, 1)]
    assert man.source["detection"] == {"score_threshold": 0.6, "max_side": 640, "keep": "all", "pad": 20,
                                       "nms_threshold": 0.3, "model": str(yunet_path), "used": True}  # fmt: skip
    assert man.source["ids"].startswith("image_index * 1000 + face_index")
    assert man.config["keep_face"] == "all" and man.config["det_threshold"] == 0.6 and man.config["det_size"] == 640
    assert man.columns == ("face", "pose_score") and json.loads((out / MANIFEST).read_text())["columns"] == [
        "face", "pose_score"]  # fmt: skip
    block = read_all(out, columns=["path", "face"])
    assert block.ids.tolist() == [0, 1, 2, 1000] and block.meta.column("face").to_pylist() == [0, 1, 2, 0]
    dataset = ds.dataset(out, format="parquet").to_table().sort_by("id")
    assert dataset.schema.remove_metadata() == schema(man.d, man.dtype, man.attributes, man.columns)
    _check_optional_columns(dataset, "all")
    assert result.low_pose_rows == int((dataset.column("pose_score").to_numpy(zero_copy_only=False) < 0.3).sum())
    np.testing.assert_array_equal(take_rows(out, [2, 1000]), block.xb[[2, 3]])
    # a shard written but not recorded (killed in between) is adopted, not recomputed
    write_manifest(out, man.replace(shards=man.shards[1:], complete=False))
    again = run_embed(cfg)
    assert again.computed_shards == 0 and read_manifest(out).shards == man.shards
    with pytest.raises(ValueError, match="keep_face: 'all' -> 'largest'"):
        run_embed(cfg.replace(keep_face="largest"))
    with pytest.raises(ValueError, match="det_size: 640 -> 800"):
        run_embed(cfg.replace(det_size=800))
    # a shard whose ids do not follow the scheme is not adopted
    table = pq.read_table(out / "part-00000.parquet")
    bad = table.set_column(0, "id", pa.array([0, 1, 3, 1000], pa.int64()))
    pq.write_table(bad, out / "part-00000.parquet")
    write_manifest(out, man.replace(shards=man.shards[1:], complete=False))
    assert run_embed(cfg).computed_shards == 1
    assert pq.read_table(out / "part-00000.parquet").equals(table)


def test_resume_output_without_optional_columns(photos: Path, ckpt: Path, yunet_path: Path, scheduler: str,
                                                tmp_path: Path) -> None:  # fmt: skip
    # An output written before the optional columns resumes with its own schema: a recomputed shard lacks them, an
    # unrecorded shard of its schema is adopted, and one of the new schema is not (the directory never mixes them).
    out = tmp_path / "old"
    cfg = _cfg(photos, ckpt, out, yunet_path, keep_face="all", shard_rows=2, scheduler=scheduler)
    first = run_embed(cfg)
    man = first.manifest
    new_part0 = (out / shard_name(0)).read_bytes()
    old_tables = [pq.read_table(out / e.file).drop_columns(["face", "pose_score"]) for e in man.shards]
    entries = [write_shard(out / e.file, t, (e.id_lo, e.id_hi)) for e, t in zip(man.shards, old_tables, strict=True)]
    write_manifest(out, man.replace(shards=tuple(entries), columns=()))
    assert "columns" not in json.loads((out / MANIFEST).read_text())
    assert run_embed(cfg).already_complete
    (out / shard_name(0)).write_bytes(new_part0)  # the new schema, unrecorded: recomputed
    write_manifest(out, man.replace(shards=(), columns=(), complete=False))  # part 1 (old schema) unrecorded: adopted
    again = run_embed(cfg)
    assert again.computed_shards == 1 and again.reused_shards == 1 and again.manifest.columns == ()
    old_schema = schema(man.d, man.dtype, man.attributes)
    for e, table in zip(again.manifest.shards, old_tables, strict=True):
        assert pq.read_table(out / e.file).equals(table)
        assert pq.read_schema(out / e.file).remove_metadata() == old_schema
    assert ds.dataset(out, format="parquet").to_table().num_rows == 5
    assert read_all(out).meta.column_names[-1] == "error"
    assert again.low_pose_rows == first.low_pose_rows  # computed from the landmarks, as the column held them


def _strip_detection(out: Path) -> None:
    """Make ``out``'s manifest look written before the detection options existed (and by its first name)."""
    man = read_manifest(out)
    config = {k: v for k, v in man.config.items() if k not in ("det_threshold", "det_size", "keep_face")}
    source = {k: v for k, v in man.source.items() if k not in ("detection", "ids")}
    write_manifest(out, man.replace(config=config, source=source))
    (out / MANIFEST).rename(out / LEGACY_MANIFEST)


def test_resume_old_manifest(photos: Path, ckpt: Path, yunet_path: Path, scheduler: str, tmp_path: Path,
                             synth_data: Path) -> None:  # fmt: skip
    # Detected faces: the old shards kept the best-scored face, so the new default is refused, naming the change.
    out = tmp_path / "old"
    cfg = _cfg(photos, ckpt, out, yunet_path, keep_face="score", scheduler=scheduler)
    run_embed(cfg)
    _strip_detection(out)
    with pytest.raises(ValueError, match="keep_face: 'score' -> 'largest'"):
        run_embed(cfg.replace(keep_face="largest"))
    assert run_embed(cfg).already_complete  # the old behaviour, spelled out, is the same config
    # Landmarks for every image: how YuNet would choose cannot matter, so an old output stays finished.
    listed = tmp_path / "listed"
    lcfg = EmbedConfig(input=synth_data / "casia/landmarks.csv", format="list", checkpoint=ckpt, out=listed,
                       device="cpu", scheduler=scheduler, shard_rows=1000)  # fmt: skip
    run_embed(lcfg)
    _strip_detection(listed)
    again = run_embed(lcfg)
    assert again.already_complete and again.manifest.source["detection"]["used"] is False


def test_cli_detection_flags(photos: Path, ckpt: Path, yunet_path: Path, scheduler: str, tmp_path: Path) -> None:
    from facesearch.cli._app import main
    from facesearch.cli.embed import embed_command  # noqa: F401  registers the command

    out = tmp_path / "cli"
    args = ["embed", "--input", str(photos), "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu",
            "--detector-pad", "20", "--detector-model", str(yunet_path), "--keep-face", "all", "--det-threshold",
            "0.5", "--det-size", "800", "--scheduler", scheduler]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "rows         5 from 3 images (4 ok; failed: 1 no_face)" in res.output
    data = json.loads((out / MANIFEST).read_text())
    config = data["config"]
    assert (config["keep_face"], config["det_threshold"], config["det_size"]) == ("all", 0.5, 800)
    assert data["source"]["detection"]["keep"] == "all" and data["source"]["detection"]["max_side"] == 800
    bad = CliRunner().invoke(main, [*args[:-2], "--keep-face", "biggest"])
    assert bad.exit_code == 2 and "'biggest' is not one of 'largest', 'center', 'score', 'all'" in bad.output
    helptext = " ".join(CliRunner().invoke(main, ["embed", "--help"]).output.split())
    assert "--keep-face" in helptext and "--det-threshold" in helptext and "--det-size" in helptext
    assert "must be on a filesystem every worker sees" in helptext  # --scheduler's requirement


def test_landmark_output_refuses_another_id_scheme(synth_data: Path, ckpt: Path, scheduler: str,
                                                   tmp_path: Path) -> None:  # fmt: skip
    """With landmarks for every image the face choice is moot, but keep_face='all' numbers rows image*1000+face: a
    resume with another scheme would mix ids in one directory, so it is refused."""
    cfg = EmbedConfig(input=synth_data / "casia/landmarks.csv", format="list", checkpoint=ckpt, out=tmp_path / "o",
                      device="cpu", scheduler=scheduler, shard_rows=1000, keep_face="all")  # fmt: skip
    run_embed(cfg)
    with pytest.raises(ValueError, match="another id scheme"):
        run_embed(cfg.replace(keep_face="largest"))
    assert run_embed(cfg.replace(keep_face="all")).already_complete
