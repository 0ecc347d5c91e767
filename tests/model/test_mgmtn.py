"""MGMTN (ATTRIBUTE_MODELS.md §2): masks aligned exactly to the trunk taps, gating that really gates, the three
fusions, learned masks in the predictor file, and a planted case that only the nose region's features can solve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesearch.model.config import preset
from facesearch.model.faces.align import margin_geometry
from facesearch.model.faces.masks import GROUPS, group_masks, template_landmarks
from facesearch.model.mgmtn import (
    FUSIONS,
    GROUP_DIM,
    MGMTN,
    MaskNet,
    MgmtnConfig,
    attribute_group,
    masks_at,
    mgmtn_config,
    tap_geometry,
)
from facesearch.model.network import to_input
from facesearch.model.predictors import load_predictor
from facesearch.model.predictors.base import InputSpec
from facesearch.model.predictors.mgmtn import MgmtnPredictor

TEMPLATE = (112, 96)
MARGIN = margin_geometry(TEMPLATE)[0]  # (128, 112)
NOSE_ATTRS = ("Big_Nose", "Pointy_Nose")


def _cfg(size: tuple[int, int] = MARGIN, width: float = 0.125, attributes: tuple[str, ...] | None = None):  # type: ignore[no-untyped-def]
    kw = {} if attributes is None else {"attributes": attributes}
    return mgmtn_config(preset("fast", width=width, input_size=size, **kw))


def test_taps_are_the_last_three_residual_groups_with_the_specified_grids() -> None:
    cfg = _cfg()
    taps = tap_geometry(cfg)
    assert [(t.height, t.width, t.stride, t.start) for t in taps] == [(30, 26, 4, 4), (14, 12, 8, 8), (6, 5, 16, 16)]
    net = MGMTN(cfg).eval()
    with torch.no_grad():
        feats = net.tap_features(torch.zeros(2, 3, *MARGIN))
    assert [tuple(f.shape[1:]) for f in feats] == [(t.channels, t.height, t.width) for t in taps]
    # 112x96 (the ablation's crop) works too, every footprint inside the image
    for t in tap_geometry(_cfg(TEMPLATE)):
        assert t.start + t.stride * t.height <= TEMPLATE[0] and t.start + t.stride * t.width <= TEMPLATE[1]


def test_mask_at_a_tap_is_the_mean_over_each_cells_footprint() -> None:
    masks = torch.rand(2, len(GROUPS), *MARGIN)
    for t in tap_geometry(_cfg()):
        s = t.stride
        expected = F.avg_pool2d(masks[:, :, s:-s, s:-s], s)  # ATTRIBUTE_MODELS.md §2's formula for the margin crop
        torch.testing.assert_close(masks_at(masks, t), expected[:, :, : t.height, : t.width])
        cell = masks[0, 3, t.start + s : t.start + 2 * s, t.start : t.start + s].mean()  # cell (1, 0) by hand
        torch.testing.assert_close(masks_at(masks, t)[0, 3, 1, 0], cell)


def test_receptive_centre_of_a_tap_cell_is_where_the_geometry_says() -> None:
    """A gradient probe: the input pixel that most influences tap-2 cell (i, j) of an all-ones network lies in the
    cell's footprint (the geometry is not off by a stride)."""
    cfg = _cfg(width=0.125)
    net = MGMTN(cfg).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.constant_(m.weight, 0.01)
    tap = tap_geometry(cfg)[0]
    x = torch.zeros(1, 3, *MARGIN, requires_grad=True)
    feat = net.tap_features(x)[0]
    i, j = 14, 12  # far enough from the borders that the receptive field is not clipped
    feat[0, :, i, j].sum().backward()
    assert x.grad is not None
    g = x.grad[0].abs().sum(0)
    ys, xs = torch.nonzero(g > 0, as_tuple=True)
    cy, cx = ys.float().mean().item(), xs.float().mean().item()  # centre of the receptive field
    lo_y, lo_x = tap.start + tap.stride * i, tap.start + tap.stride * j
    assert lo_y - 0.5 <= cy <= lo_y + tap.stride - 0.5 and lo_x - 0.5 <= cx <= lo_x + tap.stride - 0.5


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_gives_one_logit_per_attribute(fusion: str) -> None:
    net = MGMTN(_cfg(), MgmtnConfig(fusion=fusion)).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 3, *MARGIN))
    assert out.attribute_logits.shape == (3, len(net.cfg.attributes)) and out.identity_logits is None
    assert out.features.shape == (3, GROUP_DIM)
    assert (fusion == "global") == (len(net.group_fc) == 0)
    assert [GROUPS[j] for j in net.attribute_groups] == [attribute_group(a) for a in net.cfg.attributes]


def test_a_zeroed_group_mask_gives_exactly_zero_gradient_from_that_groups_logits_to_the_trunk() -> None:
    torch.manual_seed(0)
    net = MGMTN(_cfg(), MgmtnConfig(fusion="groups")).train()
    nose = [i for i, a in enumerate(net.cfg.attributes) if a in NOSE_ATTRS]
    x = torch.randn(4, 3, *MARGIN)
    masks = net.masks(x).clone()

    def trunk_grad(m: torch.Tensor) -> float:
        net.zero_grad(set_to_none=True)
        net(x, m).attribute_logits[:, nose].sum().backward()
        return sum(float(p.grad.abs().sum()) for p in net.trunk.parameters() if p.grad is not None)

    assert trunk_grad(masks) > 0  # the nose mask lets the trunk's features through ...
    masks[:, GROUPS.index("Nose")] = 0
    assert trunk_grad(masks) == 0.0  # ... and a zero mask blocks them exactly


def test_analytic_masks_are_the_template_landmarks_masks_for_every_face() -> None:
    net = MGMTN(_cfg())
    expected = group_masks(template_landmarks(TEMPLATE, True), MARGIN)
    m = net.masks(torch.randn(2, 3, *MARGIN))
    assert m.shape == (2, len(GROUPS), *MARGIN)
    torch.testing.assert_close(m[1], expected[0])


def test_learned_masks_come_from_the_frozen_mask_network_and_survive_the_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    size = margin_geometry((56, 48))[0]
    cfg = _cfg(size)
    net = MGMTN(cfg, MgmtnConfig(masks="learned", template=(56, 48)), MaskNet()).train()
    assert net.mask_net is not None and not net.mask_net.training  # frozen: eval even when the net trains
    assert not any(p.requires_grad for p in net.mask_net.parameters())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(net.masks(x), net.mask_net(x))
    path = tmp_path / "mgmtn.safetensors"
    predictor = MgmtnPredictor(net.eval(), InputSpec((56, 48), margin=True))
    predictor.save(path)
    again = load_predictor(path)
    assert isinstance(again, MgmtnPredictor) and again.mgmtn.mcfg.masks == "learned"
    crops = np.random.default_rng(0).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(again.predict_crops(crops), predictor.predict_crops(crops))
    assert again.describe()["mgmtn"]["masks"] == "learned"
    assert again.parameters > sum(p.numel() for p in MGMTN(cfg).parameters())  # the mask network counts


SMALL = (56, 48)
SMALL_MARGIN = margin_geometry(SMALL)[0]  # (64, 56)
CHECKER = np.where(((np.mgrid[0:6, 0:6][0] // 2 + np.mgrid[0:6, 0:6][1] // 2) % 2)[..., None] == 0, 250, 10)
FLAT = np.full((6, 6, 1), 130)


def _spots(mask: np.ndarray, where: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    pts = np.argwhere(where)
    return pts[(pts[:, 0] >= 3) & (pts[:, 0] <= h - 3) & (pts[:, 1] >= 3) & (pts[:, 1] <= w - 3)]


def _planted(n: int, rng: np.random.Generator, distractors: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise "faces" shifted at random by up to 12 px, each with a 6x6 patch on its nose -- a checkerboard (label 1)
    or flat grey (0) -- and ``distractors`` more patches far from the nose, checkerboard or flat at random.  Only the
    nose patch carries the label, and the nose moves with the face while the distractors fall anywhere else, so
    only features gathered by masks that follow the face's landmarks can read it reliably; pooled over the image,
    the checkerboards' total is the label plus a binomial count of distractors.  Returns (network input, labels,
    the faces' own group masks)."""
    h, w = SMALL_MARGIN
    shifts = rng.integers(-12, 13, (n, 1, 2)).astype(np.float32)
    masks = group_masks(template_landmarks(SMALL, True)[None] + shifts, SMALL_MARGIN)
    images = rng.integers(90, 160, (n, h, w, 3)).astype(np.uint8)
    labels = rng.random(n) < 0.5
    for k in range(n):
        nose = masks[k, GROUPS.index("Nose")].numpy()
        near = F.max_pool2d(torch.from_numpy(nose)[None, None], 13, 1, 6)[0, 0].numpy()
        inside = _spots(nose, nose > 0.95)
        far = _spots(nose, near < 0.05)
        spots = [(inside[rng.integers(len(inside))], labels[k])]
        spots += [(far[rng.integers(len(far))], rng.random() < 0.5) for _ in range(distractors)]
        for (cy, cx), on in spots:
            images[k, cy - 3 : cy + 3, cx - 3 : cx + 3] = CHECKER if on else FLAT
    return to_input(torch.from_numpy(images)), torch.from_numpy(labels.astype(np.float32)), masks


@pytest.mark.slow
def test_nose_group_features_beat_global_only_on_a_signal_planted_in_the_nose_region() -> None:
    x_test, y_test, m_test = _planted(512, np.random.default_rng(0))
    accuracy = {}
    for fusion in ("global", "groups"):
        torch.manual_seed(0)
        net = MGMTN(_cfg(SMALL_MARGIN, attributes=("Big_Nose",)), MgmtnConfig(fusion=fusion, template=SMALL))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        train_rng = np.random.default_rng(1)
        net.train()
        for _ in range(80):
            x, y, m = _planted(32, train_rng)
            loss = F.binary_cross_entropy_with_logits(net(x, m).attribute_logits[:, 0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(x_test, m_test).attribute_logits[:, 0] > 0
        accuracy[fusion] = float((pred == (y_test > 0.5)).float().mean())
    print("planted nose signal, test accuracy:", accuracy)
    assert accuracy["groups"] >= 0.9, accuracy
    assert accuracy["groups"] - accuracy["global"] >= 0.1, accuracy
