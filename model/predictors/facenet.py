"""The two predictors whose scores are a :class:`FaceNet`'s attribute logits.

- ``icmr`` (Wang et al., ICMR 2017): the attribute head of the multi-task identity network — any checkpoint of
  ``facesearch train``, read as it is (uncalibrated: the logits are taken as they are) or saved with a Platt
  calibration by ``facesearch attributes train --method icmr``.
- ``moon`` (Rudd et al., ECCV 2016, as ICMR §3.2 uses it): the attribute-only network trained with MOON's
  re-balanced loss, by default on the margin crop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from facesearch.model.checkpoint import Checkpoint, save_checkpoint
from facesearch.model.inference import Embedder
from facesearch.model.network import FaceNet, count_macs, count_parameters
from facesearch.model.predictors.base import PREDICTOR_PREFIX, AttributePredictor, InputSpec
from facesearch.model.predictors.calibration import Calibration


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's model state -> (the network's tensors, the predictor's own without their prefix)."""
    own = {k[len(PREDICTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PREDICTOR_PREFIX)}
    net = {k: v for k, v in state.items() if not k.startswith(PREDICTOR_PREFIX)}
    return net, own


def calibration_from(own: dict[str, torch.Tensor], info: dict[str, Any], m: int) -> Calibration:
    """The calibration stored in a predictor checkpoint (identity when it has none)."""
    if "calibration.scale" not in own:
        return Calibration.identity(m)
    method = str(info.get("calibration", "platt"))
    return Calibration(own["calibration.scale"].double().numpy(), own["calibration.bias"].double().numpy(), method)


def calibration_tensors(cal: Calibration) -> dict[str, torch.Tensor]:
    return {
        f"{PREDICTOR_PREFIX}calibration.scale": torch.from_numpy(cal.scale.copy()),
        f"{PREDICTOR_PREFIX}calibration.bias": torch.from_numpy(cal.bias.copy()),
    }


def open_network(ckpt: Checkpoint) -> tuple[dict[str, Any], FaceNet, dict[str, torch.Tensor]]:
    """A predictor checkpoint -> (its ``extra["predictor"]`` record, the network loaded, the predictor's own
    tensors)."""
    info = dict(ckpt.extra.get("predictor") or {})
    net, own = split_state(ckpt.model_state)
    model = FaceNet(ckpt.model_config)
    model.load_state_dict(net)
    return info, model, own


def crop_of(train_config: dict[str, Any] | None) -> str:
    return str((train_config or {}).get("crop", "template"))


class FaceNetPredictor(AttributePredictor):
    """Scores = a FaceNet's attribute logits on the crop it was trained on (see the module docstring)."""

    key: ClassVar[str] = "icmr"

    def __init__(
        self,
        model: FaceNet,
        input_spec: InputSpec | None = None,
        calibration: Calibration | None = None,
        meta: dict[str, Any] | None = None,
        *,
        train_config: dict[str, Any] | None = None,
        identities: tuple[str, ...] = (),
        fingerprint: str = "",
        device: str | torch.device = "cpu",
        precision: str = "auto",
        batch_size: int = 256,
    ) -> None:
        self.embedder = Embedder(model, device=device, precision=precision, batch_size=batch_size)
        self.model = self.embedder.model
        self.attributes = tuple(model.cfg.attributes)
        if input_spec is None:
            input_spec = InputSpec(model.cfg.input_size)
        if input_spec.crop_size != tuple(model.cfg.input_size):
            raise ValueError(f"{self.key}: the network reads {model.cfg.input_size} crops, the input spec gives "
                             f"{input_spec.crop_size}")  # fmt: skip
        self.input_spec = input_spec
        self.calibration = calibration or Calibration.identity(len(self.attributes))
        self.meta = dict(meta or {})
        self.train_config = train_config
        self.identities = identities
        self.fingerprint = fingerprint or self._state_fingerprint()

    def _state(self) -> dict[str, torch.Tensor]:
        state = dict(self.model.state_dict())
        if self.calibration.method != "identity":
            state.update(calibration_tensors(self.calibration))
        return state

    def _state_fingerprint(self) -> str:
        from facesearch.model.checkpoint import model_fingerprint

        return model_fingerprint(self.model.cfg, {k: v.detach().cpu() for k, v in self._state().items()})

    def scores(self, crops: np.ndarray) -> np.ndarray:
        return self.embedder.forward_crops(crops)[1]

    @property
    def parameters(self) -> int:
        """The trunk, the feature layer and the attribute head (not the identity classifier)."""
        classifier = self.model.classifier
        return count_parameters(self.model) - (count_parameters(classifier) if classifier is not None else 0)

    @property
    def macs(self) -> int:
        return count_macs(self.model)

    def _info(self) -> dict[str, Any]:
        """The checkpoint's ``extra["predictor"]`` record."""
        return {"key": self.key, "input": self.input_spec.to_dict(), "calibration": self.calibration.method,
                "meta": self.meta}  # fmt: skip

    def save(self, path: str | os.PathLike[str]) -> str:
        info = self._info()
        self.fingerprint = save_checkpoint(Path(path), self.model.cfg, self._state(), train_config=self.train_config,
                                           identities=self.identities, extra={"predictor": info})  # fmt: skip
        self.path = Path(path)
        return self.fingerprint

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, device: str | torch.device = "cpu", precision: str = "auto", batch_size: int = 256
    ) -> FaceNetPredictor:
        info, model, own = open_network(ckpt)
        if "input" in info:
            spec = InputSpec.from_dict(info["input"])
        elif crop_of(ckpt.train_config) == "margin":
            spec = InputSpec(tuple((ckpt.train_config or {})["input_size"]), margin=True)  # type: ignore[arg-type]
        else:
            spec = InputSpec(ckpt.model_config.input_size)
        cal = calibration_from(own, info, len(ckpt.model_config.attributes))
        out = cls(model, spec, cal, dict(info.get("meta") or {}), train_config=ckpt.train_config,
                  identities=ckpt.identities, fingerprint=ckpt.fingerprint, device=device, precision=precision,
                  batch_size=batch_size)  # fmt: skip
        out.path = ckpt.path
        return out


def wrap_network(
    cls: type[FaceNetPredictor], ckpt: Checkpoint, model: torch.nn.Module, device: str | torch.device, precision: str,
    batch_size: int,
) -> Any:  # fmt: skip
    """A predictor of class ``cls`` around ``model`` (already loaded from ``ckpt``), with the checkpoint's recorded
    input, calibration, meta and fingerprint: the common end of a network predictor's ``from_checkpoint``."""
    info = dict(ckpt.extra.get("predictor") or {})
    _, own = split_state(ckpt.model_state)
    cal = calibration_from(own, info, len(ckpt.model_config.attributes))
    out = cls(model, InputSpec.from_dict(info["input"]), cal, dict(info.get("meta") or {}),  # type: ignore[arg-type]
              train_config=ckpt.train_config, fingerprint=ckpt.fingerprint, device=device, precision=precision,
              batch_size=batch_size)  # fmt: skip
    out.path = ckpt.path
    return out


class IcmrPredictor(FaceNetPredictor):
    """``icmr``: the multi-task identity network's own attribute head."""

    key: ClassVar[str] = "icmr"


class MoonPredictor(FaceNetPredictor):
    """``moon``: the MOON-trained attribute network."""

    key: ClassVar[str] = "moon"


__all__ = ["FaceNetPredictor", "IcmrPredictor", "MoonPredictor", "calibration_from", "calibration_tensors",
           "open_network", "split_state", "wrap_network"]  # fmt: skip
