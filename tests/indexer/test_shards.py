"""The shard format: exact round trips, streaming across shard boundaries, empty / 1-row shards, manifest errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from facesearch.indexer.shards import (
    Manifest,
    file_sha256,
    iter_shards,
    read_all,
    read_manifest,
    schema,
    shard_name,
    table_from_arrays,
    verify_shard,
    write_manifest,
    write_shard,
)

ATTRS = ("Male", "Big_Nose")


def _table(lo: int, n: int, d: int, dtype: str, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Rows lo..lo+n-1; every 5th row failed.  Returns the table and the (n, d) embeddings in the stored dtype."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(lo, lo + n)
    status = ["ok" if i % 5 else "corrupt" for i in ids]
    lm = rng.uniform(0, 90, (n, 10)).astype(np.float32)
    det = rng.uniform(0.6, 1, n).astype(np.float32)
    det[::3] = np.nan
    table = table_from_arrays(
        ids=ids,
        paths=[f"a/{i}.jpg" for i in ids],
        identities=[None if i % 4 == 0 else f"p{i % 7}" for i in ids],
        embeddings=x,
        attributes={"Male": rng.uniform(0, 1, n), "Big_Nose": np.full(n, np.nan)},
        det_score=det,
        landmarks=lm,
        status=status,
        error=[None if s == "ok" else f"bad {i}" for i, s in zip(ids, status, strict=True)],
        dtype=dtype,
    )
    return table, x.astype(dtype)


def _write_dir(out: Path, sizes: list[int], d: int = 8, dtype: str = "float16") -> tuple[list[pa.Table], np.ndarray]:
    tables, xs, entries, lo = [], [], [], 0
    for i, n in enumerate(sizes):
        t, x = _table(lo, n, d, dtype, seed=i)
        entries.append(write_shard(out / shard_name(i), t, (lo, lo + n)))
        tables.append(t)
        xs.append(x)
        lo += n
    man = Manifest(fingerprint="f" * 64, d=d, dtype=dtype, attributes=ATTRS, shards=tuple(entries),
                   planned_shards=len(sizes), complete=True)  # fmt: skip
    write_manifest(out, man)
    return tables, np.concatenate(xs)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_exact(tmp_path: Path, dtype: str) -> None:
    tables, x = _write_dir(tmp_path, [7, 0, 1, 12], dtype=dtype)
    expected = pa.concat_tables(tables)
    assert expected.schema == schema(8, dtype, ATTRS)
    block = read_all(tmp_path, dtype=np.dtype(dtype).type, only_ok=False)
    np.testing.assert_array_equal(block.ids, np.arange(20))
    ok = np.array([s == "ok" for s in expected.column("status").to_pylist()])
    assert block.xb.dtype == np.dtype(dtype) and block.xb.flags.c_contiguous
    np.testing.assert_array_equal(block.xb[ok], x[ok])  # bit-exact, no tolerance
    assert np.isnan(block.xb[~ok]).all()
    assert block.meta.equals(expected.drop_columns(["id", "embedding"]))
    man = read_manifest(tmp_path)
    assert man.totals == {"shards": 4, "rows": 20, "ok_rows": int(ok.sum()), "failed_rows": int((~ok).sum())}
    assert [e.rows for e in man.shards] == [7, 0, 1, 12] and all(verify_shard(tmp_path, e) for e in man.shards)


def test_blocks_across_shard_boundaries(tmp_path: Path) -> None:
    _write_dir(tmp_path, [5, 1, 0, 9, 3])
    whole = read_all(tmp_path, columns=["path", "Male"])
    for block_rows, threads in ((1, True), (2, True), (4, False), (7, True), (100, False)):
        blocks = list(iter_shards(tmp_path, block_rows=block_rows, columns=["path", "Male"], threads=threads))
        assert all(0 < len(b) <= block_rows for b in blocks)
        assert all(len(b) == block_rows for b in blocks[:-1])
        np.testing.assert_array_equal(np.concatenate([b.ids for b in blocks]), whole.ids)
        np.testing.assert_array_equal(np.concatenate([b.xb for b in blocks]), whole.xb)
        assert pa.concat_tables([b.meta for b in blocks]).equals(whole.meta)
        loose = list(
            iter_shards(tmp_path, block_rows=block_rows, columns=["path", "Male"], threads=threads, joined=False)
        )  # a block per decoded batch: never across shards, never joined
        assert all(0 < len(b) <= block_rows for b in loose) and len(loose) >= len(blocks)
        np.testing.assert_array_equal(np.concatenate([b.ids for b in loose]), whole.ids)
        np.testing.assert_array_equal(np.concatenate([b.xb for b in loose]), whole.xb)
        assert pa.concat_tables([b.meta for b in loose]).equals(whole.meta)
    assert whole.xb.dtype == np.float32 and whole.meta.column_names == ["path", "Male"]
    assert not (whole.ids % 5 == 0).any()  # only_ok drops the failed rows


def test_empty_and_one_row(tmp_path: Path) -> None:
    _write_dir(tmp_path / "empty", [0])
    assert list(iter_shards(tmp_path / "empty")) == []
    block = read_all(tmp_path / "empty", columns=[])
    assert block.xb.shape == (0, 8) and block.ids.shape == (0,)
    _write_dir(tmp_path / "one", [2])  # row 0 failed, row 1 ok
    (block,) = list(iter_shards(tmp_path / "one", block_rows=1, columns=[]))
    assert block.ids.tolist() == [1] and block.xb.shape == (1, 8) and block.meta.num_columns == 0
    np.testing.assert_allclose(np.linalg.norm(block.xb, axis=1), 1, atol=2e-3)  # float16 storage rounding


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"manifest\.json not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt shard manifest .*manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "facesearch.index"}))
    with pytest.raises(ValueError, match="not a shard manifest"):
        read_manifest(tmp_path)
    _write_dir(tmp_path, [3, 4])
    man = read_manifest(tmp_path)
    with open(tmp_path / man.shards[1].file, "r+b") as fh:  # flip one byte
        fh.seek(20)
        b = fh.read(1)
        fh.seek(20)
        fh.write(bytes([b[0] ^ 1]))
    assert verify_shard(tmp_path, man.shards[0]) and not verify_shard(tmp_path, man.shards[1])
    (tmp_path / man.shards[0].file).unlink()
    assert not verify_shard(tmp_path, man.shards[0])
    with pytest.raises(ValueError, match=r"part-00000.parquet \(ids 0..2\)"):
        list(iter_shards(tmp_path))
    write_manifest(tmp_path, man.replace(complete=False))
    with pytest.raises(ValueError, match="incomplete"):
        list(iter_shards(tmp_path))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        schema(4, "bfloat16", ())
    with pytest.raises(ValueError, match="status"):
        table_from_arrays(np.arange(1), ["a"], [None], np.ones((1, 2)), {}, None, None, ["weird"], [None])
    with pytest.raises(ValueError, match="embeddings"):
        table_from_arrays(np.arange(2), ["a", "b"], [None] * 2, np.ones((1, 2)), {}, None, None, ["ok"] * 2, [None] * 2)


def _legacy(table: pa.Table) -> pa.Table:
    """``table`` in the layout of shards written before 2026-12-05: embedding elements declared nullable."""
    i = table.schema.get_field_index("embedding")
    emb = table.column(i).combine_chunks()
    legacy = pa.FixedSizeListArray.from_arrays(emb.values, type=pa.list_(emb.type.value_type, emb.type.list_size),
                                               mask=emb.is_null())  # fmt: skip
    return table.set_column(i, pa.field("embedding", legacy.type), legacy)


def test_embedding_layout_and_legacy_shards(tmp_path: Path) -> None:
    """Embeddings are written uncompressed with non-null elements (a failed row is a null list); the other columns
    zstd.  Shards of the earlier layout (nullable elements, zstd) are still read, verified and adopted, also mixed
    with new ones in one directory."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from facesearch.indexer.shards import same_schema

    tables, x = _write_dir(tmp_path, [6, 5])
    meta = pq.ParquetFile(tmp_path / shard_name(0)).metadata
    chunks = {meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c) for c in range(meta.num_columns)}
    assert chunks["embedding.list.element"].compression == "UNCOMPRESSED"
    assert {c.compression for p, c in chunks.items() if p != "embedding.list.element"} == {"ZSTD"}
    emb_type = schema(8, "float16", ATTRS).field("embedding").type
    assert not emb_type.value_field.nullable and emb_type.list_size == 8
    new = read_all(tmp_path, only_ok=False)
    # shard 1 rewritten in the legacy layout, as an older version wrote it, and recorded so
    pq.write_table(_legacy(tables[1]), tmp_path / shard_name(1), compression="zstd")
    man = read_manifest(tmp_path)
    legacy_entry = replace(man.shards[1], sha256=file_sha256(tmp_path / shard_name(1)),
                           size=(tmp_path / shard_name(1)).stat().st_size)  # fmt: skip
    write_manifest(tmp_path, man.replace(shards=(man.shards[0], legacy_entry)))
    assert verify_shard(tmp_path, legacy_entry)
    got = read_all(tmp_path, only_ok=False)
    np.testing.assert_array_equal(got.ids, new.ids)
    np.testing.assert_array_equal(got.xb, new.xb)  # NaN rows in the same places (assert_array_equal: NaN == NaN)
    assert got.meta.equals(new.meta)
    for block_rows in (2, 3):  # blocks spanning both layouts, from sliced batches
        blocks = list(iter_shards(tmp_path, block_rows=block_rows, only_ok=False, dtype=np.float16))
        np.testing.assert_array_equal(np.concatenate([b.xb for b in blocks]), new.xb.astype(np.float16))
    expected = schema(8, "float16", ATTRS)
    assert same_schema(pq.ParquetFile(tmp_path / shard_name(1)).schema_arrow, expected)
    assert same_schema(pq.ParquetFile(tmp_path / shard_name(0)).schema_arrow, expected)
    assert not same_schema(pq.ParquetFile(tmp_path / shard_name(0)).schema_arrow, schema(8, "float32", ATTRS))
    assert not same_schema(pq.ParquetFile(tmp_path / shard_name(0)).schema_arrow, schema(8, "float16", ("Male",)))
    mixed = ds.dataset(tmp_path, format="parquet", exclude_invalid_files=False,
                       ignore_prefixes=[".", "_"]).to_table().sort_by("id")  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(mixed.column("embedding").combine_chunks().values).reshape(-1, 8)[~np.isnan(new.xb).any(1)],
        x[~np.isnan(new.xb).any(1)])  # fmt: skip
