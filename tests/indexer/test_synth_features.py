"""Synthetic features: the shard schema, determinism, identity structure, probes whose mates are in the gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facesearch.indexer import shards
from facesearch.indexer.search import search_exact
from facesearch.indexer.synth_features import PROBE_ID_OFFSET, SynthFeaturesConfig, write_synth_features
from facesearch.model.config import ATTRIBUTES


def _cfg(out: Path, **kw: object) -> SynthFeaturesConfig:
    base: dict[str, object] = {"rows": 500, "dim": 64, "identities": 20, "spread": 0.6, "shard_rows": 200}
    base.update(kw)
    return SynthFeaturesConfig(out=out, **base)  # type: ignore[arg-type]


def test_schema_manifest_and_determinism(tmp_path: Path) -> None:
    s = write_synth_features(_cfg(tmp_path / "a"))
    assert s.rows == 500 and s.shards == 3
    m = shards.read_manifest(tmp_path / "a")
    assert m.complete and m.d == 64 and m.dtype == "float16" and m.attributes == ATTRIBUTES
    assert m.fingerprint.startswith("synthetic:0:") and [e.rows for e in m.shards] == [200, 200, 100]
    table = shards.read_all(tmp_path / "a")
    assert table.ids.tolist() == list(range(500))
    np.testing.assert_allclose(np.linalg.norm(table.xb, axis=1), 1.0, atol=2e-3)  # float16 storage rounding
    assert table.meta.column("path")[0].as_py() == "synth/synth_0000000/0.jpg"
    write_synth_features(_cfg(tmp_path / "b"))
    for ea, eb in zip(m.shards, shards.read_manifest(tmp_path / "b").shards, strict=True):
        assert ea.sha256 == eb.sha256  # same config, same bytes
    assert write_synth_features(_cfg(tmp_path / "a")).seconds == 0.0  # already complete: nothing to do
    with pytest.raises(ValueError, match="different shard set"):
        write_synth_features(_cfg(tmp_path / "a", seed=1))


def test_identity_structure_and_attributes(tmp_path: Path) -> None:
    write_synth_features(_cfg(tmp_path / "g"))
    b = shards.read_all(tmp_path / "g")
    who = np.array(b.meta.column("identity").to_pylist())
    S = b.xb.astype(np.float32) @ b.xb.astype(np.float32).T
    same = who[:, None] == who[None, :]
    assert S[same].mean() > 0.5 > 0.1 > S[~same].mean()  # spread 0.6: cos ~ 1/(1+0.36) within an identity
    male = b.meta.column("Male").to_numpy()
    per_id = [male[who == w].mean() for w in np.unique(who)]
    assert min(per_id) < 0.3 and max(per_id) > 0.7  # probabilities follow the identity's latent


def test_probes_find_their_mates_in_the_gallery(tmp_path: Path) -> None:
    write_synth_features(_cfg(tmp_path / "g"))
    write_synth_features(_cfg(tmp_path / "p", probes_per_identity=2, probe_identities=5))
    g, p = shards.read_all(tmp_path / "g"), shards.read_all(tmp_path / "p")
    assert shards.read_manifest(tmp_path / "p").fingerprint == shards.read_manifest(tmp_path / "g").fingerprint
    assert len(p.ids) == 10 and p.ids.min() == PROBE_ID_OFFSET
    _, found = search_exact(p.xb.astype(np.float32), [(g.ids, g.xb)], 1)
    g_who = dict(zip(g.ids.tolist(), g.meta.column("identity").to_pylist(), strict=True))
    assert [g_who[int(i)] for i in found[:, 0]] == p.meta.column("identity").to_pylist()


def test_bad_config_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows"):
        _cfg(tmp_path, rows=0)
    with pytest.raises(ValueError, match="dtype"):
        _cfg(tmp_path, dtype="int8")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "junk").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_synth_features(_cfg(tmp_path / "x"))


@pytest.mark.parametrize("spread", [float("nan"), float("inf"), -0.1])
def test_bad_spread_is_refused(tmp_path: Path, spread: float) -> None:
    with pytest.raises(ValueError, match="spread"):
        SynthFeaturesConfig(out=tmp_path / "x", rows=10, dim=4, identities=2, spread=spread)
