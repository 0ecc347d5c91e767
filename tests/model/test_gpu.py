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
