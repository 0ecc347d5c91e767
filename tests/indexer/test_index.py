"""Index directories: every kind against brute force, add/remove consistency, refusals, corrupt files."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index, load_index, recall_at, remove_ids
from facesearch.indexer.index_store import current_layout
from facesearch.model.config import ATTRIBUTES

D_DIM = 32


def _rows(rng: np.random.Generator, ids: np.ndarray, n_ident: int = 40) -> tuple[np.ndarray, list[str]]:
    """Identity-clustered unit vectors: (n, D_DIM) float32 and identity names."""
    centres = rng.standard_normal((n_ident, D_DIM)).astype(np.float32)
    who = rng.integers(0, n_ident, len(ids))
    x = centres[who] + 0.6 * rng.standard_normal((len(ids), D_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), [f"p{w}" for w in who]


def make_shards(directory: Path, ids_per_shard: list[np.ndarray], seed: int = 0, fingerprint: str = "fp-test",
                d: int = D_DIM, fail_every: int = 0, same_rows_as: Path | None = None) -> np.ndarray:  # fmt: skip
    """A shard directory with one shard per id array (empty and 1-row allowed); returns all embeddings (n, d).
    ``same_rows_as``: ids also in that shard directory get its rows (the same image embedded again)."""
    rng = np.random.default_rng(seed)
    entries, xs = [], []
    old = shards.read_all(same_rows_as, columns=["identity"]) if same_rows_as is not None else None
    for s, ids in enumerate(ids_per_shard):
        x, who = _rows(rng, ids)
        x = x[:, :d] if d <= D_DIM else np.pad(x, ((0, 0), (0, d - D_DIM)))
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
        if old is not None:
            at = {int(i): r for r, i in enumerate(old.ids)}
            old_who = old.meta.column("identity").to_pylist()
            for r, i in enumerate(ids.tolist()):
                if i in at:
                    x[r], who[r] = old.xb[at[i]], old_who[at[i]]
        status = ["ok"] * len(ids)
        if fail_every:
            status = ["ok" if i % fail_every else "corrupt" for i in range(len(ids))]
        attrs = {a: rng.random(len(ids)).astype(np.float32) for a in ATTRIBUTES}
        table = shards.table_from_arrays(ids, [f"img/{i}.jpg" for i in ids], who, x, attrs, None, None, status,
                                         [None] * len(ids), dtype="float32")  # fmt: skip
        entries.append(shards.write_shard(directory / shards.shard_name(s), table))
        xs.append(x[np.array(status) == "ok"])
    m = shards.Manifest(fingerprint, d, "float32", ATTRIBUTES, shards=tuple(entries), planned_shards=len(entries),
                        complete=True)  # fmt: skip
    shards.write_manifest(directory, m)
    return np.concatenate(xs)


def _brute(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    S = xq.astype(np.float64) @ xb.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(ids, S.shape), -S), axis=1)[:, :k]
    return np.take_along_axis(S, order, 1), ids[order]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """2001 rows in shards of 1000, 0 (empty), 1 and 1000 rows; ids 10, 13, 16, ... (not positions)."""
    directory = tmp_path_factory.mktemp("shards")
    all_ids = 10 + 3 * np.arange(2001, dtype=np.int64)
    parts = [all_ids[:1000], all_ids[:0], all_ids[1000:1001], all_ids[1001:]]
    xb = make_shards(directory, parts)
    return directory, all_ids, xb


# Recall bars for these small clustered sets (measured well above them; stated so a regression shows).
BARS = {"ivf-flat": 0.9, "ivf-pq": 0.5, "hnsw": 0.95}
SMALL = {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 8, "train_size": 2000, "block_rows": 300, "recall_sample": 50}


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-pq", "hnsw"])
def test_kinds_against_brute_force(kind: str, gallery: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    directory, ids, xb = gallery
    info = build_index(directory, tmp_path / "idx", IndexConfig(kind=kind, **SMALL))
    assert info.nb == len(ids) and info.d == D_DIM and info.fingerprint == "fp-test"
    loaded = load_index(tmp_path / "idx")
    assert sorted(loaded.ids.tolist()) == ids.tolist()
    assert loaded.attributes.column_names == ["id", "path", "identity", *ATTRIBUTES]
    xq = xb[::40]
    D, I = loaded.search(xq, 10)
    Dr, Ir = _brute(xq, xb, ids, 10)
    if kind == "flat":
        np.testing.assert_array_equal(I, Ir)  # random float data: no exact ties
        np.testing.assert_allclose(D, Dr, atol=1e-5)  # float32 accumulation vs float64 reference
        assert info.recall["recall@1"] == 1.0 and info.recall["recall@10"] == 1.0
    else:
        assert recall_at(Ir, I, 10) >= BARS[kind]
        assert info.recall["queries"] == 50 and info.recall["recall@10"] >= BARS[kind]
    on_disk = json.loads(current_layout(tmp_path / "idx").path("index_info.json").read_text())
    assert on_disk["kind"] == kind and on_disk["metric"] == "inner_product" and on_disk["peak_rss_bytes"] > 0


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "hnsw"])
def test_add_then_remove_keep_mapping_and_attributes_consistent(kind: str, tmp_path: Path) -> None:
    a_ids, b_ids = np.arange(0, 600, dtype=np.int64), np.arange(500, 900, dtype=np.int64)  # 100 ids overlap
    xa = make_shards(tmp_path / "a", [a_ids], seed=1)
    xb_new = make_shards(tmp_path / "b", [b_ids], seed=2, same_rows_as=tmp_path / "a")  # the overlap: same rows
    build_index(tmp_path / "a", tmp_path / "idx", IndexConfig(kind=kind, **SMALL))
    info = add_shards(tmp_path / "idx", tmp_path / "b")
    assert info.nb == 900 and info.history[-1]["added"] == 300 and info.history[-1]["skipped_present"] == 100
    info = remove_ids(tmp_path / "idx", np.array([3, 550, 899, 12345]))
    assert info.nb == 897 and info.history[-1]["removed"] == 3
    loaded = load_index(tmp_path / "idx")
    expect = sorted(set(range(900)) - {3, 550, 899})
    assert sorted(loaded.ids.tolist()) == expect
    paths = dict(zip(loaded.attributes.column("id").to_pylist(), loaded.attributes.column("path").to_pylist(),
                     strict=True))  # fmt: skip
    assert all(paths[i] == f"img/{i}.jpg" for i in expect)
    xall = np.concatenate([xa, xb_new[100:]])
    keep = np.isin(np.arange(900), expect)
    _, I = loaded.search(xall[keep][:20], 1)
    if kind != "hnsw":
        np.testing.assert_array_equal(I[:, 0], np.array(expect)[:20])  # each vector finds itself
    assert not np.isin(I, [3, 550, 899]).any()


def test_add_refuses_other_model_or_dimension(gallery: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    directory, _, _ = gallery
    build_index(directory, tmp_path / "idx", IndexConfig(recall_sample=0))
    make_shards(tmp_path / "other", [np.arange(5)], fingerprint="another-model")
    with pytest.raises(ValueError, match="another-model"):
        add_shards(tmp_path / "idx", tmp_path / "other")
    make_shards(tmp_path / "wide", [np.arange(5)], d=48)
    with pytest.raises(ValueError, match="d=48"):
        add_shards(tmp_path / "idx", tmp_path / "wide")


def test_failed_rows_are_not_indexed(tmp_path: Path) -> None:
    make_shards(tmp_path / "s", [np.arange(30)], fail_every=3)
    info = build_index(tmp_path / "s", tmp_path / "idx", IndexConfig(recall_sample=5))
    assert info.nb == 20 and not np.isin(load_index(tmp_path / "idx").ids, np.arange(0, 30, 3)).any()


def test_missing_or_corrupt_files_are_named(gallery: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"index_info\.json not found"):
        load_index(tmp_path)
    directory, _, _ = gallery
    build_index(directory, tmp_path / "idx", IndexConfig(recall_sample=0))
    files = current_layout(tmp_path / "idx")
    files.path("index.faiss").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"index\.faiss"):
        load_index(tmp_path / "idx")
    files.path("index_info.json").write_text("{")
    with pytest.raises(ValueError, match=r"index_info\.json"):
        load_index(tmp_path / "idx")
    with pytest.raises(ValueError, match="not empty"):
        build_index(directory, tmp_path / "idx", IndexConfig())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="flat, ivf-flat"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="valid:"):
        IndexConfig.from_dict({"kind": "flat", "nprobes": 3})
    with pytest.raises(ValueError, match="nlist"):
        IndexConfig(nlist=0)


def test_cli_synth_features_build_info_remove_add(tmp_path: Path) -> None:
    from click.testing import CliRunner

    import facesearch.cli.index  # noqa: F401  -- registers the commands until engine/cli/__init__ imports it
    from facesearch.cli import main

    run = CliRunner().invoke
    common = ["--dim", "32", "--identities", "10", "--shard-rows", "70"]
    r = run(main, ["synth", "features", "--out", str(tmp_path / "g"), "--rows", "200", *common])
    assert r.exit_code == 0, r.output
    r = run(main, ["synth", "features", "--out", str(tmp_path / "p"), "--probes-per-identity", "2", *common])
    assert r.exit_code == 0 and "20 rows" in r.output, r.output
    r = run(main, ["index", "build", "--shards", str(tmp_path / "g"), "--out", str(tmp_path / "i"), "--kind", "hnsw"])
    assert r.exit_code == 0 and "hnsw index of 200 x 32" in r.output and "recall@10" in r.output, r.output
    r = run(main, ["index", "remove", "--index", str(tmp_path / "i"), "--id", "0", "--id", "1"])
    assert r.exit_code == 0 and "removed 2 of 2" in r.output, r.output
    r = run(main, ["index", "add", "--index", str(tmp_path / "i"), "--shards", str(tmp_path / "p")])
    assert r.exit_code == 0 and "added 20 rows" in r.output, r.output
    r = run(main, ["index", "info", "--index", str(tmp_path / "i"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["nb"] == 218, r.output
    r = run(main, ["index", "build", "--shards", str(tmp_path / "g"), "--out", str(tmp_path / "i")])
    assert r.exit_code == 1 and "not empty" in r.output and "Traceback" not in r.output
    r = run(main, ["index", "info", "--index", str(tmp_path)])
    assert r.exit_code == 1 and "index_info.json not found" in r.output
