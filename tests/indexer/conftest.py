"""Fixtures of the indexer tests: a tiny model checkpoint to embed with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.network import FaceNet


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised Fast model (width 0.125, 56x48 input, d = 32) saved as a weights checkpoint."""
    torch.manual_seed(seed)
    cfg = preset("fast", width=0.125, input_size=(56, 48), num_identities=8, embedding_dim=32, attribute_hidden=16)
    save_checkpoint(path, cfg, FaceNet(cfg).state_dict())
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny weights checkpoint, one per test module."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "weights.safetensors")


@pytest.fixture
def make_checkpoint() -> Callable[..., Path]:
    """:func:`tiny_checkpoint` itself, for tests that need a second, different model."""
    return tiny_checkpoint
