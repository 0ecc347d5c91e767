"""``facesearch bench``: the benchmark harness (MegaFace Challenge 1, LFW verification, attribute accuracy, plots).

The group lives here; each benchmark's command is registered on it by its own module (``bench_*.py``)."""

from __future__ import annotations

from facesearch.cli._app import main


@main.group("bench")
def bench() -> None:
    """MegaFace-style identification/verification, LFW verification, attribute accuracy, and result plots."""
