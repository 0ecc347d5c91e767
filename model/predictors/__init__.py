"""Attribute predictors behind one interface (ATTRIBUTE_MODELS.md), selected by key.

==============  ==============================================================================================
key             predictor
==============  ==============================================================================================
``icmr``        the multi-task identity network's attribute head (Wang et al., ICMR 2017)
``moon``        the attribute-only network trained with MOON's re-balanced loss (Rudd et al., ECCV 2016)
``lnets-anet``  identity-pretrained ANet features of ten patch views, one linear SVM per attribute (Liu et al.,
                ICCV 2015)
``mgmtn``       face-region group masks gate multi-scale trunk features, fused with global ones (Gao et al., 2026)
==============  ==============================================================================================

:func:`load_predictor` opens any predictor file (and any checkpoint of ``facesearch train`` or of the attribute
classifier, read as ``icmr`` / ``moon``); :func:`predictor_class` maps a key to its class.  Training lives in
:mod:`facesearch.model.predictors.training`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from facesearch.model.checkpoint import Checkpoint, load_checkpoint
from facesearch.model.predictors.base import AttributePredictor, InputSpec
from facesearch.model.predictors.calibration import Calibration
from facesearch.model.predictors.facenet import IcmrPredictor, MoonPredictor
from facesearch.model.predictors.lnets import LNetsPredictor
from facesearch.model.predictors.mgmtn import MgmtnPredictor
from facesearch.model.predictors.mtl_cnn import MtlCnnPredictor

#: Registry: key -> predictor class.
PREDICTORS: dict[str, type[Any]] = {
    IcmrPredictor.key: IcmrPredictor,
    MoonPredictor.key: MoonPredictor,
    LNetsPredictor.key: LNetsPredictor,
    MgmtnPredictor.key: MgmtnPredictor,
    MtlCnnPredictor.key: MtlCnnPredictor,
}


def predictor_class(key: str) -> type[Any]:
    """The class registered under ``key``; ``ValueError`` listing the valid keys otherwise."""
    try:
        return PREDICTORS[key]
    except KeyError:
        raise ValueError(f"unknown attribute predictor {key!r}; valid: {', '.join(PREDICTORS)}") from None


def checkpoint_key(ckpt: Checkpoint) -> str:
    """The predictor key of a checkpoint: as recorded, else ``moon`` for the attribute classifier of ``facesearch
    attributes train`` (MOON loss, no identity loss) and ``icmr`` for any other network."""
    info = ckpt.extra.get("predictor") or {}
    if "key" in info:
        return str(info["key"])
    tc = ckpt.train_config or {}
    stages = tc.get("stages") or []
    if tc.get("attribute_loss") == "moon" and stages and all(float(s.get("lambda2", 1)) == 0 for s in stages):
        return "moon"
    return "icmr"


def load_predictor(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", precision: str = "auto", batch_size: int = 256
) -> AttributePredictor:
    """Open a predictor file or a network checkpoint as the predictor it is (see :func:`checkpoint_key`).
    Raises ``FileNotFoundError`` / ``ValueError`` (not a checkpoint, corrupt, unknown key) naming the file."""
    ckpt = load_checkpoint(path, map_location="cpu")
    key = checkpoint_key(ckpt)
    try:
        cls = predictor_class(key)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    predictor: AttributePredictor = cls.from_checkpoint(ckpt, device=device, precision=precision,
                                                        batch_size=batch_size)  # fmt: skip
    return predictor


__all__ = [
    "PREDICTORS",
    "AttributePredictor",
    "Calibration",
    "InputSpec",
    "checkpoint_key",
    "load_predictor",
    "predictor_class",
]
