"""Query inputs and result tables (facesearch.engine.queries), without the command line: every reader returns the
rows it was given, named, and refuses bad input with a ValueError naming the file (or the row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facesearch.engine.queries import (
    RESULT_COLUMNS,
    id_queries,
    parse_ids,
    prepare_queries,
    query_images,
    read_query_embeddings,
    results_records,
    results_table,
)
from facesearch.engine.search import Hit, QueryResult, SearchEngine, UnknownIdError
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q")
    write_synth_features(SynthFeaturesConfig(out=root / "s", rows=60, dim=8, identities=6, dtype="float32"))
    build_index(root / "s", root / "flat", IndexConfig(kind="flat", recall_sample=0))
    return {"shards": root / "s", "flat": root / "flat"}


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# -- read_query_embeddings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_npy_rows_are_named_by_file_and_row(tmp_path: Path, dtype: type) -> None:
    x = (_rng().standard_normal((3, 4)) * 10).astype(dtype)
    np.save(tmp_path / "q.npy", x)
    got, names = read_query_embeddings(tmp_path / "q.npy")
    assert got.dtype == dtype and np.array_equal(got, x)  # the stored precision: the search scales, then rounds
    assert names == ["q.npy[0]", "q.npy[1]", "q.npy[2]"]


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.ones(4, np.float32), r"expected an \(n, d\) array of real embeddings, got float32 \(4,\)"),
        (np.ones((2, 2), np.complex64), "got complex64"),
        (np.array([["a", "b"]]), "got <U1"),
        (np.zeros((0, 4), np.float32), "holds no query rows"),
    ],
)
def test_npy_bad_arrays_are_named(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=message) as e:
        read_query_embeddings(tmp_path / "bad.npy")
    assert "bad.npy" in str(e.value)


def test_npy_that_is_not_numpy(tmp_path: Path) -> None:
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(ValueError, match=r"text\.npy: not a readable \.npy array of numbers \(.+\)"):
        read_query_embeddings(tmp_path / "text.npy")


def test_npy_of_objects_is_refused_without_unpickling(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([[1, None]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy: not a readable \.npy array"):
        read_query_embeddings(tmp_path / "obj.npy")


def test_parquet_rows_named_by_path_and_nulls_become_nan(tmp_path: Path) -> None:
    table = pa.table({"embedding": [[1.0, 2.0], None, [3.0, 4.0]], "path": ["a.jpg", "b.jpg", "c.jpg"]})
    pq.write_table(table, tmp_path / "q.parquet")
    x, names = read_query_embeddings(tmp_path / "q.parquet")
    assert names == ["a.jpg", "b.jpg", "c.jpg"] and x.dtype == np.float64 and x.shape == (3, 2)
    assert np.array_equal(x[[0, 2]], [[1, 2], [3, 4]]) and np.isnan(x[1]).all()  # refused later, by row


def test_parquet_without_paths_names_rows_by_number(tmp_path: Path) -> None:
    emb = pa.array([[1.0, 0.0], [0.0, 1.0]], type=pa.list_(pa.float32(), 2))  # a fixed-size list column
    pq.write_table(pa.table({"embedding": emb}), tmp_path / "q.parquet")
    x, names = read_query_embeddings(tmp_path / "q.parquet")
    assert names == ["0", "1"] and np.array_equal(x, np.eye(2))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"vector": [[1.0]]}), r"no 'embedding' column \(have \['vector'\]\)"),
        (pa.table({"embedding": [1.0, 2.0]}), "must hold a list of numbers per row, got double"),
        (pa.table({"embedding": [[1.0, 2.0], [3.0]]}), "rows must all hold 2 numbers"),
        (pa.table({"embedding": pa.array([], pa.list_(pa.float32()))}), "holds no query rows"),
    ],
)
def test_parquet_bad_tables_are_named(tmp_path: Path, table: pa.Table, message: str) -> None:
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=message) as e:
        read_query_embeddings(tmp_path / "bad.parquet")
    assert "bad.parquet" in str(e.value)


def test_parquet_that_is_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR")
    with pytest.raises(ValueError, match=r"x\.parquet: not a readable Parquet file"):
        read_query_embeddings(tmp_path / "x.parquet")


def test_other_suffix_is_refused(tmp_path: Path) -> None:
    (tmp_path / "q.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"q\.csv: embeddings must be \.npy, \.parquet or a shard directory"):
        read_query_embeddings(tmp_path / "q.csv")


def test_shard_directory_rows_are_its_vectors(gallery: dict[str, Path]) -> None:
    x, names = read_query_embeddings(gallery["shards"])
    ref = shards.read_all(gallery["shards"], columns=["path"])
    assert np.array_equal(x, ref.xb) and names == [str(p) for p in ref.meta.column("path").to_pylist()]


def test_a_folder_that_is_not_shards_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_query_embeddings(tmp_path)


# -- prepare_queries ------------------------------------------------------------------------------------------------


def test_prepare_normalises_any_scale() -> None:
    """Scaled rows give the unit row; 1e300 (beyond float32) keeps its direction.  Tolerance: float32 rounding."""
    x = _rng().standard_normal((2, 6))
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    for scale in (1e-30, 1.0, 1e300):
        got = prepare_queries(x * scale, 6, "q.npy")
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_allclose(got, unit, atol=2e-7)


def test_prepare_names_the_source_for_a_wrong_d_or_a_bad_row() -> None:
    with pytest.raises(ValueError, match=r"q\.npy: queries have d=3 but the index holds d=4"):
        prepare_queries(np.ones((1, 3)), 4, "q.npy")
    bad = np.ones((3, 4))
    bad[1] = np.nan
    with pytest.raises(ValueError, match=r"^q\.npy: .*1") as e:
        prepare_queries(bad, 4, Path("q.npy"))
    assert "Traceback" not in str(e.value)
    with pytest.raises(ValueError, match=r"^q\.npy: "):
        prepare_queries(np.zeros((1, 4)), 4, "q.npy")


# -- query_images, parse_ids ----------------------------------------------------------------------------------------


def test_query_images(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert query_images(tmp_path / "a.JPG") == [tmp_path / "a.JPG"]
    assert sorted(query_images(tmp_path)) == [tmp_path / "a.JPG", tmp_path / "b" / "2.png"]
    with pytest.raises(ValueError, match=r"notes\.txt: not an image file \(suffixes .*\.jpg"):
        query_images(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no image files in this folder"):
        query_images(tmp_path / "empty")


def test_parse_ids() -> None:
    assert parse_ids("5") == [5] and parse_ids(" 5, 77 ,-1") == [5, 77, -1]
    for bad in ("", "5,", "5,,6", "a", "1.5"):
        with pytest.raises(ValueError, match=f"expected comma-separated integer ids such as 5,77, got {bad!r}"):
            parse_ids(bad)


# -- id_queries -----------------------------------------------------------------------------------------------------


def test_id_queries_are_the_stored_vectors_and_attributes(gallery: dict[str, Path]) -> None:
    engine = SearchEngine.open(gallery["flat"])
    xq, attrs, names = id_queries(engine, [7, 3, 7])
    assert names == ["id 7", "id 3", "id 7"]
    assert np.array_equal(xq, engine.vectors([7, 3, 7]))
    rows = engine.rows([7, 3, 7])
    assert attrs.shape == (3, len(engine.attribute_names)) and attrs.dtype == np.float32
    for j, a in enumerate(engine.attribute_names):
        assert np.array_equal(attrs[:, j], engine.columns[a][rows])
    with pytest.raises(UnknownIdError, match="id 999 is not in the index"):
        id_queries(engine, [3, 999])


# -- results_table, results_records ---------------------------------------------------------------------------------


def _results() -> tuple[list[str], list[QueryResult]]:
    h1 = Hit(id=4, path="p4.jpg", identity="ann", score=0.9, attributes={"Male": 0.25})
    h2 = Hit(id=9, path="p9.jpg", identity=None, score=0.5, attributes={"Male": 0.75})
    return ["q0", "q1"], [
        QueryResult(hits=(h1, h2), strategy="none", seconds=0.01, exact=True),
        QueryResult(hits=(), strategy="none", seconds=0.02, exact=True, accepted=False),
    ]


def test_results_table_has_one_row_per_hit() -> None:
    names, results = _results()
    table = results_table(names, results)
    assert table.column_names == [*RESULT_COLUMNS, "Male"]
    assert table.to_pydict() == {"query": ["q0", "q0"], "rank": [1, 2], "id": [4, 9], "path": ["p4.jpg", "p9.jpg"],
                                 "identity": ["ann", None], "score": [0.9, 0.5], "Male": [0.25, 0.75]}  # fmt: skip
    empty = results_table(names[1:], results[1:])
    assert empty.num_rows == 0 and empty.column_names == list(RESULT_COLUMNS)


def test_results_records_pair_names_with_results() -> None:
    names, results = _results()
    records = results_records(names, results)
    assert [r["query"] for r in records] == names
    assert records[0]["hits"][1]["id"] == 9 and records[1] == {"query": "q1", **results[1].to_dict()}
    with pytest.raises(ValueError):
        results_records(names[:1], results)
    with pytest.raises(ValueError):
        results_table(names, results[:1])
