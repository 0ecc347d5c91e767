"""Hostile input at the command line: every mistake a user can make with ``search``, ``index``, ``bench megaface`` /
``bench plot`` / ``bench export-bins`` and ``synth`` ends in one ``Error:`` line naming the bad input, with exit
status 2 (a usage error: click prints its usage header first) or 1 (an error found while working), and never a
traceback.  A few cases run the real console entry point in a subprocess, so nothing reaches stderr but the line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facesearch.cli import main
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features

D = 16  # the fixture gallery's embedding dimension
NB = 60  # its rows (ids 0..59)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny shard directory and its flat index, plus one bad input file of every kind the tests feed."""
    root = tmp_path_factory.mktemp("cli_errors")
    write_synth_features(SynthFeaturesConfig(out=root / "shards", rows=NB, dim=D, identities=6, dtype="float32"))
    write_synth_features(SynthFeaturesConfig(out=root / "shards8", rows=10, dim=8, identities=2, dtype="float32"))
    write_synth_features(SynthFeaturesConfig(out=root / "probes", rows=NB, dim=D, identities=6, dtype="float32",
                                             probes_per_identity=2))  # fmt: skip
    write_synth_features(SynthFeaturesConfig(out=root / "distractors", rows=NB, dim=D, identities=NB, dtype="float32",
                                             identity_prefix="mega"))  # fmt: skip
    build_index(root / "shards", root / "index", IndexConfig(kind="flat", recall_sample=0))
    files: dict[str, Path] = {"root": root, "shards": root / "shards", "shards8": root / "shards8"}
    files["probes"], files["distractors"] = root / "probes", root / "distractors"
    files["index"] = root / "index"

    def put(name: str, data: bytes | str) -> None:
        files[name] = root / name
        if isinstance(data, bytes):
            files[name].write_bytes(data)
        else:
            files[name].write_text(data)

    def npy(name: str, x: np.ndarray) -> None:
        files[name] = root / name
        np.save(files[name], x, allow_pickle=True)

    npy("empty.npy", np.zeros((0, D), np.float32))
    npy("wrong_dim.npy", np.ones((3, D // 2), np.float32))
    npy("one_d.npy", np.ones(D, np.float32))
    npy("three_d.npy", np.ones((2, 2, D), np.float32))
    npy("strings.npy", np.array([["a"] * D]))
    npy("objects.npy", np.array([[object()] * D], dtype=object))
    npy("complex.npy", np.ones((2, D), np.complex64))
    npy("nan.npy", np.full((2, D), np.nan, np.float32))
    npy("zeros.npy", np.zeros((2, D), np.float32))
    put("corrupt.npy", b"\x93NUMPY garbage that is not an array header")
    put("text.npy", "hello\n")
    good = root / "good.npy"
    np.save(good, np.ones((4, D), np.float32))
    put("truncated.npy", good.read_bytes()[:-20])
    files["noemb.parquet"] = root / "noemb.parquet"
    pq.write_table(pa.table({"path": ["a", "b"], "x": [1.0, 2.0]}), files["noemb.parquet"])
    files["scalar.parquet"] = root / "scalar.parquet"
    pq.write_table(pa.table({"embedding": [1.0, 2.0]}), files["scalar.parquet"])
    files["strings.parquet"] = root / "strings.parquet"
    pq.write_table(pa.table({"embedding": [["a"] * D, ["b"] * D]}), files["strings.parquet"])
    files["empty.parquet"] = root / "empty.parquet"
    pq.write_table(pa.table({"embedding": pa.array([], pa.list_(pa.float32()))}), files["empty.parquet"])
    files["ragged.parquet"] = root / "ragged.parquet"
    pq.write_table(pa.table({"embedding": [[1.0] * D, [1.0] * 3]}), files["ragged.parquet"])
    put("corrupt.parquet", b"PAR1 this is not parquet PAR1")
    put("queries.txt", "1 2 3\n")
    files["not_shards"] = root / "not_shards"
    files["not_shards"].mkdir()
    (files["not_shards"] / "readme.txt").write_text("no manifest here\n")
    files["no_images"] = root / "no_images"
    files["no_images"].mkdir()
    (files["no_images"] / "notes.txt").write_text("no image here\n")
    put("not_image.txt", "not an image\n")
    put("fake.jpg", "not a jpeg\n")
    put("not_json.json", "{ this is not json")
    put("binary.json", b"\xff\xfe\x00garbage")
    put("list.json", "[1, 2, 3]\n")
    put("other_kind.json", json.dumps({"kind": "something.else", "roc": {}}))
    put("no_roc.json", json.dumps({"kind": "facesearch.megaface_result"}))
    put("bad_roc.json", json.dumps({"kind": "facesearch.megaface_result", "roc": {"far": [1e-3], "threshold": "x"}}))
    put("roc.json", json.dumps({"kind": "facesearch.megaface_result",
                                "roc": {"far": [1e-3, 1e-2], "threshold": [0.5, 0.4]}}))  # fmt: skip
    put("ids_garbage.txt", "1\n2\nthree\n")
    put("ids_binary.txt", b"\xff\xfe\x00\x01")
    put("ids_empty.txt", "\n\n")
    put("ids_float.txt", "1.5\n")
    put("a_file", "plain file\n")
    run = CliRunner().invoke(main, ["bench", "megaface", "--out", str(root / "mf"), "--probes", str(files["probes"]),
                                    "--distractors", str(files["distractors"]), "--sizes", "10"])  # fmt: skip
    assert run.exit_code == 0, run.output  # the inputs themselves are good: each case spoils one thing
    files["result"] = next((root / "mf").glob("result_*.json"))
    return files


def _fails(args: list[str], status: int, *names: str) -> str:
    """Run the CLI; it must exit with ``status`` after one ``Error:`` line (a usage error first prints click's usage
    header) that names each of ``names``, and with no traceback or uncaught exception."""
    result = CliRunner().invoke(main, args)
    out = result.output
    assert result.exit_code == status, (result.exit_code, out, result.exception)
    assert isinstance(result.exception, SystemExit), (result.exception, out)
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), out
    assert sum(line.startswith("Error: ") for line in lines) == 1, out
    if status == 1:
        assert len(lines) == 1, out
    else:  # click's usage header, its pointer to --help, the error
        assert len(lines) == 3 and lines[0].startswith("Usage: "), out
    for name in names:
        assert name in lines[-1], (name, out)
    return lines[-1]


def _search(fx: dict[str, Path], *args: str | Path) -> list[str]:
    return ["search", "--index", str(fx["index"]), *map(str, args)]


# -- search: queries by id ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ids", "status", "names"),
    [("12345", 1, ("12345",)), ("-1", 1, ("-1",)), ("3,999", 1, ("999",)), ("abc", 2, ("abc",)),
     ("", 2, ("--ids",)), (",", 2, ("--ids",)), ("1,,2", 2, ("1,,2",)), ("1.5", 2, ("1.5",)),
     ("99999999999999999999999", 1, ("99999999999999999999999",))],
)  # fmt: skip
def test_search_bad_ids(fx, ids, status, names):
    _fails(_search(fx, "--ids", ids), status, *names)


# -- search: thresholds --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "status", "names"),
    [("missing.json", 2, ("missing.json",)), ("not_json.json", 1, ("not_json.json",)),
     ("binary.json", 1, ("binary.json",)), ("list.json", 1, ("list.json",)),
     ("other_kind.json", 1, ("other_kind.json",)), ("no_roc.json", 1, ("no_roc.json",)),
     ("bad_roc.json", 1, ("bad_roc.json",)), ("roc.json", 1, ("roc.json", "1e-06"))],
)  # fmt: skip
def test_search_bad_threshold_from(fx, name, status, names):
    _fails(_search(fx, "--ids", "1", "--threshold-from", fx["root"] / name), status, *names)


def test_search_threshold_from_and_threshold(fx):
    _fails(_search(fx, "--ids", "1", "--threshold-from", fx["roc.json"], "--far", "1e-3", "--threshold", "0.3"), 2,
           "--threshold")  # fmt: skip
    _fails(_search(fx, "--ids", "1", "--threshold", "nan"), 2, "--threshold", "nan")


# -- search: k -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", ["0", "-1", "x", "1e3"])
def test_search_bad_k(fx, k):
    _fails(_search(fx, "--ids", "1", "-k", k), 2, "-k", k)


@pytest.mark.parametrize("extra", [[], ["--group-by", "identity"], ["--filter", "Male"], ["--soft-weight", "0.5"]])
def test_search_k_above_the_gallery_returns_the_gallery(fx, extra):
    """A k larger than the gallery is no mistake: every item (or identity) comes back, ranked."""
    result = CliRunner().invoke(main, _search(fx, "--ids", "1", "-k", "1000000000000", "--json", *extra))
    assert result.exit_code == 0, (result.output, result.exception)
    hits = json.loads(result.output)[0]["hits"]
    assert 0 < len(hits) <= NB


# -- search: embeddings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "names"),
    [("empty.npy", ("empty.npy", "no")), ("wrong_dim.npy", ("wrong_dim.npy", "8", "16")),
     ("one_d.npy", ("one_d.npy",)), ("three_d.npy", ("three_d.npy",)), ("strings.npy", ("strings.npy",)),
     ("objects.npy", ("objects.npy",)), ("complex.npy", ("complex.npy",)), ("nan.npy", ("nan.npy", "row 0")),
     ("zeros.npy", ("zeros.npy", "row 0")), ("corrupt.npy", ("corrupt.npy",)), ("text.npy", ("text.npy",)),
     ("truncated.npy", ("truncated.npy",)), ("noemb.parquet", ("noemb.parquet", "embedding")),
     ("scalar.parquet", ("scalar.parquet", "embedding")), ("strings.parquet", ("strings.parquet",)),
     ("empty.parquet", ("empty.parquet", "no")), ("ragged.parquet", ("ragged.parquet",)),
     ("corrupt.parquet", ("corrupt.parquet",)), ("queries.txt", ("queries.txt", ".npy")),
     ("not_shards", ("not_shards",)), ("shards8", ("shards8", "8", "16"))],
)  # fmt: skip
def test_search_bad_embeddings(fx, name, names):
    _fails(_search(fx, "--embeddings", fx["root"] / name), 1, *names)


def test_search_embeddings_missing(fx):
    _fails(_search(fx, "--embeddings", fx["root"] / "nowhere.npy"), 2, "nowhere.npy")


# -- search: probe images ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "status", "names"),
    [("nowhere", 2, ("nowhere",)), ("no_images", 1, ("no_images",)), ("not_image.txt", 1, ("not_image.txt",))],
)
def test_search_bad_probes(fx, ckpt, name, status, names):
    """Probe files are listed before the index and the model are loaded (the checkpoint is not the index's model)."""
    _fails(_search(fx, "--probes", fx["root"] / name, "--checkpoint", ckpt), status, *names)


def test_search_probes_need_a_checkpoint(fx):
    _fails(_search(fx, "--probes", fx["root"] / "fake.jpg"), 2, "--checkpoint")


def test_search_checkpoint_of_another_model(fx, ckpt):
    _fails(_search(fx, "--probes", fx["root"] / "fake.jpg", "--checkpoint", ckpt), 1, str(ckpt), str(fx["index"]))


# -- search: filters, options, output ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "names"),
    [("Male >", ("Male >",)), ("Nosy > 0.5", ("Nosy",)), ("(Male", ("(Male",)), ("", ("filter", "''")),
     ("Male > 'x'", ("Male",)), ("identity", ("identity",))],
)  # fmt: skip
def test_search_bad_filter(fx, expr, names):
    _fails(_search(fx, "--ids", "1", "--filter", expr), 1, *names)


@pytest.mark.parametrize(
    ("args", "names"),
    [(["--soft-weight", "2"], ("--soft-weight", "2")), (["--soft-weight", "nan"], ("--soft-weight",)),
     (["--strategy", "magic"], ("magic",)), (["--group-by", "age"], ("age",)), (["--agg", "median"], ("median",)),
     (["--screen", "int4"], ("int4",)), (["--exclude-self"], ("--exclude-self",)),
     (["--detector-pad", "-3"], ("--detector-pad",)), (["--far", "2"], ("--far",)), (["--far", "nan"], ("--far",)),
     (["--threshold", "inf"], ("--threshold",))],
)  # fmt: skip
def test_search_bad_options(fx, args, names):
    query = ["--embeddings", str(fx["nan.npy"])] if args[0] == "--exclude-self" else ["--ids", "1"]
    _fails(_search(fx, *query, *args), 2, *names)


def test_search_bad_device(fx):
    _fails(_search(fx, "--ids", "1", "--device", "tpu"), 1, "tpu")


def test_search_threshold_from_a_real_result(fx):
    """The control: a real result file at a FAR it holds gives a threshold (each refused case spoils one thing)."""
    far = next(f for f, t in zip(*(json.loads(fx["result"].read_text())["roc"][k] for k in ("far", "threshold")),
                                 strict=True) if t is not None)  # fmt: skip
    result = CliRunner().invoke(main, _search(fx, "--ids", "1", "--threshold-from", fx["result"], "--far", str(far)))
    assert result.exit_code == 0, result.output
    _fails(_search(fx, "--ids", "1", "--threshold-from", fx["result"], "--far", "0.123"), 1, "result", "0.123")


def test_search_more_bad_inputs(fx):
    _fails(_search(fx, "--ids", "1", "--filter", "(" * 5000 + "Male" + ")" * 5000), 1, "nested too deeply")
    _fails(_search(fx, "--ids", "1", "--checkpoint", fx["a_file"]), 1, "a_file")
    _fails(_search(fx, "--embeddings", fx["index"]), 1, "index")
    _fails(_search(fx, "--embeddings", fx["root"] / "good.npy", "--filter", "Nosy"), 1, "Nosy")


@pytest.mark.parametrize("damage", ["info", "pointer", "faiss", "attributes", "generation"])
def test_search_damaged_index(fx, tmp_path, damage):
    """A damaged index directory is one line naming the file (the library checks sizes and checksums)."""
    index = tmp_path / "index"
    shutil.copytree(fx["index"], index)
    gen = next(index.glob("gen-*"))
    target = {"info": gen / "index_info.json", "pointer": index / "CURRENT", "faiss": gen / "index.faiss",
              "attributes": gen / "attributes.parquet", "generation": gen}[damage]  # fmt: skip
    if damage == "generation":
        shutil.rmtree(target)
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    for args in (["search", "--index", str(index), "--ids", "1"], ["index", "info", "--index", str(index)],
                 ["index", "remove", "--index", str(index), "--id", "1"]):  # fmt: skip
        _fails(args, 1, target.name)


def test_search_query_sources(fx):
    _fails(_search(fx), 2, "--probes", "--embeddings", "--ids")
    _fails(_search(fx, "--ids", "1", "--embeddings", fx["nan.npy"]), 2, "--ids")
    _fails(["search", "--index", str(fx["root"] / "nowhere"), "--ids", "1"], 2, "nowhere")
    _fails(["search", "--index", str(fx["shards"]), "--ids", "1"], 1, "shards")


@pytest.mark.parametrize(
    ("out", "status", "names"),
    [("hits.csv", 2, ("hits.csv", ".parquet", ".json")), ("hits", 2, ("hits",)),
     ("a_file/hits.json", 2, ("a_file",)), ("a_file/deeper/hits.json", 2, ("a_file",)),
     ("shards", 2, ("shards",))],
)  # fmt: skip
def test_search_bad_out(fx, out, status, names):
    _fails(_search(fx, "--ids", "1", "--out", fx["root"] / out), status, *names)


def test_search_out_creates_missing_folders(fx, tmp_path):
    out = tmp_path / "new" / "sub" / "hits.json"
    result = CliRunner().invoke(main, _search(fx, "--ids", "1", "-k", "3", "--out", out))
    assert result.exit_code == 0 and len(json.loads(out.read_text())[0]["hits"]) == 3, result.output


def test_search_out_unwritable(fx, tmp_path, monkeypatch):
    """Refused before searching; as root (who writes anywhere) the permission check itself is simulated."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:
        import facesearch.cli.search as search_cli

        monkeypatch.setattr(search_cli.os, "access", lambda path, mode: Path(path) != locked)
    try:
        _fails(_search(fx, "--ids", "1", "--out", locked / "sub" / "hits.json"), 2, "locked", "not writable")
    finally:
        locked.chmod(0o700)


def test_out_of_memory_is_one_line(fx, tmp_path, monkeypatch):
    """Sizes beyond the machine (a huge --dim) end in one line with numpy's own account of the request."""
    import facesearch.cli.index as index_cli

    def huge(cfg):
        raise MemoryError("Unable to allocate 37.3 GiB for an array with shape (10, 1000000000) and data type float32")

    monkeypatch.setattr(index_cli, "write_synth_features", huge)
    _fails(["synth", "features", "--out", str(tmp_path / "f"), "--dim", "1000000000"], 1, "out of memory", "37.3 GiB")


def test_search_out_write_failure_is_one_line(fx, monkeypatch):
    """An I/O error while writing (disk full, a directory removed meanwhile) is one line naming the file."""
    import facesearch.cli.search as search_cli

    def full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path) + ".tmp")

    monkeypatch.setattr(search_cli, "atomic_write_text", full)
    _fails(_search(fx, "--ids", "1", "--out", fx["root"] / "full.json"), 1, "full.json", "No space left")


# -- index, bench, synth: one case per row; {name} is a fixture file (see fx), {tmp} a fresh folder per case ----------
INDEX_CASES = [
    ("index build --shards {root}/nowhere --out {tmp}/new", 2, ("nowhere",)),
    ("index build --shards {not_shards} --out {tmp}/new", 1, ("not_shards",)),
    ("index build --shards {a_file} --out {tmp}/new", 2, ("a_file",)),
    ("index build --shards {shards} --out {a_file}", 2, ("a_file",)),
    ("index build --shards {shards} --out {a_file}/x", 1, ("a_file",)),
    ("index build --shards {shards} --out {index}", 1, ("index",)),
    ("index build --shards {shards} --out {tmp}/new --kind lsh", 2, ("lsh",)),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-flat --nlist 0", 2, ("--nlist", "0")),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-flat --nlist -4", 2, ("--nlist", "-4")),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-flat --nlist many", 2, ("--nlist", "many")),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-flat --nlist 1000", 1, ("1000",)),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-flat --nlist 1000000000000", 2, ("--nlist",)),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-flat --nprobe 0", 2, ("--nprobe", "0")),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-flat --nprobe 1000000000000", 2, ("--nprobe",)),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-pq --m 0", 2, ("--m", "0")),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-pq --m 5", 1, ("5", "16")),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-pq --nbits 0", 2, ("--nbits", "0")),
    ("index build --shards {shards} --out {tmp}/new --kind ivf-pq --nbits 99", 2, ("--nbits", "99")),
    ("index build --shards {shards} --out {tmp}/new --kind hnsw --hnsw-m 0", 2, ("--hnsw-m", "0")),
    ("index build --shards {shards} --out {tmp}/new --kind hnsw --hnsw-m 1000000000000", 2, ("--hnsw-m",)),
    ("index build --shards {shards} --out {tmp}/new --kind hnsw --ef-construction 0", 2, ("--ef-construction", "0")),
    ("index build --shards {shards} --out {tmp}/new --kind hnsw --ef-search 0", 2, ("--ef-search", "0")),
    ("index build --shards {shards} --out {tmp}/new --kind hnsw --ef-search 1000000000000", 2, ("--ef-search",)),
    ("index build --shards {shards} --out {tmp}/new --train-size 0", 1, ("train_size", "0")),
    ("index build --shards {shards} --out {tmp}/new --block-rows 0", 1, ("block_rows", "0")),
    ("index build --shards {shards} --out {tmp}/new --recall-sample -1", 1, ("recall_sample", "-1")),
    ("index build --shards {shards} --out {tmp}/new --id-offset -5", 1, ("offset", "-5")),
    ("index build --shards {shards} --out {tmp}/new --id-offset 99999999999999999999", 1, ("offset",)),
    ("index add --index {root}/nowhere --shards {shards}", 2, ("nowhere",)),
    ("index add --index {shards} --shards {shards}", 1, ("shards",)),
    ("index add --index {index} --shards {not_shards}", 1, ("not_shards",)),
    ("index add --index {index} --shards {shards8}", 1, ("8", "16")),
    ("index add --index {index} --shards {shards} --id-offset -1", 1, ("-1",)),
    ("index add --index {index} --shards {shards} --id-offset 3 --fresh-ids", 2, ("--fresh-ids",)),
    ("index remove --index {index} --id 12345", 1, ("12345",)),
    ("index remove --index {index} --id -1 --id 12345", 1, ("-1", "12345")),
    ("index remove --index {index} --id x", 2, ("x",)),
    ("index remove --index {index} --id 99999999999999999999", 2, ("99999999999999999999",)),
    ("index remove --index {index}", 2, ("--id",)),
    ("index remove --index {index} --ids-file {ids_garbage.txt}", 2, ("ids_garbage.txt", "three", "line 3")),
    ("index remove --index {index} --ids-file {ids_binary.txt}", 2, ("ids_binary.txt",)),
    ("index remove --index {index} --ids-file {ids_empty.txt}", 2, ("ids_empty.txt",)),
    ("index remove --index {index} --ids-file {ids_float.txt}", 2, ("ids_float.txt", "1.5")),
    ("index remove --index {index} --ids-file {root}/nowhere", 2, ("nowhere",)),
    ("index remove --index {index} --ids-file {shards}", 2, ("shards",)),
    ("index remove --index {shards} --id 1", 1, ("shards",)),
    ("index info --index {shards}", 1, ("shards",)),
    ("index info --index {a_file}", 2, ("a_file",)),
    ("index info --index {root}/nowhere", 2, ("nowhere",)),
    ("index remove --index {index} --ids-file {shards}", 2, ("shards",)),
    ("index add --index {index} --shards {shards} --id-offset 99999999999999999999", 1, ("99999999999999999999",)),
    ("index add --index {index} --shards {probes} --shard-ids-file {queries.txt}", 1, ("probes", "1, 2, 3")),
    ("index add --index {index} --shards {shards} --shard-ids-file {ids_garbage.txt}", 2, ("ids_garbage.txt", "3")),
    ("index add --index {index} --shards {shards} --shard-ids-file {ids_empty.txt}", 2, ("--shard-ids-file",)),
    ("index add --index {index} --shards {shards} --shard-ids-file {ids_binary.txt}", 2, ("ids_binary.txt",)),
    ("index add --index {index} --shards {shards} --shard-ids-file {root}/nowhere", 2, ("nowhere",)),
    ("index add --index {index} --shards {shards} --shard-ids-file {shards}", 2, ("--shard-ids-file",)),
]
_MF = "bench megaface --out {tmp}/mf"
BENCH_CASES = [
    (_MF + " --probes {root}/nowhere --distractors {shards}", 2, ("nowhere",)),
    (_MF + " --probes {probes} --distractors {root}/nowhere", 2, ("nowhere",)),
    (_MF + " --probes {not_shards} --distractors {shards}", 1, ("not_shards",)),
    (_MF + " --probes {shards} --distractors {not_shards}", 1, ("not_shards",)),
    (_MF + " --probes {probes} --distractors {shards8}", 1, ("8", "16")),
    (_MF + " --probes {probes} --distractor-root {distractors} --distractor-lists {root}/nowhere", 2, ("nowhere",)),
    (_MF + " --probes {probes} --distractor-root {distractors} --distractor-lists {no_images}", 1, ("no_images",)),
    (_MF + " --probe-root {no_images} --probe-list {root}/nolist.json --distractors {shards}", 2, ("nolist.json",)),
    (_MF + " --probe-root {no_images} --probe-list {list.json} --distractors {shards}", 1, ("list.json",)),
    (_MF + " --probe-root {no_images} --probe-list {not_json.json} --distractors {shards}", 1, ("not_json.json",)),
    (_MF + " --probe-root {root}/nowhere --probe-list {list.json} --distractors {shards}", 2, ("nowhere",)),
    (_MF + " --probes {probes} --distractors {distractors} --probe-list {list.json}", 1, ("list.json",)),
    (_MF + " --distractors {shards}", 1, ("probe",)),
    (_MF + " --probes {shards}", 1, ("distractor",)),
    (_MF + " --probes {probes} --distractors {distractors} --sizes ten", 2, ("--sizes", "ten")),
    (_MF + " --probes {probes} --distractors {distractors} --sizes 10,,20", 2, ("--sizes", "10,,20")),
    (_MF + " --probes {probes} --distractors {distractors} --sizes 0", 2, ("--sizes", "0")),
    (_MF + " --probes {probes} --distractors {distractors} --sizes -5", 2, ("--sizes", "-5")),
    (_MF + " --probes {probes} --distractors {distractors} --sizes 1e3", 2, ("--sizes", "1e3")),
    (_MF + " --probes {probes} --distractors {distractors} --far-max 0", 2, ("--far-max", "0")),
    (_MF + " --probes {probes} --distractors {distractors} --far-max -1", 2, ("--far-max", "-1")),
    (_MF + " --probes {probes} --distractors {distractors} --far-max 2", 2, ("--far-max", "2")),
    (_MF + " --probes {probes} --distractors {distractors} --far-max nan", 2, ("--far-max", "nan")),
    (_MF + " --probes {probes} --distractors {distractors} --far-max inf", 2, ("--far-max", "inf")),
    (_MF + " --probes {probes} --distractors {distractors} --far-max x", 2, ("--far-max", "x")),
    (_MF + " --probes {probes} --distractors {distractors} --filter-threshold 2", 2, ("--filter-threshold", "2")),
    (_MF + " --probes {probes} --distractors {distractors} --filter-threshold nan", 2, ("--filter-threshold", "nan")),
    (_MF + " --probes {probes} --distractors {distractors} --filter Nosy", 1, ("Nosy", "--filter")),
    (_MF + " --probes {probes} --distractors {distractors} --filter Male,Nosy", 1, ("Nosy", "--filter")),
    (_MF + " --probes {probes} --distractors {distractors} --filter ,", 2, ("--filter",)),
    (_MF + " --probes {probes} --distractors {distractors} --set -1", 2, ("--set", "-1")),
    (_MF + " --probes {probes} --distractors {distractors} --tie-rule coin", 2, ("coin",)),
    (_MF + " --probes {probes} --distractors {distractors} --seed -1", 2, ("--seed", "-1")),
    (_MF + " --probes {probes} --distractors {distractors} --file-ending /x.bin", 2, ("--file-ending", "/x.bin")),
    (_MF + " --probes {probes} --distractors {distractors} --file-ending .bin", 2, ("--file-ending", ".bin")),
    (_MF + " --probes {probes} --distractors {distractors} --algorithm a/b", 2, ("--algorithm", "a/b")),
    (_MF + " --probes {probes} --distractors {distractors} --sizes 1000", 1, ("1,000", "distractors")),
    (_MF + " --probes {probes} --distractors {distractors} --probe-name a_b", 1, ("a_b",)),
    (_MF + " --probes {probes} --distractors {distractors} --cleaned --probe-noise {root}/no.txt", 2, ("no.txt",)),
    ("bench megaface --out {a_file} --probes {probes} --distractors {distractors}", 2, ("a_file",)),
    ("bench megaface --out {a_file}/mf --probes {probes} --distractors {distractors}", 1, ("a_file",)),
    ("bench plot {root}/nowhere.json --out {tmp}/plots", 2, ("nowhere.json",)),
    ("bench plot {not_json.json} --out {tmp}/plots", 1, ("not_json.json",)),
    ("bench plot {binary.json} --out {tmp}/plots", 1, ("binary.json",)),
    ("bench plot {list.json} --out {tmp}/plots", 1, ("list.json",)),
    ("bench plot {other_kind.json} --out {tmp}/plots", 1, ("other_kind.json",)),
    ("bench plot {no_roc.json} --out {tmp}/plots", 1, ("no_roc.json",)),
    ("bench plot {roc.json} --out {tmp}/plots", 1, ("roc.json",)),
    ("bench plot {shards} --out {tmp}/plots", 2, ("shards",)),
    ("bench plot --out {tmp}/plots", 2, ("RESULTS",)),
    ("bench plot {result} --out {a_file}", 2, ("a_file",)),
    ("bench plot {result} --out {tmp}/plots --stem a/b", 2, ("--stem", "a/b")),
    ("bench plot {result} --out {tmp}/plots --stem ..", 2, ("--stem", "..")),
    ("bench export-bins --shards {root}/nowhere --out {tmp}/bins", 2, ("nowhere",)),
    ("bench export-bins --shards {not_shards} --out {tmp}/bins", 1, ("not_shards",)),
    ("bench export-bins --shards {shards} --out {a_file}", 2, ("a_file",)),
    ("bench export-bins --shards {shards} --out {a_file}/bins", 1, ("a_file",)),
    ("bench export-bins --shards {shards} --out {tmp}/bins --file-ending /x", 2, ("--file-ending", "/x")),
    ("bench export-bins --shards {shards} --out {tmp}/bins --file-ending _.bin", 2, ("--file-ending", "_.bin")),
]
_SF = "synth features --out {tmp}/f --rows 20 --dim 4 --identities 2"
SYNTH_CASES = [
    (_SF + " --rows 0", 1, ("rows", "0")),
    (_SF + " --dim 0", 1, ("dim", "0")),
    (_SF + " --rows -3", 1, ("rows", "-3")),
    (_SF + " --identities 0", 1, ("identities", "0")),
    (_SF + " --shard-rows 0", 1, ("shard_rows", "0")),
    (_SF + " --spread -1", 1, ("spread", "-1")),
    (_SF + " --spread nan", 2, ("--spread", "nan")),
    (_SF + " --spread inf", 2, ("--spread", "inf")),
    (_SF + " --probes-per-identity -1", 1, ("probes_per_identity", "-1")),
    (_SF + " --probe-identities 0", 1, ("probe_identities", "0")),
    (_SF + " --dtype int8", 2, ("int8",)),
    (_SF + " --rows many", 2, ("--rows", "many")),
    (_SF + " --seed -1", 2, ("--seed", "-1")),
    ("synth features --out {a_file} --rows 5 --dim 4", 2, ("a_file",)),
    ("synth features --out {a_file}/f --rows 5 --dim 4", 1, ("a_file",)),
    ("synth features --out {shards} --rows 5 --dim 4", 1, ("shards",)),
    ("synth faces --out {a_file}", 2, ("a_file",)),
    ("synth faces --out {a_file}/f --workers 1", 1, ("a_file",)),
    ("synth faces --out {tmp}/faces --identities 1", 1, ("identities", "1")),
    ("synth faces --out {tmp}/faces --size 0", 1, ("size", "0")),
    ("synth faces --out {tmp}/faces --layouts bogus", 1, ("bogus",)),
    ("synth faces --out {tmp}/faces --workers 0", 1, ("workers", "0")),
    ("synth faces --out {tmp}/faces --workers 1000000000000", 2, ("--workers", "1000000000000")),
    ("synth faces --out {tmp}/faces --seed -1", 1, ("seed", "-1")),
    ("synth faces --out {tmp}/faces --layouts ,", 1, ("layouts",)),
    ("synth faces --out {tmp}/faces --nuisance -1", 1, ("nuisance", "-1")),
    ("synth faces --out {tmp}/faces --nuisance nan", 1, ("nuisance", "nan")),
    ("synth faces --out {tmp}/faces --seed x", 2, ("--seed", "x")),
]


@pytest.mark.parametrize(("line", "status", "names"), INDEX_CASES + BENCH_CASES + SYNTH_CASES)
def test_bad_input(fx, tmp_path, line, status, names):
    paths = {**{k: str(v) for k, v in fx.items()}, "tmp": str(tmp_path)}
    args = [re.sub(r"\{([^}]+)\}", lambda m: paths[m.group(1)], a) for a in line.split()]
    _fails(args, status, *names)
    if (tmp_path / "new").exists():  # a refused build left no index behind (its lock file may stay)
        assert {p.name for p in (tmp_path / "new").iterdir()} <= {".lock"}


def test_remove_names_unknown_ids_and_missing_ok(fx, tmp_path):
    """The refused removals above left the index as it was; ids it does not hold are named when others are
    removed, and ``--missing-ok`` turns "none of them is here" (a removal run again) into a no-op."""
    info = CliRunner().invoke(main, ["index", "info", "--index", str(fx["index"]), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["nb"] == NB, info.output
    index = tmp_path / "index"
    shutil.copytree(fx["index"], index)
    remove = ["index", "remove", "--index", str(index), "--id", "3", "--id", "12345"]
    result = CliRunner().invoke(main, remove)
    assert result.exit_code == 0 and "removed 1 of 2 ids (1 not in the index: 12345)" in result.output, result.output
    _fails(remove, 1, "3", "12345", "--missing-ok")
    result = CliRunner().invoke(main, [*remove, "--missing-ok"])
    assert result.exit_code == 0, result.output
    assert f"removed 0 of 2 ids (2 not in the index: 3, 12345); nb = {NB - 1}" in result.output


# -- the real entry point ------------------------------------------------------------------------------------------
def _console() -> list[str]:
    """The installed ``facesearch`` script beside this interpreter, else the same entry point through ``-c``."""
    script = Path(sys.executable).with_name("facesearch")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from facesearch.cli import main; main()"]


@pytest.mark.slow  # a real process per case (~4 s each: the interpreter and torch start)
@pytest.mark.parametrize(
    ("line", "status", "name"),
    [("search --index {index} --ids 12345", 1, "12345"),
     ("search --index {index} --embeddings {corrupt.npy}", 1, "corrupt.npy"),
     ("search --index {index} --ids 1 --threshold-from {list.json}", 1, "list.json"),
     ("search --index {index} --ids 1 -k 0", 2, "-k"),
     ("index remove --index {index} --ids-file {ids_garbage.txt}", 2, "three"),
     ("bench plot {binary.json} --out {root}/plots", 1, "binary.json")],
)  # fmt: skip
def test_console_entry_point_prints_one_line(fx, line, status, name):
    """Through a real process: stdout is empty and stderr holds only the error (after click's usage header for a
    usage error), so nothing else (a traceback, a warning) reaches the terminal."""
    paths = {k: str(v) for k, v in fx.items()}
    args = [re.sub(r"\{([^}]+)\}", lambda m: paths[m.group(1)], a) for a in line.split()]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([*_console(), *args], capture_output=True, text=True, timeout=120, cwd=repo, env=env)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and name in lines[-1], proc.stderr
    assert len(lines) == (1 if status == 1 else 3), proc.stderr
