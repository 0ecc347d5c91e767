"""Fixtures shared by the index tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from facesearch.indexer.index_store import KILL_ENV, POINTER, current_layout

REPO = Path(__file__).resolve().parents[2]


def _to_legacy(idx: Path) -> None:
    """Rewrite a generation-layout index in the old layout: files at the top, no checksums, sources or CURRENT."""
    layout = current_layout(idx)
    info = json.loads(layout.path("index_info.json").read_text())
    for key in ("files", "sources", "max_id"):
        info.pop(key)
    for name in ("index.faiss", "attributes.parquet"):
        shutil.move(layout.path(name), idx / name)
    (idx / "index_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(layout.files_dir)
    (idx / POINTER).unlink()


@pytest.fixture(scope="session")
def to_legacy() -> Callable[[Path], None]:
    """``to_legacy(index_dir)``: turn an index built now into one written before generations existed."""
    return _to_legacy


# One interpreter imports the CLI and its ``index`` commands once, then forks a child per job with
# FACESEARCH_TEST_KILL_AT set, so each kill costs a fork instead of an interpreter start (the command module is
# imported before forking: the CLI loads its commands lazily, and importing FAISS and Arrow again in every child
# would cost seconds each).  Prints the children's exit codes (-signal when killed) as one JSON list.
KILL_DRIVER = r"""
import json, os, sys
import facesearch.cli.index
from facesearch.cli import main

results = []
for job in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.environ["FACESEARCH_TEST_KILL_AT"] = job["step"]
        try:
            main.main(args=job["args"], prog_name="facesearch", standalone_mode=False)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        except BaseException as e:
            sys.stderr.write(f"{job}: {e!r}\n")
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
print(json.dumps(results))
"""


def run_kill_driver(jobs: list[dict[str, object]]) -> tuple[list[int], str]:
    """Run ``jobs`` (``{"step": kill step, "args": [facesearch arguments]}``) through :data:`KILL_DRIVER`: the exit
    code of each and the driver's stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(KILL_ENV, None)
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, json.dumps(jobs)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout.strip().splitlines()[-1])), proc.stderr


@pytest.fixture(scope="session")
def kill_driver() -> Callable[[list[dict[str, object]]], tuple[list[int], str]]:
    """:func:`run_kill_driver`: jobs killed at chosen steps of the index writer, in forked children."""
    return run_kill_driver
