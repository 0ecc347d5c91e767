"""MGMTN's network (Gao et al., "Mask-Guided Multi-Task Network for Face Attribute Recognition", 2026;
ATTRIBUTE_MODELS.md §2): group masks of face regions gate multi-scale trunk features, and each attribute is read
from its group's features fused with global ones (Group-Global Feature Fusion, G2FF).

- **Trunk and taps.**  The project's residual trunk (:func:`facesearch.model.network.build_trunk`, any arch / width);
  the outputs of its last three residual groups play the paper's F3, F4, F5 (30x26, 14x12 and 6x5 at 128x112).
- **Masks aligned to the taps.**  :func:`tap_geometry` follows the layer plan: an unpadded 3x3 convolution moves a
  feature's receptive centre by one input step, a 2x2 pool by half a step and doubles the stride, so cell ``i`` of a
  tap of stride ``s`` is centred on input pixel ``o + s i`` and covers the ``s`` pixels from ``o - (s - 1) / 2``.
  A mask reaches a tap by averaging exactly those pixels (``avg_pool2d`` of the slice ``[start : start + s h]``):
  for the margin crop ``P[:, :, s:-s, s:-s]`` pooled by ``s``.
- **Mask source.**  ``analytic``: :func:`facesearch.model.faces.masks.group_masks` of the alignment template's
  landmarks in the crop (the alignment puts the eyes there within ~2 px and the mouth and nose within a few;
  the masks' blur and extent absorb that), one fixed mask set for every face, held as a buffer.  ``learned`` (the
  paper's Adaptive Mask Learning): :class:`MaskNet`, a small UNet trained beforehand on per-image analytic masks
  and frozen here, predicts each face's own masks from its pixels, so no landmarks are needed at prediction time.
- **G2FF.**  Group vector of group ``j`` = the mask-weighted average of every tap (divided by the mask's area so a
  small group such as Ear is not drowned), concatenated over taps -> FC + BN + PReLU -> ``e_j``; global vector =
  plain average pooling of the same taps -> FC + BN + PReLU -> ``g``; attribute ``a`` of group ``j`` is one logit
  on ``[e_j; g]`` (``fusion="g2ff"``), on ``e_j`` alone (``"groups"``) or on ``g`` alone (``"global"``, the
  baseline without masks).

:class:`MGMTN` returns :class:`facesearch.model.network.Outputs` (feature = the global vector, no identity logits), so
``facesearch train``'s loop, checkpoints and exact resume train it unchanged (``TrainConfig.network = "mgmtn"``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesearch.model.config import ModelConfig
from facesearch.model.faces.masks import GROUPS, group_masks, template_landmarks
from facesearch.model.network import ConvBNAct, Outputs, build_trunk, init_conv_linear

#: ``fusion`` choices: group + global (the paper's G2FF), group features only, global features only.
FUSIONS: tuple[str, ...] = ("g2ff", "groups", "global")
#: ``masks`` choices: drawn from the template's landmarks, or predicted per face by a trained :class:`MaskNet`.
MASK_SOURCES: tuple[str, ...] = ("analytic", "learned")

#: The group of each CelebA attribute (ATTRIBUTE_MODELS.md §5); an attribute not listed reads the whole face.
ATTRIBUTE_GROUPS: dict[str, str] = {
    **dict.fromkeys(("Arched_Eyebrows", "Bags_Under_Eyes", "Bushy_Eyebrows", "Narrow_Eyes", "Eyeglasses"), "Eyes"),
    **dict.fromkeys(("Big_Nose", "Pointy_Nose"), "Nose"),
    **dict.fromkeys(("Big_Lips", "Mouth_Slightly_Open", "Smiling", "Wearing_Lipstick", "Mustache"), "Mouth"),
    **dict.fromkeys(("High_Cheekbones", "Rosy_Cheeks", "Chubby"), "Cheeks"),
    **dict.fromkeys(
        ("Double_Chin", "Goatee", "No_Beard", "5_o_Clock_Shadow", "Sideburns", "Wearing_Necktie", "Wearing_Necklace"),
        "Lower_Face",
    ),
    "Wearing_Earrings": "Ear",
    **dict.fromkeys(
        (
            "Bald",
            "Bangs",
            "Black_Hair",
            "Blond_Hair",
            "Brown_Hair",
            "Gray_Hair",
            "Receding_Hairline",
            "Straight_Hair",
            "Wavy_Hair",
            "Wearing_Hat",
        ),
        "Hair",
    ),
    **dict.fromkeys(("Male", "Attractive", "Young", "Oval_Face", "Pale_Skin", "Heavy_Makeup", "Blurry"), "Object"),
}

#: Width of each group vector e_j and of the global vector g (the trunk config's ``embedding_dim``).
GROUP_DIM = 128
#: How many of the trunk's last residual groups are tapped (F3, F4, F5).
N_TAPS = 3


def attribute_group(name: str) -> str:
    return ATTRIBUTE_GROUPS.get(name, "Object")


@dataclass(frozen=True)
class MgmtnConfig:
    """MGMTN's own options beside the trunk's :class:`ModelConfig`: ``fusion`` (:data:`FUSIONS`), ``masks``
    (:data:`MASK_SOURCES`), the aligned ``template`` size (height, width) the crop holds and whether the crop is the
    ``margin`` canvas around it."""

    fusion: str = "g2ff"
    masks: str = "analytic"
    template: tuple[int, int] = (112, 96)
    margin: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "template", (int(self.template[0]), int(self.template[1])))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {self.fusion!r}")
        if self.masks not in MASK_SOURCES:
            raise ValueError(f"masks must be one of {list(MASK_SOURCES)}, got {self.masks!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"fusion": self.fusion, "masks": self.masks, "template": list(self.template), "margin": self.margin}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MgmtnConfig:
        return cls(str(d.get("fusion", "g2ff")), str(d.get("masks", "analytic")),
                   tuple(d.get("template", (112, 96))), bool(d.get("margin", True)))  # type: ignore[arg-type]  # fmt: skip


@dataclass(frozen=True)
class Tap:
    """Where a trunk output sits: after trunk module ``index``; ``channels``; grid (``height``, ``width``);
    ``stride`` in input pixels; ``start``: first input pixel (y and x alike) of cell 0's footprint."""

    index: int
    channels: int
    height: int
    width: int
    stride: int
    start: int


def tap_geometry(cfg: ModelConfig, n_taps: int = N_TAPS) -> list[Tap]:
    """The last ``n_taps`` residual groups of ``cfg.layer_plan`` as :class:`Tap` (see the module docstring)."""
    c, (h, w) = 3, cfg.input_size
    centre, stride, index = 0.0, 1, -1
    ends: list[Tap] = []
    for stage in cfg.layer_plan:
        if stage[0] == "conv":
            c, h, w, centre, index = cfg.channels(stage[1]), h - 2, w - 2, centre + stride, index + 1
        elif stage[0] == "pool":
            h, w, centre, stride, index = h // 2, w // 2, centre + stride / 2, stride * 2, index + 1
        else:
            c, index = cfg.channels(stage[2]), index + stage[1]
            start = centre - (stride - 1) / 2
            if start != int(start):
                raise ValueError(f"tap after stage {stage} has a half-pixel footprint; not a 2x2-pool plan")
            ends.append(Tap(index, c, h, w, stride, int(start)))
    if len(ends) < n_taps:
        raise ValueError(f"the layer plan has {len(ends)} residual groups; MGMTN taps the last {n_taps}")
    return ends[-n_taps:]


def masks_at(masks: Tensor, tap: Tap) -> Tensor:
    """(B, G, H, W) masks at the input -> (B, G, tap.height, tap.width): the mean over each cell's footprint."""
    lo, s = tap.start, tap.stride
    window = masks[:, :, lo : lo + s * tap.height, lo : lo + s * tap.width]
    return F.avg_pool2d(window, s) if s > 1 else window


def mgmtn_config(cfg: ModelConfig) -> ModelConfig:
    """MGMTN's trunk config from a FaceNet-style one: no identity classes, :data:`GROUP_DIM`-wide vectors."""
    return dataclasses.replace(cfg, num_identities=0, embedding_dim=GROUP_DIM)


class MaskNet(nn.Module):
    """The Adaptive-Mask-Learning analogue: a three-level UNet (16 / 32 / 64 channels, padded 3x3 convolutions,
    BN + PReLU) with one sigmoid output per group.  Input: the network input (B, 3, H, W) with H, W divisible by 4;
    output: (B, G, H, W) mask probabilities."""

    def __init__(self, groups: int = len(GROUPS), widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        a, b, c = widths

        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(ConvBNAct(cin, cout), ConvBNAct(cout, cout))

        self.enc1, self.enc2, self.mid = double(3, a), double(a, b), double(b, c)
        self.up2, self.dec2 = nn.ConvTranspose2d(c, b, 2, stride=2), double(2 * b, b)
        self.up1, self.dec1 = nn.ConvTranspose2d(b, a, 2, stride=2), double(2 * a, a)
        self.head = nn.Conv2d(a, groups, 1)

    def logits(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"MaskNet needs a height and width divisible by 4, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(x).float())


def _fc(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.PReLU(cout))


class MGMTN(nn.Module):
    """The network (see the module docstring).  ``cfg``: the trunk's :class:`ModelConfig` (its ``input_size`` is the
    crop the network reads, ``embedding_dim`` the width of e_j and g, :data:`GROUP_DIM` by :func:`mgmtn_config`;
    ``num_identities`` must be 0); ``mcfg``: :class:`MgmtnConfig`; ``mask_net``: the trained,
    frozen :class:`MaskNet` when ``mcfg.masks == "learned"`` (a fresh one is built otherwise, for loading weights)."""

    def __init__(self, cfg: ModelConfig, mcfg: MgmtnConfig | None = None, mask_net: MaskNet | None = None) -> None:
        super().__init__()
        if cfg.num_identities:
            raise ValueError("MGMTN predicts attributes only: its ModelConfig must have num_identities = 0")
        self.cfg, self.mcfg = cfg, mcfg or MgmtnConfig()
        self.trunk, _ = build_trunk(cfg)
        self.taps = tap_geometry(cfg)
        self.attribute_groups = tuple(GROUPS.index(attribute_group(a)) for a in cfg.attributes)
        self.used_groups = tuple(sorted(set(self.attribute_groups)))
        total = sum(t.channels for t in self.taps)
        fusion = self.mcfg.fusion
        dim = cfg.embedding_dim
        self.group_fc = nn.ModuleList([_fc(total, dim) for _ in self.used_groups] if fusion != "global" else [])
        self.global_fc = _fc(total, dim) if fusion != "groups" else None
        width = dim * (2 if fusion == "g2ff" else 1)
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in cfg.attributes])
        self.mask_net: MaskNet | None = None
        if self.mcfg.masks == "learned":
            self.mask_net = mask_net if mask_net is not None else MaskNet()
            self.mask_net.requires_grad_(False).eval()
        else:
            lm = template_landmarks(self.mcfg.template, self.mcfg.margin)
            fixed = group_masks(lm, tuple(cfg.input_size))  # type: ignore[arg-type]
            self.register_buffer("fixed_masks", fixed, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_linear(mod for name, mod in self.named_modules() if not name.startswith("mask_net"))

    def train(self, mode: bool = True) -> MGMTN:
        super().train(mode)
        if self.mask_net is not None:
            self.mask_net.eval()  # frozen: its BN statistics stay those it was trained with
        return self

    def masks(self, x: Tensor) -> Tensor:
        """(B, G, H, W) group masks of a batch of network inputs: predicted (learned) or the fixed analytic set."""
        if self.mask_net is not None:
            with torch.no_grad():
                return self.mask_net(x).to(x.dtype)
        fixed = self.get_buffer("fixed_masks")
        return fixed.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)

    def tap_features(self, x: Tensor) -> list[Tensor]:
        out, wanted = [], {t.index for t in self.taps}
        for i, module in enumerate(self.trunk):
            x = module(x)
            if i in wanted:
                out.append(x)
        return out

    def group_vectors(self, taps: list[Tensor], masks: Tensor) -> Tensor:
        """Mask-weighted averages of every tap, concatenated: (B, G, sum of tap channels), float32.  ``masks`` is
        (B, G, H, W), or (1, G, H, W) for one set shared by the batch (pooled once, not once per face)."""
        parts = []
        for feat, tap in zip(taps, self.taps, strict=True):
            m = masks_at(masks.float(), tap).expand(feat.shape[0], -1, -1, -1)
            area = m.sum((2, 3)).clamp_min(1e-6)
            parts.append(torch.einsum("bchw,bghw->bgc", feat.float(), m) / area[..., None])
        return torch.cat(parts, 2)

    def forward(self, x: Tensor, masks: Tensor | None = None) -> Outputs:
        """``x``: (B, 3, H, W) network input; ``masks``: (B, G, H, W) to use instead of :meth:`masks`."""
        taps = self.tap_features(x)
        pooled = [f.float().mean((2, 3)) for f in taps]
        g = self.global_fc(torch.cat(pooled, 1)) if self.global_fc is not None else None
        e: dict[int, Tensor] = {}
        if self.group_fc:
            if masks is None:  # the fixed analytic set is pooled once for the batch
                masks = self.masks(x) if self.mask_net is not None else self.get_buffer("fixed_masks")
            vectors = self.group_vectors(taps, masks)
            e = {j: fc(vectors[:, j]) for j, fc in zip(self.used_groups, self.group_fc, strict=True)}
        logits = []
        for j, head in zip(self.attribute_groups, self.heads, strict=True):
            parts = [v for v in (e.get(j), g) if v is not None]
            logits.append(head(torch.cat(parts, 1)))
        feature = g if g is not None else torch.stack(list(e.values()), 1).mean(1)
        return Outputs(feature, None, torch.cat(logits, 1))


def save_mask_net(path: str | os.PathLike[str], net: MaskNet, cfg: ModelConfig, mcfg: MgmtnConfig,
                  meta: dict[str, Any] | None = None) -> str:  # fmt: skip
    """Write a trained :class:`MaskNet` in the safe checkpoint format: ``cfg`` / ``mcfg`` record the crop it reads."""
    from facesearch.model.checkpoint import save_checkpoint

    extra = {"mask_net": {"groups": list(GROUPS), **mcfg.to_dict(), "meta": dict(meta or {})}}
    return save_checkpoint(Path(path), cfg, net.state_dict(), extra=extra)


def load_mask_net(path: str | os.PathLike[str]) -> MaskNet:
    """A :class:`MaskNet` from :func:`save_mask_net`'s file (``ValueError`` naming the file if it is not one)."""
    from facesearch.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    info = ckpt.extra.get("mask_net")
    if not info or list(info.get("groups", ())) != list(GROUPS):
        raise ValueError(f"{path} is not an MGMTN mask network (facesearch attributes train --method mgmtn "
                         "--masks learned writes one)")  # fmt: skip
    net = MaskNet()
    net.load_state_dict(ckpt.model_state)
    return net.requires_grad_(False).eval()


__all__ = ["ATTRIBUTE_GROUPS", "FUSIONS", "MASK_SOURCES", "MGMTN", "MaskNet", "MgmtnConfig", "Tap",
           "attribute_group", "load_mask_net", "masks_at", "mgmtn_config", "save_mask_net", "tap_geometry"]  # fmt: skip
