"""The ``facesearch`` command line: one click group; each command family lives in its own module here.

Only this package imports click.  Every command parses options, builds a config dataclass, calls one library entry
point and echoes a summary; library ``ValueError``s become one-line click errors (no traceback for user mistakes).
"""

from __future__ import annotations

# Importing the command modules registers their commands on ``main``.
from facesearch.cli import attributes as _attributes  # noqa: F401
from facesearch.cli import bench as _bench  # noqa: F401
from facesearch.cli import bench_megaface as _bench_megaface  # noqa: F401
from facesearch.cli import bench_more as _bench_more  # noqa: F401
from facesearch.cli import demo as _demo  # noqa: F401
from facesearch.cli import embed as _embed  # noqa: F401
from facesearch.cli import index as _index  # noqa: F401
from facesearch.cli import search as _search  # noqa: F401
from facesearch.cli import serve as _serve  # noqa: F401
from facesearch.cli import synth as _synth  # noqa: F401
from facesearch.cli import train as _train  # noqa: F401
from facesearch.cli._app import main

__all__ = ["main"]
