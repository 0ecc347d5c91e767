"""The CUDA twins of the CPU tests: training with exact resume, and embeddings that agree with the CPU.

Marked ``gpu``; skipped where no CUDA device is present (CI).  Run with ``pytest -m gpu`` on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facesearch.model.faces.datasets import FaceDataset, FaceItem, read_casia
from facesearch.model.inference import Embedder
from facesearch.model.train import train
from facesearch.model.train_config import StageConfig, TrainConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cfg(data: Path, out: Path, precision: str, **kw: object) -> TrainConfig:
    return TrainConfig(
        data=data / "casia",
        out=out,
        labels=data / "casia" / "attributes.csv",
        arch="fast",
        width=0.25,
        input_size=(56, 48),
        stages=(StageConfig(8, 0.05), StageConfig(4, 0.005, lambda1=0.1, lambda2=1.0)),
        batch_size=16,
        device="cuda",
        precision=precision,
        deterministic=True,
        num_workers=0,
        log_every=1,
        val_every=0,
        checkpoint_every=0,
        **kw,  # type: ignore[arg-type]
    )


def _losses(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if r.get("event") == "train"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_training_resumes_exactly(synth_data: Path, tmp_path: Path, precision: str) -> None:
    whole = train(_cfg(synth_data, tmp_path / "whole", precision))
    train(_cfg(synth_data, tmp_path / "split", precision, stop_at=6))
    split = train(_cfg(synth_data, tmp_path / "split", precision, resume=True))
    a, b = _losses(whole.metrics), _losses(split.metrics)
    assert len(a) == len(b) == 12 and all(np.isfinite(a))
    # Deterministic cuDNN kernels: the resumed run repeats the uninterrupted one bit for bit (measured on an H100).
    assert a == b
    assert whole.fingerprint == split.fingerprint


def test_cuda_embeddings_match_cpu(synth_data: Path, tmp_path: Path) -> None:
    run = train(_cfg(synth_data, tmp_path / "run", "fp32"))
    assert run.weights is not None
    ds = FaceDataset(read_casia(synth_data / "casia")[:40], size=(56, 48))
    crops = np.stack([it.image for it in (ds[i] for i in range(len(ds))) if isinstance(it, FaceItem)])
    e_cpu, p_cpu = Embedder(run.weights, device="cpu", precision="fp32").embed_crops(crops)
    e_gpu, p_gpu = Embedder(run.weights, device="cuda", precision="fp32").embed_crops(crops)
    # fp32 on both (TF32 off by default for convolutions is not guaranteed: cuDNN may use TF32), so allow 2e-3.
    np.testing.assert_allclose(e_gpu, e_cpu, atol=2e-3)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=2e-3)
    e_bf16, _ = Embedder(run.weights, device="cuda", precision="bf16").embed_crops(crops)
    cos = (e_bf16 * e_cpu).sum(1)
    assert cos.min() > 0.99, f"bf16 embeddings drift: min cosine {cos.min():.4f}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replay_matches_eager(precision: str) -> None:
    """Full batches replay a captured CUDA graph; a short last batch, the flip average and two threads sharing one
    Embedder give what the eager network gives (the same kernels: equal up to cuDNN's run-to-run order)."""
    import threading

    from facesearch.model.config import preset
    from facesearch.model.network import FaceNet

    torch.manual_seed(0)
    net = FaceNet(preset("fast", width=0.25, input_size=(56, 48), num_identities=10))
    crops = np.random.default_rng(0).integers(0, 256, (100, 56, 48, 3), dtype=np.uint8)
    for flip in (False, True):
        graphed = Embedder(net, "cuda", precision, batch_size=32, flip_average=flip)
        eager = Embedder(net, "cuda", precision, batch_size=32, flip_average=flip, cuda_graphs=False)
        e_g, p_g = graphed.embed_crops(crops)  # 3 full batches through the graph, 4 eager
        assert graphed._graph is not None and eager._graph is None
        e_e, p_e = eager.embed_crops(crops)
        np.testing.assert_allclose(e_g, e_e, atol=1e-5 if precision == "fp32" else 2e-3)
        np.testing.assert_allclose(p_g, p_e, atol=1e-5 if precision == "fp32" else 2e-3)
        again, _ = graphed.embed_crops(crops)
        np.testing.assert_allclose(again, e_g, atol=1e-6)  # replays are repeatable
        results: dict[int, np.ndarray] = {}

        def run(k: int, emb: Embedder = graphed, out: dict[int, np.ndarray] = results) -> None:
            out[k] = emb.embed_crops(np.roll(crops, k, axis=0))[0]

        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k, got in results.items():
            np.testing.assert_allclose(got, graphed.embed_crops(np.roll(crops, k, axis=0))[0], atol=1e-6)
