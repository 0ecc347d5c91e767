"""The attribute-predictor interface (ATTRIBUTE_MODELS.md §0) and its file format.

Every predictor maps aligned faces to calibrated probabilities for a list of attribute names:

- :attr:`AttributePredictor.attributes` — the names, in column order;
- :attr:`AttributePredictor.input_spec` — which aligned crop it reads (:class:`InputSpec`: the template size and
  whether it takes the margin crop around it);
- :meth:`AttributePredictor.scores` — raw scores (logits, SVM decision values), (N, M) float32;
- :meth:`AttributePredictor.predict_crops` — probabilities in [0, 1]: the scores through the predictor's
  :class:`facesearch.model.predictors.calibration.Calibration`;
- :meth:`AttributePredictor.predict` — the same from image files (or bytes, or arrays) through the one face path,
  NaN rows for images without a usable face;
- :attr:`AttributePredictor.fingerprint` — SHA-256 of its configuration and every tensor (network, SVMs,
  calibration), so an index can say exactly which predictor filled its attribute columns;
- :meth:`AttributePredictor.save` — a checkpoint in the project's safe format (safetensors with a checksum, never
  pickle): the network's tensors under ``model.``, the predictor's own (SVM weights, calibration) under
  ``model.predictor.``, and the predictor's description in the checkpoint's ``extra["predictor"]``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from facesearch.model.faces.align import margin_geometry
from facesearch.model.faces.datasets import FaceDataset, FaceItem, Failure, SkipReport
from facesearch.model.faces.prepare import DetectorLike, FaceFailure, Source, prepare_image
from facesearch.model.predictors.calibration import Calibration

#: Prefix of the predictor's own tensors inside a checkpoint's model state.
PREDICTOR_PREFIX = "predictor."


@dataclass(frozen=True)
class InputSpec:
    """The aligned crop a predictor reads: the ``size`` (height, width) template, alone or (``margin``) inside the
    margin canvas (:func:`facesearch.model.faces.align.margin_geometry`: 128x112 around 112x96)."""

    size: tuple[int, int]
    margin: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the crops :meth:`AttributePredictor.predict_crops` takes."""
        return margin_geometry(self.size)[0] if self.margin else self.size

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "margin": self.margin}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(tuple(d["size"]), bool(d.get("margin", False)))  # type: ignore[arg-type]


class AttributePredictor(ABC):
    """Aligned faces -> calibrated attribute probabilities (see the module docstring).

    Subclasses set ``key`` (the registry key), implement :meth:`scores`, :meth:`save`, :attr:`parameters` and
    :attr:`macs`, and keep ``attributes``, ``input_spec``, ``calibration``, ``fingerprint`` and ``meta`` (training
    seconds, options, validation report) as attributes."""

    key: ClassVar[str]
    attributes: tuple[str, ...]
    input_spec: InputSpec
    calibration: Calibration
    fingerprint: str
    meta: dict[str, Any]
    path: Path | None = None

    @abstractmethod
    def scores(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB crops at ``input_spec.crop_size`` -> raw scores (N, M) float32."""

    @abstractmethod
    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the predictor atomically to ``path``; returns its fingerprint."""

    @property
    @abstractmethod
    def parameters(self) -> int:
        """Learned parameters used at prediction time."""

    @property
    @abstractmethod
    def macs(self) -> int:
        """Multiply-accumulates per image (every view)."""

    @abstractmethod
    def _state_fingerprint(self) -> str:
        """The fingerprint of the current tensors (network, predictor's own, calibration)."""

    def with_calibration(self, calibration: Calibration, meta: dict[str, Any] | None = None) -> Any:
        """The same predictor with ``calibration`` (and ``meta`` merged in); a new fingerprint."""
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.calibration, out.meta = calibration, {**self.meta, **(meta or {})}
        out.fingerprint = out._state_fingerprint()
        return out

    def check_crops(self, crops: np.ndarray) -> None:
        h, w = self.input_spec.crop_size
        if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4:
            got = f"{type(crops).__name__} {getattr(crops, 'dtype', '')} {getattr(crops, 'shape', '')}"
            raise ValueError(f"{self.key} predictor: crops must be a uint8 array (N, {h}, {w}, 3), got {got}")
        if crops.shape[1:] != (h, w, 3):
            kind = "margin crop" if self.input_spec.margin else "aligned crop"
            raise ValueError(f"{self.key} predictor reads the {h}x{w} {kind}; got crops of shape {crops.shape}")

    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) crops at ``input_spec.crop_size`` -> probabilities (N, M) float32 in [0, 1]."""
        self.check_crops(crops)
        if len(crops) == 0:
            return np.zeros((0, len(self.attributes)), np.float32)
        return self.calibration.apply(self.scores(crops))

    def prepare(
        self, source: Source, landmarks: np.ndarray | None = None, detector: DetectorLike = None
    ) -> np.ndarray | FaceFailure:
        """One image's crop for this predictor (the best face), or why there is none."""
        face = prepare_image(source, landmarks, detector, size=self.input_spec.size, max_faces=1,
                             margin=self.input_spec.margin).faces[0]  # fmt: skip
        return face if isinstance(face, FaceFailure) else face.crop

    def predict(
        self,
        sources: Sequence[Source],
        landmarks: Sequence[np.ndarray | None] | None = None,
        detector: DetectorLike = None,
        batch_size: int = 128,
    ) -> np.ndarray:
        """Images (paths, bytes or arrays) with optional (5, 2) landmarks each -> (N, M) float32 probabilities; the
        rows of images without a usable face (unreadable, no face found, bad landmarks) are NaN."""
        lms = list(landmarks) if landmarks is not None else [None] * len(sources)
        if len(lms) != len(sources):
            raise ValueError(f"{len(lms)} landmark sets for {len(sources)} images")
        out = np.full((len(sources), len(self.attributes)), np.nan, np.float32)
        for lo in range(0, len(sources), batch_size):
            pairs = zip(sources[lo : lo + batch_size], lms[lo : lo + batch_size], strict=True)
            crops = [self.prepare(s, lm, detector) for s, lm in pairs]
            ok = [i for i, c in enumerate(crops) if isinstance(c, np.ndarray)]
            if ok:
                out[[lo + i for i in ok]] = self.predict_crops(np.stack([crops[i] for i in ok]))  # type: ignore[misc]
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready: key, attributes, input, fingerprint, parameters, MACs, calibration and ``meta``."""
        return {
            "key": self.key,
            "path": None if self.path is None else str(self.path),
            "attributes": list(self.attributes),
            "input": self.input_spec.to_dict(),
            "fingerprint": self.fingerprint,
            "parameters": self.parameters,
            "macs": self.macs,
            "calibration": self.calibration.method,
            **{k: v for k, v in self.meta.items() if k not in ("key", "input")},
        }


def predict_dataset(
    predictor: AttributePredictor, dataset: FaceDataset, batch_size: int = 128, num_workers: int = 0, raw: bool = False
) -> tuple[np.ndarray, SkipReport]:
    """One pass over ``dataset`` (built at ``predictor.input_spec``: its ``size`` and ``margin``), read by
    ``num_workers`` DataLoader workers: probabilities (N, M) float32 — raw scores with ``raw`` — NaN rows for the
    files that could not be read or aligned, which the returned report lists."""
    if dataset.crop_size != predictor.input_spec.crop_size:
        raise ValueError(f"the dataset gives {dataset.crop_size} crops; the {predictor.key} predictor reads "
                         f"{predictor.input_spec.crop_size}")  # fmt: skip
    out = np.full((len(dataset), len(predictor.attributes)), np.nan, np.float32)
    skips = SkipReport(total=len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    for items in loader:
        faces = [it for it in items if isinstance(it, FaceItem)]
        skips.add(it for it in items if isinstance(it, Failure))
        if faces:
            crops = np.stack([f.image for f in faces])
            idx = np.array([f.index for f in faces])
            out[idx] = predictor.scores(crops) if raw else predictor.predict_crops(crops)
    return out, skips


__all__ = ["PREDICTOR_PREFIX", "AttributePredictor", "InputSpec", "predict_dataset"]
