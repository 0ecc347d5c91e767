"""Directory locks: one writer per index (or shard) directory, a one-line error that names the holder (pid, command
line, start time, host), released when the holder dies however it dies, invisible to Parquet dataset readers."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from facesearch.indexer import shards
from facesearch.indexer.index import IndexConfig, add_shards, build_index, load_index, remove_ids
from facesearch.indexer.locks import LOCK_FILE, DirectoryLocked, directory_lock, read_holder

REPO = Path(__file__).resolve().parents[2]


def write_dir(directory: Path, ids: np.ndarray) -> None:
    x = np.random.default_rng(int(ids[0])).standard_normal((len(ids), 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = len(ids)
    table = shards.table_from_arrays(ids, [f"{i}.jpg" for i in ids], [None] * n, x, {}, None, None, ["ok"] * n,
                                     [None] * n, dtype="float32")  # fmt: skip
    entry = shards.write_shard(directory / shards.shard_name(0), table)
    shards.write_manifest(directory, shards.Manifest("fp-lock", 8, "float32", (), shards=(entry,), planned_shards=1,
                                                     complete=True))  # fmt: skip


def test_a_held_lock_names_its_holder_and_is_released_after(tmp_path: Path) -> None:
    with directory_lock(tmp_path) as path:
        assert path == tmp_path / LOCK_FILE
        holder = read_holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["since"]
        with pytest.raises(DirectoryLocked) as e:
            with directory_lock(tmp_path):
                pass
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path} is locked by pid {os.getpid()} (") and "\n" not in msg
        assert f"since {holder['since']}) on host {socket.gethostname()}" in msg and holder["command"][:60] in msg
        assert isinstance(e.value, ValueError) and e.value.holder["pid"] == os.getpid()
    assert read_holder(tmp_path) == {}  # released: the file describes nobody
    with directory_lock(tmp_path):
        pass
    with pytest.raises(ValueError, match="is not a directory"):
        with directory_lock(tmp_path / "missing"):
            pass


HOLDER = r"""
import sys
from pathlib import Path
from facesearch.indexer.locks import directory_lock
with directory_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test kills this process (or, if the test dies, closes the pipe)
"""


def test_a_killed_holder_releases_the_lock_and_the_error_names_its_command(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "--marker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 60)[0], "the lock holder said nothing within 60 s"
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLocked, match=rf"is locked by pid {proc.pid} \(-c {tmp_path} --marker, since "):
            with directory_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # stale content...
    with directory_lock(tmp_path):  # ...but the kernel released the lock with the process
        assert read_holder(tmp_path)["pid"] == os.getpid()


def test_shared_locks_for_readers(tmp_path: Path) -> None:
    with directory_lock(tmp_path, shared=True), directory_lock(tmp_path, shared=True):
        with pytest.raises(DirectoryLocked, match="is being read by another process"):
            with directory_lock(tmp_path):
                pass
    with directory_lock(tmp_path):
        with pytest.raises(DirectoryLocked, match=rf"is locked by pid {os.getpid()}"):
            with directory_lock(tmp_path, shared=True):
                pass


def test_a_reader_of_a_read_only_directory_needs_no_lock_file(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere: no read-only directory to test")
        with directory_lock(ro, shared=True):  # nobody can write here: a reader goes ahead without a lock file
            assert not (ro / LOCK_FILE).exists()
    finally:
        ro.chmod(0o755)


def test_index_writers_are_kept_out_while_one_works(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from facesearch.cli import main

    write_dir(tmp_path / "a", np.arange(0, 40, dtype=np.int64))
    write_dir(tmp_path / "b", np.arange(40, 60, dtype=np.int64))
    build_index(tmp_path / "a", tmp_path / "idx", IndexConfig(recall_sample=0))
    with directory_lock(tmp_path / "idx"):
        with pytest.raises(DirectoryLocked, match=rf"idx is locked by pid {os.getpid()}"):
            add_shards(tmp_path / "idx", tmp_path / "b")
        with pytest.raises(DirectoryLocked):
            remove_ids(tmp_path / "idx", np.array([1]))
        assert load_index(tmp_path / "idx").info.nb == 40  # readers do not wait for writers
        r = CliRunner().invoke(
            main, ["index", "add", "--index", str(tmp_path / "idx"), "--shards", str(tmp_path / "b")]
        )
        assert r.exit_code == 1 and "is locked by pid" in r.output and "Traceback" not in r.output, r.output
    with directory_lock(tmp_path / "b"):  # an embed job writing the shards: no index build or add from them
        with pytest.raises(DirectoryLocked, match=r"b is locked by pid"):
            add_shards(tmp_path / "idx", tmp_path / "b")
        with pytest.raises(DirectoryLocked, match=r"b is locked by pid"):
            build_index(tmp_path / "b", tmp_path / "idx2", IndexConfig(recall_sample=0))
    assert add_shards(tmp_path / "idx", tmp_path / "b").nb == 60


def test_a_locked_shard_directory_is_still_a_plain_parquet_dataset(tmp_path: Path) -> None:
    write_dir(tmp_path / "s", np.arange(10, dtype=np.int64))
    with directory_lock(tmp_path / "s"):
        assert (tmp_path / "s" / LOCK_FILE).is_file()
        assert pq.read_table(tmp_path / "s").num_rows == 10
    assert pq.read_table(tmp_path / "s").num_rows == 10
