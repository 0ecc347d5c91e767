"""Typed, frozen configuration for the network.

The architecture is data: ``ModelConfig.layer_plan`` lists every stage of the trunk, so Full, Fast and Variants
models, smaller widths and other input sizes are the same code reading a different plan (see ``ARCHITECTURE.md``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeVar

#: The paper's Table 1 attributes, in CelebA spelling; the default attribute head.
ATTRIBUTES: tuple[str, ...] = (
    "Narrow_Eyes",
    "Big_Nose",
    "Pointy_Nose",
    "Chubby",
    "Double_Chin",
    "High_Cheekbones",
    "Male",
)

#: The attribute groups of the paper's Table 7 (stage 2 trained with one group's attributes only), as subsets of
#: :data:`ATTRIBUTES` in its order; ``all`` is the seven.  Table 7's "none" is not a group: it is the model trained
#: with λ1 = 0 (see :func:`facesearch.model.train_config.without_attributes`).
ATTRIBUTE_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "eye": ("Narrow_Eyes",),
    "nose": ("Big_Nose", "Pointy_Nose"),
    "global": ("Chubby", "Double_Chin", "High_Cheekbones", "Male"),
    "all": ATTRIBUTES,
})  # fmt: skip

#: Aligned input size (height, width) of the paper.
INPUT_SIZE: tuple[int, int] = (112, 96)

Arch = Literal["full", "fast", "variant"]
ARCHS: tuple[str, ...] = ("full", "fast", "variant")

#: Head configurations of Fig. 9: 1 = separate attribute FC layer g beside f, 2 = attributes predicted from f,
#: 3 = an independent FC layer per attribute.
HEADS: tuple[int, ...] = (1, 2, 3)

#: The trunk as data.  ("conv", C): plain 3x3 conv, stride 1, padding 0.  ("pool",): 2x2 max-pool, stride 2.
#: ("group", n, C): n building blocks with C filters (the first projects its bypass when channels change).
#: See ARCHITECTURE.md for why the five plain convolutions sit where they do.
PAPER_LAYER_PLAN: tuple[tuple[Any, ...], ...] = (
    ("conv", 32),
    ("conv", 64),
    ("pool",),
    ("group", 3, 64),
    ("conv", 64),
    ("pool",),
    ("group", 4, 128),
    ("conv", 64),
    ("pool",),
    ("group", 6, 256),
    ("conv", 64),
    ("pool",),
    ("group", 3, 512),
)

T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass ``cls`` from a mapping; an unknown key is a ``ValueError`` listing the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {names}")
    return cls(**data)


def _tupleize(x: Any) -> Any:
    if isinstance(x, list | tuple):
        return tuple(_tupleize(v) for v in x)
    return x


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (stored in every checkpoint and shard manifest).

    ``num_identities`` (P) and ``attributes`` (M) come from the training data.  ``width`` multiplies every filter
    count (small variants for tests and CPU demos); ``input_size`` is (height, width) of the aligned crop.
    """

    arch: str = "full"
    head: int = 1
    num_identities: int = 10575
    attributes: tuple[str, ...] = ATTRIBUTES
    width: float = 1.0
    input_size: tuple[int, int] = INPUT_SIZE
    embedding_dim: int = 1024
    attribute_hidden: int = 1024
    dropout: float = 0.5
    layer_plan: tuple[tuple[Any, ...], ...] = PAPER_LAYER_PLAN

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "layer_plan", _tupleize(self.layer_plan))
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {list(ARCHS)}, got {self.arch!r}")
        if self.head not in HEADS:
            raise ValueError(f"head (Fig. 9 configuration) must be one of {list(HEADS)}, got {self.head!r}")
        if self.num_identities < 0:
            raise ValueError(f"num_identities must be >= 0, got {self.num_identities}")
        if not self.width > 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if len(self.input_size) != 2 or min(self.input_size) < 8:
            raise ValueError(f"input_size must be (height, width) with both >= 8, got {self.input_size}")
        if self.embedding_dim < 1 or self.attribute_hidden < 1:
            raise ValueError("embedding_dim and attribute_hidden must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attribute names must be unique, got {list(self.attributes)}")
        for stage in self.layer_plan:
            kind = stage[0] if stage else None
            ok = (
                (kind == "conv" and len(stage) == 2)
                or (kind == "pool" and len(stage) == 1)
                or (kind == "group" and len(stage) == 3)
            )
            if not ok:
                raise ValueError(f"bad layer_plan stage {stage!r}; expected ('conv', C), ('pool',) or ('group', n, C)")

    def channels(self, c: int) -> int:
        """Filter count ``c`` scaled by the width multiplier (at least 4)."""
        return max(4, round(c * self.width))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return from_mapping(cls, data)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named models of the paper: ``full``, ``fast`` and ``variant`` (Fig. 8), with optional overrides."""
    if name not in ARCHS:
        raise ValueError(f"unknown model preset {name!r}; valid: {list(ARCHS)}")
    return ModelConfig(arch=name, **overrides)


__all__ = [
    "ARCHS",
    "ATTRIBUTES",
    "ATTRIBUTE_GROUPS",
    "HEADS",
    "INPUT_SIZE",
    "PAPER_LAYER_PLAN",
    "ModelConfig",
    "from_mapping",
    "preset",
]
