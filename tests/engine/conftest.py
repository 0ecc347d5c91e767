"""Fixtures shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from facesearch.engine.search import SearchEngine
from facesearch.indexer.embed import EmbedConfig
from facesearch.indexer.index import IndexConfig, build_index
from facesearch.indexer.pipeline import run_embed


@pytest.fixture(scope="module")
def faces(orl_dir: Path, yunet_path: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> SearchEngine:
    """The ORL s1 faces indexed with the tiny model; attribute columns from its own head."""
    root = tmp_path_factory.mktemp("faces")
    run_embed(EmbedConfig(input=orl_dir / "s1", checkpoint=ckpt, out=root / "s", detector_pad=20, workers=1))
    build_index(root / "s", root / "i", IndexConfig(kind="flat", recall_sample=0))
    return SearchEngine.open(root / "i", checkpoint=ckpt, device="cpu")
