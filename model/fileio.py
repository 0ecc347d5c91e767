"""Atomic file writes: every artifact of the project is written as ``<name>.tmp``, flushed, then ``os.replace``d,
so a job killed at any moment leaves either the previous file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a rename inside ``path`` (best effort: some file systems refuse to fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; ``fsync=False`` skips the flush to disk (still never half-written after
    a process kill, only after a power loss), for bulk writes of many small regenerable files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (fsynced), with no newline translation."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(
    path: Path, write: Callable[[Path], None], per_process: bool = False, tmp_name: str | None = None
) -> None:
    """Atomically create ``path`` with a library's own file writer: ``write(tmp)`` writes the temporary file, which
    is then fsynced, renamed over ``path`` and the rename persisted.  ``per_process`` puts the process id in the
    temporary's name, for files that a leftover worker of a killed job might be writing at the same moment;
    ``tmp_name`` names the temporary outright (e.g. a hidden name that dataset readers skip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp_name is None:
        tmp_name = f"{path.name}.{os.getpid()}.tmp" if per_process else f"{path.name}.tmp"
    tmp = path.with_name(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_with", "fsync_dir"]
