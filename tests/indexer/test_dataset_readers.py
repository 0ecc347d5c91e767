"""A shard directory is a plain Parquet dataset: pyarrow's dataset reader and ``read_table(dir)`` read it as is (the
manifest and write temporaries are skipped by name), even while a shard is being written, with the shard schema and
the same rows as the project's own reader.  Directories with the legacy ``manifest.json`` stay readable, resumable
and appendable, and migrate without ever being without a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index, load_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features
from facesearch.model.config import ATTRIBUTES


def _synth(out: Path, rows: int = 401, **kw: object) -> Path:
    """A project-made directory: shards of 200, 200 and 1 rows (float16 by default)."""
    base: dict[str, object] = {"rows": rows, "dim": 16, "identities": 10, "shard_rows": 200}
    base.update(kw)
    write_synth_features(SynthFeaturesConfig(out=out, **base))  # type: ignore[arg-type]
    return out


def _with_empty_shard(out: Path) -> Path:
    """Shards of 7, 0 (empty), 1 and 5 rows written with the project's writers; every 3rd row failed (null
    embedding), float32."""
    rng = np.random.default_rng(0)
    entries, lo = [], 0
    for i, n in enumerate([7, 0, 1, 5]):
        ids = np.arange(lo, lo + n)
        status = ["ok" if j % 3 else "corrupt" for j in ids]
        table = shards.table_from_arrays(ids, [f"a/{j}.jpg" for j in ids], [f"p{j % 2}" for j in ids],
                                         rng.standard_normal((n, 8)), {"Male": rng.random(n)}, None, None, status,
                                         [None if s == "ok" else "bad" for s in status], dtype="float32")  # fmt: skip
        entries.append(shards.write_shard(out / shards.shard_name(i), table, (lo, lo + n)))
        lo += n
    shards.write_manifest(out, shards.Manifest("f" * 64, 8, "float32", ("Male",), shards=tuple(entries),
                                               planned_shards=4, complete=True))  # fmt: skip
    return out


def _check_same_rows(directory: Path, table: pa.Table) -> None:
    """``table`` (from a generic reader) holds exactly the project reader's rows, in the shard schema."""
    man = shards.read_manifest(directory)
    assert table.schema.remove_metadata() == shards.schema(man.d, man.dtype, man.attributes)
    emb = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb) and emb.list_size == man.d
    assert emb.value_type == (pa.float16() if man.dtype == "float16" else pa.float32())
    table = table.sort_by("id")
    own = shards.read_all(directory, dtype=np.dtype(man.dtype).type, only_ok=False)
    np.testing.assert_array_equal(table.column("id").to_numpy(), own.ids)
    np.testing.assert_array_equal(shards.embeddings_to_numpy(table.column("embedding"), man.d), own.xb)  # NaN = null
    assert table.drop_columns(["id", "embedding"]).combine_chunks().equals(own.meta.combine_chunks())


@pytest.mark.parametrize("make", [_synth, _with_empty_shard], ids=["synth_features", "empty_and_failed_rows"])
def test_pyarrow_reads_a_shard_directory_as_is(tmp_path: Path, make: object) -> None:
    directory = make(tmp_path / "s")  # type: ignore[operator]
    names = sorted(p.name for p in directory.iterdir())
    assert shards.MANIFEST in names and shards.LEGACY_MANIFEST not in names
    dataset = ds.dataset(directory, format="parquet")
    assert sorted(Path(f).name for f in dataset.files) == [e.file for e in shards.read_manifest(directory).shards]
    _check_same_rows(directory, dataset.to_table())
    _check_same_rows(directory, pq.read_table(directory))
    assert pq.read_table(directory, columns=["id"], filters=[("id", "<", 3)]).num_rows == 3


def test_one_row_and_empty_directories(tmp_path: Path) -> None:
    one = _synth(tmp_path / "one", rows=1)
    assert pq.read_table(one).num_rows == 1
    _check_same_rows(one, pq.read_table(one))
    empty = tmp_path / "empty"
    table = shards.schema(4, "float16", ()).empty_table()
    entry = shards.write_shard(empty / shards.shard_name(0), table)
    shards.write_manifest(empty, shards.Manifest("f" * 64, 4, "float16", (), shards=(entry,), planned_shards=1,
                                                 complete=True))  # fmt: skip
    got = pq.read_table(empty)
    assert got.num_rows == 0 and got.schema.remove_metadata() == shards.schema(4, "float16", ())


def test_readable_while_a_shard_is_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader that lists the directory while write_shard's temporary exists (a job in progress) must not choke.
    directory = _synth(tmp_path / "s")
    seen: list[int] = []
    real_write = pq.write_table

    def write_then_read(table: pa.Table, where: object, **kw: object) -> None:
        real_write(table, where, **kw)
        assert Path(str(where)).name.startswith("."), where  # the temporary, hidden from dataset readers
        seen.append(pq.read_table(directory).num_rows)

    monkeypatch.setattr(shards.pq, "write_table", write_then_read)
    extra = shards.table_from_arrays(np.arange(401, 403), ["x", "y"], [None] * 2, np.ones((2, 16)), {}, None, None,
                                     ["ok"] * 2, [None] * 2)  # fmt: skip
    shards.write_shard(directory / shards.shard_name(3), extra)
    assert seen == [401]  # the temporary was skipped; the part did not exist yet
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    (directory / "_manifest.json.tmp").write_text("{half a manif")  # a manifest write killed midway
    (directory / shards.temporary_name("part-00004.parquet")).write_bytes(b"PAR1 half a parquet file")
    assert pq.read_table(directory).num_rows == 403
    assert shards.remove_temporaries(directory) == 1
    (directory / "part-00005.parquet.123.tmp").write_bytes(b"left by a job of the legacy naming")
    assert shards.remove_temporaries(directory) == 1


def _legacy(directory: Path) -> bytes:
    """Turn a project-made directory into one written before the rename: the manifest as ``manifest.json``."""
    raw = (directory / shards.MANIFEST).read_bytes()
    (directory / shards.MANIFEST).rename(directory / shards.LEGACY_MANIFEST)
    return raw


def test_legacy_directory_is_readable_and_indexable(tmp_path: Path) -> None:
    directory = _synth(tmp_path / "old")
    raw = _legacy(directory)
    assert shards.is_shard_directory(directory)
    assert shards.manifest_path(directory) == directory / shards.LEGACY_MANIFEST
    man = shards.read_manifest(directory)
    assert man.complete and man.totals["rows"] == 401
    assert shards.read_all(directory, columns=[]).ids.tolist() == list(range(401))
    assert shards.take_rows(directory, [400]).shape == (1, 16)
    info = build_index(directory, tmp_path / "idx", IndexConfig(recall_sample=5))
    assert info.nb == 401 and info.source["manifest_sha256"] == shards.file_sha256(directory / shards.LEGACY_MANIFEST)
    assert raw == (directory / shards.LEGACY_MANIFEST).read_bytes()  # reading never rewrites
    more = _synth(tmp_path / "more", rows=20, seed=0, probes_per_identity=2)
    _legacy(more)
    assert add_shards(tmp_path / "idx", more).nb == 421  # an old directory appended to an index
    assert sorted(load_index(tmp_path / "idx").ids.tolist())[-1] == int(shards.read_all(more).ids.max())


def test_rerun_on_legacy_directory_migrates_it(tmp_path: Path) -> None:
    directory = _synth(tmp_path / "old")
    raw = _legacy(directory)
    with pytest.raises(pa.ArrowInvalid, match=r"manifest\.json"):
        pq.read_table(directory)  # the defect: an old directory is no Parquet dataset
    assert _synth(directory) == directory  # same config, complete: nothing recomputed, the manifest renamed
    assert (directory / shards.MANIFEST).read_bytes() == raw and not (directory / shards.LEGACY_MANIFEST).exists()
    assert pq.read_table(directory).num_rows == 401
    with pytest.raises(ValueError, match="different shard set"):
        _synth(directory, seed=3)


def test_resumed_legacy_directory_migrates_on_write(tmp_path: Path) -> None:
    # A job resuming an old directory records its next shard with write_manifest: the manifest moves to the new name.
    directory = _synth(tmp_path / "old")
    _legacy(directory)
    man = shards.read_manifest(directory)
    partial = man.replace(shards=man.shards[:2], complete=False)
    shards.write_manifest(directory, partial)
    assert sorted(p.name for p in directory.iterdir() if "manifest" in p.name) == [shards.MANIFEST]
    assert shards.read_manifest(directory).shards == man.shards[:2]
    shards.write_manifest(directory, man)
    assert shards.read_manifest(directory).totals == man.totals and pq.read_table(directory).num_rows == 401


def test_crash_mid_migration_keeps_the_newer_manifest(tmp_path: Path) -> None:
    # Killed after writing _manifest.json but before removing manifest.json: both exist; the new one (written last)
    # wins, and the next write removes the old one.
    directory = _synth(tmp_path / "s")
    new = shards.read_manifest(directory)
    old = json.loads((directory / shards.MANIFEST).read_text())
    old["complete"], old["shards"] = False, old["shards"][:1]
    (directory / shards.LEGACY_MANIFEST).write_text(json.dumps(old))
    assert shards.manifest_path(directory) == directory / shards.MANIFEST
    assert shards.read_manifest(directory).shards == new.shards
    assert shards.migrate_manifest(directory) == directory / shards.MANIFEST
    assert (directory / shards.LEGACY_MANIFEST).exists()  # migrate only renames a legacy-only directory
    shards.write_manifest(directory, new)
    assert not (directory / shards.LEGACY_MANIFEST).exists() and shards.read_manifest(directory).shards == new.shards


def test_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"_manifest\.json not found"):
        shards.read_manifest(tmp_path)
    assert not shards.is_shard_directory(tmp_path) and shards.manifest_path(tmp_path) is None
    with pytest.raises(ValueError, match="not found"):
        shards.migrate_manifest(tmp_path)
    (tmp_path / shards.LEGACY_MANIFEST).write_text(json.dumps({"kind": "facesearch.index"}))
    with pytest.raises(ValueError, match="not a shard manifest"):
        shards.migrate_manifest(tmp_path)  # never renames what is not a shard manifest
    assert (tmp_path / shards.LEGACY_MANIFEST).exists() and not (tmp_path / shards.MANIFEST).exists()
    (tmp_path / shards.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"_manifest\.json is not a shard manifest"):
        shards.read_manifest(tmp_path)


def test_other_readers_if_installed(tmp_path: Path) -> None:
    # pandas and duckdb are not dependencies; where installed they read the directory too.
    directory = _synth(tmp_path / "s", dtype="float32")
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(directory)
    assert len(frame) == 401 and sorted(frame.columns) == sorted(["id", "path", "identity", "embedding", *ATTRIBUTES,
                                                                  *shards.TAIL_COLUMNS])  # fmt: skip
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"select count(*) from read_parquet('{directory}/*.parquet')").fetchone()[0] == 401


def test_ok_rows_via_a_filter_equal_the_project_reader(tmp_path: Path) -> None:
    directory = _with_empty_shard(tmp_path / "s")
    ok = ds.dataset(directory, format="parquet").to_table(filter=pc.field("status") == "ok").sort_by("id")
    own = shards.read_all(directory)
    np.testing.assert_array_equal(ok.column("id").to_numpy(), own.ids)
    np.testing.assert_array_equal(shards.embeddings_to_numpy(ok.column("embedding"), 8), own.xb)
