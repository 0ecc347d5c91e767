"""The run's decoded distractor store: exactly the shards' ok rows and attributes, read by every size's selection as
views or gathers equal to streaming the shards; errors reach the reader naming the directory; a run uses it, and one
too large for memory decodes per size with the same counts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from facesearch.benchmarks import megaface_run, megaface_store
from facesearch.benchmarks.megaface_data import CachedDistractors, ShardDistractors
from facesearch.benchmarks.megaface_run import BenchConfig, run_megaface
from facesearch.benchmarks.megaface_store import DecodedShards, fits, ok_ids
from facesearch.indexer import shards
from facesearch.indexer.synth_features import SynthFeaturesConfig, write_synth_features


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Probes (8 identities x 5) and 900 distractors in shards of 256 rows."""
    root = tmp_path_factory.mktemp("store")
    write_synth_features(SynthFeaturesConfig(out=root / "probes", rows=40, dim=16, identities=8, spread=1.2, seed=3))
    write_synth_features(SynthFeaturesConfig(out=root / "dis", rows=900, dim=16, identities=300, shard_rows=256,
                                             seed=4))  # fmt: skip
    return root


def _streamed(directory: Path, ids: np.ndarray, attrs: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    blocks = list(ShardDistractors(directory, ids, attrs).blocks())  # decoded from the shards as they stream
    return np.concatenate([b for b, _ in blocks]), {a: np.concatenate([m[a] for _, m in blocks]) for a in attrs}


def test_store_holds_the_ok_rows_and_serves_selections(features: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(megaface_store, "BLOCK_ROWS", 100)  # several blocks: readers wait for rows part-way
    directory = features / "dis"
    store = DecodedShards(directory, ("Male", "Chubby"))
    store.wait(len(store.ids))
    assert store.done and store.rows.dtype == np.float16
    full = shards.read_all(directory, columns=["Male", "Chubby"], dtype=np.float16)
    np.testing.assert_array_equal(store.ids, full.ids)
    np.testing.assert_array_equal(store.ids, ok_ids(directory))
    np.testing.assert_array_equal(store.rows, full.xb)
    np.testing.assert_array_equal(store.attrs["Male"], full.meta.column("Male").to_numpy())
    rng = np.random.default_rng(0)
    for ids in (store.ids, store.ids[100:400], np.sort(rng.choice(store.ids, 77, replace=False)), store.ids[:1]):
        src = ShardDistractors(directory, ids, ("Male",), store)
        assert src.resident and not src.decoding()
        got = list(src.blocks())
        assert not any(b.flags.writeable for b, _ in got)  # nobody writes into the shared store
        xb, attrs = _streamed(directory, ids, ("Male",))
        np.testing.assert_array_equal(np.concatenate([b for b, _ in got]), xb)
        np.testing.assert_array_equal(np.concatenate([m["Male"] for _, m in got]), attrs["Male"])
        idx = np.unique(rng.integers(0, len(ids), 5))
        np.testing.assert_array_equal(src.take(idx), xb[idx])
        cached = CachedDistractors(src)  # passed through: no second copy
        np.testing.assert_array_equal(np.concatenate([b for b, _ in cached.blocks()]), xb)
        assert cached.rows is None and not cached.decoding()
    # a store without an attribute a source asks for is not used; an id the store lacks is an error naming it
    assert not ShardDistractors(directory, store.ids, ("Big_Nose",), store).resident
    with pytest.raises(ValueError, match=r"1 selected distractor rows are missing or failed \(first id: 123456\)"):
        ShardDistractors(directory, np.array([store.ids[0], 123456]), (), store)


def test_store_skips_failed_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    entries, lo = [], 0
    for i, n in enumerate([7, 0, 5, 9]):
        ids = np.arange(lo, lo + n)
        status = ["ok" if j % 3 else "corrupt" for j in ids]
        table = shards.table_from_arrays(ids, [f"a/{j}.jpg" for j in ids], [None] * n, rng.standard_normal((n, 4)),
                                         {"Male": rng.random(n)}, None, None, status,
                                         [None if s == "ok" else "bad" for s in status])  # fmt: skip
        entries.append(shards.write_shard(tmp_path / shards.shard_name(i), table, (lo, lo + n)))
        lo += n
    shards.write_manifest(tmp_path, shards.Manifest("f" * 64, 4, "float16", ("Male",), shards=tuple(entries),
                                                    planned_shards=4, complete=True))  # fmt: skip
    store = DecodedShards(tmp_path, ("Male",))
    store.wait(len(store.ids))
    full = shards.read_all(tmp_path, columns=["Male"], dtype=np.float16)
    assert store.ids.tolist() == [j for j in range(21) if j % 3]
    np.testing.assert_array_equal(store.rows, full.xb)
    np.testing.assert_array_equal(store.attrs["Male"], full.meta.column("Male").to_numpy())


def test_store_errors_reach_the_reader(features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "dis"
    directory.mkdir()
    for f in (features / "dis").iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    real = shards.iter_shards

    def failing(*a: object, **k: object):  # the third block cannot be read
        for i, block in enumerate(real(*a, **k)):  # type: ignore[arg-type]
            if i == 2:
                raise ValueError("cannot read shard part-00001.parquet (ids 256..511): damaged")
            yield block

    monkeypatch.setattr(megaface_store, "BLOCK_ROWS", 100)
    monkeypatch.setattr(megaface_store.shards, "iter_shards", failing)
    store = DecodedShards(directory)
    store.wait(200)  # rows before the damage are served
    with pytest.raises(ValueError, match=f"cannot read the distractor shards {directory}: .*damaged"):
        store.wait(201)
    monkeypatch.setattr(megaface_store.shards, "iter_shards", real)
    last = directory / shards.read_manifest(directory).shards[-1].file
    last.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=f"cannot read shard {last}"):
        DecodedShards(directory)


def test_store_closed_early(features: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(megaface_store, "BLOCK_ROWS", 10)
    store = DecodedShards(features / "dis")
    store.close()
    with pytest.raises(ValueError, match="closed before row 900"):
        store.wait(900)


def test_run_uses_the_store_and_too_large_a_directory_decodes_per_size(
    features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[DecodedShards] = []
    real = megaface_run.DecodedShards

    def spy(*a: object, **k: object) -> DecodedShards:
        made.append(real(*a, **k))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(megaface_run, "DecodedShards", spy)
    cfg = BenchConfig(out=tmp_path / "a", probes=features / "probes", distractors=features / "dis", sizes=(10, 300))
    a = run_megaface(cfg)
    assert len(made) == 1 and made[0].done and fits(features / "dis")
    monkeypatch.setattr(megaface_run, "fits", lambda directory: False)  # as for a directory beyond the limit
    b = run_megaface(dataclasses.replace(cfg, out=tmp_path / "b"))
    assert len(made) == 1
    for x, y in zip(a, b, strict=True):
        for key in ("counts", "rank_histogram", "roc", "ties"):
            assert json.dumps(x[key], sort_keys=True) == json.dumps(y[key], sort_keys=True)
