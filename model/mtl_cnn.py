"""MTL-CNN's network (Celona, Bianco & Schettini, "Fine-Grained Face Annotation Using Deep Multi-Task CNN", Sensors
2018; ATTRIBUTE_MODELS.md §3): one fully shared network, per-task gates that route the shared activations through a
shared non-linear layer, binary and categorical heads, and a correlation layer that conditions every prediction on
the others.

- **Shared feature.**  The project's residual trunk (any arch / width) -> FC + BN + PReLU -> ``f`` (``D`` =
  ``ModelConfig.embedding_dim``), split into ``K`` (:attr:`MtlConfig.groups`) channel groups of ``D / K``.
- **Gates.**  Task ``a`` has routing logits ``β_a`` (K,); its gate ``γ_a = K · softmax(β_a)`` (mean 1) scales each
  channel group of ``f``; the routed vector goes through **one** layer shared by every task,
  ``h_a = PReLU(BN_a(W_s (γ_a ⊙ f)))`` (``W_s`` shared; per-task BatchNorm statistics and PReLU slopes), so the gate
  decides which parts of the shared representation reach the shared non-linearity (a gate right before a task's
  linear classifier would only re-parameterise that classifier).  ``gates="fixed"`` freezes ``β = 0`` (every gate 1:
  the ablation without routing).  One ``W_s`` replaces a per-task branch of the same width
  (:func:`branch_parameters`): fewer parameters.
- **Heads.**  A logit per binary attribute, a softmax over the classes of a categorical task (e.g. an age group or
  a hair colour).  Every head output is a *unit*: one per binary attribute, one per class of a categorical task.
- **Correlation layer.**  ``z' = z + (C ⊙ M) s`` with ``s = 2 σ(z) - 1`` for a binary unit and ``2 p - 1`` (``p`` the
  task's softmax) for a categorical one; ``M`` is zero on the diagonal, between the units of one task and between
  tasks that no training database labels together (nothing could teach those entries), so those entries of ``C``
  stay exactly zero.  ``C`` starts at zero (the layer starts as the identity) and is fitted in a second stage on the
  frozen network's outputs (:mod:`facesearch.model.predictors.mtl_train`).
- **Centre loss** on the L2-normalised ``h_a`` per (task, class) (:class:`CentreLoss`): normalised, so it cannot be
  lowered by shrinking the features (no collapse).

:meth:`MtlCnn.forward` returns :class:`facesearch.model.network.Outputs` (feature ``f``; attribute scores: the
corrected logits of the binary units and, for a categorical class, the logit of its softmax probability), so the
predictor wrapper and :class:`facesearch.model.inference.Embedder` read it like any other network;
:meth:`MtlCnn.outputs` gives everything training needs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesearch.model.config import ModelConfig
from facesearch.model.losses import moon_weights
from facesearch.model.network import Outputs, build_trunk, init_conv_linear

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: ``MtlConfig.gates`` choices: learned routing, or every gate fixed at 1 (ablation).
GATES: tuple[str, ...] = ("learned", "fixed")


@dataclass(frozen=True)
class Task:
    """One prediction task: a binary attribute (``classes`` empty) or a categorical one with named ``classes``."""

    name: str
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not _IDENT.fullmatch(self.name):
            raise ValueError(f"a task name must be a name (letters, digits, _), got {self.name!r}")
        bad = [c for c in self.classes if not re.fullmatch(r"[A-Za-z0-9_]+", c)]
        if bad:
            raise ValueError(f"categorical task {self.name}: class names must be letters, digits or _, got {bad}")
        if len(self.classes) == 1 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"categorical task {self.name}: needs >= 2 distinct classes, got {list(self.classes)}")

    @property
    def categorical(self) -> bool:
        return bool(self.classes)

    @property
    def width(self) -> int:
        """Head outputs (units): 1 for a binary attribute, the number of classes otherwise."""
        return len(self.classes) if self.classes else 1

    @property
    def units(self) -> tuple[str, ...]:
        """Column names: the attribute's own name, or ``name_class`` per class (names a filter can use)."""
        return tuple(f"{self.name}_{c}" for c in self.classes) if self.classes else (self.name,)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        return cls(str(d["name"]), tuple(d.get("classes") or ()))


@dataclass(frozen=True)
class MtlConfig:
    """MTL-CNN's own options beside the trunk's :class:`ModelConfig`: the ``tasks``; ``groups`` (K) channel groups
    of ``f``; ``hidden``: width of each routed ``h_a``; ``gates`` (:data:`GATES`); ``correlation``: whether the
    correlation layer is used; ``together``: pairs of task names some training database labels together (the
    correlation layer's non-masked pairs); the aligned ``template`` (height, width) and whether the input is its
    ``margin`` crop."""

    tasks: tuple[Task, ...]
    groups: int = 8
    hidden: int = 128
    gates: str = "learned"
    correlation: bool = True
    together: tuple[tuple[str, str], ...] = ()
    template: tuple[int, int] = (112, 96)
    margin: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "tasks", tuple(t if isinstance(t, Task) else Task.from_dict(t) for t in self.tasks))
        set_(self, "together", tuple(sorted({tuple(sorted((str(a), str(b)))) for a, b in self.together})))  # type: ignore[misc]
        set_(self, "template", (int(self.template[0]), int(self.template[1])))
        names = [t.name for t in self.tasks]
        if not names or len(set(names)) != len(names) or len(set(self.units)) != len(self.units):
            raise ValueError(f"MTL-CNN needs >= 1 task with distinct names and columns, got {list(self.units)}")
        if self.gates not in GATES:
            raise ValueError(f"gates must be one of {list(GATES)}, got {self.gates!r}")
        if self.groups < 1 or self.hidden < 1:
            raise ValueError(f"groups and hidden must be >= 1, got {self.groups}, {self.hidden}")
        unknown = sorted({n for pair in self.together for n in pair} - set(names))
        if unknown:
            raise ValueError(f"'together' names tasks that do not exist: {unknown}")

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(u for t in self.tasks for u in t.units)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(tasks=[t.to_dict() for t in self.tasks], together=[list(p) for p in self.together],
                 template=list(self.template))  # fmt: skip
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MtlConfig:
        return cls(
            tasks=tuple(Task.from_dict(t) for t in d["tasks"]),
            groups=int(d.get("groups", 8)),
            hidden=int(d.get("hidden", 128)),
            gates=str(d.get("gates", "learned")),
            correlation=bool(d.get("correlation", True)),
            together=tuple((str(a), str(b)) for a, b in d.get("together", ())),
            template=tuple(d.get("template", (112, 96))),  # type: ignore[arg-type]
            margin=bool(d.get("margin", True)),
        )


def mtl_model_config(cfg: ModelConfig, mcfg: MtlConfig) -> ModelConfig:
    """The trunk config of an MTL-CNN: no identity classes, the attribute columns are the task units."""
    return dataclasses.replace(cfg, num_identities=0, attributes=mcfg.units, head=1)


def correlation_mask(tasks: Sequence[Task], together: Iterable[tuple[str, str]]) -> Tensor:
    """(U, U) float32 0/1: 1 where unit ``u`` may read unit ``v`` (different tasks labelled together somewhere)."""
    pairs = {tuple(sorted(p)) for p in together}
    owner = [t.name for t in tasks for _ in range(t.width)]
    u = len(owner)
    mask = torch.zeros(u, u)
    for i in range(u):
        for j in range(u):
            if owner[i] != owner[j] and tuple(sorted((owner[i], owner[j]))) in pairs:
                mask[i, j] = 1.0
    return mask


def branch_parameters(feature_dim: int, hidden: int, tasks: Sequence[Task]) -> int:
    """Parameters of the per-task-branch design of the same width: one ``D -> hidden`` FC + BN + PReLU and a head
    per task (what the shared, gated layer replaces)."""
    return sum(feature_dim * hidden + 3 * hidden + (hidden + 1) * t.width for t in tasks)


class MtlOutputs(NamedTuple):
    """Everything one forward pass gives: ``feature`` f (B, D); ``routed`` h (B, T, hidden) float32; ``logits`` z
    (B, U) float32 before the correlation layer; ``corrected`` z' (B, U) after it (z when it is off)."""

    feature: Tensor
    routed: Tensor
    logits: Tensor
    corrected: Tensor


class MtlCnn(nn.Module):
    """The network (see the module docstring).  ``cfg``: the trunk's :class:`ModelConfig` (from
    :func:`mtl_model_config`; ``embedding_dim`` divisible by ``mcfg.groups``); ``mcfg``: :class:`MtlConfig`."""

    def __init__(self, cfg: ModelConfig, mcfg: MtlConfig) -> None:
        super().__init__()
        if cfg.num_identities:
            raise ValueError("MTL-CNN predicts attributes only: its ModelConfig must have num_identities = 0")
        if tuple(cfg.attributes) != mcfg.units:
            raise ValueError(f"the ModelConfig's attributes must be the task units {list(mcfg.units)} "
                             "(use mtl_model_config)")  # fmt: skip
        d, k, t, h = cfg.embedding_dim, mcfg.groups, len(mcfg.tasks), mcfg.hidden
        if d % k:
            raise ValueError(f"the feature width {d} must be divisible by the {k} gate groups")
        self.cfg, self.mcfg = cfg, mcfg
        self.trunk, shape = build_trunk(cfg)
        flat = shape[0] * shape[1] * shape[2]
        self.feature = nn.Sequential(nn.Linear(flat, d, bias=False), nn.BatchNorm1d(d), nn.PReLU(d))
        self.routing = nn.Parameter(torch.zeros(t, k), requires_grad=mcfg.gates == "learned")
        self.shared = nn.Linear(d, h, bias=False)  # W_s: one for every task
        self.task_norm = nn.BatchNorm1d(t * h)
        self.task_act = nn.PReLU(t * h)
        self.heads = nn.ModuleList([nn.Linear(h, task.width) for task in mcfg.tasks])
        u = len(mcfg.units)
        self.correlation = nn.Parameter(torch.zeros(u, u), requires_grad=mcfg.correlation)
        self.register_buffer("correlation_mask", correlation_mask(mcfg.tasks, mcfg.together), persistent=False)
        owner = torch.tensor([i for i, task in enumerate(mcfg.tasks) for _ in range(task.width)])
        self.register_buffer("unit_task", owner, persistent=False)
        init_conv_linear(self.modules())

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.mcfg.tasks

    def gates(self) -> Tensor:
        """(T, K) float32 gates ``K · softmax(β)``: each row sums to K, its mean is 1."""
        return self.mcfg.groups * torch.softmax(self.routing.float(), dim=1)

    def routing_weights(self) -> Tensor:
        """(T, K) float32 ``softmax(β)``: each task's share of every channel group (rows sum to 1)."""
        return torch.softmax(self.routing.float(), dim=1)

    def routed(self, f: Tensor) -> Tensor:
        """(B, D) shared feature -> (B, T, hidden) routed task features ``h_a``."""
        gate = self.gates().to(f.dtype).repeat_interleave(f.shape[1] // self.mcfg.groups, dim=1)  # (T, D)
        x = self.shared(f[:, None, :] * gate[None])  # (B, T, hidden)
        b, t, h = x.shape
        return self.task_act(self.task_norm(x.reshape(b, t * h))).reshape(b, t, h)

    def head_logits(self, h: Tensor) -> Tensor:
        """(B, T, hidden) -> (B, U) float32 raw unit logits ``z``."""
        return torch.cat([head(h[:, i]) for i, head in enumerate(self.heads)], 1).float()

    def signals(self, z: Tensor) -> Tensor:
        """(B, U) logits -> (B, U) signals in [-1, 1]: ``2 σ(z) - 1`` (binary), ``2 softmax - 1`` (categorical)."""
        parts, lo = [], 0
        for task in self.tasks:
            zt = z[:, lo : lo + task.width]
            parts.append(2 * (torch.softmax(zt, 1) if task.categorical else torch.sigmoid(zt)) - 1)
            lo += task.width
        return torch.cat(parts, 1)

    def masked_correlation(self) -> Tensor:
        return self.correlation.float() * self.get_buffer("correlation_mask")

    def correlate(self, z: Tensor) -> Tensor:
        """The correlation layer: ``z + s (C ⊙ M)ᵀ`` (``z`` unchanged when ``mcfg.correlation`` is off)."""
        if not self.mcfg.correlation:
            return z
        return z + self.signals(z) @ self.masked_correlation().T

    def outputs(self, x: Tensor) -> MtlOutputs:
        f = self.feature(torch.flatten(self.trunk(x), 1))
        h = self.routed(f)
        z = self.head_logits(h)
        return MtlOutputs(f, h.float(), z, self.correlate(z))

    def unit_scores(self, z: Tensor) -> Tensor:
        """(B, U) corrected logits -> per-unit scores whose sigmoid is the unit's probability: the binary logits as
        they are, ``log p - log(1 - p)`` of each categorical class's softmax probability ``p``."""
        parts, lo = [], 0
        for task in self.tasks:
            zt = z[:, lo : lo + task.width]
            if task.categorical:
                logp = torch.log_softmax(zt, 1)
                zt = logp - torch.log1p(-logp.exp().clamp_max(1 - 1e-7))
            parts.append(zt)
            lo += task.width
        return torch.cat(parts, 1)

    def forward(self, x: Tensor) -> Outputs:
        out = self.outputs(x)
        return Outputs(out.feature, None, self.unit_scores(out.corrected))


def task_loss(z: Tensor, labels: Tensor, tasks: Sequence[Task], positive_rates: Tensor | None = None) -> Tensor:
    """The multi-task loss of unit logits ``z`` (B, U) against ``labels`` (B, T) float: 0/1 for a binary task, the
    class index for a categorical one, NaN unknown.  A binary task's term is the mean over its known labels of the
    binary cross-entropy weighted by MOON's re-balancing towards a 50 % positive share (``positive_rates`` (T,): the
    training set's rates; None = this batch's); a categorical task's is the cross-entropy over its classes.  The loss
    is the mean of the terms of the tasks with at least one label in the batch, so a task without labels contributes
    nothing (and gets no gradient).  Float32 scalar (0 when nothing is labelled)."""
    terms, lo = [], 0
    for i, task in enumerate(tasks):
        y = labels[:, i].float()
        known = ~torch.isnan(y)
        if bool(known.any()):
            zt = z[known, lo : lo + task.width].float()
            if task.categorical:
                terms.append(F.cross_entropy(zt, y[known].long()))
            else:
                yk = y[known]
                rate = positive_rates[i : i + 1] if positive_rates is not None else yk.mean().reshape(1)
                w = moon_weights(yk[:, None], rate.to(yk), 0.5)[:, 0]
                terms.append((w * F.binary_cross_entropy_with_logits(zt[:, 0], yk, reduction="none")).mean())
        lo += task.width
    return torch.stack(terms).mean() if terms else z.sum() * 0.0


class CentreLoss(nn.Module):
    """Centre loss (Wen et al., ECCV 2016) on L2-normalised routed features, one centre per (task, class): the mean
    over labelled samples of ``|ĥ_a - c_{a,y}|² / 2``.  Centres are unit vectors moved towards each batch's class
    mean by ``alpha`` (not by gradient).  Normalising makes the loss independent of the feature norm, so it cannot
    be lowered by shrinking every feature (no collapse).  ``classes``: per task, 2 (binary) or its class count."""

    def __init__(self, classes: Sequence[int], hidden: int, alpha: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(len(classes), max(classes), hidden, generator=gen), dim=2)
        self.register_buffer("centres", centres)
        self.register_buffer("seen", torch.zeros(len(classes), max(classes), dtype=torch.bool))
        self.alpha = alpha

    def forward(self, h: Tensor, labels: Tensor) -> Tensor:
        """``h`` (B, T, hidden); ``labels`` (B, T) int64 class (binary: 0/1), -1 unknown.  Returns a scalar (0 when
        no label is known) and, in training mode, updates the centres of the classes seen in the batch."""
        hn = F.normalize(h.float(), dim=2)
        known = labels >= 0
        if not bool(known.any()):
            return hn.sum() * 0.0
        b_idx, t_all = torch.nonzero(known, as_tuple=True)
        y = labels[b_idx, t_all]
        feats = hn[b_idx, t_all]
        centres = self.get_buffer("centres")
        first = ~self.get_buffer("seen")[t_all, y]
        target = torch.where(first[:, None], feats.detach(), centres[t_all, y])
        loss = 0.5 * ((feats - target) ** 2).sum(1).mean()
        if self.training:
            with torch.no_grad():
                for t, c in {(int(a), int(b)) for a, b in zip(t_all.tolist(), y.tolist(), strict=True)}:
                    sel = (t_all == t) & (y == c)
                    mean = feats[sel].mean(0)
                    old = centres[t, c] if bool(self.get_buffer("seen")[t, c]) else mean
                    centres[t, c] = F.normalize((1 - self.alpha) * old + self.alpha * mean, dim=0)
                    self.get_buffer("seen")[t, c] = True
        return loss


__all__ = ["GATES", "CentreLoss", "MtlCnn", "MtlConfig", "MtlOutputs", "Task", "branch_parameters",
           "correlation_mask", "mtl_model_config", "task_loss"]  # fmt: skip
