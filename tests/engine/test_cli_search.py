"""``facesearch search`` end to end on a real (tiny) model: probe images through detection, alignment and the
checkpoint, and query embeddings read from a Parquet file and from a shard directory; each checked against the
library's own answer for the same queries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.engine.search import SearchEngine
from facesearch.indexer import shards
from facesearch.indexer.embed import EmbedConfig
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.pipeline import run_embed

# Stored embeddings are float16 (relative rounding ~1e-3) and probes are embedded in another batch (another float32
# summation order): a gallery image queried as a probe or by its stored row scores 1 within this.
SELF_SCORE_ATOL = 3e-3


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, orl_dir: Path, yunet_path: Path, ckpt: Path) -> dict[str, Path]:
    """Two ORL people (20 images) embedded with the tiny checkpoint into shards, and their flat index."""
    from distributed import LocalCluster

    root = tmp_path_factory.mktemp("cli_search")
    for person in ("s1", "s2"):
        shutil.copytree(orl_dir / person, root / "images" / person)
    cfg = EmbedConfig(input=root / "images", checkpoint=ckpt, out=root / "shards", detector_pad=20, shard_rows=8,
                      detector_model=yunet_path, device="cpu")  # fmt: skip
    # an in-process cluster: no worker process to start (and to import torch in) for 20 images
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        assert run_embed(cfg.replace(scheduler=cluster.scheduler_address)).ok_rows >= 18, "YuNet finds ORL faces"
    build_index(root / "shards", root / "index", IndexConfig(kind="flat", recall_sample=0))
    return {"root": root, "images": root / "images", "shards": root / "shards", "index": root / "index"}


def _search(*args: object) -> list[dict]:
    res = CliRunner().invoke(main, ["search", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _ids(docs: list[dict]) -> list[list[int]]:
    return [[h["id"] for h in d["hits"]] for d in docs]


def _path_ids(gallery: dict[str, Path]) -> dict[str, int]:
    """Gallery path (as stored, relative to the input folder) -> id, for the rows embedded ok."""
    block = shards.read_all(gallery["shards"], columns=["path"])
    return dict(zip(block.meta.column("path").to_pylist(), block.ids.tolist(), strict=True))


def test_search_probe_images_with_the_checkpoint(gallery, ckpt, yunet_path, monkeypatch, tmp_path):
    monkeypatch.setenv("FACESEARCH_YUNET", str(yunet_path))
    ids = _path_ids(gallery)
    probes = tmp_path / "probes"
    probes.mkdir()
    names = ["s1/3.pgm", "s2/7.pgm"]
    assert all(name in ids for name in names), "YuNet should find both probes' faces in the gallery"
    for name in names:
        shutil.copy(gallery["images"] / name, probes / name.replace("/", "_"))
    docs = _search("--index", gallery["index"], "--probes", probes, "--checkpoint", ckpt, "--detector-pad", 20,
                   "-k", 5, "--device", "cpu")  # fmt: skip
    assert [Path(d["query"]).name for d in docs] == [n.replace("/", "_") for n in names]
    for doc, name in zip(docs, names, strict=True):
        top = doc["hits"][0]
        assert top["id"] == ids[name] and top["score"] == pytest.approx(1.0, abs=SELF_SCORE_ATOL), doc
        assert len(doc["hits"]) == 5 and doc["strategy"] == "none" and doc["exact"]
    # the library's answer for the same probes: the same hits in the same order
    engine = SearchEngine.open(gallery["index"], checkpoint=ckpt, device="cpu")
    xq, _, _ = engine.embed_images(sorted(probes.iterdir()), pad=20)
    assert _ids(docs) == [[h.id for h in r.hits] for r in engine.search(xq, k=5)]
    # one probe file (not a folder), grouped by identity: the probe's own person first
    (doc,) = _search("--index", gallery["index"], "--probes", probes / names[0].replace("/", "_"), "--checkpoint", ckpt,
                     "--detector-pad", 20, "-k", 2, "--group-by", "identity", "--device", "cpu")  # fmt: skip
    assert [h["identity"] for h in doc["hits"]] == [names[0].split("/")[0], "s2" if names[0].startswith("s1") else "s1"]


def test_search_embeddings_from_a_parquet_file(gallery, tmp_path):
    """A Parquet file with ``embedding`` and ``path`` columns (here: a shard's ok rows, as a user would extract them)
    queries like the same vectors given to the library; each row finds itself first."""
    table = pq.read_table(gallery["shards"] / shards.shard_name(0))
    table = table.filter(pc.equal(table.column("status"), "ok")).select(["path", "embedding", "id"])
    pq.write_table(table, tmp_path / "queries.parquet")
    docs = _search("--index", gallery["index"], "--embeddings", tmp_path / "queries.parquet", "-k", 4)
    assert [d["query"] for d in docs] == table.column("path").to_pylist()
    ids = table.column("id").to_pylist()
    for doc, own in zip(docs, ids, strict=True):
        assert doc["hits"][0]["id"] == own and doc["hits"][0]["score"] == pytest.approx(1.0, abs=SELF_SCORE_ATOL)
    xq = np.asarray(table.column("embedding").to_pylist(), np.float32)
    assert _ids(docs) == [[h.id for h in r.hits] for r in SearchEngine.open(gallery["index"]).search(xq, k=4)]


def test_search_embeddings_from_a_shard_directory(gallery, tmp_path):
    """A whole shard directory: every ok row of every shard is a query, named by its path, in id order."""
    block = shards.read_all(gallery["shards"], columns=["path"])
    assert len(shards.read_manifest(gallery["shards"]).shards) >= 2, "the fixture should span several shards"
    docs = _search("--index", gallery["index"], "--embeddings", gallery["shards"], "-k", 3)
    assert [d["query"] for d in docs] == block.meta.column("path").to_pylist()
    assert [d["hits"][0]["id"] for d in docs] == block.ids.tolist()
    assert _ids(docs) == [[h.id for h in r.hits] for r in SearchEngine.open(gallery["index"]).search(block.xb, k=3)]
    out = tmp_path / "hits.parquet"  # the same search written to a file: one row per hit
    res = CliRunner().invoke(main, ["search", "--index", str(gallery["index"]), "--embeddings", str(gallery["shards"]),
                                    "-k", "3", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0 and f"{len(block.ids)} queries, {3 * len(block.ids)} hits" in res.output, res.output
    hits = pq.read_table(out)
    assert hits.num_rows == 3 * len(block.ids) and hits.column("id").to_pylist() == [i for q in _ids(docs) for i in q]
    assert pa.types.is_floating(hits.schema.field("score").type)
