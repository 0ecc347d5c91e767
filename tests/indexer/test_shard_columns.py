"""Optional shard columns (``face``, ``pose_score``): their place and types in the schema, the writer, the manifest's
``columns`` (absent in old manifests), and every reader on a directory that has them: the project's streaming and
row readers, pyarrow's dataset reader, and the index builder.  Shard fixtures include a 1-row and an empty shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index, load_index
from facesearch.model.faces.align import pose_score

D = 8
COLUMNS = ("face", "pose_score")


def _table(lo: int, n: int, seed: int, columns: tuple[str, ...] = COLUMNS) -> pa.Table:
    """Rows with ids ``image * 1000 + face`` from image ``lo``: image ``i`` has ``i % 3 + 1`` faces; every 4th row
    failed (no landmarks, so no pose score)."""
    rng = np.random.default_rng(seed)
    pairs = [(image, face) for image in range(lo, lo + n) for face in range(image % 3 + 1)]
    ids = np.array([image * 1000 + face for image, face in pairs], np.int64)
    m = len(ids)
    status = ["corrupt" if j % 4 == 3 else "ok" for j in range(m)]
    lm = rng.uniform(10, 90, (m, 10)).astype(np.float32)
    lm[[s != "ok" for s in status]] = np.nan
    extra = {"face": np.array([face for _, face in pairs]), "pose_score": pose_score(lm)}
    return shards.table_from_arrays(ids, [f"img/{image}.jpg" for image, _ in pairs], [f"p{image % 2}" for image, _ in
                                    pairs], rng.standard_normal((m, D)), {"Male": rng.random(m)}, None, lm, status,
                                    [None if s == "ok" else "bad" for s in status], dtype="float32",
                                    extra={k: extra[k] for k in columns})  # fmt: skip


def _directory(out: Path, sizes: list[int], columns: tuple[str, ...] = COLUMNS, lo: int = 0) -> Path:
    """Shards of ``sizes`` images each (an empty and a 1-row one among them), ``columns`` in the manifest."""
    entries = []
    for i, n in enumerate(sizes):
        entries.append(shards.write_shard(out / shards.shard_name(i), _table(lo, n, i, columns),
                                          (lo * 1000, (lo + n) * 1000)))  # fmt: skip
        lo += n
    shards.write_manifest(out, shards.Manifest("f" * 64, D, "float32", ("Male",), shards=tuple(entries),
                                               planned_shards=len(sizes), complete=True, columns=columns))  # fmt: skip
    return out


def test_schema_places_optional_columns_after_error() -> None:
    base = shards.schema(D, "float16", ("Male",))
    for given in (COLUMNS, COLUMNS[::-1]):
        got = shards.schema(D, "float16", ("Male",), given)
        assert got.names == [*base.names, "face", "pose_score"]  # OPTIONAL_COLUMNS order, whatever the given one
        assert got.field("face").type == pa.int32() and got.field("pose_score").type == pa.float32()
    assert shards.schema(D, "float16", ("Male",), ["pose_score"]).names == [*base.names, "pose_score"]
    assert list(shards.OPTIONAL_COLUMNS) == ["face", "pose_score"]
    with pytest.raises(ValueError, match=r"optional columns must be distinct names from \['face', 'pose_score'\]"):
        shards.schema(D, "float16", (), ["yaw"])
    with pytest.raises(ValueError, match="optional columns"):
        shards.schema(D, "float16", (), ["face", "face"])
    for name in COLUMNS:  # an attribute may not take an optional column's name, chosen or not
        with pytest.raises(ValueError, match="not reuse column names"):
            shards.schema(D, "float16", (name,))


def test_table_from_arrays_extra() -> None:
    t = _table(0, 4, seed=0)
    assert t.schema == shards.schema(D, "float32", ("Male",), COLUMNS)
    rows = t.to_pylist()
    assert [r["face"] for r in rows] == [r["id"] % 1000 for r in rows] == [0, 0, 1, 0, 1, 2, 0]
    for r in rows:  # the value pose_score computes from the row's stored landmarks; null where they are
        want = None if r["landmarks"] is None else float(pose_score(np.array(r["landmarks"], np.float32)))
        assert r["pose_score"] == want
    assert t.column("pose_score").null_count == 1 and t.column("face").null_count == 0
    plain = _table(0, 4, seed=0, columns=())
    assert plain.schema == shards.schema(D, "float32", ("Male",)) and plain.equals(t.drop_columns(list(COLUMNS)))
    with pytest.raises(ValueError, match="face must be"):
        shards.table_from_arrays([0], ["a"], [None], np.ones((1, 2)), {}, None, None, ["ok"], [None],
                                 extra={"face": np.array([0.5])})  # fmt: skip
    with pytest.raises(ValueError, match=r"pose_score must have shape \(1,\)"):
        shards.table_from_arrays([0], ["a"], [None], np.ones((1, 2)), {}, None, None, ["ok"], [None],
                                 extra={"pose_score": np.ones(2)})  # fmt: skip
    with pytest.raises(ValueError, match="optional columns"):
        shards.table_from_arrays([0], ["a"], [None], np.ones((1, 2)), {}, None, None, ["ok"], [None],
                                 extra={"yaw": np.ones(1)})  # fmt: skip


def test_manifest_columns_round_trip(tmp_path: Path) -> None:
    new = _directory(tmp_path / "new", [2])
    assert json.loads((new / shards.MANIFEST).read_text())["columns"] == list(COLUMNS)
    assert shards.read_manifest(new).columns == COLUMNS
    old = _directory(tmp_path / "old", [2], columns=())
    assert "columns" not in json.loads((old / shards.MANIFEST).read_text())  # as written before the columns
    assert shards.read_manifest(old).columns == ()
    data = json.loads((new / shards.MANIFEST).read_text())
    for bad in ("face", ["face", "face"], [1]):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / shards.MANIFEST).write_text(json.dumps({**data, "columns": bad}))
        with pytest.raises(ValueError, match=r"corrupt shard manifest .*columns"):
            shards.read_manifest(tmp_path / "bad")


def test_project_readers(tmp_path: Path) -> None:
    directory = _directory(tmp_path / "s", [5, 0, 1, 4])
    whole = pa.concat_tables([pq.read_table(directory / e.file) for e in shards.read_manifest(directory).shards])
    every = shards.read_all(directory, only_ok=False)
    assert every.meta.column_names == ["path", "identity", "Male", *shards.TAIL_COLUMNS, *COLUMNS]
    assert every.meta.equals(whole.drop_columns(["id", "embedding"]))
    np.testing.assert_array_equal(every.ids, whole.column("id").to_numpy())
    streamed = list(shards.iter_shards(directory, block_rows=3, columns=["face", "pose_score"]))
    ok = shards.read_all(directory, columns=["face", "pose_score"])
    assert pa.concat_tables([b.meta for b in streamed]).equals(ok.meta)
    np.testing.assert_array_equal(ok.meta.column("face").to_numpy(), ok.ids % 1000)
    assert ok.meta.column("pose_score").null_count == 0  # only the failed rows lack a pose score
    np.testing.assert_array_equal(shards.take_rows(directory, ok.ids[::-1]), ok.xb[::-1])
    with pytest.raises(ValueError, match=r"unknown shard column\(s\) \['yaw'\]"):
        shards.read_all(directory, columns=["yaw"])
    old = _directory(tmp_path / "old", [3], columns=())
    with pytest.raises(ValueError, match=r"unknown shard column\(s\) \['pose_score'\]"):
        shards.read_all(old, columns=["pose_score"])  # an old directory has none
    empty = _directory(tmp_path / "empty", [0])
    block = shards.read_all(empty)
    assert len(block) == 0 and block.meta.schema == every.meta.schema


def test_dataset_readers(tmp_path: Path) -> None:
    directory = _directory(tmp_path / "s", [5, 0, 1, 4])
    man = shards.read_manifest(directory)
    table = ds.dataset(directory, format="parquet").to_table().sort_by("id")
    assert table.schema.remove_metadata() == shards.schema(D, "float32", ("Male",), man.columns)
    assert table.num_rows == man.totals["rows"]
    np.testing.assert_array_equal(table.column("face").to_numpy(), table.column("id").to_numpy() % 1000)
    got = pq.read_table(directory, columns=["id", "pose_score"], filters=[("pose_score", ">=", 0.0)])
    assert got.num_rows == man.totals["ok_rows"]  # failed rows have a null pose score, which no filter keeps


def test_index_build_and_append(tmp_path: Path) -> None:
    new = _directory(tmp_path / "new", [5, 1])
    info = build_index(new, tmp_path / "idx", IndexConfig(recall_sample=5))
    assert info.nb == shards.read_manifest(new).totals["ok_rows"]
    old = _directory(tmp_path / "old", [2], columns=(), lo=6)  # ids past the first directory's
    assert add_shards(tmp_path / "idx", old).nb == info.nb + shards.read_manifest(old).totals["ok_rows"]
    loaded = load_index(tmp_path / "idx", verify=True)
    assert sorted(loaded.ids.tolist()) == sorted([*shards.read_all(new).ids, *shards.read_all(old).ids])


def test_embed_summary_reads_the_stored_pose_score(tmp_path: Path) -> None:
    from facesearch.indexer.pipeline import LOW_POSE_SCORE, _row_counts

    directory = _directory(tmp_path / "s", [6, 1])
    man = shards.read_manifest(directory)
    counts, low, _ = _row_counts(directory, man)
    pose = shards.read_all(directory, columns=["pose_score"]).meta.column("pose_score").to_numpy()
    assert low == int((pose < LOW_POSE_SCORE).sum()) > 0  # random landmarks: mostly far from frontal
    assert _row_counts(directory, man.replace(columns=()))[1] == low  # the same from the landmarks column
    # the column is what is read: a shard whose stored scores say "frontal" counts no low-pose row
    table = pq.read_table(directory / man.shards[0].file)
    frontal = table.set_column(table.schema.get_field_index("pose_score"), "pose_score",
                               pa.array(np.ones(table.num_rows, np.float32)))  # fmt: skip
    entry = shards.write_shard(directory / man.shards[0].file, frontal, (man.shards[0].id_lo, man.shards[0].id_hi))
    man = man.with_entry(entry)
    last = pq.read_table(directory / man.shards[1].file, columns=["status", "pose_score"]).to_pylist()
    assert _row_counts(directory, man)[1] == sum(r["status"] == "ok" and r["pose_score"] < LOW_POSE_SCORE for r in last)
    assert counts == _row_counts(directory, man)[0]
