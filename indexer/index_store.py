"""How an index directory is laid out on disk, and how an update replaces it as a whole.

Layout (written by every build and update)::

    index/
      CURRENT                  {"generation": "gen-00003", "info": {"size": ..., "sha256": ...}}  (the pointer)
      gen-00003/index.faiss    the FAISS index
      gen-00003/attributes.parquet
      gen-00003/index_info.json  with "files": size + SHA-256 of index.faiss and attributes.parquet
      .lock                    held by the writer (:mod:`facesearch.indexer.locks`)

A writer builds a complete new generation in a hidden ``.gen-00004.tmp`` directory (every file fsynced), renames it
to ``gen-00004``, then switches ``CURRENT`` with ``os.replace`` and fsyncs the directory: that one rename is the
moment the update happens.  Killed before it, the index is the old one; after it, the new one.  Only then are the
old generation (and the files of an old layout) removed; whatever a killed writer left (a ``.gen-*.tmp``, an old
generation) is removed by the next writer.  Readers resolve ``CURRENT`` once and read that generation's files; one
whose generation was removed under it (a writer finished meanwhile) resolves again (:func:`read_with_retry`).

The old layout (``index.faiss``, ``attributes.parquet``, ``index_info.json`` at the top, no ``CURRENT``) stays
readable, without checksums; the first update (add / remove) migrates it.

Test hook: with ``FACESEARCH_TEST_KILL_AT=<step>`` in the environment, a writer SIGKILLs itself at that step of
:data:`KILL_STEPS` (:func:`kill_point`); the crash tests use it, nothing else should.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from facesearch.indexer.locks import LOCK_FILE as LOCK_NAME
from facesearch.model.fileio import atomic_write_bytes, fsync_dir

INDEX_FILE, ATTR_FILE, INFO_FILE = "index.faiss", "attributes.parquet", "index_info.json"
POINTER = "CURRENT"
POINTER_KIND = "facesearch.index_pointer"
KILL_ENV = "FACESEARCH_TEST_KILL_AT"
# The writer's steps, in order; killed at any of them, the index loads as before (up to "generation-renamed") or as
# after ("pointer-switched" on), and the next writer completes.
KILL_STEPS: tuple[str, ...] = (
    "begin",  # locked, leftovers of a killed writer removed
    "attributes-written",
    "index-written",
    "info-written",
    "generation-renamed",
    "pointer-written",  # CURRENT.tmp complete, not yet renamed
    "pointer-switched",
    "old-generation-removed",
    "old-layout-partly-removed",  # migration only: one top-level file of the old layout removed
)
_OLD_NAMES = (INDEX_FILE, ATTR_FILE, INFO_FILE)
_GEN = re.compile(r"^gen-(\d{5,})$")
_HASH_CHUNK = 1 << 22
T = TypeVar("T")


def kill_point(step: str) -> None:
    """Test hook: SIGKILL this process when ``$FACESEARCH_TEST_KILL_AT`` names ``step`` (see :data:`KILL_STEPS`)."""
    assert step in KILL_STEPS, f"unknown kill step {step!r}"
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def file_record(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of a file (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def check_size(path: Path, record: dict[str, Any]) -> None:
    """``ValueError`` naming ``path`` when its size differs from the recorded one (missing: not found)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"{path} not found: the index directory is incomplete") from None
    if size != record["size"]:
        raise ValueError(f"{path} is {size} bytes but index_info.json records {record['size']}: the file was "
                         "truncated or replaced")  # fmt: skip


def check_digest(path: Path, record: dict[str, Any], data: bytes | None = None) -> None:
    """``ValueError`` naming ``path`` and both digests when its SHA-256 differs from the recorded one; ``data``: the
    file's bytes when already read (hashed instead of reading the file again)."""
    actual = hashlib.sha256(data).hexdigest() if data is not None else file_record(path)["sha256"]
    if actual != record["sha256"]:
        raise ValueError(f"{path} is damaged: SHA-256 {actual[:16]}… but recorded {record['sha256'][:16]}…")


@dataclass(frozen=True)
class Layout:
    """Where an index directory's current files are: ``files_dir`` (a generation, or the directory itself for the
    old layout), ``generation`` (None for the old layout) and the pointer's record of ``index_info.json``."""

    directory: Path
    files_dir: Path
    generation: str | None
    info_record: dict[str, Any] | None

    def path(self, name: str) -> Path:
        return self.files_dir / name


def _read_pointer(directory: Path) -> dict[str, Any] | None:
    path = directory / POINTER
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    try:
        data = json.loads(raw.decode("utf-8"))
        ok = isinstance(data, dict) and data.get("kind") == POINTER_KIND and _GEN.match(str(data.get("generation")))
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"corrupt index pointer {path}: expected {{\"kind\": \"{POINTER_KIND}\", \"generation\": "
                         "\"gen-NNNNN\", ...}")  # fmt: skip
    return dict(data)


def current_layout(directory: Path) -> Layout:
    """The current files of an index directory; a one-line ``ValueError`` when it is not one, or its pointer is
    corrupt or names a missing generation."""
    directory = Path(directory)
    pointer = _read_pointer(directory)
    if pointer is None:
        if not (directory / INFO_FILE).is_file():
            raise ValueError(f"{directory / INFO_FILE} not found: {directory} is not an index directory "
                             "(run facesearch index build)")  # fmt: skip
        return Layout(directory, directory, None, None)
    gen = str(pointer["generation"])
    if not (directory / gen).is_dir():
        raise ValueError(f"{directory / POINTER} points to generation {gen}, which is missing: the index directory "
                         "was damaged (rebuild it with facesearch index build)")  # fmt: skip
    record = pointer.get("info")
    return Layout(directory, directory / gen, gen, record if isinstance(record, dict) else None)


def is_index_directory(directory: Path) -> bool:
    """True when ``directory`` holds an index (either layout; its content is not checked)."""
    directory = Path(directory)
    return (directory / POINTER).is_file() or (directory / INFO_FILE).is_file()


def is_empty_for_build(directory: Path) -> bool:
    """True when ``directory`` holds nothing but the lock and what a killed build left (no ``CURRENT``)."""
    if (Path(directory) / POINTER).exists():
        return False
    return all(
        p.name in (LOCK_NAME, POINTER + ".tmp") or p.name.startswith(".gen-") or _GEN.match(p.name)
        for p in Path(directory).iterdir()
    )


def read_with_retry(directory: Path, read: Callable[[Layout], T], attempts: int = 3) -> T:
    """``read(layout)`` of the current generation; when its files vanish meanwhile (a writer switched generations
    and removed the old one) and the pointer has moved, read the new one."""
    for attempt in range(attempts):
        layout = current_layout(directory)
        try:
            return read(layout)
        except (FileNotFoundError, ValueError) as e:
            if attempt + 1 < attempts and current_layout(directory).generation != layout.generation:
                continue
            if isinstance(e, FileNotFoundError):
                raise ValueError(f"{e.filename} not found: the index directory is incomplete") from e
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _generations(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _GEN.match(p.name)) and p.is_dir())


def remove_leftovers(directory: Path) -> list[str]:
    """Under the writer's lock: remove what killed writers left (hidden temporaries, generations that ``CURRENT``
    does not name, the old layout's files once ``CURRENT`` exists); returns the removed names."""
    directory = Path(directory)
    pointer = _read_pointer(directory)
    keep = str(pointer["generation"]) if pointer else None
    gone = []
    for p in sorted(directory.iterdir()):
        stale_gen = bool(_GEN.match(p.name)) and p.name != keep  # no pointer: a killed build or migration
        temporary = p.name.startswith(".gen-") or p.name == POINTER + ".tmp"
        old_layout = pointer is not None and p.name in (INDEX_FILE, ATTR_FILE, INFO_FILE)
        if stale_gen or temporary or old_layout or (p.name.endswith(".tmp") and p.name[:-4] in _OLD_NAMES):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p.name)
    if gone:
        fsync_dir(directory)
    return gone


class NewGeneration:
    """A generation being written: files go into a hidden temporary directory; :meth:`commit` makes it current.

    Use under the directory's lock, as ``with NewGeneration(dir) as gen: ...; gen.commit(info)``; leaving the block
    without a commit removes the temporary."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.directory)
        kill_point("begin")
        self.previous = current_layout(self.directory) if is_index_directory(self.directory) else None
        numbers = _generations(self.directory)
        self.name = f"gen-{(numbers[-1] + 1 if numbers else 1):05d}"
        self.tmp = self.directory / f".{self.name}.tmp"
        self.tmp.mkdir()
        self.records: dict[str, dict[str, Any]] = {}
        self.committed = False

    def __enter__(self) -> NewGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name: str) -> Path:
        """Where to write file ``name`` of the new generation."""
        return self.tmp / name

    def record(self, name: str) -> dict[str, Any]:
        """fsync file ``name`` (written by the caller) and record its size and SHA-256 for ``index_info.json``."""
        path = self.path(name)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        self.records[name] = file_record(path)
        kill_point("attributes-written" if name == ATTR_FILE else "index-written")
        return self.records[name]

    def commit(self, info: dict[str, Any]) -> Path:
        """Write ``index_info.json`` (``info`` plus the file records), make this generation current, remove the old
        one; returns the generation's directory."""
        assert set(self.records) == {INDEX_FILE, ATTR_FILE}, f"commit before both files were recorded: {self.records}"
        raw = (json.dumps({**info, "files": self.records}, indent=2) + "\n").encode("utf-8")
        atomic_write_bytes(self.path(INFO_FILE), raw)
        kill_point("info-written")
        fsync_dir(self.tmp)
        final = self.directory / self.name
        os.rename(self.tmp, final)
        fsync_dir(self.directory)
        kill_point("generation-renamed")
        self._switch({"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
        self.committed = True
        self._remove_previous()
        return final

    def _switch(self, info_record: dict[str, Any]) -> None:
        pointer = {"kind": POINTER_KIND, "generation": self.name, "info": info_record}
        tmp = self.directory / (POINTER + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write((json.dumps(pointer) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        kill_point("pointer-written")
        os.replace(tmp, self.directory / POINTER)
        fsync_dir(self.directory)
        kill_point("pointer-switched")

    def _remove_previous(self) -> None:
        old = self.previous
        if old is None:
            return
        if old.generation is not None:
            shutil.rmtree(old.files_dir, ignore_errors=True)
            fsync_dir(self.directory)
            kill_point("old-generation-removed")
            return
        for i, name in enumerate((INDEX_FILE, ATTR_FILE, INFO_FILE)):  # the old layout: files at the top
            (self.directory / name).unlink(missing_ok=True)
            if i == 0:
                fsync_dir(self.directory)
                kill_point("old-layout-partly-removed")
        fsync_dir(self.directory)


__all__ = [
    "ATTR_FILE",
    "INDEX_FILE",
    "INFO_FILE",
    "KILL_ENV",
    "KILL_STEPS",
    "POINTER",
    "Layout",
    "NewGeneration",
    "check_digest",
    "check_size",
    "current_layout",
    "file_record",
    "is_empty_for_build",
    "is_index_directory",
    "kill_point",
    "read_with_retry",
    "remove_leftovers",
]
