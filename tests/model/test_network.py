"""The network: shapes, parameter counts (checked against an independent closed form), gradients, bf16."""

from __future__ import annotations

import itertools

import pytest
import torch

from facesearch.model.config import ATTRIBUTES, PAPER_LAYER_PLAN, ModelConfig, preset
from facesearch.model.network import FaceNet, count_macs, count_parameters, to_input

torch.set_num_threads(2)


def expected_parameters(cfg: ModelConfig) -> int:
    """Parameter count from the layer plan in closed form, written independently of the module code."""
    n_main = {"full": 3, "fast": 2, "variant": 2}[cfg.arch]
    c, (h, w), total = 3, cfg.input_size, 0
    for stage in cfg.layer_plan:
        if stage[0] == "conv":
            co = cfg.channels(stage[1])
            total += 9 * c * co + 2 * co + co  # conv, BN (gamma, beta), PReLU slopes
            c, h, w = co, h - 2, w - 2
        elif stage[0] == "pool":
            h, w = h // 2, w // 2
        else:
            co = cfg.channels(stage[2])
            for i in range(stage[1]):
                ci = c if i == 0 else co
                total += 9 * ci * co + 9 * co * co * (n_main - 1) + 2 * co * n_main + co * (n_main - 1)
                if cfg.arch == "variant":
                    total += 9 * ci * co + 2 * co
                elif ci != co:
                    total += ci * co + 2 * co
                total += co  # PReLU after the sum
            c = co
    flat, e, m, hid = c * h * w, cfg.embedding_dim, len(cfg.attributes), cfg.attribute_hidden
    total += flat * e + 3 * e  # f: FC (no bias), BN, PReLU
    total += e * cfg.num_identities + cfg.num_identities  # W_p
    total += {1: flat * hid + 3 * hid + hid * m + m, 2: e * m + m, 3: m * (flat * hid + 3 * hid + hid + 1)}[cfg.head]
    return total


@pytest.mark.parametrize(("arch", "head"), list(itertools.product(["full", "fast", "variant"], [1, 2, 3])))
def test_paper_size_parameter_count_and_shapes(arch: str, head: int) -> None:
    cfg = preset(arch, head=head, num_identities=10575)
    model = FaceNet(cfg)
    assert model.trunk_shape == (512, 5, 4), "112x96 input must leave a 5x4 map before the FC layers"
    assert count_parameters(model) == expected_parameters(cfg)


def test_paper_size_forward_and_macs() -> None:
    torch.manual_seed(0)
    for arch, gmac in (("full", 3.761), ("fast", 2.583)):
        model = FaceNet(preset(arch, num_identities=10575)).eval()  # P of CASIA-WebFace, as in the paper
        out = model(to_input(torch.randint(0, 256, (2, 112, 96, 3), dtype=torch.uint8)))
        assert out.features.shape == (2, 1024)
        assert out.identity_logits is not None and out.identity_logits.shape == (2, 10575)
        assert out.attribute_logits.shape == (2, len(ATTRIBUTES))
        # MACs are traced by hooks; the figure in ARCHITECTURE.md must match to 3 decimals (GMAC).
        assert abs(count_macs(model) / 1e9 - gmac) < 1e-3


SMALL = {"width": 0.125, "input_size": (56, 48), "num_identities": 7, "embedding_dim": 32, "attribute_hidden": 16}


@pytest.mark.parametrize(("arch", "head"), list(itertools.product(["full", "fast", "variant"], [1, 2, 3])))
def test_every_parameter_gets_a_gradient_and_bf16_has_no_nan(arch: str, head: int) -> None:
    torch.manual_seed(1)
    cfg = preset(arch, head=head, **SMALL)
    model = FaceNet(cfg).train()
    assert count_parameters(model) == expected_parameters(cfg)
    x = to_input(torch.randint(0, 256, (4, 56, 48, 3), dtype=torch.uint8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.identity_logits is not None
    loss = out.identity_logits.float().logsumexp(1).mean() + out.attribute_logits.float().pow(2).mean()
    loss = loss + out.features.float().pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient under bf16"
    assert all(torch.isfinite(t.float()).all() for t in (out.features, out.attribute_logits, out.identity_logits))


def test_embed_is_unit_norm_and_attribute_dict_is_keyed_by_name() -> None:
    model = FaceNet(preset("fast", **SMALL)).eval()
    x = to_input(torch.randint(0, 256, (3, 56, 48, 3), dtype=torch.uint8))
    with torch.no_grad():
        e = model.embed(x)
        probs = model.attribute_dict(model(x).attribute_logits)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert list(probs) == list(ATTRIBUTES)
    assert all(((v >= 0) & (v <= 1)).all() for v in probs.values())


def test_model_without_identity_classifier() -> None:
    model = FaceNet(preset("fast", **{**SMALL, "num_identities": 0})).eval()
    out = model(to_input(torch.zeros(1, 56, 48, 3, dtype=torch.uint8)))
    assert out.identity_logits is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "huge"}, "arch must be one of"),
        ({"head": 4}, "head"),
        ({"width": 0}, "width"),
        ({"input_size": (16, 16)}, "too small"),
        ({"layer_plan": (("conv",),)}, "bad layer_plan stage"),
        ({"attributes": ("Male", "Male")}, "unique"),
    ],
)
def test_bad_configs_are_clear_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaceNet(ModelConfig(**{**SMALL, **changes}))


def test_unknown_config_key_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid keys"):
        ModelConfig.from_dict({"arch": "fast", "depth": 3})


def test_config_round_trips_through_dict() -> None:
    cfg = preset("variant", head=3, **SMALL)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig().layer_plan == PAPER_LAYER_PLAN


def test_to_input_rejects_wrong_layout() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        to_input(torch.zeros(1, 3, 56, 48, dtype=torch.uint8))
