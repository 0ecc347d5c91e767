"""Damaged shards are refused before they are indexed: a changed byte, a shard rewritten behind the manifest's back,
a truncated or missing file (size / SHA-256 against the manifest, naming the file and both digests), and NaN / inf
embeddings (naming the shard and the row id); ``verify_shards`` reports every problem for a resumed embed job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index, load_index

D = 16


def write_dir(directory: Path, ids: np.ndarray, x: np.ndarray, shard_rows: int = 40, dtype: str = "float32") -> None:
    """A complete shard directory of rows ``ids`` / ``x`` (n, d), ``shard_rows`` rows per shard, no attributes."""
    entries = []
    for s, lo in enumerate(range(0, len(ids), shard_rows)):
        i, v = ids[lo : lo + shard_rows], x[lo : lo + shard_rows]
        n = len(i)
        table = shards.table_from_arrays(i, [f"img/{k}.jpg" for k in i], [None] * n, v, {}, None, None, ["ok"] * n,
                                         [None] * n, dtype=dtype)  # fmt: skip
        entries.append(shards.write_shard(directory / shards.shard_name(s), table))
    shards.write_manifest(directory, shards.Manifest("fp-int", x.shape[1], dtype, (), shards=tuple(entries),
                                                     planned_shards=len(entries), complete=True))  # fmt: skip


def gallery(directory: Path, n: int = 100, seed: int = 0, first_id: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_dir(directory, np.arange(first_id, first_id + n, dtype=np.int64), x)
    return x


def test_a_shard_rewritten_behind_the_manifest_is_refused_naming_both_digests(tmp_path: Path) -> None:
    # A valid Parquet file with one embedding changed: before, the index was built from it without a word.
    x = gallery(tmp_path / "s")
    path = tmp_path / "s" / "part-00001.parquet"
    table = pq.read_table(path)
    x2 = x[40:80].copy()
    x2[3] = -x2[3]
    n = 40
    ids = table.column("id").to_numpy()
    shards.write_shard(path, shards.table_from_arrays(ids, [f"img/{k}.jpg" for k in ids], [None] * n, x2, {}, None,
                                                      None, ["ok"] * n, [None] * n, dtype="float32"))  # fmt: skip
    recorded = shards.read_manifest(tmp_path / "s").entry("part-00001.parquet")
    assert recorded is not None and recorded.size == path.stat().st_size  # same size: only the digest tells
    actual = shards.file_sha256(path)
    with pytest.raises(ValueError) as e:
        build_index(tmp_path / "s", tmp_path / "idx", IndexConfig(recall_sample=0))
    msg = str(e.value)
    assert f"damaged shard {path}" in msg and actual[:16] in msg and recorded.sha256[:16] in msg and "\n" not in msg
    assert not (tmp_path / "idx" / "CURRENT").exists()


@pytest.mark.parametrize("where", [0.5, 0.9])
def test_one_changed_byte_is_refused_by_build_and_add(tmp_path: Path, where: float) -> None:
    gallery(tmp_path / "s")
    path = tmp_path / "s" / "part-00002.parquet"
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"damaged shard .*part-00002\.parquet: SHA-256 [0-9a-f]{16}… but the "):
        build_index(tmp_path / "s", tmp_path / "idx", IndexConfig(recall_sample=0))
    gallery(tmp_path / "good", seed=1, first_id=1000)
    build_index(tmp_path / "good", tmp_path / "idx2", IndexConfig(recall_sample=0))
    with pytest.raises(ValueError, match=r"part-00002\.parquet: SHA-256"):
        add_shards(tmp_path / "idx2", tmp_path / "s")
    assert load_index(tmp_path / "idx2").info.nb == 100  # unchanged


def test_truncated_and_missing_shards_are_refused_by_size(tmp_path: Path) -> None:
    gallery(tmp_path / "s")
    path = tmp_path / "s" / "part-00000.parquet"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(ValueError, match=rf"part-00000\.parquet: {size // 2} bytes but the manifest records {size}"):
        build_index(tmp_path / "s", tmp_path / "idx", IndexConfig(recall_sample=0))
    path.unlink()
    with pytest.raises(ValueError, match=r"part-00000\.parquet: missing \(the manifest lists it\)"):
        build_index(tmp_path / "s", tmp_path / "idx", IndexConfig(recall_sample=0))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nan_or_inf_embeddings_are_refused_naming_shard_and_row(tmp_path: Path, bad: float, dtype: str) -> None:
    # Written through write_shard, so the checksums match: only the values are wrong.  Before, FAISS took the NaN row
    # and every query returned k-1 hits (or NaN scores).
    x = np.random.default_rng(0).standard_normal((100, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[57, 3] = bad
    write_dir(tmp_path / "s", np.arange(100, dtype=np.int64), x, dtype=dtype)
    for kind in ("flat", "ivf-flat"):
        with pytest.raises(ValueError, match=r"part-00001\.parquet: the embedding of row id 57 has NaN or infinite"):
            build_index(tmp_path / "s", tmp_path / f"idx-{kind}", IndexConfig(kind=kind, nlist=4, recall_sample=0))
    gallery(tmp_path / "good", seed=1, first_id=1000)
    build_index(tmp_path / "good", tmp_path / "idx", IndexConfig(recall_sample=0))
    with pytest.raises(ValueError, match=r"row id 57 has NaN or infinite"):
        add_shards(tmp_path / "idx", tmp_path / "s")


def test_verify_shards_lists_every_problem(tmp_path: Path) -> None:
    gallery(tmp_path / "s", n=160)  # 4 shards
    assert shards.verify_shards(tmp_path / "s") == []
    d = tmp_path / "s"
    (d / "part-00000.parquet").unlink()
    raw = bytearray((d / "part-00002.parquet").read_bytes())
    raw[100] ^= 0xFF
    (d / "part-00002.parquet").write_bytes(bytes(raw))
    (d / "part-00003.parquet").write_bytes(b"short")
    problems = shards.verify_shards(d)
    assert [p.file for p in problems] == ["part-00000.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert "missing" in problems[0].reason and "SHA-256" in problems[1].reason and "5 bytes" in problems[2].reason
    assert str(problems[1]).startswith(f"damaged shard {d / 'part-00002.parquet'}: SHA-256")
    only = shards.verify_shards(d, files=["part-00001.parquet", "part-00002.parquet", "part-00009.parquet"])
    assert [p.file for p in only] == ["part-00002.parquet", "part-00009.parquet"]
    assert only[1].reason == "not in the manifest"
    assert not shards.verify_shard(d, shards.read_manifest(d).shards[2])


def test_manifests_without_sizes_are_still_checked_by_digest(tmp_path: Path) -> None:
    gallery(tmp_path / "s")
    path = shards.manifest_path(tmp_path / "s")
    assert path is not None
    data = json.loads(path.read_text())
    assert all("size" in e for e in data["shards"])
    for e in data["shards"]:
        del e["size"]  # a manifest written before sizes were recorded
    path.write_text(json.dumps(data))
    assert shards.read_manifest(tmp_path / "s").shards[0].size is None
    assert shards.verify_shards(tmp_path / "s") == []
    build_index(tmp_path / "s", tmp_path / "idx", IndexConfig(recall_sample=0))
    shard = tmp_path / "s" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes() + b"\0")
    assert "SHA-256" in shards.verify_shards(tmp_path / "s")[0].reason
