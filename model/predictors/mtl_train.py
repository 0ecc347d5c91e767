"""Training MTL-CNN (:mod:`facesearch.model.mtl_cnn`) on several databases whose label sets differ.

``facesearch attributes train --method mtl-cnn --data D1 [--data D2 ...] [--categorical NAME ...]``:

- **Databases.**  Each ``--data`` is a CelebA-format root (binary ``list_attr_celeba.txt`` columns; ``train`` /
  ``val`` partitions when it has ``list_eval_partition.txt``) or a generic list CSV (binary 0/1 columns, empty =
  unknown; the columns named by ``categorical`` hold integer classes, -1 or empty = unknown).  A database without
  partitions holds out ``val_fraction`` of its people (seeded) for validation and calibration.  A sample carries
  only its own database's labels: every other task is unknown for it and contributes nothing to the loss.
- **Tasks.**  The union of the databases' binary columns (the paper's seven first, in their order) and the
  categorical columns, whose classes are ``0 .. max class``.  Two tasks are *labelled together* when one database
  labels both; the correlation layer only links such pairs.
- **Batches** are stratified per database: each step draws an equal share of its images from every database (a
  pure function of the seed and the step, so a resumed run draws the same batches); images are mirrored at random.
- **Stage 1** trains the network with :func:`facesearch.model.mtl_cnn.task_loss` (SGD, momentum 0.9, weight decay
  5e-4 except on the routing logits, lr x0.1 at 50 % and 75 %) plus the centre loss (weight ``centre_loss``) from
  ``centre_warmup`` of the run on.  It checkpoints every ``checkpoint_every`` steps (atomically, with optimizer, RNG
  and centre state) and resumes from the checkpoint in ``out/network``.
- **Stage 2** fits the correlation matrix on the frozen network's logits of the training images (full batch, Adam,
  ``correlation_iterations`` steps, L2 1e-4), masked as above.
- Calibration (Platt, per unit) on the validation people of every database, then ``out/predictor.safetensors`` and
  ``predictor.json`` as for every predictor (:func:`facesearch.model.predictors.training.finish_predictor`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesearch.model.attributes import AttributeTrainConfig
from facesearch.model.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from facesearch.model.config import ATTRIBUTES, ModelConfig
from facesearch.model.device import autocast, autocast_dtype, resolve_device
from facesearch.model.faces.align import margin_geometry
from facesearch.model.faces.celeba import read_celeba
from facesearch.model.faces.datasets import FaceDataset, collate_faces
from facesearch.model.faces.detect import FaceDetector
from facesearch.model.faces.samples import Sample, read_list
from facesearch.model.mtl_cnn import (
    CentreLoss,
    MtlCnn,
    MtlConfig,
    Task,
    branch_parameters,
    mtl_model_config,
    task_loss,
)
from facesearch.model.network import to_input
from facesearch.model.predictors.base import InputSpec
from facesearch.model.predictors.mtl_cnn import MtlCnnPredictor
from facesearch.model.predictors.training import (
    PredictorResult,
    _stage,
    finish_predictor,
    iter_crops,
    jsonable,
    label_matrix,
    predictor_scores,
)

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
CHECKPOINT = "checkpoint.safetensors"
_CENTRE_PREFIX = "centre_loss."


@dataclass(frozen=True)
class Database:
    """One training database: its ``train`` and ``val`` samples, the binary columns it labels and its categorical
    columns with their largest class."""

    name: str
    path: Path
    train: list[Sample]
    val: list[Sample]
    binary: tuple[str, ...]
    categorical: dict[str, int]

    @property
    def tasks(self) -> tuple[str, ...]:
        return (*self.binary, *self.categorical)

    def describe(self) -> dict[str, Any]:
        people = {s.identity for s in self.train + self.val}
        return {"path": str(self.path), "train_images": len(self.train), "val_images": len(self.val),
                "people": len(people), "binary": list(self.binary), "categorical": dict(self.categorical)}  # fmt: skip


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [h.strip() for h in next(csv.reader(f), [])]


def _hold_out(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val): ``fraction`` of the people (at least one when there are two or more) held out, seeded."""
    people = sorted({s.identity or str(s.path) for s in samples})
    if len(people) < 2:
        return samples, []
    k = min(len(people) - 1, max(1, round(fraction * len(people))))
    held = {people[i] for i in np.random.default_rng(seed).permutation(len(people))[:k]}
    return ([s for s in samples if (s.identity or str(s.path)) not in held],
            [s for s in samples if (s.identity or str(s.path)) in held])  # fmt: skip


def read_database(path: Path, categorical: Sequence[str], val_fraction: float = 0.1, seed: int = 0) -> Database:
    """A CelebA root or a list CSV as a :class:`Database` (see the module docstring).  ``ValueError`` /
    ``FileNotFoundError`` naming ``path`` when it is neither or labels nothing."""
    path = Path(path)
    if path.is_dir():
        if not (path / "list_attr_celeba.txt").is_file():
            raise FileNotFoundError(f"{path}: a database folder must be a CelebA root with list_attr_celeba.txt")
        if (path / "list_eval_partition.txt").is_file():
            train, val = read_celeba(path, 0), read_celeba(path, 1)
        else:
            train, val = _hold_out(read_celeba(path), val_fraction, seed)
    elif path.is_file():
        present = [c for c in categorical if c in _csv_header(path)]
        train, val = _hold_out(read_list(path, categorical=present), val_fraction, seed)
    else:
        raise FileNotFoundError(f"database {path} does not exist (a CelebA root or a list CSV)")
    labelled: dict[str, None] = {}
    for s in train:
        labelled.update(dict.fromkeys(s.attributes or {}))
    cats = {c: int(max((s.attributes or {}).get(c, 0) for s in train + val)) for c in categorical if c in labelled}
    binary = tuple(a for a in labelled if a not in cats)
    if not labelled:
        raise ValueError(f"database {path} labels no attribute on its training images")
    return Database(path.stem if path.is_file() else path.name, path, train, val, binary, cats)


def parse_categorical(entries: Sequence[str]) -> dict[str, tuple[str, ...] | None]:
    """``--categorical`` entries ``NAME`` or ``NAME=class0,class1,...`` (the names of classes 0, 1, ...) -> name ->
    class names (None: the classes are named by their numbers)."""
    out: dict[str, tuple[str, ...] | None] = {}
    for entry in entries:
        name, _, classes = entry.partition("=")
        names = tuple(c.strip() for c in classes.split(",")) if classes else None
        if not name.strip() or (names is not None and (len(names) < 2 or not all(names))):
            raise ValueError(f"--categorical {entry!r}: expected NAME or NAME=class0,class1,... (two or more classes)")
        out[name.strip()] = names
    return out


def database_tasks(
    databases: Sequence[Database], class_names: dict[str, tuple[str, ...] | None] | None = None
) -> tuple[tuple[Task, ...], tuple[tuple[str, str], ...]]:
    """The tasks of all databases (the paper's seven binary attributes first, then other binary columns in order of
    appearance, then the categorical ones, with their ``class_names`` when given) and the pairs of tasks some
    database labels together."""
    binary: dict[str, None] = {a: None for a in ATTRIBUTES if any(a in d.binary for d in databases)}
    for d in databases:
        binary.update(dict.fromkeys(d.binary))
    classes: dict[str, int] = {}
    for d in databases:
        for c, top in d.categorical.items():
            classes[c] = max(classes.get(c, 0), top)
    clash = sorted(set(binary) & set(classes))
    if clash:
        raise ValueError(f"columns {clash} are binary in one database and categorical in another")
    tasks = tuple(Task(a) for a in binary) + tuple(_categorical_task(c, n, (class_names or {}).get(c))
                                                   for c, n in classes.items())  # fmt: skip
    together = {tuple(sorted((a, b))) for d in databases for a in d.tasks for b in d.tasks if a != b}
    return tasks, tuple(sorted(together))  # type: ignore[arg-type]


def _categorical_task(name: str, top: int, names: tuple[str, ...] | None) -> Task:
    if names is None:
        return Task(name, tuple(map(str, range(max(2, top + 1)))))
    if top >= len(names):
        raise ValueError(f"categorical column {name} holds class {top}, but only {len(names)} class names are given "
                         f"({', '.join(names)})")  # fmt: skip
    return Task(name, names)


def unit_samples(samples: Sequence[Sample], tasks: Sequence[Task]) -> list[Sample]:
    """Samples whose categorical labels are spelled as one-vs-rest unit labels (``task_class`` 1, the task's other
    classes 0), the columns the predictor calibrates and reports."""
    out = []
    for s in samples:
        attrs = dict(s.attributes or {})
        for t in tasks:
            if t.categorical and t.name in attrs:
                cls = int(attrs.pop(t.name))
                attrs.update({u: float(i == cls) for i, u in enumerate(t.units)})
        out.append(dataclasses.replace(s, attributes=attrs))
    return out


class StratifiedSteps(torch.utils.data.Sampler[list[int]]):
    """Batch indices for steps ``start .. total - 1``: an equal share of ``batch`` from every database (the
    concatenated dataset's ``ranges``), drawn without replacement within a step from a generator seeded by
    (``seed``, step), so a resumed run sees the same batches."""

    def __init__(self, ranges: Sequence[range], batch: int, seed: int, start: int, total: int) -> None:
        self.ranges, self.batch, self.seed, self.start, self.total = list(ranges), batch, seed, start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.ranges)
        for step in range(self.start, self.total):
            rng = np.random.default_rng([self.seed, step, 0x5A])
            picks: list[int] = []
            for i, r in enumerate(self.ranges):
                share = min(len(r), self.batch // n + (i < self.batch % n))
                picks.extend(r.start + int(j) for j in rng.choice(len(r), share, replace=False))
            yield picks


def _config_record(cfg: AttributeTrainConfig) -> dict[str, Any]:
    # where and how it runs, and the options of stage 2 only: a run without the correlation layer reuses stage 1
    free = {"out", "device", "precision", "num_workers", "resume", "detections", "checkpoint_every", "correlation",
            "correlation_iterations"}  # fmt: skip
    return {k: jsonable(v) for k, v in dataclasses.asdict(cfg).items() if k not in free}


def _positive_rates(samples: Sequence[Sample], tasks: Sequence[Task]) -> torch.Tensor:
    rates = []
    for t in tasks:
        ys = [s.attributes[t.name] for s in samples if s.attributes and t.name in s.attributes]
        rates.append(float(np.mean(ys)) if ys and not t.categorical else 0.5)
    return torch.tensor(rates, dtype=torch.float32)


def build_network(cfg: AttributeTrainConfig, tasks: Sequence[Task], together: Sequence[tuple[str, str]]) -> MtlCnn:
    mcfg = MtlConfig(tuple(tasks), groups=cfg.gate_groups, hidden=cfg.task_hidden, gates=cfg.gates,
                     correlation=cfg.correlation, together=tuple(together), template=cfg.input_size)  # fmt: skip
    base = ModelConfig(arch=cfg.arch, num_identities=0, width=cfg.width, input_size=margin_geometry(cfg.input_size)[0],
                       embedding_dim=cfg.feature_dim)  # fmt: skip
    return MtlCnn(mtl_model_config(base, mcfg), mcfg)


def _save(path: Path, model: MtlCnn, centre: CentreLoss, opt: torch.optim.Optimizer, step: int,
          record: dict[str, Any]) -> None:  # fmt: skip
    state = {**model.state_dict(), **{_CENTRE_PREFIX + k: v for k, v in centre.state_dict().items()}}
    save_checkpoint(path, model.cfg, state, step=step, optimizer_state=opt.state_dict(), rng_state=capture_rng_state(),
                    train_config=record, extra={"mtl_cnn": model.mcfg.to_dict()})  # fmt: skip


def _resume(path: Path, model: MtlCnn, centre: CentreLoss, opt: torch.optim.Optimizer, record: dict[str, Any]) -> int:
    ckpt = load_checkpoint(path)
    old = ckpt.train_config or {}
    changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if changed:
        raise ValueError(f"{path} was written by a different run (changed: {', '.join(changed)}): choose another --out "
                         "or delete it")  # fmt: skip
    state = dict(ckpt.model_state)
    centre.load_state_dict(
        {k[len(_CENTRE_PREFIX) :]: state.pop(k) for k in list(state) if k.startswith(_CENTRE_PREFIX)}
    )
    model.load_state_dict(state)
    if ckpt.optimizer_state is not None:
        opt.load_state_dict(ckpt.optimizer_state)
    if ckpt.rng_state:
        restore_rng_state(ckpt.rng_state)
    return ckpt.step


def train_network(
    cfg: AttributeTrainConfig, databases: Sequence[Database], progress: Progress | None = None
) -> tuple[MtlCnn, CentreLoss, dict[str, Any]]:
    """Stage 1 (see the module docstring); returns the network (CPU, eval mode), its centre loss and a record."""
    tasks, together = database_tasks(databases, parse_categorical(cfg.categorical))
    torch.manual_seed(cfg.seed)
    model = build_network(cfg, tasks, together)
    centre = CentreLoss([t.width if t.categorical else 2 for t in tasks], cfg.task_hidden, seed=cfg.seed)
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    model.to(device)
    centre.to(device)
    routing = [model.routing] if cfg.gates == "learned" else []
    others = [p for n, p in model.named_parameters() if n not in ("routing", "correlation") and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": others}, {"params": routing, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    record = _config_record(cfg)
    path = cfg.out / "network" / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    start = _resume(path, model, centre, opt, record) if path.is_file() else 0
    samples = [s for d in databases for s in d.train]
    ranges, lo = [], 0
    for d in databases:
        ranges.append(range(lo, lo + len(d.train)))
        lo += len(d.train)
    names = [t.name for t in tasks]
    ds = FaceDataset(samples, size=cfg.input_size, margin=True, attributes=names,
                     detector_factory=FaceDetector if any(s.landmarks is None for s in samples) else None)  # fmt: skip
    batch = cfg.batch_size or 48
    sampler = StratifiedSteps(ranges, batch, cfg.seed, start, cfg.iterations)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.resolved_workers,
                                         collate_fn=collate_faces)  # fmt: skip
    rates = _positive_rates(samples, tasks).to(device)
    warm = int(cfg.centre_warmup * cfg.iterations)
    schedule = _stage(cfg, cfg.iterations, cfg.lr, 1.0, 0.0)  # lr x0.1 at 50 % and 75 %, as every method
    model.train()
    t0, skipped, step, last = time.perf_counter(), 0, start, {}
    for step, fb in enumerate(loader, start=start):
        if len(fb.images) < 2:
            skipped += 1
            continue
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(step)
        flip = torch.from_numpy(np.random.default_rng([cfg.seed, step, 0xF1]).random(len(fb.images)) < 0.5)
        images = torch.where(flip[:, None, None, None], fb.images.flip(2), fb.images)
        labels = fb.attributes.to(device)
        with autocast(device, dtype):
            out = model.outputs(to_input(images.to(device)))
        loss_tasks = task_loss(out.logits, labels, tasks, rates)
        loss = loss_tasks
        centre_value = torch.zeros(())
        if cfg.centre_loss > 0 and step >= warm:
            centre_value = centre(out.routed, torch.nan_to_num(labels, nan=-1.0).long())
            loss = loss + cfg.centre_loss * centre_value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        last = {"loss": loss_tasks.item(), "centre_loss": centre_value.item()}
        if progress is not None and (done % 10 == 0 or done == cfg.iterations):
            seconds = time.perf_counter() - t0
            rate = (done - start) * batch / max(seconds, 1e-9)
            progress({"event": "train", "step": done, "total": cfg.iterations, "loss": loss.item(),
                      "lr": schedule.lr_at(step), "images_per_s": rate})  # fmt: skip
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            _save(path, model, centre, opt, done, record)
    if start < cfg.iterations and skipped > cfg.max_skipped_steps * (cfg.iterations - start):
        raise RuntimeError(f"{skipped} of {cfg.iterations - start} steps had fewer than 2 readable images")
    model.cpu().eval()
    centre.cpu()
    return model, centre, {"steps": cfg.iterations, "resumed_at": start, "skipped_steps": skipped, **last}


@torch.no_grad()
def network_logits(
    model: MtlCnn, samples: Sequence[Sample], cfg: AttributeTrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Raw unit logits ``z`` (N, U) of the readable ``samples`` and their (N, T) labels (NaN unknown)."""
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    model.to(device).eval()
    names = [t.name for t in model.tasks]
    zs, ys = [], []
    for idx, crops in iter_crops(samples, InputSpec(cfg.input_size, margin=True), workers=cfg.resolved_workers):
        with autocast(device, dtype):
            zs.append(model.outputs(to_input(torch.from_numpy(crops).to(device))).logits.float().cpu().numpy())
        ys.append(label_matrix([samples[i] for i in idx], names))
    model.cpu()
    u = len(model.mcfg.units)
    if not zs:
        return np.zeros((0, u), np.float32), np.zeros((0, len(names)), np.float32)
    return np.concatenate(zs), np.concatenate(ys)


def fit_correlation(
    model: MtlCnn, z: np.ndarray, labels: np.ndarray, iterations: int, positive_rates: torch.Tensor | None = None,
    l2: float = 1e-4, lr: float = 0.05,
) -> dict[str, float]:  # fmt: skip
    """Stage 2: fit ``model.correlation`` (masked) on fixed logits ``z`` (N, U) and labels (N, T), full batch.
    Returns the task loss before and after."""
    zt, yt = torch.from_numpy(z).float(), torch.from_numpy(labels).float()
    c = model.correlation
    c.requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    with torch.no_grad():
        before = float(task_loss(zt, yt, model.tasks, positive_rates))
    for _ in range(iterations):
        loss = (
            task_loss(model.correlate(zt), yt, model.tasks, positive_rates)
            + l2 * (model.masked_correlation() ** 2).sum()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            c.mul_(model.get_buffer("correlation_mask"))  # masked entries stay exactly zero
    c.requires_grad_(False)
    with torch.no_grad():
        after = float(task_loss(model.correlate(zt), yt, model.tasks, positive_rates))
    return {"task_loss_before": before, "task_loss_after": after}


def label_log_odds(samples: Sequence[Sample], units: Sequence[str], min_pairs: int = 20) -> np.ndarray:
    """(U, U) float64 log-odds ratios of the unit labels of ``samples`` (one-vs-rest for categorical classes, from
    :func:`unit_samples`): ``log((n11 + ½)(n00 + ½) / ((n10 + ½)(n01 + ½)))`` over the samples labelled on both; NaN
    on the diagonal and where fewer than ``min_pairs`` samples carry both labels."""
    y = np.array([[(s.attributes or {}).get(u, np.nan) for u in units] for s in samples], np.float64).reshape(
        -1, len(units)
    )
    out = np.full((len(units), len(units)), np.nan)
    for i in range(len(units)):
        for j in range(len(units)):
            both = np.isfinite(y[:, i]) & np.isfinite(y[:, j])
            if i == j or both.sum() < min_pairs:
                continue
            a, b = y[both, i] > 0.5, y[both, j] > 0.5
            n11, n00, n10, n01 = (a & b).sum(), (~a & ~b).sum(), (a & ~b).sum(), (~a & b).sum()
            out[i, j] = float(np.log((n11 + 0.5) * (n00 + 0.5) / ((n10 + 0.5) * (n01 + 0.5))))
    return out


def categorical_accuracy(predictor: MtlCnnPredictor, samples: Sequence[Sample], workers: int = 0) -> dict[str, Any]:
    """Per categorical task: top-1 accuracy of the predicted class on the labelled ``samples`` and their count."""
    cats = [t for t in predictor.tasks if t.categorical]
    labelled = [s for s in samples if any(t.name in (s.attributes or {}) for t in cats)]
    if not cats or not labelled:
        return {}
    scores = predictor_scores(predictor, labelled, workers=workers)
    out: dict[str, Any] = {}
    for t in cats:
        cols = [predictor.attributes.index(u) for u in t.units]
        rows = [
            (i, int(s.attributes[t.name])) for i, s in enumerate(labelled) if s.attributes and t.name in s.attributes
        ]
        ok = [(i, y) for i, y in rows if np.isfinite(scores[i, cols]).all()]
        if ok:
            pred = scores[[i for i, _ in ok]][:, cols].argmax(1)
            truth = np.array([y for _, y in ok])
            out[t.name] = {"accuracy": float((pred == truth).mean()), "n": len(ok),
                           "majority_class_rate": float(np.bincount(truth).max() / len(truth))}  # fmt: skip
    return out


def train_mtl_cnn(cfg: AttributeTrainConfig, progress: Progress | None = None) -> PredictorResult:
    """``facesearch attributes train --method mtl-cnn``: stage 1, stage 2, calibration, the predictor file."""
    t0 = time.perf_counter()
    paths = [cfg.data, *cfg.more_data]
    columns = list(parse_categorical(cfg.categorical))
    databases = [read_database(p, columns, cfg.val_fraction, cfg.seed) for p in paths]
    unused = [c for c in columns if not any(c in d.categorical for d in databases)]
    if unused:
        raise ValueError(f"--categorical {', '.join(unused)}: no database labels such a column "
                         f"({', '.join(str(p) for p in paths)})")  # fmt: skip
    seconds: dict[str, float] = {}
    model, _centre, stage1 = train_network(cfg, databases, progress)
    seconds["network"] = round(time.perf_counter() - t0, 2)
    train_samples = [s for d in databases for s in d.train]
    stage2: dict[str, Any] = {}
    if cfg.correlation and cfg.correlation_iterations > 0:
        t1 = time.perf_counter()
        z, y = network_logits(model, train_samples, cfg)
        stage2 = fit_correlation(model, z, y, cfg.correlation_iterations, _positive_rates(train_samples, model.tasks))
        seconds["correlation"] = round(time.perf_counter() - t1, 2)
    predictor = MtlCnnPredictor(model, InputSpec(cfg.input_size, margin=True), device=cfg.device,  # type: ignore[arg-type]
                                precision=cfg.precision)  # fmt: skip
    held_out = [s for d in databases for s in d.val]
    shared = ("routing", "shared", "task_norm", "task_act", "heads")
    meta = {
        "databases": {(d.name if [e.name for e in databases].count(d.name) == 1 else f"{i}:{d.name}"): d.describe()
                      for i, d in enumerate(databases)},
        "stage1": stage1,
        "stage2": stage2,
        "parameters_gated_shared_layer": sum(p.numel() for n, p in model.named_parameters() if n.startswith(shared)),
        "parameters_per_task_branches": branch_parameters(cfg.feature_dim, cfg.task_hidden, model.tasks),
        "label_log_odds": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                           for row in label_log_odds(unit_samples(train_samples, model.tasks), model.mcfg.units)],
    }  # fmt: skip

    def categorical(p: Any) -> dict[str, Any]:
        return {"categorical": categorical_accuracy(p, held_out, cfg.resolved_workers)}

    val = unit_samples(held_out or train_samples, model.tasks)
    return finish_predictor(predictor, val, cfg, seconds, t0, "val" if held_out else "train", meta, categorical)


__all__ = ["Database", "StratifiedSteps", "database_tasks", "fit_correlation", "label_log_odds", "network_logits",
           "parse_categorical", "read_database", "train_mtl_cnn", "train_network", "unit_samples"]  # fmt: skip
