"""Per-attribute accuracy of the network's predicted attributes on a CelebA-format labelled set (the paper's Table 4).

:func:`evaluate_attributes` is a pure metric on probabilities and boolean truth; :func:`predict_celeba` produces them
from a checkpoint and a CelebA-format root (aligned images + ``list_landmarks_align_celeba.txt``), aligning each
image with its landmarks to the model input.  :func:`format_attribute_table` renders the Table-4-style Markdown.
:func:`balanced_accuracy` is the project's one balanced accuracy (the demo's too), with an explicit rule for a
class absent from the labels.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.model.tables import render_table

log = logging.getLogger(__name__)

#: ``--split`` choices -> ``list_eval_partition.txt`` partition (None = every labelled image).
SPLITS: dict[str, int | None] = {"train": 0, "val": 1, "test": 2, "all": None}


@dataclass(frozen=True)
class AttributeScore:
    """Binary prediction quality of one attribute over ``n`` images.

    ``positive_rate``: the fraction of true positives in the labels; ``tpr`` / ``tnr``: recall of the positive /
    negative class (NaN when that class is absent); ``balanced_accuracy``: the mean of the defined ones of the two."""

    attribute: str
    n: int
    positive_rate: float
    accuracy: float
    balanced_accuracy: float
    tpr: float
    tnr: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes ``None``."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


#: ``absent`` choices of :func:`balanced_accuracy`.
ABSENT_CLASS: tuple[str, ...] = ("nan", "ignore")


def class_rates(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of (n, m) arrays of 0/1 (or bool) predictions and labels: the true-positive rate (recall of the
    rows where ``truth == 1``) and the true-negative rate (where ``truth == 0``), each (m,) float64, NaN where that
    class is absent from the column.  Rows whose truth is neither 0 nor 1 count in neither class."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"pred and truth must be (n, m) arrays of one shape, got {pred.shape} and {truth.shape}")
    pos, neg = truth == 1, truth == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = ((pred == 1) & pos).sum(0) / pos.sum(0)
        tnr = ((pred == 0) & neg).sum(0) / neg.sum(0)
    return np.asarray(tpr, np.float64), np.asarray(tnr, np.float64)


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray, absent: str = "nan") -> np.ndarray:
    """Per column of (n, m) 0/1 (or bool) predictions and labels, the mean of the true-positive and true-negative
    rates (:func:`class_rates`): (m,) float64.

    A class absent from a column's ``truth`` (no positives, or no negatives) leaves its rate undefined; ``absent``
    says what the column then scores: ``"nan"`` (the default): NaN, undefined rather than a flattering 1.0 for a
    constant predictor; ``"ignore"``: the rate of the class that is present alone (NaN only for an empty column).
    The demo reports the first, :func:`evaluate_attributes` (Table 4) the second."""
    if absent not in ABSENT_CLASS:
        raise ValueError(f"absent must be one of {list(ABSENT_CLASS)}, got {absent!r}")
    tpr, tnr = class_rates(pred, truth)
    if absent == "nan":
        return (tpr + tnr) / 2
    both = np.stack([tpr, tnr])
    defined = (~np.isnan(both)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined > 0, np.nansum(both, 0) / defined, np.nan)


def evaluate_attributes(
    probabilities: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], threshold: float = 0.5
) -> list[AttributeScore]:
    """Score each attribute present in both ``probabilities`` ({name: (n,) float in [0, 1]}) and ``truth``
    ({name: (n,) bool}), in ``probabilities``' order; an image is predicted positive when its probability is
    ``>= threshold``.  Raises ``ValueError`` for no shared attribute, mismatched lengths or non-finite values."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    names = [a for a in probabilities if a in truth]
    if not names:
        raise ValueError(f"no attribute in common: predicted {sorted(probabilities)}, labelled {sorted(truth)}")
    scores = []
    for name in names:
        p = np.asarray(probabilities[name], dtype=np.float64).ravel()
        t = np.asarray(truth[name]).ravel()
        if p.shape != t.shape or len(p) == 0:
            raise ValueError(f"{name}: {len(p)} probabilities for {len(t)} labels; need equal, non-zero counts")
        if not np.isfinite(p).all():
            raise ValueError(f"{name}: {int((~np.isfinite(p)).sum())} probabilities are NaN or infinite")
        if t.dtype != bool:
            raise ValueError(f"{name}: truth must be a bool array, got {t.dtype}")
        pred = p >= threshold
        (tpr,), (tnr,) = class_rates(pred[:, None], t[:, None])
        (balanced,) = balanced_accuracy(pred[:, None], t[:, None], absent="ignore")
        scores.append(AttributeScore(name, len(p), int(t.sum()) / len(p), float((pred == t).mean()), float(balanced),
                                     float(tpr), float(tnr)))  # fmt: skip
    return scores


@dataclass
class CelebaPredictions:
    """Predicted probabilities and labels of the images that could be aligned, both {attribute: (n,)}; the
    ``skipped`` count (unreadable files, bad landmarks) with a summary, and the model ``fingerprint``."""

    probabilities: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]
    n: int
    skipped: int = 0
    skipped_summary: str = ""
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def predict_celeba(
    celeba_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    device: str = "auto",
    batch_size: int = 128,
    split: str = "test",
    limit: int | None = None,
) -> CelebaPredictions:
    """Predict the checkpoint's attributes on a CelebA-format set and pair them with the labels.

    ``split``: ``test | val | train`` (from ``list_eval_partition.txt``) or ``all``; ``limit``: only the first N
    images of the split (file order).  Images are aligned with their landmarks to the model input (detected with
    YuNet where the landmark file lacks them); images that fail are skipped and counted.  Only the attributes both
    predicted and labelled are returned."""
    from facesearch.model.faces.datasets import FaceDataset, read_celeba
    from facesearch.model.faces.detect import FaceDetector
    from facesearch.model.inference import Embedder, embed_dataset

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    root = Path(celeba_dir)
    if not (root / "list_attr_celeba.txt").is_file():
        raise FileNotFoundError(f"{root}: not a CelebA-format root (no list_attr_celeba.txt)")
    samples = sorted(read_celeba(root, SPLITS[split]), key=lambda s: s.path.name)[:limit]
    if not samples:
        raise ValueError(f"{root}: no images in the {split!r} split")
    embedder = Embedder(checkpoint, device=device, batch_size=batch_size)
    names = [a for a in embedder.attributes if all(s.attributes and a in s.attributes for s in samples)]
    if not names:
        raise ValueError(f"{root}: none of the model's attributes {list(embedder.attributes)} is labelled")
    needs_detector = any(s.landmarks is None for s in samples)
    dataset = FaceDataset(samples, size=embedder.input_size, attributes=embedder.attributes,
                          detector_factory=FaceDetector if needs_detector else None)  # fmt: skip
    _, probs, skips = embed_dataset(embedder, dataset, batch_size=batch_size)
    ok = ~np.isnan(probs).any(axis=1)
    column = {a: i for i, a in enumerate(embedder.attributes)}
    kept = [s for s, good in zip(samples, ok, strict=True) if good]
    truth = {a: np.array([(s.attributes or {})[a] > 0.5 for s in kept], dtype=bool) for a in names}
    probabilities = {a: probs[ok, column[a]] for a in names}
    summary = skips.summary() if len(skips) else ""
    if summary:
        log.warning("%s: %s", root, summary)
    meta = {"data": str(root), "split": split, "limit": limit, "checkpoint": str(checkpoint)}
    return CelebaPredictions(probabilities, truth, int(ok.sum()), len(skips), summary, embedder.fingerprint, meta)


def mean_scores(scores: Sequence[AttributeScore]) -> dict[str, float]:
    """Unweighted means over attributes of accuracy, balanced accuracy and positive rate."""
    return {
        key: float(np.nanmean([getattr(s, key) for s in scores]))
        for key in ("accuracy", "balanced_accuracy", "positive_rate")
    }


def attribute_result(scores: Sequence[AttributeScore], threshold: float, **meta: Any) -> dict[str, Any]:
    """The JSON document of a run: per-attribute scores, their means, the threshold and provenance ``meta``."""
    return {"threshold": threshold, "mean": mean_scores(scores), "attributes": [s.to_dict() for s in scores], **meta}


def format_attribute_table(scores: Sequence[AttributeScore]) -> str:
    """Markdown like the paper's Table 4: one row per attribute (accuracy %, balanced accuracy %, positive rate,
    n) and a final row of unweighted means."""
    rows = [[s.attribute, f"{100 * s.accuracy:.2f}", f"{100 * s.balanced_accuracy:.2f}", f"{s.positive_rate:.3f}", s.n]
            for s in scores]  # fmt: skip
    if scores:
        m = mean_scores(scores)
        ns = {s.n for s in scores}
        n = str(ns.pop()) if len(ns) == 1 else "—"
        rows.append(["**mean**", f"{100 * m['accuracy']:.2f}", f"{100 * m['balanced_accuracy']:.2f}",
                     f"{m['positive_rate']:.3f}", n])  # fmt: skip
    return render_table(["attribute", "accuracy %", "balanced accuracy %", "positive rate", "n"], rows)


__all__ = ["ABSENT_CLASS", "SPLITS", "AttributeScore", "CelebaPredictions", "attribute_result", "balanced_accuracy",
           "class_rates", "evaluate_attributes", "format_attribute_table", "mean_scores", "predict_celeba"]  # fmt: skip
