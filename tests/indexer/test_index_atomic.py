"""An update is atomic as a whole: ``facesearch index add`` / ``remove`` / ``build`` SIGKILLed at every step of the
writer (``FACESEARCH_TEST_KILL_AT``, :data:`facesearch.indexer.index_store.KILL_STEPS`) leave an index that loads and
equals exactly the state before or the state after, and re-running the command completes.  Old-layout directories
(files at the top) stay readable and migrate on their first update, killed or not."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index, load_index, remove_ids
from facesearch.indexer.index_check import StoredVectors
from facesearch.indexer.index_ids import known_sources
from facesearch.indexer.index_store import KILL_ENV, KILL_STEPS, POINTER, current_layout, read_with_retry

D = 16
REPO = Path(__file__).resolve().parents[2]
SWITCH = KILL_STEPS.index("pointer-switched")  # killed before it: the old state; at or after it: the new one
REMOVED = [3, 150, 299, 12345]

# One interpreter imports the CLI once and forks a child per job, which runs the real ``facesearch`` command with
# the kill hook set (a fresh interpreter per job would spend ~5 s importing torch, 31 times).  The parent never
# touches FAISS or torch before forking, so no thread pool is copied half-initialised.


def write_dir(directory: Path, ids: np.ndarray, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((len(ids), D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = len(ids)
    table = shards.table_from_arrays(ids, [f"img/{i}.jpg" for i in ids], [f"p{i % 9}" for i in ids], x, {}, None,
                                     None, ["ok"] * n, [None] * n, dtype="float32")  # fmt: skip
    entry = shards.write_shard(directory / shards.shard_name(0), table)
    shards.write_manifest(directory, shards.Manifest("fp-kill", D, "float32", (), shards=(entry,), planned_shards=1,
                                                     complete=True))  # fmt: skip


def state(idx: Path, history: bool = True) -> dict[str, Any]:
    """Everything a search can see: ids, vectors, attribute rows, nb, sources (and the history's operations)."""
    loaded = load_index(idx)
    order = np.argsort(loaded.ids)
    ids = loaded.ids[order]
    out = {
        "ids": ids.tolist(),
        "vectors": StoredVectors(loaded.index).get(ids).tobytes(),
        "attributes": loaded.attributes.take(pa.array(order)).to_pydict(),
        "nb": loaded.info.nb,
        "sources": [(s["manifest_sha256"], s["id_offset"]) for s in known_sources(loaded.info)],
    }
    if history:
        out["history"] = [(e["op"], e.get("added"), e.get("removed")) for e in loaded.info.history]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, to_legacy: Callable[[Path], None]) -> dict[str, Any]:
    """Shards a (ids 0..299) and b (300..399); a flat index of a; the reference states before and after."""
    root = tmp_path_factory.mktemp("kill")
    write_dir(root / "a", np.arange(300, dtype=np.int64), 0)
    write_dir(root / "b", np.arange(300, 400, dtype=np.int64), 1)
    build_index(root / "a", root / "pristine", IndexConfig(recall_sample=0))
    shutil.copytree(root / "pristine", root / "legacy")
    to_legacy(root / "legacy")
    refs: dict[str, Any] = {"root": root, "before": state(root / "pristine")}
    for op, src in (("add", "pristine"), ("remove", "pristine"), ("migrate", "legacy")):
        shutil.copytree(root / src, root / f"ref-{op}")
        if op == "remove":
            remove_ids(root / f"ref-{op}", np.array(REMOVED))
        else:
            add_shards(root / f"ref-{op}", root / "b")
        refs[op] = state(root / f"ref-{op}")
    refs["legacy-before"] = state(root / "legacy")
    assert refs["legacy-before"] == refs["before"]
    return refs


def _args(op: str, idx: Path, root: Path) -> list[str]:
    if op == "remove":
        return ["index", "remove", "--index", str(idx), *[a for i in REMOVED for a in ("--id", str(i))]]
    if op == "build":
        return ["index", "build", "--shards", str(root / "a"), "--out", str(idx), "--recall-sample", "0"]
    return ["index", "add", "--index", str(idx), "--shards", str(root / "b")]


def _only_one_generation(idx: Path) -> None:
    names = sorted(p.name for p in idx.iterdir())
    assert len(names) == 3 and names[0] == ".lock" and names[1] == POINTER and names[2].startswith("gen-"), names


@pytest.mark.slow
def test_update_killed_at_every_step_is_before_or_after_and_reruns(
    setup: dict[str, Any], kill_driver: Callable[..., tuple[list[int], str]]
) -> None:
    root = setup["root"]
    cases = [("add", s) for s in KILL_STEPS if s != "old-layout-partly-removed"]
    cases += [("remove", s) for s in KILL_STEPS if s != "old-layout-partly-removed"]
    cases += [("migrate", s) for s in KILL_STEPS if s != "old-generation-removed"]
    jobs = []
    for op, step in cases:
        idx = root / f"{op}-{step}"
        shutil.copytree(root / ("legacy" if op == "migrate" else "pristine"), idx)
        jobs.append({"step": step, "args": _args(op, idx, root)})
    codes = kill_driver(jobs)[0]
    for (op, step), code in zip(cases, codes, strict=True):
        idx = root / f"{op}-{step}"
        assert code == -signal.SIGKILL, f"{op} was not killed at {step} (exit {code})"
        got = state(idx)
        expected = setup[op] if KILL_STEPS.index(step) >= SWITCH else setup["before"]
        assert got == expected, f"{op} killed at {step}: the index is neither the state before nor after"
        if op == "migrate" and KILL_STEPS.index(step) < SWITCH:
            assert (idx / "index_info.json").is_file() and not (idx / POINTER).exists()  # still the old layout
        if op == "remove":
            remove_ids(idx, np.array(REMOVED))
        else:
            add_shards(idx, root / "b")
        assert state(idx, history=False) == {k: v for k, v in setup[op].items() if k != "history"}, (op, step)
        _only_one_generation(idx)  # what the killed writer left is gone


@pytest.mark.slow
def test_build_killed_at_every_step_can_be_run_again(
    setup: dict[str, Any], kill_driver: Callable[..., tuple[list[int], str]]
) -> None:
    root = setup["root"]
    steps = KILL_STEPS[: SWITCH + 1]  # a build has no old generation to remove
    jobs = [{"step": s, "args": _args("build", root / f"build-{s}", root)} for s in steps]
    codes = kill_driver(jobs)[0]
    for step, code in zip(steps, codes, strict=True):
        idx = root / f"build-{step}"
        assert code == -signal.SIGKILL, f"build was not killed at {step} (exit {code})"
        if KILL_STEPS.index(step) < SWITCH:
            with pytest.raises(ValueError, match="not an index directory"):
                load_index(idx)
            build_index(root / "a", idx, IndexConfig(recall_sample=0))  # not "not empty": the leftovers go
        else:
            with pytest.raises(ValueError, match="not empty"):
                build_index(root / "a", idx, IndexConfig(recall_sample=0))
        assert state(idx, history=False) == {k: v for k, v in setup["before"].items() if k != "history"}
        _only_one_generation(idx)


@pytest.mark.slow
def test_the_hook_kills_a_real_cli_process(setup: dict[str, Any]) -> None:
    root = setup["root"]
    idx = root / "cli-kill"
    shutil.copytree(root / "pristine", idx)
    env = {**os.environ, "PYTHONPATH": str(REPO), KILL_ENV: "pointer-written"}
    proc = subprocess.run([sys.executable, "-c", "from facesearch.cli import main; main()", *_args("add", idx, root)],
                          cwd=REPO, env=env, capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert state(idx) == setup["before"] and (idx / "CURRENT.tmp").is_file()
    add_shards(idx, root / "b")
    assert state(idx) == setup["add"]


def test_old_layout_reads_and_migrates(setup: dict[str, Any], tmp_path: Path) -> None:
    root = setup["root"]
    idx = tmp_path / "old"
    shutil.copytree(root / "legacy", idx)
    assert load_index(idx).info.files == {}  # readable, without checksums
    info = add_shards(idx, root / "b")
    assert set(info.files) == {"index.faiss", "attributes.parquet"}
    assert not any((idx / n).exists() for n in ("index.faiss", "attributes.parquet", "index_info.json"))
    _only_one_generation(idx)
    assert state(idx) == setup["migrate"]


def test_leftovers_are_removed_by_the_next_writer(setup: dict[str, Any], tmp_path: Path) -> None:
    root = setup["root"]
    idx = tmp_path / "idx"
    shutil.copytree(root / "pristine", idx)
    (idx / ".gen-00007.tmp").mkdir()
    (idx / ".gen-00007.tmp" / "index.faiss").write_bytes(b"half")
    (idx / "gen-00004").mkdir()  # a generation CURRENT does not name
    (idx / "CURRENT.tmp").write_text("{")
    (idx / "index.faiss").write_bytes(b"an old-layout file after migration")
    assert state(idx) == setup["before"]  # readers are not confused by them
    remove_ids(idx, np.array(REMOVED))
    assert state(idx) == setup["remove"]
    _only_one_generation(idx)
    # numbered after the current one (never a name a reader could have resolved: leftovers were never current)
    assert current_layout(idx).generation == "gen-00002"


def test_a_reader_whose_generation_is_removed_meanwhile_reads_the_new_one(setup: dict[str, Any],
                                                                          tmp_path: Path) -> None:  # fmt: skip
    root = setup["root"]
    idx = tmp_path / "idx"
    shutil.copytree(root / "pristine", idx)
    seen: list[str | None] = []

    def read(layout: Any) -> bytes:
        seen.append(layout.generation)
        if len(seen) == 1:
            add_shards(idx, root / "b")  # a writer finishes between resolving CURRENT and opening the files
        return bytes(layout.path("index_info.json").read_bytes())

    read_with_retry(idx, read)
    assert seen == ["gen-00001", "gen-00002"]
