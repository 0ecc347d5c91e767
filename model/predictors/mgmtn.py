"""``mgmtn``: the Mask-Guided Multi-Task Network (Gao et al., 2026) as an attribute predictor.

The network is :class:`facesearch.model.mgmtn.MGMTN`; the predictor reads its attribute logits on the crop it was
trained on (the 128x112 margin crop by default, 112x96 for the ablation), Platt-scaled.  Its checkpoint holds the
trunk's :class:`ModelConfig`, the network's tensors (with the frozen mask network's when the masks are learned) and,
in ``extra["predictor"]["mgmtn"]``, the :class:`facesearch.model.mgmtn.MgmtnConfig` (fusion, mask source, crop).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from facesearch.model.checkpoint import Checkpoint
from facesearch.model.faces.align import margin_geometry
from facesearch.model.faces.masks import GROUPS, crop_landmarks, group_masks, mask_overlay
from facesearch.model.faces.prepare import DetectorLike, FaceFailure, Source, prepare_image
from facesearch.model.mgmtn import MGMTN, MaskNet, MgmtnConfig
from facesearch.model.network import count_parameters, to_input
from facesearch.model.predictors.facenet import FaceNetPredictor, split_state, wrap_network


class MgmtnPredictor(FaceNetPredictor):
    """``mgmtn``: MGMTN's attribute logits (see the module docstring)."""

    key: ClassVar[str] = "mgmtn"

    @property
    def mgmtn(self) -> MGMTN:
        assert isinstance(self.model, MGMTN), "an mgmtn predictor wraps an MGMTN network"
        return self.model

    @property
    def parameters(self) -> int:
        """Everything used at prediction time (the mask network included when the masks are learned)."""
        return count_parameters(self.model)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mgmtn": self.mgmtn.mcfg.to_dict()}

    def _info(self) -> dict[str, Any]:
        return {**super()._info(), "mgmtn": self.mgmtn.mcfg.to_dict()}

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, device: str | torch.device = "cpu", precision: str = "auto", batch_size: int = 256
    ) -> MgmtnPredictor:
        info = dict(ckpt.extra.get("predictor") or {})
        if "mgmtn" not in info:
            raise ValueError(f"{ckpt.path}: an mgmtn predictor without its MGMTN configuration (corrupt or not one)")
        net_state, _ = split_state(ckpt.model_state)
        model = MGMTN(ckpt.model_config, MgmtnConfig.from_dict(info["mgmtn"]))
        model.load_state_dict(net_state)
        return wrap_network(cls, ckpt, model, device, precision, batch_size)  # type: ignore[no-any-return]


def mask_picture(
    source: Source,
    landmarks: np.ndarray | None = None,
    detector: DetectorLike = None,
    size: tuple[int, int] = (112, 96),
    margin: bool = True,
    mask_net: MaskNet | None = None,
    sidecar: bool = False,
) -> np.ndarray:
    """The picture of ``facesearch attributes masks``: one image's best face, aligned to the ``size`` template
    (inside the margin crop with ``margin``), with MGMTN's eight group masks drawn from its own landmarks over it,
    one panel per group (landmarks: ``landmarks``, else the ``<image>.json`` sidecar with ``sidecar``, else
    ``detector``); with ``mask_net`` (a learned-mask MGMTN's) a second row shows that network's masks.
    uint8 RGB.  Raises the face's ``ImageError`` when the image gives no usable face."""
    face = prepare_image(source, landmarks, detector, size=size, margin=margin, max_faces=1, sidecar=sidecar).faces[0]
    if isinstance(face, FaceFailure):
        raise face.error
    marks = crop_landmarks(face.landmarks, size, margin)
    crop_size = margin_geometry(size)[0] if margin else size
    analytic = group_masks(marks, crop_size)[0].numpy()
    rows = [mask_overlay(face.crop, analytic, [f"{g} (landmarks)" for g in GROUPS])]
    if mask_net is not None:
        with torch.no_grad():
            learned = mask_net.eval()(to_input(torch.from_numpy(face.crop[None].copy())))[0].numpy()
        rows.append(mask_overlay(face.crop, learned, [f"{g} (learned)" for g in GROUPS]))
    return np.concatenate(rows, axis=0)


__all__ = ["MgmtnPredictor", "mask_picture"]
