"""The multi-task face network of Wang et al. (ICMR 2017): a residual trunk, a 1024-d identity feature f with its
softmax identity classifier, and an attribute branch (Fig. 9 configurations 1, 2 and 3).

The trunk is built from ``ModelConfig.layer_plan`` (data, not code branches); ``arch`` picks the building block:
``full`` (three 3x3 convolutions + bypass), ``fast`` (two + bypass) or ``variant`` (Fig. 8: two on the main road, one
3x3 convolution on the bypass).  Every convolution and fully connected layer (except the final classifiers) is
followed by BatchNorm then PReLU; dropout follows the FC layers.  See ``ARCHITECTURE.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesearch.model.config import ModelConfig

#: Input normalisation of the aligned uint8 crop: (x - 127.5) / 128, as in SphereFace / CosFace.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 1.0 / 128.0


class Outputs(NamedTuple):
    """One forward pass.  ``features``: (B, D) identity feature f (not normalised); ``identity_logits``: (B, P) or
    None when the model has no identity classifier (P = 0); ``attribute_logits``: (B, M) pre-sigmoid scores."""

    features: Tensor
    identity_logits: Tensor | None
    attribute_logits: Tensor


def to_input(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) RGB crops -> float32 (B, 3, H, W) network input in channels_last memory format."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().sub_(PIXEL_MEAN).mul_(PIXEL_SCALE)
    return x.contiguous(memory_format=torch.channels_last)


class ConvBNAct(nn.Sequential):
    """3x3 (or k x k) convolution -> BatchNorm -> PReLU (activation optional for the last conv of a block)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, padding: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride=1, padding=padding, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """A building block: ``n_main`` 3x3 convolutions (padding 1) on the main road plus a bypass, summed, then PReLU.

    Bypass: identity when the channel count is unchanged, else a 1x1 projection + BN; the ``variant`` block always
    uses a 3x3 convolution + BN on the bypass (Fig. 8).
    """

    def __init__(self, cin: int, cout: int, n_main: int, conv_bypass: bool) -> None:
        super().__init__()
        main: list[nn.Module] = []
        for i in range(n_main):
            main.append(ConvBNAct(cin if i == 0 else cout, cout, act=i < n_main - 1))
        self.main = nn.Sequential(*main)
        self.bypass: nn.Module
        if conv_bypass:
            self.bypass = ConvBNAct(cin, cout, kernel=3, padding=1, act=False)
        elif cin != cout:
            self.bypass = ConvBNAct(cin, cout, kernel=1, padding=0, act=False)
        else:
            self.bypass = nn.Identity()
        self.act = nn.PReLU(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.main(x) + self.bypass(x))


_BLOCK = {"full": (3, False), "fast": (2, False), "variant": (2, True)}


def build_trunk(cfg: ModelConfig) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """The convolutional trunk from the layer plan, and its output shape (C, H, W) for ``cfg.input_size``."""
    n_main, conv_bypass = _BLOCK[cfg.arch]
    c, (h, w) = 3, cfg.input_size
    layers: list[nn.Module] = []
    for stage in cfg.layer_plan:
        if stage[0] == "conv":
            cout = cfg.channels(stage[1])
            layers.append(ConvBNAct(c, cout, kernel=3, padding=0))
            c, h, w = cout, h - 2, w - 2
        elif stage[0] == "pool":
            layers.append(nn.MaxPool2d(2, 2))
            h, w = h // 2, w // 2
        else:
            _, n_blocks, filters = stage
            cout = cfg.channels(filters)
            for i in range(n_blocks):
                layers.append(ResidualBlock(c if i == 0 else cout, cout, n_main, conv_bypass))
            c = cout
        if h < 1 or w < 1:
            raise ValueError(
                f"input_size {cfg.input_size} is too small for the layer plan: stage {stage} leaves {h}x{w}; "
                "use a larger input or fewer pools"
            )
    return nn.Sequential(*layers), (c, h, w)


def _fc(cin: int, cout: int, dropout: float) -> nn.Sequential:
    """Fully connected -> BatchNorm1d -> PReLU -> Dropout."""
    return nn.Sequential(nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.PReLU(cout), nn.Dropout(dropout))


def init_conv_linear(modules: Iterable[nn.Module]) -> None:
    """He (fan-out) initialisation of convolutions, Xavier of fully connected layers with zero biases."""
    for mod in modules:
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class FaceNet(nn.Module):
    """The multi-task network.  Input: float (B, 3, H, W) from :func:`to_input`; see :class:`Outputs`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk, self.trunk_shape = build_trunk(cfg)
        flat = self.trunk_shape[0] * self.trunk_shape[1] * self.trunk_shape[2]
        m = len(cfg.attributes)
        self.feature = _fc(flat, cfg.embedding_dim, cfg.dropout)  # f
        self.classifier = nn.Linear(cfg.embedding_dim, cfg.num_identities) if cfg.num_identities > 0 else None
        self.attribute_branch: nn.Module | None = None  # g (configuration 1)
        self.attribute_heads = nn.ModuleList()  # configuration 3: one FC branch per attribute
        if cfg.head == 1:
            self.attribute_branch = _fc(flat, cfg.attribute_hidden, cfg.dropout)
            self.attribute_out = nn.Linear(cfg.attribute_hidden, m)  # W_a
        elif cfg.head == 2:
            self.attribute_out = nn.Linear(cfg.embedding_dim, m)  # W_a reads f
        else:
            for _ in range(m):
                self.attribute_heads.append(
                    nn.Sequential(_fc(flat, cfg.attribute_hidden, cfg.dropout), nn.Linear(cfg.attribute_hidden, 1))
                )
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_linear(self.modules())
        # Zero-init the last BN of each residual main road so every block starts as (nearly) its bypass.
        for mod in self.modules():
            if isinstance(mod, ResidualBlock):
                last_bn = list(mod.main[-1].children())[1]
                assert isinstance(last_bn, nn.BatchNorm2d), "a block's main road ends in conv -> BN"
                nn.init.zeros_(last_bn.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """The trunk, flattened: (B, C*H*W)."""
        return torch.flatten(self.trunk(x), 1)

    def forward(self, x: Tensor) -> Outputs:
        t = self.forward_features(x)
        f = self.feature(t)
        logits = self.classifier(f) if self.classifier is not None else None
        if self.cfg.head == 1:
            assert self.attribute_branch is not None, "head 1 needs the attribute branch"
            a = self.attribute_out(self.attribute_branch(t))
        elif self.cfg.head == 2:
            a = self.attribute_out(f)
        else:
            a = torch.cat([h(t) for h in self.attribute_heads], dim=1)
        return Outputs(f, logits, a)

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised identity embedding, float32 (B, D); a zero feature stays zero (never NaN)."""
        return F.normalize(self.forward(x).features.float(), dim=1, eps=1e-12)

    def attribute_dict(self, attribute_logits: Tensor) -> dict[str, Tensor]:
        """(B, M) logits -> {attribute name: (B,) probability}."""
        p = torch.sigmoid(attribute_logits.float())
        return {name: p[:, i] for i, name in enumerate(self.cfg.attributes)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: FaceNet) -> int:
    """Multiply-accumulates of convolutions and FC layers for one image at ``model.cfg.input_size`` (exact, traced)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total += out[0].numel() * k
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *model.cfg.input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def stage_table(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], int]]:
    """Per stage of the trunk and heads: (name, output shape without batch, parameters).  For ARCHITECTURE.md."""
    model = FaceNet(cfg).eval()
    rows: list[tuple[str, tuple[int, ...], int]] = [("input", (3, *cfg.input_size), 0)]
    x = torch.zeros(1, 3, *cfg.input_size)
    with torch.no_grad():
        for stage_module in model.trunk:
            x = stage_module(x)
            kind = type(stage_module).__name__
            rows.append((kind, tuple(x.shape[1:]), count_parameters(stage_module)))
        t = torch.flatten(x, 1)
        f = model.feature(t)
        rows.append(("FC f (identity feature)", tuple(f.shape[1:]), count_parameters(model.feature)))
        if model.classifier is not None:
            rows.append(("W_p (identity softmax)", (cfg.num_identities,), count_parameters(model.classifier)))
        n_attr = count_parameters(model) - sum(r[2] for r in rows)
        rows.append((f"attribute head (configuration {cfg.head})", (len(cfg.attributes),), n_attr))
    return rows


__all__ = ["FaceNet", "Outputs", "count_macs", "count_parameters", "init_conv_linear", "stage_table", "to_input"]
