"""Shards -> the devkit's feature tree (facesearch.benchmarks.devkit_export): streamed block by block, every ok row
written where the devkit looks for it, read back bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facesearch.benchmarks import devkit
from facesearch.benchmarks.devkit_export import FILE_ENDING, export_bins
from facesearch.indexer import shards
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "s"
    write_synth_features(SynthFeaturesConfig(out=out, rows=23, dim=8, identities=5, shard_rows=10, dtype="float16"))
    return out


@pytest.mark.parametrize("block_rows", [1, 7, 65536])  # blocks across shard boundaries, and one block
def test_export_reads_back_as_the_shards(features: Path, tmp_path: Path, block_rows: int) -> None:
    n = export_bins(features, tmp_path / "bins", "_mine.bin", block_rows=block_rows)
    ref = shards.read_all(features, columns=["path"])
    paths = [str(p) for p in ref.meta.column("path").to_pylist()]
    assert n == len(paths) == 23
    got = devkit.read_feature_tree(tmp_path / "bins", paths, "_mine.bin")
    assert got.dtype == np.float32 and np.array_equal(got, ref.xb)  # float16 -> float32 is exact


def test_default_ending_and_bad_ending(features: Path, tmp_path: Path) -> None:
    assert FILE_ENDING == "_facesearch.bin" and devkit.algorithm_name(FILE_ENDING) == "facesearch"
    export_bins(features, tmp_path / "bins")
    assert len(list((tmp_path / "bins").rglob(f"*{FILE_ENDING}"))) == 23
    with pytest.raises(ValueError, match="has no algorithm name"):
        export_bins(features, tmp_path / "other", ".bin")
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_not_a_shard_directory(tmp_path: Path) -> None:
    with pytest.raises((ValueError, OSError)):
        export_bins(tmp_path, tmp_path / "bins")
