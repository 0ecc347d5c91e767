"""Fixtures shared by the index tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from facesearch.indexer.index_store import POINTER, current_layout


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
