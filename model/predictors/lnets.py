"""LNets+ANet (Liu, Luo, Wang, Tang, ICCV 2015) on this project's parts (ATTRIBUTE_MODELS.md §1).

The paper localises the face with two nets (LNets), extracts ANet features of several overlapping patches of the
slightly enlarged face, and scores each attribute with one linear SVM on those features, averaged over the patches;
ANet is pretrained on identities and fine-tuned on attributes.  Here YuNet + 5-point alignment replaces the LNets
(the paper's own "detector + ANet" row), the ANet is the project's trunk (identity-pretrained with ``facesearch
train``'s machinery, then fine-tuned on attributes with MOON's loss on random windows), and the patches are ten views
of the 128x112 margin crop: the 112x96 windows at :func:`facesearch.model.faces.align.window_offsets` — the four
corners and the centred window, which is the standard aligned crop pixel for pixel — and their mirror images.

:class:`LNetsPredictor` holds the fine-tuned network and one linear SVM per attribute (weights on the L2-normalised
feature); a face's score is the mean of the SVM decision values over its views, Platt-scaled to a probability.
:func:`fit_svms` fits the SVMs with scikit-learn's ``LinearSVC`` (L2, squared hinge, balanced class weights), ``C``
chosen per attribute by identity-grouped 3-fold cross-validation on balanced accuracy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from facesearch.model.checkpoint import Checkpoint, model_fingerprint, save_checkpoint
from facesearch.model.faces.align import cut_windows, window_offsets
from facesearch.model.inference import Embedder
from facesearch.model.network import FaceNet, count_macs, count_parameters
from facesearch.model.predictors.base import PREDICTOR_PREFIX, AttributePredictor, InputSpec
from facesearch.model.predictors.calibration import Calibration
from facesearch.model.predictors.facenet import calibration_from, calibration_tensors, open_network

log = logging.getLogger(__name__)

#: ``views`` choices: all ten patch views, or the centred window alone (the ablation).
VIEW_SETS: tuple[str, ...] = ("ten", "centre")
#: The SVM regularisation grid of the identity-grouped cross-validation.
SVM_C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0)


def view_list(size: tuple[int, int], views: str) -> list[tuple[tuple[int, int], bool]]:
    """((x, y) offset, mirrored) of each view: the five windows then their mirror images, or the centred one."""
    if views not in VIEW_SETS:
        raise ValueError(f"views must be one of {list(VIEW_SETS)}, got {views!r}")
    offsets = window_offsets(size)
    if views == "centre":
        return [(offsets[-1], False)]
    return [(o, False) for o in offsets] + [(o, True) for o in offsets]


def patch_views(crops: np.ndarray, size: tuple[int, int], views: str = "ten") -> np.ndarray:
    """Margin crops (B, H, W, 3) -> their views (B, V, h, w, 3) (V = 10 or 1).  A mirrored view is the mirror image of
    its window (the window of the mirrored crop at the mirrored offset is the same pixels)."""
    out = []
    for offset, mirrored in view_list(size, views):
        w = cut_windows(crops, size, [offset] * len(crops))
        out.append(w[:, :, ::-1] if mirrored else w)
    return np.ascontiguousarray(np.stack(out, axis=1))


def view_features(embedder: Embedder, crops: np.ndarray, views: str = "ten", chunk: int = 256) -> np.ndarray:
    """L2-normalised features of every view: (B, V, D) float32."""
    size = embedder.input_size
    feats = []
    for lo in range(0, len(crops), chunk):
        v = patch_views(crops[lo : lo + chunk], size, views)
        b, n = v.shape[:2]
        emb = embedder.forward_crops(v.reshape(b * n, *v.shape[2:]))[0]
        feats.append(emb.reshape(b, n, -1))
    d = embedder.embedding_dim
    return np.concatenate(feats) if feats else np.zeros((0, len(view_list(size, views)), d), np.float32)


@dataclass(frozen=True)
class SvmFit:
    """Per attribute: weights (M, D), bias (M,), the chosen C and its cross-validated balanced accuracy."""

    weight: np.ndarray
    bias: np.ndarray
    c: list[float | None]
    cv_balanced_accuracy: list[float | None]


def fit_svms(
    features: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    c_grid: Sequence[float] = SVM_C_GRID,
    folds: int = 3,
    seed: int = 0,
) -> SvmFit:
    """One linear SVM per attribute on view features.

    ``features``: (N, V, D) — every view of an image is a training example with the image's labels; ``labels``:
    (N, M) 0/1 with NaN = unknown; ``groups``: the identity of each image (cross-validation folds never split a
    person, and all views of an image stay together).  ``C`` per attribute maximises the mean over folds of the
    balanced accuracy of the view-averaged decision of the centred view and its mirror image (cheaper than all ten;
    the final fit uses every view); an attribute with one class only gets zero weights."""
    from sklearn.model_selection import GroupKFold
    from sklearn.svm import LinearSVC

    v, d = features.shape[1:]
    m = labels.shape[1]
    weight, bias = np.zeros((m, d)), np.zeros(m)
    chosen: list[float | None] = [None] * m
    cv_scores: list[float | None] = [None] * m
    group_ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    all_views = features.astype(np.float64)
    # C is chosen on the centred view and its mirror (the last of the five windows, plain and mirrored) to keep the
    # cross-validation cheap; the final SVM learns from every view.
    cv_views = all_views[:, [v // 2 - 1, v - 1]] if v == 10 else all_views

    def fit(x: np.ndarray, y: np.ndarray, c: float) -> Any:
        svm = LinearSVC(C=c, loss="squared_hinge", class_weight="balanced", dual=False, max_iter=2000,
                        random_state=seed)  # fmt: skip
        return svm.fit(x.reshape(-1, d), np.repeat(y, x.shape[1]))

    def balanced(y: np.ndarray, decision: np.ndarray) -> float:
        pred = decision > 0
        return float(((pred & (y == 1)).sum() / max(1, (y == 1).sum()) + (~pred & (y == 0)).sum()
                      / max(1, (y == 0).sum())) / 2)  # fmt: skip

    for j in range(m):
        known = np.isfinite(labels[:, j])
        y, g = labels[known, j].astype(np.int64), group_ids[known]
        if len(np.unique(y)) < 2:
            log.warning("attribute %d has one class only in the SVM training data: zero weights", j)
            continue
        k = min(folds, len(np.unique(g)))
        best_c, best = c_grid[0], -1.0
        if k >= 2 and len(c_grid) > 1:
            x = cv_views[known]
            for c in c_grid:
                fold_scores = []
                for tr, te in GroupKFold(n_splits=k).split(x, y, g):
                    if len(np.unique(y[tr])) < 2 or len(np.unique(y[te])) < 2:
                        continue
                    svm = fit(x[tr], y[tr], c)
                    decision = svm.decision_function(x[te].reshape(-1, d)).reshape(len(te), -1).mean(1)
                    fold_scores.append(balanced(y[te], decision))
                score = float(np.mean(fold_scores)) if fold_scores else -1.0
                if score > best:
                    best_c, best = c, score
        svm = fit(all_views[known], y, best_c)
        weight[j], bias[j] = svm.coef_[0], svm.intercept_[0]
        chosen[j], cv_scores[j] = float(best_c), (best if best >= 0 else None)
    return SvmFit(weight, bias, chosen, cv_scores)


class LNetsPredictor(AttributePredictor):
    """``lnets-anet``: ANet features of ten views -> one linear SVM per attribute, averaged, Platt-scaled."""

    key: ClassVar[str] = "lnets-anet"

    def __init__(
        self,
        model: FaceNet,
        svm_weight: np.ndarray,
        svm_bias: np.ndarray,
        views: str = "ten",
        calibration: Calibration | None = None,
        meta: dict[str, Any] | None = None,
        *,
        train_config: dict[str, Any] | None = None,
        fingerprint: str = "",
        device: str | torch.device = "cpu",
        precision: str = "auto",
        batch_size: int = 256,
    ) -> None:
        self.embedder = Embedder(model, device=device, precision=precision, batch_size=batch_size)
        self.model = self.embedder.model
        self.attributes = tuple(model.cfg.attributes)
        m, d = len(self.attributes), model.cfg.embedding_dim
        self.svm_weight = np.asarray(svm_weight, np.float32).reshape(m, d)
        self.svm_bias = np.asarray(svm_bias, np.float32).reshape(m)
        view_list(model.cfg.input_size, views)  # validates
        self.views = views
        self.input_spec = InputSpec(model.cfg.input_size, margin=True)
        self.calibration = calibration or Calibration.identity(m)
        self.meta = dict(meta or {})
        self.train_config = train_config
        self.fingerprint = fingerprint or self._state_fingerprint()

    def _state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state[f"{PREDICTOR_PREFIX}svm.weight"] = torch.from_numpy(self.svm_weight.copy())
        state[f"{PREDICTOR_PREFIX}svm.bias"] = torch.from_numpy(self.svm_bias.copy())
        if self.calibration.method != "identity":
            state.update(calibration_tensors(self.calibration))
        return state

    def view_decisions(self, crops: np.ndarray) -> np.ndarray:
        """SVM decision values of every view: (N, V, M) float32."""
        feats = view_features(self.embedder, crops, self.views)
        return np.einsum("nvd,md->nvm", feats, self.svm_weight) + self.svm_bias

    def scores(self, crops: np.ndarray) -> np.ndarray:
        """The mean over views of the SVM decision values, (N, M) float32."""
        return self.view_decisions(crops).mean(axis=1).astype(np.float32)

    @property
    def parameters(self) -> int:
        classifier = self.model.classifier
        net = count_parameters(self.model) - (count_parameters(classifier) if classifier is not None else 0)
        head = sum(p.numel() for p in self.model.attribute_out.parameters())
        return net - head + self.svm_weight.size + self.svm_bias.size

    @property
    def macs(self) -> int:
        return len(view_list(self.model.cfg.input_size, self.views)) * (count_macs(self.model) + self.svm_weight.size)

    def _state_fingerprint(self) -> str:
        return model_fingerprint(self.model.cfg, self._state())

    def save(self, path: str | os.PathLike[str]) -> str:
        info = {"key": self.key, "input": self.input_spec.to_dict(), "views": self.views,
                "calibration": self.calibration.method, "meta": self.meta}  # fmt: skip
        self.fingerprint = save_checkpoint(Path(path), self.model.cfg, self._state(), train_config=self.train_config,
                                           extra={"predictor": info})  # fmt: skip
        self.path = Path(path)
        return self.fingerprint

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, device: str | torch.device = "cpu", precision: str = "auto", batch_size: int = 256
    ) -> LNetsPredictor:
        info, model, own = open_network(ckpt)
        if "svm.weight" not in own:
            raise ValueError(f"{ckpt.path}: an lnets-anet predictor without SVM weights (corrupt or not one)")
        cal = calibration_from(own, info, len(ckpt.model_config.attributes))
        out = cls(model, own["svm.weight"].numpy(), own["svm.bias"].numpy(), str(info.get("views", "ten")), cal,
                  dict(info.get("meta") or {}), train_config=ckpt.train_config, fingerprint=ckpt.fingerprint,
                  device=device, precision=precision, batch_size=batch_size)  # fmt: skip
        out.path = ckpt.path
        return out


__all__ = ["SVM_C_GRID", "VIEW_SETS", "LNetsPredictor", "SvmFit", "fit_svms", "patch_views", "view_features",
           "view_list"]  # fmt: skip
