"""Directory locks: one writer at a time per index or shard directory, and an error that says who holds it.

:func:`directory_lock` takes an ``fcntl.flock`` lock on ``<dir>/.lock`` (a dot-name: Parquet dataset readers skip it,
so a locked shard directory stays a plain dataset) and writes the holder into the file as one JSON line: pid, host,
command line and start time.  A second process that asks for it gets at once a :class:`DirectoryLocked` (a
``ValueError``, so the CLI shows one line)::

    index/ is locked by pid 4242 (facesearch index add --index index/ --shards more/, since 2025-01-02T03:04:05+00:00)
    on host gpu-7

The kernel releases a ``flock`` when its holder dies, however it dies (``kill -9`` included): a stale ``.lock`` file
never blocks anyone, and its content only describes the last holder.  The file is never deleted (deleting it would
let two processes lock two different files of the same name).  ``shared=True`` takes a shared lock, for readers that
must not see a writer start under them (many readers at once; a writer then gets a :class:`DirectoryLocked` saying
the directory is being read).  Locks are advisory: only code that asks for them is kept out.  On NFS ``flock`` works
(Linux emulates it with POSIX locks since 2.6.12), but a lock held from another machine is reported without its pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
log = logging.getLogger(__name__)


class DirectoryLocked(ValueError):
    """The directory is locked by another process; ``holder`` is what that process wrote (may be empty)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _command() -> str:
    """This process's command line as a user typed it (``facesearch index add …``, ``python -m pytest …``)."""
    if not sys.argv or not sys.argv[0]:
        return "python"
    first = Path(sys.argv[0])
    name = f"python -m {first.parent.name}" if first.name == "__main__.py" else first.name
    return " ".join([name, *sys.argv[1:]])


def _holder_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command(),
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_holder(directory: Path) -> dict[str, Any]:
    """What the last (or current) exclusive holder of ``directory``'s lock wrote; ``{}`` when unknown."""
    try:
        text = (Path(directory) / LOCK_FILE).read_text(encoding="utf-8").strip()
        data = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(directory: Path, holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return f"{directory} is locked by another process (it has not said who yet); try again in a moment"
    command = str(holder.get("command", "?"))
    command = command if len(command) <= 160 else command[:157] + "..."
    return (f"{directory} is locked by pid {holder['pid']} ({command}, since {holder.get('since', '?')}) "
            f"on host {holder.get('host', '?')}")  # fmt: skip


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _refusal(directory: Path, fd: int, shared: bool) -> DirectoryLocked:
    """The error for a lock we could not take: a writer names itself in the file; readers (shared) do not."""
    if not shared and _try_flock(fd, fcntl.LOCK_SH):  # only shared holders: a reader, who writes no record
        fcntl.flock(fd, fcntl.LOCK_UN)
        return DirectoryLocked(f"{directory} is being read by another process (e.g. facesearch index build from "
                               "these shards); try again when it has finished", {})  # fmt: skip
    holder = read_holder(directory)
    return DirectoryLocked(_describe(directory, holder), holder)


def _open_lock_file(path: Path, shared: bool) -> tuple[int, str]:
    """(descriptor, "") of the lock file, created if need be; for a shared lock a read-only descriptor of an
    existing one will do (a shared ``flock`` needs no write access).  (-1, reason) when it cannot be opened."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644), ""
    except OSError as e:
        error = str(e.strerror)
    if shared:
        try:
            return os.open(path, os.O_RDONLY), ""
        except OSError:
            pass
    return -1, error


@contextlib.contextmanager
def directory_lock(directory: Path, shared: bool = False) -> Iterator[Path]:
    """Hold ``directory``'s lock for the ``with`` block; yields the lock file's path.

    Exclusive (default): one holder; its pid, host, command line and start time are written into the lock file.
    ``shared``: any number of shared holders, no exclusive one (in a read-only directory it is taken on an existing
    lock file, or skipped: nobody can write there).  Never waits: a lock held by another process is a
    :class:`DirectoryLocked` at once.  ``directory`` must exist (a ``ValueError`` otherwise).  Within one process
    the lock is not re-entrant (a second ``directory_lock`` on the same directory is refused like any other)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory: nothing to lock")
    path = directory / LOCK_FILE
    fd, error = _open_lock_file(path, shared)
    if fd < 0 and shared:  # a read-only directory without a lock file: nobody can write there either
        log.debug("no lock on read-only %s: %s", directory, error)
        yield path
        return
    if fd < 0:
        raise ValueError(f"cannot create the lock file {path}: {error}")
    try:
        if not _try_flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            raise _refusal(directory, fd, shared)
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode("utf-8"), 0)
        try:
            yield path
        finally:
            if not shared:
                os.ftruncate(fd, 0)  # a released lock describes nobody
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


__all__ = ["LOCK_FILE", "DirectoryLocked", "directory_lock", "read_holder"]
