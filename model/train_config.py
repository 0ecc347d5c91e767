"""Typed, frozen configuration of a training run: the stage schedule (paper §4.4) and everything else.

The paper trains in two stages: identity only (λ1 = 0, λ2 = 1; SGD, momentum 0.9, weight decay 5e-4, lr 0.01 ×0.1
at 40k and 58k, 70k iterations), then fine-tunes with the attribute loss (λ1 = 0.1, λ2 = 1, lr 0.001 ×0.1 at 10k
and 20k, 30k iterations); batch 40 for the Full model, 48 for Fast and Variant.  The schedule is data, a tuple of
:class:`StageConfig`, so any stage can be shortened or replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facesearch.model.config import ATTRIBUTE_GROUPS, ATTRIBUTES, INPUT_SIZE, ModelConfig, from_mapping
from facesearch.model.device import PRECISIONS
from facesearch.model.faces.align import margin_geometry
from facesearch.model.losses import ATTRIBUTE_LOSSES
from facesearch.model.trainer_data import DATA_FORMATS


@dataclass(frozen=True)
class StageConfig:
    """One training stage: ``iterations`` steps at learning rate ``lr``, multiplied by ``gamma`` at each of the
    ``milestones`` (steps counted from the start of the stage), with loss weights ``lambda1`` (attributes) and
    ``lambda2`` (identity) of eq. 2.  Each stage starts a fresh optimizer (momentum reset), as a fine-tune does."""

    iterations: int
    lr: float
    milestones: tuple[int, ...] = ()
    lambda1: float = 0.0
    lambda2: float = 1.0
    gamma: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.iterations < 0:
            raise ValueError(f"stage iterations must be >= 0, got {self.iterations}")
        if not self.lr > 0 or not 0 < self.gamma <= 1:
            raise ValueError(f"stage lr must be > 0 and gamma in (0, 1], got lr={self.lr}, gamma={self.gamma}")
        if self.lambda1 < 0 or self.lambda2 < 0 or self.lambda1 == self.lambda2 == 0:
            raise ValueError(f"stage lambdas must be >= 0 and not both 0, got {self.lambda1}, {self.lambda2}")
        if list(self.milestones) != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            raise ValueError(f"stage milestones must be increasing positive steps, got {list(self.milestones)}")

    def lr_at(self, local_step: int) -> float:
        """The learning rate of step ``local_step`` (0-based within the stage): a pure function of the step."""
        return self.lr * self.gamma ** sum(local_step >= m for m in self.milestones)


#: The paper's two stages (§4.4).
PAPER_STAGES: tuple[StageConfig, ...] = (
    StageConfig(70_000, 0.01, (40_000, 58_000), lambda1=0.0, lambda2=1.0),
    StageConfig(30_000, 0.001, (10_000, 20_000), lambda1=0.1, lambda2=1.0),
)


def rescale_stage(stage: StageConfig, iterations: int | None = None, lr: float | None = None) -> StageConfig:
    """``stage`` with a new length and/or base lr; milestones keep their relative position (40k and 58k of 70k
    become 114 and 166 of 200), so a shortened run keeps the paper's shape."""
    changes: dict[str, Any] = {}
    if lr is not None:
        changes["lr"] = lr
    if iterations is not None:
        if iterations < 0:
            raise ValueError(f"stage iterations must be >= 0, got {iterations}")
        scaled = [round(m * iterations / stage.iterations) for m in stage.milestones] if stage.iterations else []
        changes.update(iterations=iterations, milestones=tuple(sorted({m for m in scaled if 0 < m < iterations})))
    return dataclasses.replace(stage, **changes)


#: TrainConfig fields that may differ between a run and its ``resume`` (where and how it runs, not what it computes).
#: ``TrainConfig.crop`` choices: what the network sees (see :class:`TrainConfig`).
CROPS: tuple[str, ...] = ("template", "margin", "views")
#: The networks :func:`facesearch.model.train.train` can train: the multi-task FaceNet, or MGMTN
#: (:mod:`facesearch.model.mgmtn`, attributes only).
NETWORKS: tuple[str, ...] = ("facenet", "mgmtn")

RESUME_FREE_FIELDS: frozenset[str] = frozenset(
    {"data", "labels", "identities", "out", "resume", "stop_at", "device", "precision", "deterministic", "num_workers",
     "val_every", "checkpoint_every", "log_every", "detections", "min_readable", "max_skipped_steps", "crop_store"}
)  # fmt: skip


def _stage(x: Any) -> StageConfig:
    if isinstance(x, StageConfig):
        return x
    if isinstance(x, Mapping):
        return from_mapping(StageConfig, x)
    raise ValueError(f"a stage must be a StageConfig or a mapping of its fields, got {x!r}")


@dataclass(frozen=True)
class TrainConfig:
    """A training run.  ``data`` is a CASIA-style folder, a generic list CSV, a CelebA root or a flat image folder
    (``data_format``); ``identities`` an identity file (``file identity`` lines, as CelebA's ``identity_CelebA.txt``)
    naming a flat folder's images, or replacing a CelebA root's; ``labels`` an optional per-identity attribute CSV.
    ``detections`` is the face detection cache (default ``out/detections.jsonl``; share one between runs on the same
    images).  ``min_readable``: the fraction of listed files that must be readable (checked before training, and as
    decode failures appear); ``max_skipped_steps``: the fraction of an invocation's steps that may be skipped for want
    of 2 readable images in the batch.  Either limit passed is an error.  Model fields build the
    :class:`ModelConfig` (P comes from the data).  ``batch_size`` None = the paper's (40 full, 48 fast/variant);
    ``num_workers`` None = min(2, CPUs).  ``stop_at`` ends this invocation after that global step (checkpointed,
    resumable with ``resume``).
    ``deterministic`` makes cuDNN pick deterministic kernels (CUDA only; CPU runs are deterministic anyway): needed
    for bit-exact resume on a GPU, where the default autotuned fp32 kernels differ from run to run.
    ``crop`` (:data:`CROPS`): ``template`` trains on the ``input_size`` aligned crop; ``margin`` on the attribute
    predictors' margin crop around it (the model's input is then the margin canvas, 128x112 for 112x96); ``views``
    reads margin crops and trains on ``input_size`` windows of them, one of the five LNets+ANet windows per image and
    step (:func:`facesearch.model.faces.align.window_offsets`; validation uses the centred one).  ``partition``: only
    that ``list_eval_partition.txt`` split of a CelebA root (0 train, 1 val, 2 test).  ``init``: start from the
    weights of this checkpoint where names and shapes match (e.g. an identity-pretrained trunk).
    ``similarity_loss``: weight of DeepID2's same-identity feature-distance term added to the identity loss
    (:func:`facesearch.model.losses.similarity_loss`; LNets+ANet's pretraining).
    ``network``: :data:`NETWORKS`; ``mgmtn`` trains MGMTN (attributes only: every stage needs lambda2 = 0; crop
    ``template`` or ``margin``) with ``fusion`` and the frozen mask network ``mask_net`` (a file of
    :func:`facesearch.model.predictors.mgmtn_train.train_mask_net`; None = the analytic masks).
    ``crop_store``: a directory of the run's aligned crops (:mod:`facesearch.model.faces.crop_store`), built on first
    use and memory-mapped after, so steps read crops instead of decoding and aligning images (the same batches)."""

    data: Path
    out: Path = Path("runs/train")
    data_format: str = "casia"
    labels: Path | None = None
    identities: Path | None = None
    detections: Path | None = None
    arch: str = "full"
    head: int = 1
    width: float = 1.0
    input_size: tuple[int, int] = INPUT_SIZE
    embedding_dim: int = 1024
    attribute_hidden: int = 1024
    dropout: float = 0.5
    attributes: tuple[str, ...] = ATTRIBUTES
    stages: tuple[StageConfig, ...] = PAPER_STAGES
    batch_size: int | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    attribute_loss: str = "mse"
    moon_target: float = 0.5
    holdout_per_identity: int = 1
    flip: bool = True
    detect: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    deterministic: bool = False
    num_workers: int | None = None
    val_every: int = 2000
    checkpoint_every: int = 2000
    log_every: int = 20
    resume: bool = False
    stop_at: int | None = None
    min_readable: float = 0.9
    max_skipped_steps: float = 0.1
    crop: str = "template"
    partition: int | None = None
    init: Path | None = None
    similarity_loss: float = 0.0
    network: str = "facenet"
    fusion: str = "g2ff"
    mask_net: Path | None = None
    crop_store: Path | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "data", Path(self.data))
        set_(self, "out", Path(self.out))
        for name in ("labels", "identities", "detections", "init", "mask_net", "crop_store"):
            set_(self, name, None if getattr(self, name) is None else Path(getattr(self, name)))
        set_(self, "input_size", tuple(int(v) for v in self.input_size))
        set_(self, "attributes", tuple(self.attributes))
        set_(self, "stages", tuple(_stage(s) for s in self.stages))
        self._validate()

    def _validate(self) -> None:
        choices = {"data_format": DATA_FORMATS, "attribute_loss": ATTRIBUTE_LOSSES, "precision": PRECISIONS,
                   "crop": CROPS, "network": NETWORKS}  # fmt: skip
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        if not self.stages or self.total_steps < 1:
            raise ValueError("the schedule needs at least one stage with iterations > 0")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        for name in ("val_every", "checkpoint_every", "log_every", "holdout_per_identity"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.similarity_loss < 0:
            raise ValueError(f"similarity_loss must be >= 0, got {self.similarity_loss}")
        if not 0 < self.moon_target < 1 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("need 0 < moon_target < 1, 0 <= momentum < 1 and weight_decay >= 0")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at must be >= 1, got {self.stop_at}")
        for name in ("min_readable", "max_skipped_steps"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1] (a fraction), got {getattr(self, name)}")
        if self.data_format == "flat" and self.identities is None:
            raise ValueError("data_format flat needs an identity file (identities=..., --identities FILE)")
        if self.partition is not None and (self.data_format != "celeba" or self.partition not in (0, 1, 2)):
            raise ValueError(f"partition (0 train, 1 val, 2 test) selects a CelebA split; got {self.partition!r} with "
                             f"data_format {self.data_format!r}")  # fmt: skip
        if self.identities is not None and self.data_format not in ("flat", "celeba"):
            raise ValueError(f"an identity file is read with data_format flat or celeba, not {self.data_format!r}")
        if self.network == "mgmtn":
            if any(s.lambda2 > 0 for s in self.stages) or self.crop == "views":
                raise ValueError("network mgmtn predicts attributes only (every stage lambda2 = 0) from the template "
                                 "or margin crop")  # fmt: skip
            from facesearch.model.mgmtn import FUSIONS

            if self.fusion not in FUSIONS:
                raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {self.fusion!r}")
        elif self.mask_net is not None:
            raise ValueError("mask_net belongs to network mgmtn")
        self.model_config(1)  # arch, head, width, input size, dropout: ModelConfig validates them

    @property
    def total_steps(self) -> int:
        return sum(s.iterations for s in self.stages)

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else (40 if self.arch == "full" else 48)

    @property
    def resolved_workers(self) -> int:
        return self.num_workers if self.num_workers is not None else min(2, os.cpu_count() or 1)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, step within that stage) of global step ``step`` (0-based)."""
        for i, stage in enumerate(self.stages):
            if step < stage.iterations:
                return i, step
            step -= stage.iterations
        raise ValueError(f"step is past the end of the schedule ({self.total_steps} steps)")

    def model_config(self, num_identities: int) -> ModelConfig:
        return ModelConfig(
            arch=self.arch,
            head=self.head,
            num_identities=num_identities,
            attributes=self.attributes,
            width=self.width,
            input_size=margin_geometry(self.input_size)[0] if self.crop == "margin" else self.input_size,
            embedding_dim=self.embedding_dim,
            attribute_hidden=self.attribute_hidden,
            dropout=self.dropout,
        )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings, stages as mappings); ``from_dict(to_dict())`` round-trips."""
        d = dataclasses.asdict(self)
        d.update(data=str(self.data), out=str(self.out))
        d.update({k: None if getattr(self, k) is None else str(getattr(self, k)) for k in
                  ("labels", "identities", "detections", "init", "mask_net", "crop_store")})  # fmt: skip
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return from_mapping(cls, data)


def select_attributes(names: str | Sequence[str] | None = None, group: str | None = None) -> tuple[str, ...]:
    """The attribute head of a run: ``names`` (a comma-separated string or a sequence, each one of the paper's seven
    :data:`~facesearch.model.config.ATTRIBUTES`) or the Table 7 ``group`` (a key of
    :data:`~facesearch.model.config.ATTRIBUTE_GROUPS`), always in the paper's order (so ``Male,Big_Nose`` and
    ``Big_Nose,Male`` make the same network).  Neither: all seven.  Raises ``ValueError`` for both, for an unknown
    name or group (listing the valid ones) and for an empty list."""
    if names is not None and group is not None:
        raise ValueError("give attributes or an attribute group, not both")
    if group is not None:
        if group not in ATTRIBUTE_GROUPS:
            raise ValueError(f"unknown attribute group {group!r}; valid: {list(ATTRIBUTE_GROUPS)}")
        return ATTRIBUTE_GROUPS[group]
    if names is None:
        return ATTRIBUTES
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    wanted = [n for n in wanted if n]
    unknown = [n for n in wanted if n not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; valid: {list(ATTRIBUTES)} (CelebA spelling)")
    if not wanted:
        raise ValueError(f"no attribute given; choose from {list(ATTRIBUTES)} (or train without attributes: "
                         f"lambda1 = 0)")  # fmt: skip
    return tuple(a for a in ATTRIBUTES if a in wanted)


def without_attributes(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` as the paper's model "without attributes": λ1 = 0 in every stage, the schedule otherwise unchanged
    (iterations, learning rates, milestones, λ2), the clean ablation of PAPER_TABLES.md.

    The attribute loss is then not computed at all (it contributes exactly 0 and no ``loss_attribute`` is logged), so
    no labels file is needed.  The attribute head is kept, untrained, so the network and its initialisation are those
    of the model with attributes (a paired comparison); its predictions mean nothing.  Raises ``ValueError`` for a
    stage that trains attributes only (λ2 = 0): without attributes it would train nothing."""
    bad = [i + 1 for i, s in enumerate(cfg.stages) if s.lambda2 == 0]
    if bad:
        raise ValueError(f"cannot train without attributes: stage(s) {bad} have lambda2 = 0 (attributes only), so "
                         f"lambda1 = 0 would leave them no loss")  # fmt: skip
    return cfg.replace(stages=tuple(dataclasses.replace(s, lambda1=0.0) for s in cfg.stages))


def resume_mismatch(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """Names of the fields that differ between a checkpoint's config and ``current`` but must match for a resume."""
    now = current.to_dict()
    # A field the checkpoint predates had its default then (e.g. ``network`` before MGMTN existed).
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    plain = {k: v for k, v in defaults.items() if v is None or isinstance(v, str | int | float)}
    defaults = json.loads(json.dumps(plain))
    return sorted(k for k in set(now) | set(saved)
                  if k not in RESUME_FREE_FIELDS and saved.get(k, defaults.get(k)) != now.get(k))  # fmt: skip


class MissingDataError(ValueError):
    """No training ``data`` in any source of :func:`resolve_train_config`: not among the options, not in the config
    file, not in the resumed run's ``train_config.json``."""


#: The keys of :func:`resolve_train_config`'s options that rescale the schedule instead of naming a field.
STAGE_OPTIONS = ("stage1_iterations", "stage2_iterations", "lr", "finetune_lr")
#: The keys of :func:`resolve_train_config`'s options that choose the attribute head and loss instead of naming a field.
ATTRIBUTE_OPTIONS = ("attribute_group", "no_attributes")


def resolve_train_config(options: Mapping[str, Any], config_file: str | os.PathLike[str] | None = None) -> TrainConfig:
    """A run's :class:`TrainConfig` from its settings, later sources winning: the field defaults; the run's own
    ``train_config.json`` in ``options["out"]`` (only with ``options["resume"]``, and without its ``stop_at``: a stop
    point belongs to the invocation that set it); the JSON object in ``config_file``; every option that is not None.

    ``options`` holds TrainConfig fields and the :data:`STAGE_OPTIONS`, which rescale the schedule last:
    ``stage1_iterations`` / ``stage2_iterations`` set a stage's length (milestones scale along, see
    :func:`rescale_stage`) and ``lr`` / ``finetune_lr`` its base learning rate.  Of the :data:`ATTRIBUTE_OPTIONS`,
    ``attribute_group`` sets ``attributes`` to a Table 7 group (``attributes`` in ``options`` is a sequence or a
    comma-separated string of names; either is checked by :func:`select_attributes`) and a true ``no_attributes``
    applies :func:`without_attributes` last (it excludes both).  ``identities`` without a
    ``data_format`` means ``flat`` (a plain folder named by an identity file).  So a run resumes from its directory
    alone, and a config file is a base the options adjust.

    Raises :class:`MissingDataError` when no source gives ``data``; ``ValueError`` for a JSON file that cannot be read
    or holds no object, an unknown key (listing the valid ones), a stage the schedule lacks or an invalid value."""
    merged: dict[str, Any] = {}
    out = options.get("out")
    if options.get("resume") and out is not None and (Path(out) / "train_config.json").is_file():
        merged.update(_read_config_json(Path(out) / "train_config.json", "run config"))
        merged.pop("stop_at", None)
    if config_file is not None:
        merged.update(_read_config_json(Path(config_file), "config"))
    merged.update({k: v for k, v in options.items() if v is not None and k not in (*STAGE_OPTIONS, *ATTRIBUTE_OPTIONS)})
    chosen, group = options.get("attributes"), options.get("attribute_group")
    if options.get("no_attributes") and (chosen is not None or group is not None):
        raise ValueError("no_attributes trains no attribute (lambda1 = 0); it excludes attributes and attribute_group")
    if chosen is not None or group is not None:
        merged["attributes"] = select_attributes(chosen, group)
    if "data" not in merged:
        raise MissingDataError("no training data: give data, or resume a run whose train_config.json has it")
    if merged.get("identities") is not None and "data_format" not in merged:
        merged["data_format"] = "flat"
    cfg = TrainConfig.from_dict(merged)
    stages = list(cfg.stages)
    for i, (n, lr) in enumerate(((options.get("stage1_iterations"), options.get("lr")),
                                 (options.get("stage2_iterations"), options.get("finetune_lr")))):  # fmt: skip
        if n is None and lr is None:
            continue
        if i >= len(stages):
            raise ValueError(f"the schedule has {len(stages)} stage(s); cannot set stage {i + 1}")
        stages[i] = rescale_stage(stages[i], n, lr)
    cfg = cfg.replace(stages=tuple(stages))
    return without_attributes(cfg) if options.get("no_attributes") else cfg


def _read_config_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object of TrainConfig fields in ``path``; ``what`` names the file in errors."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object of TrainConfig fields")
    return data


__all__ = [
    "ATTRIBUTE_OPTIONS",
    "CROPS",
    "NETWORKS",
    "PAPER_STAGES",
    "RESUME_FREE_FIELDS",
    "STAGE_OPTIONS",
    "MissingDataError",
    "StageConfig",
    "TrainConfig",
    "rescale_stage",
    "resolve_train_config",
    "resume_mismatch",
    "select_attributes",
    "without_attributes",
]
