"""Broken index directories are refused with one line naming the file and what disagrees, by the library
(``load_index``, ``SearchEngine.open``) and the CLI (``index info``, ``search``), never a traceback or a silent
answer; ``verify`` / ``index info --verify`` also catch altered vector bytes and NaN vectors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from facesearch.engine.search import SearchEngine
from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index, load_index
from facesearch.indexer.index_store import Layout, current_layout

D, N = 16, 200


def write_dir(directory: Path, ids: np.ndarray, x: np.ndarray) -> None:
    n = len(ids)
    table = shards.table_from_arrays(ids, [f"img/{i}.jpg" for i in ids], [f"p{i % 7}" for i in ids], x, {}, None, None,
                                     ["ok"] * n, [None] * n, dtype="float32")  # fmt: skip
    entry = shards.write_shard(directory / shards.shard_name(0), table)
    shards.write_manifest(directory, shards.Manifest("fp-int", x.shape[1], "float32", (), shards=(entry,),
                                                     planned_shards=1, complete=True))  # fmt: skip


def unit(seed: int, n: int = N) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A flat index of N rows (ids 0..N-1), an ivf-flat one, and another flat index of N rows (ids 1000..)."""
    root = tmp_path_factory.mktemp("built")
    write_dir(root / "s", np.arange(N, dtype=np.int64), unit(0))
    write_dir(root / "t", np.arange(1000, 1000 + N, dtype=np.int64), unit(1))
    build_index(root / "s", root / "flat", IndexConfig(recall_sample=0))
    build_index(root / "s", root / "ivf", IndexConfig(kind="ivf-flat", nlist=4, recall_sample=0))
    build_index(root / "t", root / "other", IndexConfig(recall_sample=0))
    return {"flat": root / "flat", "ivf": root / "ivf", "other": root / "other", "shards": root / "s"}


CopyIndex = Callable[..., Path]


@pytest.fixture
def copy_index(built: dict[str, Path], tmp_path: Path, to_legacy: Callable[[Path], None]) -> CopyIndex:
    """``copy_index(legacy, name="flat")``: a private copy of a built index, in the old layout when ``legacy``."""

    def copy(legacy: bool, name: str = "flat") -> Path:
        idx = tmp_path / "idx"
        shutil.copytree(built[name], idx)
        if legacy:
            to_legacy(idx)
        return idx

    return copy


def edit_info(layout: Layout, old: str, new: str) -> None:
    """Edit index_info.json as a person with a text editor would (every occurrence of ``old``)."""
    text = layout.path("index_info.json").read_text()
    assert old in text
    layout.path("index_info.json").write_text(text.replace(old, new))


def drop_a_row(layout: Layout) -> None:
    table = pq.read_table(layout.path("attributes.parquet"))
    pq.write_table(table.slice(1), layout.path("attributes.parquet"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


Break = Callable[[Layout, dict[str, Path]], None]
# name -> (damage, message on the generation layout (checksums), message on the old layout (structure only))
BREAKS: dict[str, tuple[Break, str, str]] = {
    "missing index.faiss": (
        lambda L, b: L.path("index.faiss").unlink(),
        r"index\.faiss not found",
        r"index\.faiss not found",
    ),
    "empty index.faiss": (
        lambda L, b: L.path("index.faiss").write_bytes(b""),
        r"index\.faiss is 0 bytes but index_info\.json records \d+",
        r"corrupt FAISS index .*index\.faiss: Error in",
    ),
    "truncated index.faiss": (
        lambda L, b: truncate(L.path("index.faiss")),
        r"index\.faiss is \d+ bytes but",
        r"corrupt FAISS index .*index\.faiss: .*read error",
    ),
    "garbage index_info.json": (
        lambda L, b: L.path("index_info.json").write_text("{not json"),
        r"index_info\.json is 9 bytes but .*CURRENT records \d+",
        r"corrupt index info .*index_info\.json: Expecting",
    ),
    "missing attributes.parquet": (
        lambda L, b: L.path("attributes.parquet").unlink(),
        r"attributes\.parquet not found",
        r"attributes\.parquet not found",
    ),
    "attributes with a row missing": (
        lambda L, b: drop_a_row(L),
        r"attributes\.parquet is \d+ bytes but",
        rf"index\.faiss holds {N} vectors but attributes\.parquet has {N - 1} rows",
    ),
    "attributes of another index": (
        lambda L, b: shutil.copy(current_layout(b["other"]).path("attributes.parquet"), L.path("attributes.parquet")),
        r"attributes\.parquet is (damaged: SHA-256|\d+ bytes but)",
        r"attributes\.parquet and .*index\.faiss hold different ids \(e\.g\. 1000; 200 differ\)",
    ),
    "d mismatch": (
        lambda L, b: edit_info(L, f'"d": {D},', f'"d": {2 * D},'),
        r"index_info\.json is damaged: SHA-256 [0-9a-f]{16}… but",
        rf"index\.faiss holds a flat index with d={D}, .*index_info\.json says d {2 * D}",
    ),
    "kind mismatch": (
        lambda L, b: edit_info(L, '"kind": "flat"', '"kind": "hnsw"'),
        r"index_info\.json is damaged: SHA-256",
        r"index\.faiss holds a flat index .* says kind hnsw",
    ),
}
POINTER_BREAKS: dict[str, tuple[Break, str]] = {
    "pointer to a missing generation": (
        lambda L, b: shutil.rmtree(L.files_dir),
        r"CURRENT points to generation gen-00001, which is missing",
    ),
    "garbage pointer": (lambda L, b: (L.directory / "CURRENT").write_text("gen-1"), r"corrupt index pointer .*CURRENT"),
    "missing index_info.json": (lambda L, b: L.path("index_info.json").unlink(), r"index_info\.json not found"),
}
CASES = [(name, False, m) for name, (_, m, _) in BREAKS.items()]
CASES += [(name, True, m) for name, (_, _, m) in BREAKS.items()]
CASES += [(name, False, m) for name, (_, m) in POINTER_BREAKS.items()]


def _damage(idx: Path, name: str, built: dict[str, Path]) -> None:
    damage = BREAKS[name][0] if name in BREAKS else POINTER_BREAKS[name][0]
    damage(current_layout(idx), built)


def _one_line_error(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


@pytest.mark.parametrize(("name", "legacy", "message"), CASES, ids=[f"{c[0]}{'-old' if c[1] else ''}" for c in CASES])
def test_broken_index_directories_are_one_line_errors(copy_index: CopyIndex, name: str, legacy: bool, message: str,
                                                      built: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    from click.testing import CliRunner

    from facesearch.cli import main

    idx = copy_index(legacy)
    load_index(idx)  # sound before the damage
    _damage(idx, name, built)
    with pytest.raises(ValueError, match=message) as e:
        load_index(idx)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        SearchEngine.open(idx, device="cpu")
    run = CliRunner().invoke
    r = run(main, ["index", "info", "--index", str(idx)])
    assert r.exit_code == 1, r.output
    assert message.replace("\\", "").split(" ")[0].split(".*")[0] in _one_line_error(r.output)
    r = run(main, ["search", "--index", str(idx), "--ids", "0", "--device", "cpu"])
    assert r.exit_code == 1 and "Error: " in _one_line_error(r.output), r.output


def test_an_update_refuses_a_broken_index_and_leaves_it_as_it_is(
    copy_index: CopyIndex, built: dict[str, Path], tmp_path: Path
) -> None:
    idx = copy_index(legacy=False)
    write_dir(tmp_path / "more", np.arange(5000, 5010, dtype=np.int64), unit(5, 10))
    _damage(idx, "truncated index.faiss", built)
    before = sorted(p.name for p in idx.rglob("*"))
    with pytest.raises(ValueError, match=r"index\.faiss is \d+ bytes but"):
        add_shards(idx, tmp_path / "more")
    assert sorted(p.name for p in idx.rglob("*")) == before


def _flat_vector_offset(path: Path, first: np.ndarray) -> int:
    raw = path.read_bytes()
    at = raw.find(np.ascontiguousarray(first, np.float32).tobytes())
    assert at > 0 and raw.count(first.tobytes()) == 1, "the stored vector's bytes, once"
    return at


@pytest.mark.parametrize("legacy", [False, True])
def test_altered_vector_bytes_and_nan_vectors_are_caught_by_verify(copy_index: CopyIndex, built: dict[str, Path],
                                                                   tmp_path: Path, legacy: bool) -> None:  # fmt: skip
    from click.testing import CliRunner

    from facesearch.cli import main

    idx = copy_index(legacy)
    loaded = load_index(idx)
    row = int(np.flatnonzero(loaded.ids == 7)[0])
    xb = faiss.rev_swig_ptr(faiss.downcast_index(loaded.index.index).get_xb(), N * D).reshape(N, D)
    path = current_layout(idx).path("index.faiss")
    at = _flat_vector_offset(path, xb[row])
    raw = bytearray(path.read_bytes())
    raw[at : at + 4] = np.float32(np.nan).tobytes()  # the first value of id 7's vector
    path.write_bytes(bytes(raw))
    load_index(idx)  # the cheap checks at open cannot see a changed value: sizes and structure still agree
    message = r"index\.faiss is damaged: SHA-256" if not legacy else r"stored vector of id 7 has NaN or infinite"
    with pytest.raises(ValueError, match=message):
        load_index(idx, verify=True)
    with pytest.raises(ValueError, match=message):
        SearchEngine.open(idx, device="cpu", verify=True)
    r = CliRunner().invoke(main, ["index", "info", "--index", str(idx), "--verify"])
    assert r.exit_code == 1 and ("damaged" in r.output or "NaN" in r.output), r.output
    _one_line_error(r.output)


def test_nan_in_an_ivf_list_is_named_by_id(copy_index: CopyIndex, built: dict[str, Path], tmp_path: Path) -> None:
    idx = copy_index(legacy=True, name="ivf")
    loaded = load_index(idx)
    ivf = loaded.index
    from faiss.contrib.inspect_tools import get_invlist

    lno = next(i for i in range(ivf.nlist) if ivf.invlists.list_size(i))
    ids, codes = get_invlist(ivf.invlists, lno)
    path = current_layout(idx).path("index.faiss")
    at = _flat_vector_offset(path, codes[0].view(np.float32))
    raw = bytearray(path.read_bytes())
    raw[at + 8 : at + 12] = np.float32(np.inf).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"stored vector of id {int(ids[0])} has NaN or infinite"):
        load_index(idx, verify=True)


def test_sound_indexes_say_what_was_checked(copy_index: CopyIndex, built: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from facesearch.cli import main

    run = CliRunner().invoke
    r = run(main, ["index", "info", "--index", str(built["ivf"]), "--verify"])
    assert r.exit_code == 0 and "verified: SHA-256 of every file" in r.output, r.output
    r = run(main, ["index", "info", "--index", str(built["flat"])])
    assert r.exit_code == 0 and "checked: sizes, SHA-256 of attributes.parquet" in r.output, r.output
    idx = copy_index(legacy=True)
    r = run(main, ["index", "info", "--index", str(idx), "--verify"])
    assert r.exit_code == 0 and "checksums: none recorded" in r.output, r.output
    assert load_index(idx, verify=True).info.nb == N


def test_add_with_a_missing_or_unmade_shard_directory(
    copy_index: CopyIndex, built: dict[str, Path], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from facesearch.cli import main

    idx = copy_index(legacy=False)
    with pytest.raises(ValueError, match=r"_manifest\.json not found: .* is not a shard directory"):
        add_shards(idx, tmp_path / "nowhere")
    run = CliRunner().invoke
    r = run(main, ["index", "add", "--index", str(idx), "--shards", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output, r.output
    (tmp_path / "empty").mkdir()
    r = run(main, ["index", "add", "--index", str(idx), "--shards", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "is not a shard directory" in _one_line_error(r.output)
    r = run(main, ["index", "add", "--index", str(tmp_path / "empty"), "--shards", str(built["shards"])])
    assert r.exit_code == 1 and "is not an index directory" in _one_line_error(r.output)
