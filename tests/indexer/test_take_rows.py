"""Reading a few rows by id reads only the shards and row groups that hold them, and equals the streamed rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facesearch.indexer import shards
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


def test_take_rows_equals_streamed_rows(tmp_path: Path) -> None:
    write_synth_features(SynthFeaturesConfig(out=tmp_path, rows=5000, dim=16, identities=50, shard_rows=1200))
    every = shards.read_all(tmp_path, columns=[])
    ids = np.array([4999, 0, 1201, 1199, 3000, 1201])
    got = shards.take_rows(tmp_path, ids)
    want = every.xb[np.searchsorted(every.ids, ids)]
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert shards.take_rows(tmp_path, []).shape == (0, 16)
    with pytest.raises(KeyError, match="5000"):
        shards.take_rows(tmp_path, [3, 5000])
    with pytest.raises(KeyError, match="-7"):
        shards.take_rows(tmp_path, [-7])
