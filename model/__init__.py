"""The multi-task face network (Wang et al., ICMR 2017): architecture, training, attribute labelling, alignment,
dataset readers, synthetic faces and inference.  ``model`` imports none of the other packages.

The names below are imported on first use (PEP 562), so importing a light submodule (``facesearch.model.config``,
the synthetic face generator behind ``facesearch synth --help``) does not load torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facesearch.model.checkpoint import load_checkpoint, model_fingerprint
    from facesearch.model.config import ATTRIBUTES, INPUT_SIZE, ModelConfig, preset
    from facesearch.model.inference import Embedder, load_model
    from facesearch.model.network import FaceNet, Outputs, to_input
    from facesearch.model.train import TrainResult, train
    from facesearch.model.train_config import StageConfig, TrainConfig

_EXPORTS: dict[str, str] = {
    "load_checkpoint": "checkpoint",
    "model_fingerprint": "checkpoint",
    "ATTRIBUTES": "config",
    "INPUT_SIZE": "config",
    "ModelConfig": "config",
    "preset": "config",
    "Embedder": "inference",
    "load_model": "inference",
    "FaceNet": "network",
    "Outputs": "network",
    "to_input": "network",
    "TrainResult": "train",
    "train": "train",
    "StageConfig": "train_config",
    "TrainConfig": "train_config",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"facesearch.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'facesearch.model' has no attribute {name!r}")


__all__ = [
    "ATTRIBUTES",
    "INPUT_SIZE",
    "Embedder",
    "FaceNet",
    "ModelConfig",
    "Outputs",
    "StageConfig",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "load_model",
    "model_fingerprint",
    "preset",
    "to_input",
    "train",
]
