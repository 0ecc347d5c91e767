"""Training: :func:`train` runs the paper's staged schedule (or any other) with exact, step-granular resume.

Outputs under ``cfg.out``:

* ``checkpoint.safetensors`` — the full training state (model, optimizer, RNG, step), rewritten atomically every
  ``checkpoint_every`` steps and at the end; ``resume=True`` continues from it.
* ``model.safetensors`` — weights only (no optimizer), written when the schedule completes; what inference and the
  indexer load.  Same fingerprint as the final checkpoint.
* ``train_config.json`` (resolved config), ``metrics.jsonl`` (one JSON object per detection pass, log window and
  validation) and ``skipped.jsonl`` (files that could not be read or aligned; they are skipped, counted and listed).
* ``detections.jsonl`` (or ``cfg.detections``): the faces detected in images without landmarks, each image once,
  reused by later epochs, resumed runs and any run pointed at the same file.

With ``cfg.crop_store`` the aligned crops are read from that store (:mod:`facesearch.model.faces.crop_store`, built on
first use, shared by runs on the same images) instead of decoded and aligned at every step; the batches are the same.

Data problems stop the run instead of training on what is left: fewer than ``min_readable`` of the listed files
readable (checked with one ``stat`` per file before training, then counting decode failures as they appear), or more
than ``max_skipped_steps`` of the steps skipped for want of 2 readable images.

Exact resume: the batch order and flips are pure functions of (seed, step) (:mod:`facesearch.model.trainer_data`), the
learning rate a pure function of the step, and the checkpoint carries BN statistics, momentum buffers and the RNG state
that drives dropout.  N steps in one run and N/2 + resume + N/2 give the same losses (tested on CPU in fp32; on CUDA
bit-identical with ``deterministic=True``, which also makes two fresh GPU runs agree).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from facesearch.model.checkpoint import (
    capture_rng_state,
    export_weights,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from facesearch.model.device import autocast, autocast_dtype, resolve_device
from facesearch.model.faces.align import window_offsets
from facesearch.model.faces.datasets import FaceBatch, SkipReport
from facesearch.model.faces.detections import (
    DETECTIONS,
    DetectionCache,
    attach_detections,
    detector_identity,
    known_failures,
)
from facesearch.model.fileio import atomic_write_text
from facesearch.model.losses import multitask_loss
from facesearch.model.network import FaceNet, to_input
from facesearch.model.train_config import PAPER_STAGES, StageConfig, TrainConfig, resume_mismatch
from facesearch.model.train_log import LogWindow, truncate_metrics
from facesearch.model.trainer_data import (
    StepBatchSampler,
    TrainingData,
    check_readable,
    derive_seed,
    listed_failures,
    prepare_data,
    train_loader,
    val_loader,
    visited_indices,
    with_crop_store,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    """What a run produced.  ``final``: the last training window (loss, acc, ...) and validation metrics."""

    out: Path
    checkpoint: Path
    weights: Path | None
    metrics: Path
    skipped: Path
    step: int
    total_steps: int
    fingerprint: str
    num_identities: int
    final: dict[str, Any] = field(default_factory=dict)
    skipped_summary: str = ""
    skipped_steps: int = 0

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps


@dataclass
class _Run:
    """The live state of one invocation (model, data, logs); passed to the step/evaluate/save helpers."""

    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    data: TrainingData
    model: FaceNet
    metrics: Path
    skips: SkipReport
    progress: Progress | None
    optimizer: torch.optim.Optimizer | None = None
    opt_stage: int = -1
    fingerprint: str = ""
    last: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0  # all invocations (restored from the checkpoint)
    skipped_steps_now: int = 0  # this invocation

    def emit(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.last.update({k: v for k, v in record.items() if k != "event"})
        if self.progress is not None:
            self.progress(record)


def make_optimizer(model: FaceNet, cfg: TrainConfig, stage: StageConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weight matrices and kernels only (not on BN, PReLU slopes or biases —
    decaying PReLU slopes pushes them to ReLU and decaying BN scales fights the normalisation)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=stage.lr, momentum=cfg.momentum)


def init_from(model: FaceNet, checkpoint: Path) -> list[str]:
    """Copy ``checkpoint``'s weights into ``model`` wherever a name and shape match (an identity-pretrained trunk
    into an attribute network: the identity classifier and a differently sized head stay as initialised).  Returns
    the names left as initialised; raises ``ValueError`` when the trunk does not match (a different arch, width or
    input size)."""
    state = load_checkpoint(checkpoint).model_state
    own = model.state_dict()
    same = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    trunk = [k for k in own if k.startswith("trunk.")]
    if not trunk or any(k not in same for k in trunk):
        raise ValueError(f"cannot initialise from {checkpoint}: its trunk does not match this network's (arch, width "
                         f"and input size must be the same)")  # fmt: skip
    model.load_state_dict(same, strict=False)
    kept = sorted(set(own) - set(same))
    log.info("initialised %d tensors from %s; %d as new (%s)", len(same), checkpoint, len(kept), ", ".join(kept[:4]))
    return kept


def training_views(images: Tensor, size: tuple[int, int], seed: int, step: int) -> Tensor:
    """One LNets+ANet window per image of a batch of margin crops (B, H, W, 3), chosen uniformly among
    :func:`facesearch.model.faces.align.window_offsets` by a pure function of (seed, step)."""
    offsets = window_offsets(size)
    gen = torch.Generator().manual_seed(derive_seed("view", seed, step))
    pick = torch.randint(len(offsets), (images.shape[0],), generator=gen).tolist()
    h, w = size
    return torch.stack([images[i, y : y + h, x : x + w] for i, (x, y) in enumerate(offsets[p] for p in pick)])


def centre_view(images: Tensor, size: tuple[int, int]) -> Tensor:
    """The centred window (the standard aligned crop) of a batch of margin crops."""
    (x, y), (h, w) = window_offsets(size)[-1], size
    return images[:, y : y + h, x : x + w]


def train_step(run: _Run, batch: FaceBatch, stage: StageConfig, step: int = 0) -> dict[str, Tensor] | None:
    """One SGD step on ``batch`` (bf16 autocast forward if enabled, float32 loss).  Returns detached float32
    scalars ``loss``, ``loss_attribute`` / ``loss_identity``, ``correct``, ``known``; None if the batch has fewer than
    2 usable images (BatchNorm needs 2; the step still counts, so the schedule stays a function of the step)."""
    if batch.images.shape[0] < 2:
        log.warning("step skipped: only %d readable images in the batch", batch.images.shape[0])
        return None
    assert run.optimizer is not None, "the optimizer is created before the first step"
    images = batch.images
    if run.cfg.crop == "views":
        images = training_views(images, run.cfg.input_size, run.cfg.seed, step)
    x = to_input(images.to(run.device, non_blocking=True))
    ids = batch.identities.to(run.device, non_blocking=True)
    attrs = batch.attributes.to(run.device, non_blocking=True)
    with autocast(run.device, run.dtype):
        out = run.model(x)
    total, parts = multitask_loss(
        out, ids, attrs, stage.lambda1, stage.lambda2, run.cfg.attribute_loss, run.data.positive_rate,
        run.cfg.moon_target, run.cfg.similarity_loss,
    )  # fmt: skip
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    run.optimizer.step()
    known = ids >= 0
    stats = {"loss": total.detach(), "known": known.sum().float()}
    stats.update({f"loss_{k}": v for k, v in parts.items()})
    if out.identity_logits is not None:
        stats["correct"] = (out.identity_logits.detach().argmax(1).eq(ids) & known).sum().float()
    return stats


@torch.inference_mode()
def evaluate(run: _Run, loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    """Held-out identification top-1 (identity classifier) and attribute accuracy at 0.5 over the known labels."""
    was_training = run.model.training
    run.model.eval()
    id_hits = id_n = attr_hits = attr_n = 0
    try:
        for batch in loader:
            run.skips.add(batch.failures)
            if batch.images.shape[0] == 0:
                continue
            images = centre_view(batch.images, run.cfg.input_size) if run.cfg.crop == "views" else batch.images
            with autocast(run.device, run.dtype):
                out = run.model(to_input(images.to(run.device)))
            ids, attrs = batch.identities.to(run.device), batch.attributes.to(run.device)
            if out.identity_logits is not None:
                known = ids >= 0
                id_hits += int((out.identity_logits.argmax(1).eq(ids) & known).sum())
                id_n += int(known.sum())
            labelled = ~torch.isnan(attrs)
            pred = (torch.sigmoid(out.attribute_logits.float()) >= 0.5).float()
            attr_hits += int((pred.eq((attrs >= 0.5).float()) & labelled).sum())
            attr_n += int(labelled.sum())
    finally:
        run.model.train(was_training)
    result: dict[str, Any] = {"val_images": id_n}
    if id_n:
        result["val_top1"] = id_hits / id_n
        result["chance"] = 1.0 / max(1, len(run.data.identities))
    if attr_n:
        result["val_attribute_acc"] = attr_hits / attr_n
    return result


def _save(run: _Run, path: Path, step: int, stage: int) -> None:
    assert run.optimizer is not None, "a checkpoint is written after at least one step"
    run.fingerprint = save_checkpoint(
        path,
        run.model.cfg,
        run.model.state_dict(),
        step=step,
        optimizer_state=run.optimizer.state_dict(),
        rng_state=capture_rng_state(),
        train_config=run.cfg.to_dict(),
        identities=run.data.identities,
        extra={"stage": stage, "n_train": len(run.data.train), "skipped_steps": run.skipped_steps},
    )
    run.skips.write_jsonl(run.cfg.out / "skipped.jsonl")


def _restore(run: _Run, path: Path) -> int:
    """Load ``path`` into ``run`` after checking it belongs to this config and data; returns the next step."""
    ckpt = load_checkpoint(path, map_location=run.device)
    mismatch = resume_mismatch(ckpt.train_config or {}, run.cfg)
    if mismatch:
        raise ValueError(f"cannot resume from {path}: the config differs in {mismatch} (start a new --out instead)")
    if ckpt.identities != run.data.identities or ckpt.extra.get("n_train") != len(run.data.train):
        raise ValueError(f"cannot resume from {path}: the training data changed (identities or image count differ)")
    run.model.load_state_dict(ckpt.model_state)
    run.skipped_steps = int(ckpt.extra.get("skipped_steps", 0))
    step = ckpt.step
    if step < run.cfg.total_steps:
        stage, local = run.cfg.stage_at(step)
        if local > 0 and ckpt.optimizer_state is not None:  # mid-stage: continue this stage's optimizer
            run.optimizer, run.opt_stage = make_optimizer(run.model, run.cfg, run.cfg.stages[stage]), stage
            run.optimizer.load_state_dict(ckpt.optimizer_state)
    restore_rng_state(ckpt.rng_state)
    run.fingerprint = ckpt.fingerprint
    truncate_metrics(run.metrics, step)
    log.info("resumed from %s at step %d", path, step)
    return step


def _new_run(cfg: TrainConfig, progress: Progress | None) -> _Run:
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    data = prepare_data(
        cfg.data, cfg.data_format, cfg.labels, cfg.input_size, cfg.attributes, cfg.holdout_per_identity, cfg.seed,
        cfg.detect, cfg.identities, margin=cfg.crop != "template", partition=cfg.partition,
    )  # fmt: skip
    if not data.identities and any(s.lambda2 > 0 for s in cfg.stages):
        raise ValueError(f"{cfg.data} has no identities, but the schedule trains the identity loss (lambda2 > 0)")
    skips = SkipReport(total=len(data.train) + len(data.val))
    skips.add(listed_failures(data))
    check_readable(skips.failures.values(), len(data.train) + len(data.val), cfg.min_readable, listed=True)
    if not data.has_attribute_labels and any(s.lambda1 > 0 for s in cfg.stages):
        log.warning("no attribute labels in %s (pass labels=...): the attribute loss will be 0", cfg.data)
    torch.manual_seed(cfg.seed)  # model initialisation, then dropout's stream
    model = build_network(cfg, len(data.identities))
    if cfg.init is not None and not cfg.resume:
        init_from(model, cfg.init)
    model = model.to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    cfg.out.mkdir(parents=True, exist_ok=True)
    return _Run(cfg, device, dtype, data, model, cfg.out / "metrics.jsonl", skips, progress)


def build_network(cfg: TrainConfig, num_identities: int) -> FaceNet:
    """The network ``cfg`` trains: a :class:`FaceNet` with ``num_identities`` classes, or (``network="mgmtn"``)
    an :class:`facesearch.model.mgmtn.MGMTN`, which returns the same :class:`Outputs` (so it is typed as one)."""
    if cfg.network != "mgmtn":
        return FaceNet(cfg.model_config(num_identities))
    from facesearch.model.mgmtn import MGMTN, MgmtnConfig, load_mask_net, mgmtn_config

    mcfg = MgmtnConfig(cfg.fusion, "learned" if cfg.mask_net is not None else "analytic", cfg.input_size,
                       cfg.crop == "margin")  # fmt: skip
    mask_net = load_mask_net(cfg.mask_net) if cfg.mask_net is not None else None
    return MGMTN(mgmtn_config(cfg.model_config(0)), mcfg, mask_net)  # type: ignore[return-value]


def _start(run: _Run) -> int:
    cfg, path = run.cfg, run.cfg.out / CHECKPOINT
    if cfg.resume:
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist")
        return _restore(run, path)
    if path.exists():
        raise ValueError(f"{path} already exists: pass resume to continue that run, or choose another out directory")
    run.metrics.unlink(missing_ok=True)
    return 0


def _detect(run: _Run, sampler: StepBatchSampler) -> None:
    """Detect, once, the faces this invocation's steps and validations use, through the run's detection cache."""
    train_set, val_set = run.data.train, run.data.val
    if train_set.detector_factory is None:
        return
    cache = DetectionCache(run.cfg.detections or run.cfg.out / DETECTIONS, detector_identity())
    stats = attach_detections([train_set, val_set], cache, run.cfg.resolved_workers, [visited_indices(sampler), None])
    run.emit({"event": "detect", "step": sampler.start, **stats.record()})
    run.skips.add(known_failures(train_set) + known_failures(val_set))
    _check_data(run)


def _use_crop_store(run: _Run, start: int) -> None:
    """Read the crops from ``cfg.crop_store``, built on first use: every image's face detected first (through the
    detection cache), since the store holds what the datasets make of every image."""
    cfg, train_set, val_set = run.cfg, run.data.train, run.data.val
    assert cfg.crop_store is not None, "called with a crop store"
    record: dict[str, Any] = {"event": "crop_store", "step": start, "path": str(cfg.crop_store)}
    if train_set.detector_factory is not None:
        cache = DetectionCache(cfg.detections or cfg.out / DETECTIONS, detector_identity())
        record.update(attach_detections([train_set, val_set], cache, cfg.resolved_workers).record())
    run.data, stats = with_crop_store(run.data, cfg.crop_store, cfg.resolved_workers)
    run.emit({**record, **stats.record()})


def _check_data(run: _Run, steps: int = 0) -> None:
    """Stop (after listing the skipped files) when too many files are unreadable or too many of this invocation's
    ``steps`` were skipped."""
    cfg, skipped = run.cfg, run.cfg.out / "skipped.jsonl"
    total = run.skips.total or 0
    try:
        if run.skips.unreadable() > (1 - cfg.min_readable) * total:
            check_readable(run.skips.failures.values(), total, cfg.min_readable, listed=False, see=str(skipped))
        if steps and run.skipped_steps_now > cfg.max_skipped_steps * steps:
            raise ValueError(f"{run.skipped_steps_now} of {steps} steps were skipped (fewer than 2 readable images "
                             f"in the batch), more than max_skipped_steps {cfg.max_skipped_steps} allows; see "
                             f"{skipped}")  # fmt: skip
    except ValueError:
        run.skips.write_jsonl(skipped)
        raise


def _set_stage(run: _Run, step: int) -> tuple[int, StageConfig, float]:
    """Ready the optimizer for global step ``step`` (a new one at each stage start) with that step's learning rate;
    returns (stage index, stage, learning rate)."""
    stage_idx, local = run.cfg.stage_at(step)
    stage = run.cfg.stages[stage_idx]
    if run.opt_stage != stage_idx:
        run.optimizer, run.opt_stage = make_optimizer(run.model, run.cfg, stage), stage_idx
    assert run.optimizer is not None, "optimizer exists"
    lr = stage.lr_at(local)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return stage_idx, stage, lr


def _loop(run: _Run, start: int, stop: int) -> int:
    """Steps ``start .. stop - 1``; logs, validates and checkpoints on the way.  Returns the step reached."""
    cfg, pin = run.cfg, run.device.type == "cuda"
    sampler = StepBatchSampler(len(run.data.train), cfg.resolved_batch_size, cfg.seed, start, stop, cfg.flip)
    _detect(run, sampler)
    if cfg.crop_store is not None:
        _use_crop_store(run, start)
    loader = train_loader(run.data.train, sampler, cfg.resolved_workers, pin)
    vloader = val_loader(run.data.val, cfg.resolved_batch_size, cfg.resolved_workers, pin, cfg.seed)
    run.model.train()
    window, step = LogWindow(), start
    for batch in loader:
        stage_idx, stage, lr = _set_stage(run, step)
        run.skips.add(batch.failures)
        stats = train_step(run, batch, stage, step)
        if stats is not None:
            window.add(stats, int(batch.images.shape[0]))
        else:
            window.skipped_steps += 1
            run.skipped_steps += 1
            run.skipped_steps_now += 1
        step += 1
        if batch.failures or stats is None:
            _check_data(run, stop - start)
        if (cfg.log_every and step % cfg.log_every == 0) or step == stop:
            run.emit({"event": "train", "step": step, "total": cfg.total_steps, "stage": stage_idx + 1, "lr": lr,
                      "epoch": step / sampler.steps_per_epoch, **window.record()})  # fmt: skip
            window = LogWindow()
        if step % sampler.steps_per_epoch == 0 and len(run.skips):
            log.info("epoch %d: %s", step // sampler.steps_per_epoch, run.skips.summary())
        if step != stop and cfg.val_every and step % cfg.val_every == 0 and len(run.data.val):
            run.emit({"event": "val", "step": step, **evaluate(run, vloader)})
        if step != stop and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save(run, cfg.out / CHECKPOINT, step, stage_idx)
    if len(run.data.val):
        run.emit({"event": "val", "step": step, **evaluate(run, vloader)})
    if step > start:
        _save(run, cfg.out / CHECKPOINT, step, cfg.stage_at(step - 1)[0])
    return step


@contextlib.contextmanager
def _cudnn_mode(deterministic: bool) -> Iterator[None]:
    """cuDNN autotuning (fast, run-to-run variation) or deterministic kernels; the previous flags are restored."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not deterministic, deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def train(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train (or resume, with ``cfg.resume``) and return what was written.  ``progress`` receives every record that
    goes to ``metrics.jsonl`` (``event`` = ``train`` with step, loss, acc, lr, images/s; or ``val``)."""
    with _cudnn_mode(cfg.deterministic):
        return _train(cfg, progress)


def _train(cfg: TrainConfig, progress: Progress | None) -> TrainResult:
    run = _new_run(cfg, progress)
    start = _start(run)
    atomic_write_text(cfg.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    stop = min(cfg.total_steps, cfg.stop_at) if cfg.stop_at is not None else cfg.total_steps
    step = _loop(run, start, stop) if stop > start else start
    if len(run.skips):
        log.info("%s (see %s)", run.skips.summary(), cfg.out / "skipped.jsonl")
    run.skips.write_jsonl(cfg.out / "skipped.jsonl")
    weights = None
    if step >= cfg.total_steps:
        weights = export_weights(cfg.out / CHECKPOINT, cfg.out / WEIGHTS)
    return TrainResult(
        out=cfg.out,
        checkpoint=cfg.out / CHECKPOINT,
        weights=weights,
        metrics=run.metrics,
        skipped=cfg.out / "skipped.jsonl",
        step=step,
        total_steps=cfg.total_steps,
        fingerprint=run.fingerprint,
        num_identities=len(run.data.identities),
        final=dict(run.last),
        skipped_summary=run.skips.summary() if len(run.skips) else "",
        skipped_steps=run.skipped_steps,
    )


__all__ = [
    "CHECKPOINT",
    "PAPER_STAGES",
    "WEIGHTS",
    "StageConfig",
    "TrainConfig",
    "TrainResult",
    "centre_view",
    "evaluate",
    "init_from",
    "make_optimizer",
    "train",
    "train_step",
    "training_views",
]
