"""The shared-memory crop ring (:mod:`facesearch.indexer.crop_ring`): crops written by a real spawned process come
back byte for byte, the ones that do not fit and those of a closed ring fall back to pickles, slots are reused, and a
small shared-memory file system shrinks the ring instead of failing."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from facesearch.indexer import crop_ring, prepare_pool
from facesearch.indexer.crop_ring import CropRing, open_ring, write_crops
from facesearch.indexer.embed import EmbedConfig, embed_partition, plan_inputs
from facesearch.model.inference import Embedder


def _crops(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(n)]


def _write(slot: crop_ring.RingSlot | None, n: int, seed: int) -> int:
    return write_crops(slot, _crops(n, seed))


@pytest.fixture(scope="module")
def pool() -> ProcessPoolExecutor:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        yield ex


def test_crops_round_trip_through_a_process(pool: ProcessPoolExecutor) -> None:
    ring = CropRing(2, 4, (6, 5, 3))
    try:
        a, b = ring.take(), ring.take()
        assert a is not None and b is not None and ring.take() is None, "two slots, then none"
        assert pool.submit(_write, a, 3, 1).result() == 3
        assert pool.submit(_write, b, 7, 2).result() == 4, "a slot holds its capacity; the rest goes pickled"
        np.testing.assert_array_equal(ring.read(a, 3), np.stack(_crops(3, 1)))
        np.testing.assert_array_equal(ring.read(b, 4), np.stack(_crops(7, 2))[:4])
        again = ring.take()
        assert again is not None and again.index in (a.index, b.index), "a read slot is free again"
        ring.release(again)
        ring.release(again)  # twice is harmless
        assert len(ring.free) == 2
    finally:
        ring.close()
    assert ring.take() is None
    ring.close()  # twice is harmless


def test_closed_ring_falls_back_to_pickles(pool: ProcessPoolExecutor) -> None:
    ring = CropRing(1, 4, (6, 5, 3))
    slot = ring.take()
    ring.close()
    assert pool.submit(_write, slot, 2, 3).result() == 0, "a closed segment takes no crops"
    assert write_crops(None, _crops(2, 0)) == 0


def test_small_shared_memory_shrinks_the_ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stat:
        f_frsize = 1
        f_bavail = 2 * 3 * 90 * 10  # room for 3 slots of 10 crops of 6x5x3 at half the free space

    monkeypatch.setattr(crop_ring.os, "statvfs", lambda _: Stat)
    ring = open_ring(100, 10, (6, 5, 3))
    assert ring is not None and len(ring.free) == 3
    ring.close()
    Stat.f_bavail = 10
    assert open_ring(100, 10, (6, 5, 3)) is None


def test_embedding_reads_crops_from_the_ring(tmp_path: Path, ckpt: Path, synth_data: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A shard's rows are the same through the ring, through pickles, and on threads; the ring was read."""
    casia = synth_data / "casia"
    cfg = EmbedConfig(input=casia / "landmarks.csv", root=casia, format="list", checkpoint=ckpt, out=tmp_path / "o",
                      batch_size=8, dtype="float32", decode_processes=0)  # fmt: skip
    items = plan_inputs(cfg)[:24]
    embedder = Embedder(ckpt, "cpu", precision="fp32", batch_size=8)
    threads = embed_partition(items, embedder, None, cfg)
    reads: list[int] = []
    real_read = CropRing.read
    monkeypatch.setattr(CropRing, "read", lambda self, slot, n: reads.append(n) or real_read(self, slot, n))
    ring = embed_partition(items, embedder, None, cfg.replace(decode_processes=2))
    assert sum(reads) == 24, "every crop came through shared memory"
    monkeypatch.setattr(prepare_pool, "open_ring", lambda slots, capacity, shape: CropRing(slots, 3, shape))
    reads.clear()
    split = embed_partition(items, embedder, None, cfg.replace(decode_processes=2))
    assert sum(reads) == 18, "pieces of 4 crops: 3 in a slot, the fourth pickled"
    monkeypatch.setattr(prepare_pool, "open_ring", lambda *a, **k: None)
    pickled = embed_partition(items, embedder, None, cfg.replace(decode_processes=2))
    assert sum(reads) == 18, "without a ring nothing is read from one"
    assert ring.equals(threads) and split.equals(threads) and pickled.equals(threads)


def _attached(_: int) -> list[str]:
    return list(crop_ring._ATTACHED)


def test_a_process_lets_go_of_closed_rings(pool: ProcessPoolExecutor) -> None:
    """A decode process keeps a few segments attached, and drops those whose ring was closed as soon as it attaches a
    new one (their memory is freed then, not when they age out)."""
    old, new = CropRing(1, 2, (6, 5, 3)), CropRing(1, 2, (6, 5, 3))
    try:
        assert pool.submit(_write, old.take(), 1, 4).result() == 1
        assert old.shm is not None and old.shm.name in pool.submit(_attached, 0).result()
        name = old.shm.name
        old.close()
        assert pool.submit(_write, new.take(), 1, 5).result() == 1
        held = pool.submit(_attached, 0).result()
        assert name not in held and new.shm is not None and new.shm.name in held
    finally:
        old.close()
        new.close()
