"""The ``facesearch`` command line: one click group; each command family lives in its own module here.

Only this package imports click.  Every command parses options, builds a config dataclass, calls one library entry
point and echoes a summary; library ``ValueError``s become one-line click errors (no traceback for user mistakes).

The commands load lazily (:data:`facesearch.cli._app.COMMANDS`): a command's module, and the libraries it needs, are
imported only when that command runs, so ``facesearch --help`` starts in a fraction of a second.
"""

from __future__ import annotations

from facesearch.cli._app import main

__all__ = ["main"]
