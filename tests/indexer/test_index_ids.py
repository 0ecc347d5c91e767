"""Ids across galleries: a second embed output (ids from 0 again) is a collision error, never a silent skip;
``fresh_ids`` / ``id_offset`` add it under new ids and record the mapping; re-adding the same shard set is a no-op."""

# ruff: noqa: E741  -- FAISS vocabulary: D (scores) and I (ids)
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, add_to_index, build_index, load_index, remove_ids
from facesearch.indexer.index_ids import trace_id

D = 16
SMALL = {"nlist": 4, "m": 4, "nbits": 4, "nprobe": 4, "train_size": 400, "recall_sample": 0}


def unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_gallery(directory: Path, ids: np.ndarray, paths: list[str], x: np.ndarray,
                  identities: list[str | None] | None = None, fingerprint: str = "fp-ids",
                  shard_rows: int = 1 << 30) -> None:  # fmt: skip
    """A complete shard directory (``shard_rows`` rows per shard) with these rows; no attribute columns."""
    n, entries = len(ids), []
    for s, lo in enumerate(range(0, max(n, 1), shard_rows)):
        sl = slice(lo, lo + shard_rows)
        who = (identities or [None] * n)[sl]
        m = len(ids[sl])
        table = shards.table_from_arrays(ids[sl], paths[sl], who, x[sl], {}, None, None, ["ok"] * m, [None] * m,
                                         dtype="float32")  # fmt: skip
        entries.append(shards.write_shard(directory / shards.shard_name(s), table))
    shards.write_manifest(directory, shards.Manifest(fingerprint, x.shape[1], "float32", (), shards=tuple(entries),
                                                     planned_shards=len(entries), complete=True))  # fmt: skip


def two_galleries(tmp_path: Path, n: int = 50, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Two embed outputs numbered 0..n-1 each, of different faces (paths a/… and b/…, different vectors)."""
    rng = np.random.default_rng(seed)
    xa, xb = unit(rng, n), unit(rng, n)
    ids = np.arange(n, dtype=np.int64)
    write_gallery(tmp_path / "a", ids, [f"s{i // 10}/{i % 10}.pgm" for i in ids], xa, [f"A{i // 10}" for i in ids])
    write_gallery(tmp_path / "b", ids, [f"t{i // 10}/{i % 10}.pgm" for i in ids], xb, [f"B{i // 10}" for i in ids])
    return tmp_path / "a", tmp_path / "b", xa, xb


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-pq", "hnsw"])
def test_second_gallery_with_the_same_ids_is_an_error_naming_them(kind: str, tmp_path: Path) -> None:
    # n = 400 so that IVF / PQ can train; the regression: "added 0 rows (400 already present)", search answered with
    # the first gallery's people.
    a, b, _, _ = two_galleries(tmp_path, n=400)
    build_index(a, tmp_path / "idx", IndexConfig(kind=kind, **SMALL))
    before = load_index(tmp_path / "idx")
    with pytest.raises(ValueError, match=r"400 id\(s\) .* taken .* 0, 1, 2, 3, 4 … \(400 in all\).*--fresh-ids") as e:
        add_shards(tmp_path / "idx", b)
    assert "\n" not in str(e.value) and "--id-offset 400" in str(e.value) and "path 's0/0.pgm'" in str(e.value)
    after = load_index(tmp_path / "idx")
    assert after.info.nb == 400 and after.info.history == before.info.history  # nothing written


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-pq", "hnsw"])
def test_fresh_ids_add_the_second_gallery_and_search_finds_its_faces(kind: str, tmp_path: Path) -> None:
    a, b, _, xb = two_galleries(tmp_path, n=400)
    build_index(a, tmp_path / "idx", IndexConfig(kind=kind, **SMALL))
    r = add_to_index(tmp_path / "idx", b, fresh_ids=True)
    assert (r.added, r.skipped_present, r.id_offset, r.changed) == (400, 0, 400, True)
    loaded = load_index(tmp_path / "idx")
    assert sorted(loaded.ids.tolist()) == list(range(800))
    _, I = loaded.search(xb[:20], 1)
    if kind != "ivf-pq":  # PQ is lossy: nearest reconstruction need not be the vector itself
        np.testing.assert_array_equal(I[:, 0], 400 + np.arange(20))
    paths = dict(zip(loaded.ids.tolist(), loaded.attributes.column("path").to_pylist(), strict=True))
    assert paths[400 + 17] == "t1/7.pgm" and paths[17] == "s1/7.pgm"
    # the mapping: sources name each shard set, its offset and its id ranges
    src = loaded.info.sources
    assert [(s["op"], s["id_offset"], s["index_ids"], s["shard_ids"]) for s in src] == [
        ("build", 0, [0, 400], [0, 400]),
        ("add", 400, [400, 800], [0, 400]),
    ]
    assert src[1]["manifest_sha256"] == shards.manifest_sha256(b) and src[1]["shards_dir"] == str(b.resolve())
    found = trace_id(loaded.info, 417)
    assert found is not None and found[0]["shards_dir"] == str(b.resolve()) and found[1] == 17


def test_explicit_offset_and_collision_by_embedding_or_identity(tmp_path: Path) -> None:
    a, b, xa, _ = two_galleries(tmp_path)
    build_index(a, tmp_path / "idx", IndexConfig(recall_sample=0))
    info = add_shards(tmp_path / "idx", b, id_offset=1000)
    assert sorted(load_index(tmp_path / "idx").ids.tolist()) == [*range(50), *range(1000, 1050)]
    assert info.history[-1]["id_offset"] == 1000
    # same relative paths (another root with the same file names) but other faces: the embeddings tell them apart
    rng = np.random.default_rng(7)
    ids = np.arange(50, dtype=np.int64)
    paths, who = [f"s{i // 10}/{i % 10}.pgm" for i in ids], [f"A{i // 10}" for i in ids]
    write_gallery(tmp_path / "c", ids, paths, unit(rng, 50), who)
    with pytest.raises(ValueError, match=r"50 id\(s\).*e\.g\. id 0: the same path but embeddings at cosine"):
        add_shards(tmp_path / "idx", tmp_path / "c")
    # same path and embedding, another identity label
    write_gallery(tmp_path / "d", ids[:3], paths[:3], xa[:3], ["X", "A0", "A0"])
    with pytest.raises(ValueError, match=r"1 id\(s\).*: 0 \(e\.g\. id 0: identity 'A0' in the index, 'X'"):
        add_shards(tmp_path / "idx", tmp_path / "d")
    with pytest.raises(ValueError, match="not both"):
        add_shards(tmp_path / "idx", b, id_offset=5, fresh_ids=True)
    with pytest.raises(ValueError, match=r"outside 0\.\.2\^63-1"):
        add_shards(tmp_path / "idx", tmp_path / "c", id_offset=-10)


def test_the_same_rows_again_are_skipped_and_the_same_shards_are_recognised(tmp_path: Path) -> None:
    a, b, xa, _ = two_galleries(tmp_path)
    build_index(a, tmp_path / "idx", IndexConfig(recall_sample=0))
    # a re-embedded copy of gallery a (float16 rounding: the same photos, not bit-equal vectors) is "already present"
    ids = np.arange(50, dtype=np.int64)
    write_gallery(tmp_path / "a16", ids, [f"s{i // 10}/{i % 10}.pgm" for i in ids],
                  xa.astype(np.float16).astype(np.float32), [f"A{i // 10}" for i in ids])  # fmt: skip
    r = add_to_index(tmp_path / "idx", tmp_path / "a16")
    assert (r.added, r.skipped_present, r.changed) == (0, 50, False)
    first = add_to_index(tmp_path / "idx", b, fresh_ids=True)
    gen = len(load_index(tmp_path / "idx").info.history)
    for kwargs in ({"fresh_ids": True}, {}, {"id_offset": first.id_offset}):  # re-running the add: nothing to do
        again = add_to_index(tmp_path / "idx", b, **kwargs)  # type: ignore[arg-type]
        assert not again.changed and again.prior is not None and again.id_offset == 50 and again.skipped_present == 50
    assert len(load_index(tmp_path / "idx").info.history) == gen
    with pytest.raises(
        ValueError, match="already added to this index with id offset 50; adding it again with offset 7"
    ):
        add_to_index(tmp_path / "idx", b, id_offset=7)
    # removed rows of an added shard set come back when it is added again, under the same ids
    remove_ids(tmp_path / "idx", np.array([60, 61]))
    back = add_to_index(tmp_path / "idx", b, fresh_ids=True)
    assert (back.added, back.skipped_present, back.id_offset) == (2, 48, 50)


def test_fresh_ids_never_reuse_removed_ids_and_a_grown_directory_keeps_its_offset(tmp_path: Path) -> None:
    a, b, _, xb = two_galleries(tmp_path)
    build_index(a, tmp_path / "idx", IndexConfig(recall_sample=0))
    remove_ids(tmp_path / "idx", np.arange(45, 50))
    r = add_to_index(tmp_path / "idx", b, fresh_ids=True)
    assert r.id_offset == 50 and load_index(tmp_path / "idx").info.max_id == 99  # not 45: ids 45..49 were someone's
    # gallery b grows (a resumed embed appends rows 50..59): fresh ids keep its offset, only the new rows go in
    ids = np.arange(60, dtype=np.int64)
    x = np.concatenate([xb, unit(np.random.default_rng(3), 10)])
    write_gallery(b, ids, [f"t{i // 10}/{i % 10}.pgm" for i in ids], x, [f"B{i // 10}" for i in ids])
    grown = add_to_index(tmp_path / "idx", b, fresh_ids=True)
    assert (grown.added, grown.skipped_present, grown.id_offset) == (10, 50, 50)
    assert sorted(load_index(tmp_path / "idx").ids.tolist()) == [*range(45), *range(50, 110)]


def test_repeated_ids_in_a_shard_set_are_refused(tmp_path: Path) -> None:
    x = unit(np.random.default_rng(0), 6)
    ids = np.array([0, 1, 2, 3, 2, 5], np.int64)  # id 2 twice, across two shards
    write_gallery(tmp_path / "s", ids, [f"{i}.jpg" for i in range(6)], x, shard_rows=4)
    with pytest.raises(ValueError, match=r"holds the same id more than once \(ids 2 after id offset 0\)"):
        build_index(tmp_path / "s", tmp_path / "idx", IndexConfig(recall_sample=0))


def test_build_with_an_offset_and_the_manifest_id_offset_field(tmp_path: Path) -> None:
    a, _, xa, _ = two_galleries(tmp_path)
    info = build_index(a, tmp_path / "idx", IndexConfig(recall_sample=20), id_offset=5000)
    assert info.recall["recall@1"] == 1.0 and info.max_id == 5049  # recall compares index ids with shard ids + offset
    _, I = load_index(tmp_path / "idx").search(xa[:5], 1)
    np.testing.assert_array_equal(I[:, 0], 5000 + np.arange(5))
    # the manifest carries embed's own offset (0 when absent, as in every manifest written before it)
    m = shards.read_manifest(a)
    assert m.id_offset == 0 and json.loads((a / shards.MANIFEST).read_text())["id_offset"] == 0
    raw = json.loads((a / shards.MANIFEST).read_text())
    del raw["id_offset"]
    (a / shards.MANIFEST).write_text(json.dumps(raw))
    assert shards.read_manifest(a).id_offset == 0
    shards.write_manifest(a, m.replace(id_offset=7000))
    assert shards.read_manifest(a).id_offset == 7000
    with pytest.raises(ValueError, match="id_offset must be an integer"):
        m.replace(id_offset="7")


def test_cli_add_fresh_ids_offset_and_already_added(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from facesearch.cli import main

    a, b, _, _ = two_galleries(tmp_path)
    run = CliRunner().invoke
    assert run(main, ["index", "build", "--shards", str(a), "--out", str(tmp_path / "i")]).exit_code == 0
    r = run(main, ["index", "add", "--index", str(tmp_path / "i"), "--shards", str(b)])
    assert r.exit_code == 1 and "--fresh-ids" in r.output and "Traceback" not in r.output, r.output
    assert r.output.count("\n") == 1, r.output
    r = run(main, ["index", "add", "--index", str(tmp_path / "i"), "--shards", str(b), "--fresh-ids"])
    assert r.exit_code == 0 and "added 50 rows (0 already present) with id offset 50" in r.output, r.output
    r = run(main, ["index", "add", "--index", str(tmp_path / "i"), "--shards", str(b), "--fresh-ids"])
    assert r.exit_code == 0 and "already added" in r.output and "nothing changed (nb = 100)" in r.output, r.output
    r = run(main, ["index", "add", "--index", str(tmp_path / "i"), "--shards", str(b), "--id-offset", "9"])
    assert r.exit_code == 1 and "already added to this index with id offset 50" in r.output, r.output
    r = run(main, ["index", "add", "--index", str(tmp_path / "i"), "--shards", str(b), "--id-offset", "9",
                   "--fresh-ids"])  # fmt: skip
    assert r.exit_code == 2 and "not both" in r.output
    r = run(main, ["index", "info", "--index", str(tmp_path / "i")])
    assert r.exit_code == 0 and "id offset 50, ids 50..99" in r.output, r.output
