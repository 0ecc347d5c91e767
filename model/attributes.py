"""Attribute labels for identity datasets (paper §3.2).

Identity datasets such as CASIA-WebFace carry no attribute labels, so the paper trains an attribute classifier on
CelebA, predicts the attributes of every image of the identity dataset and takes, per identity, the majority vote of
the Table 1 attributes (they are properties of the person, not of the picture).  Here:

1. :func:`train_attribute_classifier` trains a FaceNet on CelebA-format data with the attribute loss only
   (λ1 = 1, λ2 = 0) and MOON's mixed objective (per-attribute re-weighting of positive and negative labels toward a
   target distribution, Rudd et al. ECCV 2016), since CelebA's attributes are strongly imbalanced.
2. :func:`embed_dataset` runs it over any dataset (aligned crops, batched, bf16 where the CPU has the units).
3. :func:`majority_vote` turns per-image probabilities into per-identity 0/1 labels.
4. :func:`label_identities` does 2 + 3 and writes the labels CSV that ``facesearch train --labels`` consumes, with a
   provenance JSON beside it (classifier fingerprint, counts, positive rates, skipped files).

Both detect faces without landmarks through the same detection cache as training (each image once; the classifier's
run keeps it in its run directory, labelling beside its output), so labelling and training the same images can share
one cache file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.model.config import ATTRIBUTES, INPUT_SIZE, from_mapping
from facesearch.model.faces.datasets import (
    FaceDataset,
    Failure,
    Sample,
    SkipReport,
    stat_failures,
    write_attribute_labels,
)
from facesearch.model.fileio import atomic_write_text
from facesearch.model.predictors import InputSpec, load_predictor
from facesearch.model.predictors.base import predict_dataset
from facesearch.model.provenance import our_version
from facesearch.model.provenance import provenance as provenance_record
from facesearch.model.train import TrainResult, train
from facesearch.model.train_config import StageConfig, TrainConfig
from facesearch.model.trainer_data import (
    DATA_FORMATS,
    DetectionCache,
    attach_detections,
    check_readable,
    detector_factory,
    detector_identity,
    known_failures,
    read_samples,
)

log = logging.getLogger(__name__)


#: ``facesearch attributes train --method`` choices (the trainable keys of the predictor registry).
METHODS: tuple[str, ...] = ("moon", "icmr", "lnets-anet", "mgmtn", "mtl-cnn")
#: The crop each method reads by default (see ``TrainConfig.crop``).
DEFAULT_CROP: dict[str, str] = {
    "moon": "margin",
    "icmr": "template",
    "lnets-anet": "views",
    "mgmtn": "margin",
    "mtl-cnn": "margin",
}


@dataclass(frozen=True)
class AttributeTrainConfig:
    """An attribute predictor's run on CelebA-format ``data`` (see :mod:`facesearch.model.predictors.training`).

    ``method``: :data:`METHODS`; ``crop``: what the networks see (default per method, :data:`DEFAULT_CROP`);
    ``iterations``: the attribute stage's steps (lr x0.1 at 50 % and 75 %); ``identity_iterations``: the identity
    stage of ``icmr`` / ``lnets-anet`` (default: ``iterations``).  LNets+ANet: ``pretrained`` starts the attribute
    fine-tuning from that identity checkpoint instead of pretraining here; ``pretrain=False`` fine-tunes from
    scratch (the paper's ablation); ``views``: ``ten`` patch views or the ``centre`` one (ablation);
    ``svm_images``: at most this many training images (identity-stratified at random) fit the SVMs;
    ``similarity_loss``: weight of DeepID2's same-identity distance term in the identity pretraining.
    MGMTN: ``masks`` ``analytic`` (drawn from the template's landmarks) or ``learned`` (a mask network first trained
    ``mask_iterations`` steps on per-image analytic masks, then frozen); ``fusion`` ``g2ff`` | ``groups`` |
    ``global``; ``pretrained`` initialises its trunk from an identity checkpoint.
    MTL-CNN (:mod:`facesearch.model.predictors.mtl_train`): ``more_data`` further databases beside ``data`` (CelebA
    roots or list CSVs), ``categorical`` the list-CSV columns holding integer classes; ``gates`` ``learned`` |
    ``fixed``; ``correlation`` on / off and its stage-2 ``correlation_iterations``; ``centre_loss`` weight from
    ``centre_warmup`` (fraction of the run) on; ``feature_dim`` (D) split into ``gate_groups`` (K) groups;
    ``task_hidden``: width of each routed task feature; ``val_fraction`` of the people of a database without
    partitions held out for calibration; ``checkpoint_every`` steps."""

    data: Path
    out: Path = Path("runs/attributes")
    arch: str = "fast"
    width: float = 1.0
    input_size: tuple[int, int] = INPUT_SIZE
    attributes: tuple[str, ...] = ATTRIBUTES
    iterations: int = 20_000
    lr: float = 0.01
    batch_size: int | None = None
    moon_target: float = 0.5
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int | None = None
    resume: bool = False
    detections: Path | None = None
    min_readable: float = 0.9
    max_skipped_steps: float = 0.1
    method: str = "moon"
    crop: str | None = None
    identity_iterations: int | None = None
    pretrained: Path | None = None
    pretrain: bool = True
    views: str = "ten"
    svm_images: int = 20_000
    similarity_loss: float = 0.01
    masks: str = "analytic"
    fusion: str = "g2ff"
    mask_iterations: int = 300
    more_data: tuple[Path, ...] = ()
    categorical: tuple[str, ...] = ()
    gates: str = "learned"
    correlation: bool = True
    correlation_iterations: int = 300
    centre_loss: float = 0.003
    centre_warmup: float = 0.25
    feature_dim: int = 1024
    gate_groups: int = 8
    task_hidden: int = 128
    val_fraction: float = 0.1
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        for name in ("data", "out", "detections", "pretrained"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "more_data", tuple(Path(p) for p in self.more_data))
        object.__setattr__(self, "categorical", tuple(str(c) for c in self.categorical))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        self._check_mtl()
        if self.views not in ("ten", "centre"):
            raise ValueError(f"views must be 'ten' or 'centre', got {self.views!r}")
        if self.method == "lnets-anet" and self.resolved_crop != "views":
            raise ValueError("lnets-anet reads patch views of the margin crop (crop 'views')")
        if self.method == "mgmtn" and self.resolved_crop not in ("template", "margin"):
            raise ValueError("mgmtn reads the template or the margin crop")
        if self.masks not in ("analytic", "learned"):
            raise ValueError(f"masks must be 'analytic' or 'learned', got {self.masks!r}")
        if self.fusion not in ("g2ff", "groups", "global"):
            raise ValueError(f"fusion must be one of g2ff, groups, global, got {self.fusion!r}")
        if self.mask_iterations < 1:
            raise ValueError(f"mask_iterations must be >= 1, got {self.mask_iterations}")
        if self.iterations < 1 or (self.identity_iterations is not None and self.identity_iterations < 1):
            raise ValueError("iterations and identity_iterations must be >= 1")
        if self.similarity_loss < 0:
            raise ValueError(f"similarity_loss must be >= 0, got {self.similarity_loss}")
        if self.svm_images < 2:
            raise ValueError(f"svm_images must be >= 2, got {self.svm_images}")
        if self.pretrained is not None and not self.pretrained.is_file():
            raise FileNotFoundError(f"pretrained checkpoint {self.pretrained} does not exist")

    def _check_mtl(self) -> None:
        if self.method != "mtl-cnn" and (self.more_data or self.categorical):
            raise ValueError("several --data databases and --categorical columns are for --method mtl-cnn only")
        if self.gates not in ("learned", "fixed"):
            raise ValueError(f"gates must be 'learned' or 'fixed', got {self.gates!r}")
        if self.correlation_iterations < 0 or self.centre_loss < 0 or not 0 <= self.centre_warmup <= 1:
            raise ValueError("need correlation_iterations >= 0, centre_loss >= 0 and centre_warmup in [0, 1]")
        if self.gate_groups < 1 or self.feature_dim % self.gate_groups or self.task_hidden < 1:
            raise ValueError(f"feature_dim ({self.feature_dim}) must be a multiple of gate_groups "
                             f"({self.gate_groups}) and task_hidden >= 1")  # fmt: skip
        if not 0 < self.val_fraction < 1 or self.checkpoint_every < 1:
            raise ValueError("need 0 < val_fraction < 1 and checkpoint_every >= 1")
        if self.method == "mtl-cnn" and self.resolved_crop != "margin":
            raise ValueError("mtl-cnn reads the margin crop")

    @property
    def resolved_crop(self) -> str:
        return self.crop or DEFAULT_CROP[self.method]

    @property
    def resolved_workers(self) -> int:
        return self.train_config().resolved_workers

    def train_config(self) -> TrainConfig:
        """The equivalent :class:`TrainConfig`: attribute loss only, lr ×0.1 at 50 % and 75 % of the run."""
        n = self.iterations
        milestones = tuple(sorted({m for m in (n // 2, 3 * n // 4) if 0 < m < n}))
        return TrainConfig(
            data=self.data,
            out=self.out,
            data_format="celeba",
            arch=self.arch,
            head=2,  # attributes read the 1024-d feature: the classifier needs no identity branch of its own
            width=self.width,
            input_size=self.input_size,
            attributes=self.attributes,
            stages=(StageConfig(n, self.lr, milestones, lambda1=1.0, lambda2=0.0),),
            batch_size=self.batch_size,
            attribute_loss="moon",
            moon_target=self.moon_target,
            seed=self.seed,
            device=self.device,
            precision=self.precision,
            num_workers=self.num_workers,
            val_every=max(1, n // 4),
            checkpoint_every=max(1, n // 4),
            resume=self.resume,
            detections=self.detections,
            min_readable=self.min_readable,
            max_skipped_steps=self.max_skipped_steps,
            crop=self.resolved_crop,
            network="mgmtn" if self.method == "mgmtn" else "facenet",
            fusion=self.fusion,
        )


def train_attribute_classifier(
    cfg: AttributeTrainConfig, progress: Callable[[dict], None] | None = None
) -> TrainResult:
    """Train the attribute classifier of §3.2 (see :class:`AttributeTrainConfig`)."""
    labels = Path(cfg.data) / "list_attr_celeba.txt"
    if Path(cfg.data).is_dir() and not labels.is_file():  # an identity-only CelebA root trains identities, not this
        raise FileNotFoundError(f"{labels} does not exist: the attribute classifier learns CelebA's attribute labels")
    return train(cfg.train_config(), progress)


@dataclass(frozen=True)
class LabelConfig:
    """Label the identities of ``data`` (``data_format`` casia / list / celeba / flat + ``identities``) with
    ``classifier``'s attributes.  Faces without landmarks are detected (``detect``, YuNet) through the detection cache
    ``detections`` (default: ``<out stem>.detections.jsonl`` beside ``out``); fewer than ``min_readable`` of the listed
    files readable is an error."""

    classifier: Path
    data: Path
    out: Path
    data_format: str = "casia"
    identities: Path | None = None
    threshold: float = 0.5
    batch_size: int = 128
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    detect: bool = True
    detections: Path | None = None
    min_readable: float = 0.9

    def __post_init__(self) -> None:
        for name in ("classifier", "data", "out", "identities", "detections"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {list(DATA_FORMATS)}, got {self.data_format!r}")
        if not 0 <= self.min_readable <= 1:
            raise ValueError(f"min_readable must be in [0, 1] (a fraction), got {self.min_readable}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelConfig:
        return from_mapping(cls, data)


def majority_vote(identities: Sequence[str], probs: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Per identity, each attribute is 1 when more of its images are predicted positive (p > ``threshold``) than
    negative; a tie goes to the mean probability.  ``probs``: (N, M) float32, NaN rows (unreadable images) are
    ignored; identities with no readable image get no label.  Returns {identity: (M,) float32 of 0/1}."""
    if len(identities) != len(probs):
        raise ValueError(f"{len(identities)} identities for {len(probs)} rows of probabilities")
    out: dict[str, np.ndarray] = {}
    order = np.argsort(np.asarray(identities, dtype=object), kind="stable")
    ids = np.asarray(identities, dtype=object)[order]
    p = probs[order]
    bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
    for a, b in itertools.pairwise(bounds):
        rows = p[a:b][np.isfinite(p[a:b]).all(axis=1)]
        if not len(rows):
            continue
        pos = (rows > threshold).sum(axis=0)
        neg = len(rows) - pos
        tie_break = rows.mean(axis=0) > threshold
        out[str(ids[a])] = np.where(pos == neg, tie_break, pos > neg).astype(np.float32)
    return out


@dataclass(frozen=True)
class LabelResult:
    labels: Path
    provenance: Path
    identities: int
    images: int
    skipped: int
    positive_rate: dict[str, float]
    skipped_summary: str


def _dataset(
    cfg: LabelConfig, samples: Sequence[Sample], spec: InputSpec, attributes: Sequence[str]
) -> tuple[FaceDataset, list[Failure]]:
    """The dataset to label, its faces detected through the cache; also the files known to be unusable."""
    known = stat_failures(samples)
    check_readable(known, len(samples), cfg.min_readable, listed=True)
    factory = detector_factory(samples) if cfg.detect else None
    dataset = FaceDataset(samples, size=spec.size, attributes=attributes, detector_factory=factory,
                          margin=spec.margin)  # fmt: skip
    if factory is not None:
        path = cfg.detections or cfg.out.with_suffix(".detections.jsonl")
        stats = attach_detections([dataset], DetectionCache(path, detector_identity()), cfg.num_workers)
        log.info("faces: %d detected now, %d from %s", stats.new, stats.cached, path)
        report = SkipReport()
        report.add([*known, *known_failures(dataset)])
        check_readable(report.failures.values(), len(samples), cfg.min_readable, listed=False)
    return dataset, known


def label_identities(cfg: LabelConfig) -> LabelResult:
    """Predict attributes on ``cfg.data``, vote per identity, write ``cfg.out`` (labels CSV) and a provenance JSON."""
    t0 = time.perf_counter()
    predictor = load_predictor(cfg.classifier, device=cfg.device, precision=cfg.precision, batch_size=cfg.batch_size)
    names = predictor.attributes
    samples = read_samples(cfg.data, cfg.data_format, cfg.identities)
    unnamed = sum(s.identity is None for s in samples)
    if unnamed:
        raise ValueError(f"{cfg.data}: {unnamed} images have no identity; labelling needs identity folders or column")
    dataset, known = _dataset(cfg, samples, predictor.input_spec, names)
    probs, skips = predict_dataset(predictor, dataset, cfg.batch_size, cfg.num_workers)
    skips.add(known)
    votes = majority_vote([str(s.identity) for s in samples], probs, cfg.threshold)
    labels = {k: {a: float(v[j]) for j, a in enumerate(names)} for k, v in votes.items()}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    write_attribute_labels(cfg.out, labels, names)
    skipped_path = cfg.out.with_suffix(".skipped.jsonl")
    skips.write_jsonl(skipped_path)
    rate = {a: float(np.mean([v[j] for v in votes.values()])) if votes else float("nan") for j, a in
            enumerate(names)}  # fmt: skip
    provenance = cfg.out.with_suffix(".json")
    record = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "classifier_fingerprint": predictor.fingerprint,
        "predictor": predictor.key,
        "attributes": list(names),
        "identities": len(votes),
        "images": len(samples),
        "skipped": len(skips),
        "skipped_summary": skips.summary(),
        "positive_rate": rate,
        "version": our_version(),
        "provenance": provenance_record(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_text(provenance, json.dumps(record, indent=2) + "\n")
    log.info("labelled %d identities from %d images (%s)", len(votes), len(samples), skips.summary())
    return LabelResult(cfg.out, provenance, len(votes), len(samples), len(skips), rate, skips.summary())


__all__ = [
    "AttributeTrainConfig",
    "LabelConfig",
    "LabelResult",
    "label_identities",
    "majority_vote",
    "train_attribute_classifier",
]
