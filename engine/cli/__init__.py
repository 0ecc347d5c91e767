"""The ``facesearch`` command line: one click group; each command family lives in its own module here.

Only this package imports click.  Every command parses options, builds a config dataclass, calls one library entry
point and echoes a summary; library ``ValueError``s become one-line click errors (no traceback for user mistakes).
"""

from __future__ import annotations

from engine.cli._app import main

# Importing the command modules registers their commands on ``main``.
from engine.cli import synth as _synth  # noqa: F401  (registers `synth`)

__all__ = ["main"]
