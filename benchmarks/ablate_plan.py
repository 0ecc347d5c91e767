"""What ``facesearch ablate`` trains: the tiers (sizes), the variants (canonical training configs) and the paper's
Tables 2–7 (rows, reference rows, the paper's numbers), as data.

A variant is :class:`Variant` ``(arch, head, attributes)``; its :attr:`Variant.key` names its training config
canonically, so a model that appears in several tables (Table 5 Fast = Table 6 Configuration-1 = Table 7 "all" =
Table 2 Fast-with) is trained once per seed.  ``attributes`` is a Table 7 group (``eye``, ``nose``, ``global``,
``all``: the head predicts those, trained at λ1 = 0.1 in stage 2) or ``none``: λ1 = 0 in every stage
(:func:`facesearch.model.train_config.without_attributes`; the head of all seven is kept, untrained, so the network
is the one "with attributes").  Everything else comes from the :class:`Tier` and is identical across variants; the
batch size is the tier's for every block (the paper uses 40 for Full, 48 for Fast), so the batch order, a function of
(seed, data, batch size) alone, is the same for every variant of a seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from facesearch.model.attributes import AttributeTrainConfig
from facesearch.model.config import ARCHS, ATTRIBUTE_GROUPS, ATTRIBUTES, HEADS, INPUT_SIZE
from facesearch.model.faces.synth import SynthConfig
from facesearch.model.train_config import TrainConfig, rescale_stage, without_attributes

#: ``Variant.attributes`` choices: λ1 = 0 (``none``) or a Table 7 group.
ATTRIBUTE_SETS: tuple[str, ...] = ("none", *ATTRIBUTE_GROUPS)


@dataclass(frozen=True)
class Tier:
    """The sizes of one ablation scale (recorded in every result).  Synthetic data: ``identities`` x
    ``images_per_identity`` training images, ``celeba_images`` for the attribute teacher, ``probe_identities`` x
    ``probe_images_per_identity`` FaceScrub-style probes (also the LFW-style people) and ``distractors`` MegaFace-style
    distractors rendered at ``image_size`` px; a list CSV is split with ``probe_identities`` /
    ``probe_images_per_identity``.  Training: ``width`` x the paper's filters at ``input_size``, ``stage1_iterations``
    at ``lr`` then ``stage2_iterations`` at ``lr / 10`` (the paper's schedule shape, milestones scaled), batch
    ``batch_size`` for every block.  Teacher: ``teacher_method`` (``facesearch attributes train --method``) for
    ``teacher_iterations`` at ``teacher_input_size``.  ``lfw_pairs_per_fold`` matched (and as many mismatched) pairs
    in each of 10 folds; ``bootstrap`` resamples per interval; ``workers``: DataLoader workers (None = min(2, CPUs))."""

    name: str
    identities: int
    images_per_identity: int
    celeba_images: int
    probe_identities: int
    probe_images_per_identity: int
    distractors: int
    image_size: int
    input_size: tuple[int, int]
    width: float
    embedding_dim: int
    attribute_hidden: int
    batch_size: int
    stage1_iterations: int
    stage2_iterations: int
    lr: float
    teacher_method: str
    teacher_iterations: int
    teacher_input_size: tuple[int, int]
    teacher_width: float
    lfw_pairs_per_fold: int
    bootstrap: int
    workers: int | None = None
    celeba_images_per_identity: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "teacher_input_size", tuple(int(v) for v in self.teacher_input_size))
        counts = ("identities", "images_per_identity", "celeba_images", "probe_identities", "distractors",
                  "embedding_dim", "attribute_hidden", "stage1_iterations", "stage2_iterations", "teacher_iterations",
                  "lfw_pairs_per_fold", "bootstrap")  # fmt: skip
        values = {n: getattr(self, n) for n in counts}
        bad = [f"{n}={v!r}" for n, v in values.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"tier {self.name!r}: these sizes must be integers >= 1: {', '.join(bad)}")
        if self.probe_images_per_identity < 2 or self.batch_size < 2:
            raise ValueError(f"tier {self.name!r}: probe_images_per_identity (a probe needs a mate) and batch_size "
                             f"(BatchNorm) must be >= 2")  # fmt: skip
        if self.probe_identities < 20:
            raise ValueError(f"tier {self.name!r}: the LFW-style 10 folds need >= 20 probe people, got "
                             f"{self.probe_identities}")  # fmt: skip
        if not (self.width > 0 and self.teacher_width > 0 and self.lr > 0):
            raise ValueError(f"tier {self.name!r}: width, teacher_width and lr must be > 0")

    def synth_config(self, out: Path, seed: int) -> SynthConfig:
        """The synthetic data of this tier (every layout), drawn with the data seed ``seed``."""
        return SynthConfig(out=out, seed=seed, identities=self.identities, images_per_identity=self.images_per_identity,
                           celeba_images=self.celeba_images, celeba_images_per_identity=self.celeba_images_per_identity,
                           probe_identities=self.probe_identities,
                           probe_images_per_identity=self.probe_images_per_identity, distractors=self.distractors,
                           size=self.image_size,
                           workers=None if self.workers is None else max(1, self.workers))  # fmt: skip

    def teacher_config(self, data: Path, out: Path, seed: int, device: str = "auto") -> AttributeTrainConfig:
        """The attribute teacher of this tier, trained on the CelebA-style root ``data`` into ``out``."""
        return AttributeTrainConfig(data=data, out=out, method=self.teacher_method, iterations=self.teacher_iterations,
                                    lr=self.lr, input_size=self.teacher_input_size, arch="fast",
                                    width=self.teacher_width, batch_size=self.batch_size, seed=seed, device=device,
                                    num_workers=self.workers)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


#: The tiers.  ``smoke``: seconds, for tests.  ``cpu``: a 2-core machine, the demo's scale (about 3 min per Fast and
#: 4 min per Full training, ~30 s embedding and benchmark, per variant and seed).  ``gpu``: the paper's input and
#: width on one GPU, 20k steps (the paper trains 100k), 1M distractors.
TIERS: Mapping[str, Tier] = MappingProxyType({
    "smoke": Tier("smoke", identities=12, images_per_identity=5, celeba_images=120, celeba_images_per_identity=6,
                  probe_identities=20, probe_images_per_identity=3, distractors=100, image_size=64,
                  input_size=(56, 48), width=0.125, embedding_dim=64, attribute_hidden=64, batch_size=16,
                  stage1_iterations=8, stage2_iterations=4, lr=0.05, teacher_method="moon", teacher_iterations=10,
                  teacher_input_size=(56, 48), teacher_width=0.125, lfw_pairs_per_fold=5, bootstrap=200, workers=0),
    "cpu": Tier("cpu", identities=200, images_per_identity=10, celeba_images=3000, probe_identities=40,
                probe_images_per_identity=10, distractors=10_000, image_size=128, input_size=(56, 48), width=0.25,
                embedding_dim=1024, attribute_hidden=1024, batch_size=48, stage1_iterations=420,
                stage2_iterations=180, lr=0.05, teacher_method="mgmtn", teacher_iterations=500,
                teacher_input_size=INPUT_SIZE, teacher_width=0.25, lfw_pairs_per_fold=100, bootstrap=1000),
    "gpu": Tier("gpu", identities=4000, images_per_identity=25, celeba_images=20_000, probe_identities=80,
                probe_images_per_identity=40, distractors=1_000_000, image_size=160, input_size=INPUT_SIZE, width=1.0,
                embedding_dim=1024, attribute_hidden=1024, batch_size=48, stage1_iterations=14_000,
                stage2_iterations=6_000, lr=0.01, teacher_method="mgmtn", teacher_iterations=3000,
                teacher_input_size=INPUT_SIZE, teacher_width=1.0, lfw_pairs_per_fold=300, bootstrap=1000),
})  # fmt: skip


def get_tier(name: str) -> Tier:
    if name not in TIERS:
        raise ValueError(f"unknown tier {name!r}; valid: {list(TIERS)}")
    return TIERS[name]


@dataclass(frozen=True)
class Variant:
    """One trained model: building block ``arch``, last-layer configuration ``head`` (Fig. 9) and attribute set
    (:data:`ATTRIBUTE_SETS`)."""

    arch: str = "fast"
    head: int = 1
    attributes: str = "all"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS or self.head not in HEADS or self.attributes not in ATTRIBUTE_SETS:
            raise ValueError(f"a variant needs arch in {list(ARCHS)}, head in {list(HEADS)} and attributes in "
                             f"{list(ATTRIBUTE_SETS)}; got {self.arch!r}, {self.head!r}, "
                             f"{self.attributes!r}")  # fmt: skip

    @property
    def key(self) -> str:
        """The canonical name of the training config, e.g. ``fast-head1-all`` (a folder name)."""
        return f"{self.arch}-head{self.head}-{self.attributes}"

    @classmethod
    def from_key(cls, key: str) -> Variant:
        parts = key.split("-")
        if len(parts) != 3 or not parts[1].startswith("head") or not parts[1][4:].isdigit():
            raise ValueError(f"not a variant key {key!r}: expected <arch>-head<N>-<attributes>, e.g. fast-head1-all")
        return cls(parts[0], int(parts[1][4:]), parts[2])

    def train_config(self, tier: Tier, seed: int, **fields: Any) -> TrainConfig:
        """The variant's :class:`TrainConfig` at ``tier`` and ``seed``; ``fields`` (data, out, labels, init, device,
        ...) are the same for every variant of a run."""
        names = ATTRIBUTES if self.attributes == "none" else ATTRIBUTE_GROUPS[self.attributes]
        n = tier.stage1_iterations + tier.stage2_iterations
        base = TrainConfig(arch=self.arch, head=self.head, attributes=names, width=tier.width,
                           input_size=tier.input_size, embedding_dim=tier.embedding_dim,
                           attribute_hidden=tier.attribute_hidden, batch_size=tier.batch_size, seed=seed,
                           num_workers=tier.workers, val_every=0, checkpoint_every=max(1, n // 4),
                           **fields)  # fmt: skip
        stages = (rescale_stage(base.stages[0], tier.stage1_iterations, tier.lr),
                  rescale_stage(base.stages[1], tier.stage2_iterations, tier.lr / 10))  # fmt: skip
        cfg = base.replace(stages=stages)
        return without_attributes(cfg) if self.attributes == "none" else cfg


@dataclass(frozen=True)
class Row:
    """A table row: ``name`` as the paper prints it, the ``variant`` trained for it (None: the attribute teacher,
    Table 4), the paper's numbers (``rank1`` % at 1M distractors, ``tar`` % at FAR 1e-6, ``lfw`` %) and the row it is
    compared with (``reference``, a row name; None for a reference row)."""

    name: str
    variant: Variant | None
    paper: Mapping[str, float] = field(default_factory=dict)
    reference: str | None = None


@dataclass(frozen=True)
class Table:
    """One of the paper's tables: ``source`` names the paper's table, ``kind`` is ``identity`` (rank-1, TAR, LFW) or
    ``attributes`` (Table 4)."""

    name: str
    title: str
    source: str
    rows: tuple[Row, ...]
    kind: str = "identity"


_FAST, _FULL = Variant("fast"), Variant("full")
_NONE = Variant("fast", attributes="none")
#: The paper's numbers (ICMR 2017; ../shared/PAPER_TABLES.md), each table with its reference.  LFW for Fast-with /
#: Full-with is Table 5's, for Fast-without Table 7's "none"; Full-without has none in the paper.
TABLES: Mapping[str, Table] = MappingProxyType({
    "t2t3": Table("t2t3", "Attributes or not, Fast and Full blocks",
                  "Table 2 (rank-1 % at 1M distractors) and Table 3 (TAR % at FAR 1e-6), §4.7; LFW from Tables 5 / 7", (
        Row("Fast-Model without attributes", _NONE, {"rank1": 70.28, "tar": 58.20, "lfw": 97.20}),
        Row("Fast-Model with attributes", _FAST, {"rank1": 73.07, "tar": 68.56, "lfw": 97.62},
            "Fast-Model without attributes"),
        Row("Full-Model without attributes", Variant("full", attributes="none"), {"rank1": 74.25, "tar": 76.22}),
        Row("Full-Model with attributes", _FULL, {"rank1": 77.74, "tar": 79.24, "lfw": 98.15},
            "Full-Model without attributes"),
    )),
    "t4": Table("t4", "Attribute accuracy: the attribute-only teacher vs the multi-task head",
                "Table 4 (plain accuracy %, 1,000 FaceScrub images)", (
        Row("MOON (attributes only)", None),
        Row("multi-task", _FAST, reference="MOON (attributes only)"),
    ), kind="attributes"),
    "t5": Table("t5", "Building block", "Table 5 (MegaFace rank-1 % / LFW %)", (
        Row("Fast-Block", _FAST, {"rank1": 73.07, "lfw": 97.62}),
        Row("Full-Block", _FULL, {"rank1": 77.74, "lfw": 98.15}, "Fast-Block"),
        Row("Variants-Block", Variant("variant"), {"rank1": 69.63, "lfw": 97.50}, "Fast-Block"),
    )),
    "t6": Table("t6", "Last-layer configuration, Fast-Model", "Table 6 (MegaFace rank-1 % / LFW %)", (
        Row("Configuration-1", _FAST, {"rank1": 73.07, "lfw": 97.62}),
        Row("Configuration-2", Variant("fast", 2), {"rank1": 72.05, "lfw": 97.50}, "Configuration-1"),
        Row("Configuration-3", Variant("fast", 3), {"rank1": 69.40, "lfw": 97.60}, "Configuration-1"),
    )),
    "t7": Table("t7", "Attribute groups in stage 2, Fast-Model", "Table 7 (MegaFace rank-1 % / LFW %)", (
        Row("none", _NONE, {"rank1": 70.28, "lfw": 97.20}),
        Row("eye", Variant("fast", attributes="eye"), {"rank1": 72.23, "lfw": 97.49}, "none"),
        Row("nose", Variant("fast", attributes="nose"), {"rank1": 71.72, "lfw": 97.63}, "none"),
        Row("global", Variant("fast", attributes="global"), {"rank1": 71.92, "lfw": 97.45}, "none"),
        Row("all", _FAST, {"rank1": 73.07, "lfw": 97.62}, "none"),
    )),
})  # fmt: skip

#: Table 4's plain accuracies (%) per attribute: (MOON, multi-task).
PAPER_TABLE4: Mapping[str, tuple[float, float]] = MappingProxyType({
    "Narrow_Eyes": (83.40, 85.60), "Big_Nose": (71.00, 75.30), "Pointy_Nose": (70.50, 73.90), "Chubby": (93.30, 93.50),
    "Double_Chin": (94.80, 96.70), "High_Cheekbones": (74.10, 76.80), "Male": (96.90, 97.30), "mean": (83.43, 85.59),
})  # fmt: skip

#: ``facesearch ablate`` table choices: each table, and ``all``.
TABLE_CHOICES: tuple[str, ...] = (*TABLES, "all")


def resolve_tables(names: Sequence[str]) -> tuple[str, ...]:
    """Table names (``all`` = every table) in the paper's order, each once; ``ValueError`` for an unknown one."""
    unknown = [n for n in names if n not in TABLE_CHOICES]
    if unknown or not names:
        raise ValueError(f"unknown table(s) {unknown or list(names)}; valid: {list(TABLE_CHOICES)}")
    wanted = set(TABLES) if "all" in names else set(names)
    return tuple(t for t in TABLES if t in wanted)


def table_rows(table: str, only: Sequence[str] = ()) -> tuple[Row, ...]:
    """The rows of ``table``; with ``only`` (variant keys), those rows whose variant is listed (and the teacher)."""
    rows = TABLES[table].rows
    return rows if not only else tuple(r for r in rows if r.variant is None or r.variant.key in only)


def plan_variants(tables: Sequence[str], only: Sequence[str] = ()) -> tuple[Variant, ...]:
    """The distinct variants the tables need, each once, in first-use order.  ``only`` restricts them to those keys;
    a key no table of ``tables`` has is a ``ValueError`` naming the valid ones."""
    every = [r.variant for t in tables for r in TABLES[t].rows if r.variant is not None]
    keys = list(dict.fromkeys(v.key for v in every))
    unknown = [k for k in only if k not in keys]
    if unknown:
        raise ValueError(f"unknown variant key(s) {unknown} for tables {list(tables)}; valid: {keys}")
    chosen = {v.key: v for v in every if not only or v.key in only}
    return tuple(chosen.values())


__all__ = [
    "ATTRIBUTE_SETS",
    "PAPER_TABLE4",
    "TABLES",
    "TABLE_CHOICES",
    "TIERS",
    "Row",
    "Table",
    "Tier",
    "Variant",
    "get_tier",
    "plan_variants",
    "resolve_tables",
    "table_rows",
]
