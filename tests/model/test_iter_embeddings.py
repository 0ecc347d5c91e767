"""The one embedding loop (:func:`iter_embeddings`) and the dataset pass built on it: rows against the model run
directly on the same crops, NaN rows for items without a crop, batches pulled one at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from facesearch.model.config import ModelConfig
from facesearch.model.faces.datasets import FaceDataset, Sample, read_list
from facesearch.model.inference import Embedder, embed_dataset, iter_embeddings
from facesearch.model.network import FaceNet

torch.set_num_threads(1)

CFG = ModelConfig(arch="variant", head=1, num_identities=6, width=0.125, input_size=(56, 48), embedding_dim=24,
                  attribute_hidden=8)  # fmt: skip


def _embedder(batch_size: int = 4) -> Embedder:
    torch.manual_seed(0)
    return Embedder(FaceNet(CFG), precision="fp32", batch_size=batch_size)


def test_rows_match_the_model_and_missing_crops_are_nan() -> None:
    embedder = _embedder()
    rng = np.random.default_rng(0)
    crops = list(rng.integers(0, 256, size=(7, 56, 48, 3), dtype=np.uint8))
    items: list[np.ndarray | None] = [crops[0], None, crops[1], crops[2], None, crops[3], crops[4]]
    batches = [items[:3], items[3:5], items[5:], []]
    out = list(iter_embeddings(embedder, batches, crop=lambda c: c))
    assert [len(b.items) for b in out] == [3, 2, 2, 0] and all(b.seconds >= 0 for b in out)
    emb = np.concatenate([b.embeddings for b in out])
    probs = np.concatenate([b.probabilities for b in out])
    ok = np.concatenate([b.ok for b in out])
    assert emb.shape == (7, 24) and probs.shape == (7, len(CFG.attributes)) and emb.dtype == probs.dtype == np.float32
    assert ok.tolist() == [c is not None for c in items]
    assert np.isnan(emb[~ok]).all() and np.isnan(probs[~ok]).all()
    # The reference: the model alone on each batch's crops (same forward passes, so equal to the bit).
    for b in out:
        present = [c for c in b.items if c is not None]
        if present:
            ref_e, ref_p = embedder.embed_crops(np.stack(present))
            np.testing.assert_array_equal(b.embeddings[b.ok], ref_e)
            np.testing.assert_array_equal(b.probabilities[b.ok], ref_p)
    np.testing.assert_allclose(np.linalg.norm(emb[ok], axis=1), 1, atol=1e-5)


def test_batches_are_pulled_one_at_a_time() -> None:
    embedder, pulled = _embedder(), []

    def producer() -> Iterator[list[int]]:
        for i in range(3):
            pulled.append(i)
            yield [i]

    crop = np.zeros((56, 48, 3), np.uint8)
    for i, batch in enumerate(iter_embeddings(embedder, producer(), crop=lambda _: crop)):
        assert pulled == list(range(i + 1)) and list(batch.items) == [i]


def test_embed_dataset_rows_and_failures(synth_data: Path) -> None:
    samples = read_list(synth_data / "casia" / "landmarks.csv")[:9]
    samples.insert(4, Sample(synth_data / "missing.jpg", samples[0].identity, samples[0].landmarks))
    dataset = FaceDataset(samples, size=(56, 48), attributes=CFG.attributes)
    embedder = _embedder(batch_size=256)
    emb, probs, skips = embed_dataset(embedder, dataset, batch_size=4)
    assert emb.shape == (10, 24) and probs.shape == (10, len(CFG.attributes))
    assert np.isnan(emb[4]).all() and np.isnan(probs[4]).all() and not np.isnan(np.delete(emb, 4, 0)).any()
    assert skips.counts() == {"missing": 1} and skips.total == 10
    crops = [dataset[i] for i in range(10)]
    # Reference: the model on the dataset's crops, batch by batch as the loader cut them (4, 4, 2 items).
    for lo in range(0, 10, 4):
        rows = [i for i in range(lo, min(lo + 4, 10)) if i != 4]
        ref_e, ref_p = embedder.embed_crops(np.stack([crops[i].image for i in rows]))  # type: ignore[union-attr]
        np.testing.assert_array_equal(emb[rows], ref_e)
        np.testing.assert_array_equal(probs[rows], ref_p)
