"""``mtl-cnn``: MTL-CNN (Celona et al., Sensors 2018) as an attribute predictor.

The network is :class:`facesearch.model.mtl_cnn.MtlCnn`; the predictor's columns are its task units: one per binary
attribute (the correlation-corrected logit, Platt-scaled) and one per class of a categorical task, named
``task_class`` (the class's softmax probability as a one-vs-rest column, Platt-scaled), so categorical predictions fill
attribute columns as any binary attribute does.  Its checkpoint holds the trunk's :class:`ModelConfig`, every tensor
(routing logits and correlation matrix included) and, in ``extra["predictor"]["mtl_cnn"]``, the
:class:`facesearch.model.mtl_cnn.MtlConfig` (tasks, gates, the co-labelled task pairs).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from facesearch.model.checkpoint import Checkpoint
from facesearch.model.mtl_cnn import MtlCnn, MtlConfig, Task
from facesearch.model.network import count_parameters
from facesearch.model.predictors.facenet import FaceNetPredictor, split_state, wrap_network


class MtlCnnPredictor(FaceNetPredictor):
    """``mtl-cnn``: MTL-CNN's task units (see the module docstring)."""

    key: ClassVar[str] = "mtl-cnn"

    @property
    def network(self) -> MtlCnn:
        assert isinstance(self.model, MtlCnn), "an mtl-cnn predictor wraps an MtlCnn network"
        return self.model

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.network.tasks

    @property
    def parameters(self) -> int:
        return count_parameters(self.model)

    def routing_weights(self) -> np.ndarray:
        """(T, K) float64: each task's softmax share of every channel group of the shared feature."""
        with torch.no_grad():
            return self.network.routing_weights().double().cpu().numpy()

    def correlation(self) -> np.ndarray:
        """(U, U) float64: the correlation layer's matrix with its masked entries (exactly) zero."""
        with torch.no_grad():
            return self.network.masked_correlation().double().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mtl_cnn": self.network.mcfg.to_dict()}

    def _info(self) -> dict[str, Any]:
        return {**super()._info(), "mtl_cnn": self.network.mcfg.to_dict()}

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, device: str | torch.device = "cpu", precision: str = "auto", batch_size: int = 256
    ) -> MtlCnnPredictor:
        info = dict(ckpt.extra.get("predictor") or {})
        if "mtl_cnn" not in info:
            raise ValueError(
                f"{ckpt.path}: an mtl-cnn predictor without its MTL-CNN configuration (corrupt or not one)"
            )
        net_state, _ = split_state(ckpt.model_state)
        model = MtlCnn(ckpt.model_config, MtlConfig.from_dict(info["mtl_cnn"]))
        model.load_state_dict(net_state)
        return wrap_network(cls, ckpt, model, device, precision, batch_size)  # type: ignore[no-any-return]


__all__ = ["MtlCnnPredictor"]
