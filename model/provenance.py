"""What made an artifact: one provenance record for every file the project writes (checkpoints, shard manifests,
index info, benchmark results, speed runs, the demo summary).

    {"facesearch": "0.1.0", "versions": {"torch": ..., "numpy": ..., "faiss": ...}, "machine": {...},
     "command": "facesearch index build ...", "created": "2026-12-03T07:00:00+00:00"}

Versions are read from the installed distributions' metadata, so recording them imports nothing heavy.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

#: Distributions whose versions a record names when they are installed (import names in parentheses do not matter:
#: these are distribution names).
PACKAGES: tuple[str, ...] = (
    "torch",
    "numpy",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "pyarrow",
    "dask",
    "distributed",
    "opencv-python-headless",
    "opencv-python",
)


def package_version(name: str = "facesearch") -> str | None:
    """The installed version of distribution ``name`` (ours by default), or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def our_version() -> str:
    """facesearch's version ("unknown" when running from a checkout that was never installed)."""
    return package_version("facesearch") or "unknown"


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """{distribution: version}: ours (``facesearch``), python, and those of ``packages`` that are installed."""
    out = {"facesearch": our_version(), "python": platform.python_version()}
    for name in packages:
        if (v := package_version(name)) is not None:
            out[name] = v
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine in a few fields: CPU model, logical CPUs this process may use, memory, OS and architecture."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        mem = 0
    return {
        "cpu": _cpu_model(),
        "cpus": cpus,
        "memory_gib": round(mem / 2**30, 1),
        "system": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that is running, shell-quoted (``facesearch ...`` for the console script)."""
    args = list(sys.argv if argv is None else argv)
    if args and os.path.basename(args[0]) in ("facesearch", "__main__.py"):
        args[0] = "facesearch"
    return " ".join(shlex.quote(a) for a in args)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance record: our version, the versions of the libraries that computed the numbers, the machine,
    the command and the time; ``extra`` fields (a config, a model fingerprint) are added as given."""
    return {
        "facesearch": our_version(),
        "versions": versions(),
        "machine": machine(),
        "command": command_line() if command is None else command,
        "created": now(),
        **extra,
    }


__all__ = ["PACKAGES", "command_line", "machine", "now", "our_version", "package_version", "provenance", "versions"]
