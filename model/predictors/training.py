"""Training every registered attribute predictor on CelebA-format data, calibrated on its validation split.

:func:`train_attribute_predictor` runs ``facesearch attributes train --method KEY``:

- ``moon``: one stage of the attribute loss (MOON's re-balanced mixed objective) on the margin crop;
- ``icmr``: the paper's two stages scaled to the budget — identity only, then identity + attributes (λ1 = 0.1, MSE,
  lr ÷ 10) — on the standard 112x96 crop, Configuration-1 head;
- ``mgmtn``: MGMTN (:mod:`facesearch.model.mgmtn`) with the attribute loss on the margin crop (or 112x96), from
  scratch or from the trunk of a ``pretrained`` identity checkpoint; with learned masks its mask network trains
  first (:func:`facesearch.model.predictors.mgmtn_train.train_mask_net`) and is frozen inside it;
- ``mtl-cnn``: :func:`facesearch.model.predictors.mtl_train.train_mtl_cnn` (several databases);
- ``lnets-anet``: identity pretraining of the trunk on the data's own identities (softmax + DeepID2's same-identity
  distance term, weight ``similarity_loss``; skipped with ``pretrain=False``,
  the paper's "without identity pretraining" row, or replaced by a given ``pretrained`` checkpoint), attribute
  fine-tuning from it (MOON loss, random patch windows), then one linear SVM per attribute on the features of the
  ten views of the training images (:func:`facesearch.model.predictors.lnets.fit_svms`).

Every network stage is a resumable ``facesearch train`` run in its own folder under ``out``; the nets train on the
``train`` partition (``list_eval_partition.txt`` 0) when the root has one, Platt scaling is fitted on the ``val``
partition (1), and ``test`` (2) is never read.  Without a partition file the whole root trains and calibration uses
the training images (recorded as such).  The predictor file ``out/predictor.safetensors`` records the method, its
options, the training seconds of each part and the validation report (ECE before / after calibration, balanced
accuracy, counts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesearch.model.attributes import AttributeTrainConfig
from facesearch.model.checkpoint import load_checkpoint
from facesearch.model.faces.datasets import FaceDataset, FaceItem, Sample
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.fileio import atomic_write_text
from facesearch.model.network import FaceNet
from facesearch.model.predictors.base import AttributePredictor, InputSpec
from facesearch.model.predictors.calibration import calibration_report, expected_calibration_error, fit_platt
from facesearch.model.predictors.facenet import FaceNetPredictor, IcmrPredictor, MoonPredictor
from facesearch.model.predictors.lnets import LNetsPredictor, fit_svms, view_features
from facesearch.model.predictors.mgmtn import MgmtnPredictor
from facesearch.model.predictors.mgmtn_train import train_mask_net
from facesearch.model.provenance import provenance
from facesearch.model.train import TrainResult, build_network, train
from facesearch.model.train_config import StageConfig, TrainConfig
from facesearch.model.trainer_data import read_samples

log = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.safetensors"
Progress = Callable[[dict], None]


@dataclass(frozen=True)
class PredictorResult:
    """What :func:`train_attribute_predictor` wrote: the predictor file and its description."""

    path: Path
    predictor: AttributePredictor
    seconds: dict[str, float]
    validation: dict[str, Any]


def has_partitions(root: Path) -> bool:
    return (Path(root) / "list_eval_partition.txt").is_file()


def split_samples(cfg: AttributeTrainConfig, partition: int) -> list[Sample]:
    """The labelled samples of one CelebA partition (all of them when the root has no partition file)."""
    samples = read_samples(cfg.data, "celeba", None, partition if has_partitions(cfg.data) else None)
    return [s for s in samples if s.attributes]


def iter_crops(
    samples: Sequence[Sample], spec: InputSpec, batch_size: int = 128, workers: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(sample indices, uint8 crops at ``spec``) per batch of the samples that align (the others are skipped)."""
    needs_detector = any(s.landmarks is None for s in samples)
    ds = FaceDataset(samples, size=spec.size, margin=spec.margin,
                     detector_factory=FaceDetector if needs_detector else None)  # fmt: skip
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=list)
    for items in loader:
        faces = [it for it in items if isinstance(it, FaceItem)]
        if faces:
            yield np.array([f.index for f in faces]), np.stack([f.image for f in faces])


def label_matrix(samples: Sequence[Sample], attributes: Sequence[str]) -> np.ndarray:
    """(N, M) float32 0/1 labels, NaN where a sample's label is unknown."""
    return np.array([[(s.attributes or {}).get(a, np.nan) for a in attributes] for s in samples], np.float32)


def predictor_scores(
    predictor: AttributePredictor, samples: Sequence[Sample], batch_size: int = 128, workers: int = 0
) -> np.ndarray:
    """Raw scores (N, M) of ``samples`` (NaN rows where a face could not be aligned)."""
    out = np.full((len(samples), len(predictor.attributes)), np.nan, np.float32)
    for idx, crops in iter_crops(samples, predictor.input_spec, batch_size, workers):
        out[idx] = predictor.scores(crops)
    return out


def _balanced(prob: np.ndarray, y: np.ndarray) -> list[float | None]:
    out: list[float | None] = []
    for j in range(y.shape[1]):
        ok = np.isfinite(y[:, j]) & np.isfinite(prob[:, j])
        pos, neg = ok & (y[:, j] > 0.5), ok & (y[:, j] <= 0.5)
        if pos.any() and neg.any():
            out.append(float(((prob[pos, j] > 0.5).mean() + (prob[neg, j] <= 0.5).mean()) / 2))
        else:
            out.append(None)
    return out


def calibrate(
    predictor: AttributePredictor, samples: Sequence[Sample], workers: int = 0, split: str = "val"
) -> tuple[AttributePredictor, dict[str, Any]]:
    """Fit Platt scaling on ``samples`` and report the calibration: ECE of the raw sigmoid and of the calibrated
    probabilities, balanced accuracy at 0.5, reliability table; returns the calibrated predictor and the report."""
    scores = predictor_scores(predictor, samples, workers=workers)
    y = label_matrix(samples, predictor.attributes)
    ok = np.isfinite(scores).all(axis=1)
    cal = fit_platt(scores[ok], y[ok])
    raw = 1.0 / (1.0 + np.exp(-scores[ok].astype(np.float64)))
    probs = cal.apply(scores[ok])
    report = {
        "split": split,
        "images": int(ok.sum()),
        "ece_uncalibrated": dict(
            zip(predictor.attributes, expected_calibration_error(raw, y[ok]).tolist(), strict=True)
        ),
        "balanced_accuracy": dict(zip(predictor.attributes, _balanced(probs, y[ok]), strict=True)),
        **calibration_report(probs, y[ok], predictor.attributes),
        "platt": cal.to_dict(),
    }
    calibrated = predictor.with_calibration(cal, {"validation": report})
    return calibrated, report


def _network_config(cfg: AttributeTrainConfig, out: Path, **changes: Any) -> TrainConfig:
    base = cfg.train_config()
    return dataclasses.replace(base, out=out, partition=0 if has_partitions(cfg.data) else None, **changes)


def _run(tc: TrainConfig, progress: Progress | None, seconds: dict[str, float], name: str) -> TrainResult:
    """One network stage, resumed when its folder has a checkpoint; its time is added to ``seconds[name]``."""
    tc = tc.replace(resume=(tc.out / "checkpoint.safetensors").is_file())
    t0 = time.perf_counter()
    result = train(tc, progress)
    seconds[name] = round(time.perf_counter() - t0, 2)
    if result.weights is None:
        raise RuntimeError(f"{name} stopped before the end of its schedule ({result.step} of {result.total_steps})")
    return result


def _load_net(path: Path) -> FaceNet:
    ckpt = load_checkpoint(path)
    model = build_network(TrainConfig.from_dict(ckpt.train_config or {}), ckpt.model_config.num_identities)
    model.load_state_dict(ckpt.model_state)
    return model


def _stage(cfg: AttributeTrainConfig, n: int, lr: float, lambda1: float, lambda2: float) -> StageConfig:
    milestones = tuple(sorted({m for m in (n // 2, 3 * n // 4) if 0 < m < n}))
    return StageConfig(n, lr, milestones, lambda1=lambda1, lambda2=lambda2)


def _train_networks(cfg: AttributeTrainConfig, progress: Progress | None, seconds: dict[str, float]) -> FaceNet:
    """The network stages of ``cfg.method``; returns the final network (CPU, eval mode)."""
    n_id = cfg.identity_iterations if cfg.identity_iterations is not None else cfg.iterations
    if cfg.method == "moon":
        run = _run(_network_config(cfg, cfg.out / "network"), progress, seconds, "network")
    elif cfg.method == "icmr":
        stages = (_stage(cfg, n_id, cfg.lr, 0.0, 1.0), _stage(cfg, cfg.iterations, cfg.lr / 10, 0.1, 1.0))
        tc = _network_config(cfg, cfg.out / "network", head=1, attribute_loss="mse", stages=stages)
        run = _run(tc, progress, seconds, "network")
    elif cfg.method == "mgmtn":
        mask_net = None
        if cfg.masks == "learned":
            t0 = time.perf_counter()
            mask_net = train_mask_net(cfg, split_samples(cfg, 0), cfg.out / "masks")
            seconds["mask_network"] = round(time.perf_counter() - t0, 2)
        tc = _network_config(cfg, cfg.out / "network", init=cfg.pretrained, mask_net=mask_net)
        run = _run(tc, progress, seconds, "network")
    else:  # lnets-anet
        init = cfg.pretrained
        if init is None and cfg.pretrain:
            tc = _network_config(cfg, cfg.out / "identity", stages=(_stage(cfg, n_id, cfg.lr, 0.0, 1.0),),
                                 similarity_loss=cfg.similarity_loss)  # fmt: skip
            init = _run(tc, progress, seconds, "identity_pretraining").weights
        tc = _network_config(cfg, cfg.out / "finetune", init=init)
        run = _run(tc, progress, seconds, "attribute_finetuning")
    assert run.weights is not None, "_run checks the schedule finished"
    return _load_net(run.weights).eval()


def _svm_stage(
    cfg: AttributeTrainConfig, model: FaceNet, train_samples: Sequence[Sample], seconds: dict[str, float]
) -> LNetsPredictor:
    """View features of (at most ``cfg.svm_images``) training images -> one linear SVM per attribute."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    samples = list(train_samples)
    if len(samples) > cfg.svm_images:
        samples = [samples[i] for i in sorted(rng.choice(len(samples), cfg.svm_images, replace=False))]
    m, d = len(cfg.attributes), model.cfg.embedding_dim
    bare = LNetsPredictor(model, np.zeros((m, d)), np.zeros(m), cfg.views, device=cfg.device, precision=cfg.precision)
    feats, keep = [], []
    for idx, crops in iter_crops(samples, bare.input_spec, workers=cfg.resolved_workers):
        feats.append(view_features(bare.embedder, crops, cfg.views))
        keep.extend(idx.tolist())
    x = np.concatenate(feats)
    kept = [samples[i] for i in keep]
    fit = fit_svms(x, label_matrix(kept, cfg.attributes), [str(s.identity) for s in kept], seed=cfg.seed)
    seconds["svm"] = round(time.perf_counter() - t0, 2)
    meta = {"svm": {"images": len(kept), "views": cfg.views, "c": fit.c, "cv_balanced_accuracy":
                    fit.cv_balanced_accuracy}}  # fmt: skip
    return LNetsPredictor(model, fit.weight, fit.bias, cfg.views, meta=meta, device=cfg.device,
                          precision=cfg.precision)  # fmt: skip


def train_attribute_predictor(cfg: AttributeTrainConfig, progress: Progress | None = None) -> PredictorResult:
    """Train ``cfg.method`` on ``cfg.data`` (see the module docstring) and write ``cfg.out / predictor.safetensors``
    plus ``predictor.json`` (its description)."""
    if cfg.method == "mtl-cnn":  # several databases, categorical tasks: its own loop
        from facesearch.model.predictors.mtl_train import train_mtl_cnn

        return train_mtl_cnn(cfg, progress)  # type: ignore[no-any-return]
    root = Path(cfg.data)
    if not (root / "list_attr_celeba.txt").is_file():
        raise FileNotFoundError(f"{root / 'list_attr_celeba.txt'} does not exist: attribute predictors learn "
                                "CelebA-format attribute labels (a CelebA root)")  # fmt: skip
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    model = _train_networks(cfg, progress, seconds)
    train_samples = split_samples(cfg, 0)
    predictor: AttributePredictor
    if cfg.method == "lnets-anet":
        predictor = _svm_stage(cfg, model, train_samples, seconds)
    else:
        cls: type[FaceNetPredictor] = {"moon": MoonPredictor, "mgmtn": MgmtnPredictor}.get(cfg.method, IcmrPredictor)
        crop = "margin" if cfg.resolved_crop == "margin" else "template"
        predictor = cls(model, InputSpec(cfg.input_size, margin=crop == "margin"), device=cfg.device,
                        precision=cfg.precision)  # fmt: skip
    val = split_samples(cfg, 1) if has_partitions(root) else train_samples
    return finish_predictor(predictor, val, cfg, seconds, t0, "val" if has_partitions(root) else "train")


def jsonable(v: Any) -> Any:
    """``v`` as JSON stores it: paths as strings, tuples as lists (what a checkpoint's record reads back as)."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple | list):
        return [jsonable(x) for x in v]
    return v


def finish_predictor(
    predictor: AttributePredictor,
    val: Sequence[Sample],
    cfg: AttributeTrainConfig,
    seconds: dict[str, float],
    t0: float,
    split: str,
    meta: dict[str, Any] | None = None,
    extra_report: Callable[[AttributePredictor], dict[str, Any]] | None = None,
) -> PredictorResult:
    """The common end of every method: Platt calibration on ``val`` (the ``split`` it is), the options, timings
    (``t0``: the run's start) and ``meta`` recorded, ``extra_report`` of the calibrated predictor merged into the
    validation report; writes ``cfg.out / predictor.safetensors`` and ``predictor.json``."""
    t1 = time.perf_counter()
    predictor, report = calibrate(predictor, val, cfg.resolved_workers, split)
    if extra_report is not None:
        report.update(extra_report(predictor))
        predictor.meta["validation"] = report
    seconds["calibration"] = round(time.perf_counter() - t1, 2)
    seconds["total"] = round(time.perf_counter() - t0, 2)
    options = {k: jsonable(v) for k, v in dataclasses.asdict(cfg).items()}
    predictor.meta.update(train_seconds=seconds, options=options, trained_on=str(cfg.data), **(meta or {}))
    predictor.train_config = options  # type: ignore[attr-defined]
    path = cfg.out / PREDICTOR_FILE
    predictor.save(path)
    description = {**predictor.describe(), "provenance": provenance()}
    atomic_write_text(cfg.out / "predictor.json", json.dumps(description, indent=2, default=str) + "\n")
    log.info("wrote %s (%s, fingerprint %s)", path, cfg.method, predictor.fingerprint[:12])
    return PredictorResult(path, predictor, seconds, report)


__all__ = [
    "PREDICTOR_FILE",
    "PredictorResult",
    "calibrate",
    "finish_predictor",
    "has_partitions",
    "iter_crops",
    "jsonable",
    "label_matrix",
    "predictor_scores",
    "split_samples",
    "train_attribute_predictor",
]
