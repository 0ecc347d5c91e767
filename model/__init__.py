"""The multi-task face network (Wang et al., ICMR 2017): architecture, training, attribute labelling, alignment,
dataset readers, synthetic faces and inference.  ``model`` imports none of the other packages."""

from facesearch.model.checkpoint import load_checkpoint, model_fingerprint
from facesearch.model.config import ATTRIBUTES, INPUT_SIZE, ModelConfig, preset
from facesearch.model.inference import Embedder, load_model
from facesearch.model.network import FaceNet, Outputs, to_input
from facesearch.model.train import TrainResult, train
from facesearch.model.train_config import StageConfig, TrainConfig

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
