"""MTL-CNN's network (ATTRIBUTE_MODELS.md §3): routing, gradients, the masked correlation layer, the planted
Chubby / Double_Chin case, the centre loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesearch.model.config import ModelConfig
from facesearch.model.mtl_cnn import (
    CentreLoss,
    MtlCnn,
    MtlConfig,
    Task,
    branch_parameters,
    correlation_mask,
    mtl_model_config,
    task_loss,
)
from facesearch.model.network import count_parameters, to_input
from facesearch.model.predictors.mtl_train import fit_correlation

SIZE = (64, 56)
TASKS = (Task("Male"), Task("Big_Nose"), Task("Chubby"), Task("Double_Chin"), Task("Hair", ("a", "b", "c")))
# two databases: {Male, Big_Nose} and {Male, Chubby, Double_Chin, Hair}
TOGETHER = (("Big_Nose", "Male"), ("Chubby", "Male"), ("Double_Chin", "Male"), ("Hair", "Male"),
            ("Chubby", "Double_Chin"), ("Chubby", "Hair"), ("Double_Chin", "Hair"))  # fmt: skip


def network(gates: str = "learned", tasks: tuple[Task, ...] = TASKS, together=TOGETHER, seed: int = 0) -> MtlCnn:
    torch.manual_seed(seed)
    mcfg = MtlConfig(tasks, groups=4, hidden=16, gates=gates, together=together)
    base = ModelConfig(arch="fast", num_identities=0, width=0.25, input_size=SIZE, embedding_dim=32)
    return MtlCnn(mtl_model_config(base, mcfg), mcfg)


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return to_input(torch.randint(0, 256, (n, *SIZE, 3), generator=g, dtype=torch.uint8))


def test_units_shapes_and_outputs():
    model = network()
    assert model.mcfg.units == ("Male", "Big_Nose", "Chubby", "Double_Chin", "Hair_a", "Hair_b", "Hair_c")
    out = model.outputs(images(4))
    assert out.feature.shape == (4, 32) and out.routed.shape == (4, 5, 16)
    assert out.logits.shape == out.corrected.shape == (4, 7)
    scores = model(images(4)).attribute_logits
    # a categorical class's score is the logit of its softmax probability, so the sigmoids sum to 1
    assert torch.allclose(torch.sigmoid(scores[:, 4:]).sum(1), torch.ones(4), atol=1e-4)


def test_routing_weights_sum_to_one_and_mean_gate_is_one():
    model = network()
    with torch.no_grad():
        model.routing.copy_(torch.randn(5, 4) * 3)
    w, g = model.routing_weights(), model.gates()
    assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-6)
    assert torch.allclose(g.mean(1), torch.ones(5), atol=1e-6)


def test_one_hot_route_gives_zero_gradient_outside_its_group():
    model = network().eval()
    with torch.no_grad():
        model.routing.zero_()
        model.routing[1] = torch.tensor([-float("inf"), -float("inf"), 0.0, -float("inf")])  # Big_Nose: group 2
    f = torch.randn(6, 32, requires_grad=True)
    h = model.routed(f)
    h[:, 1].sum().backward()
    assert f.grad is not None
    per_group = f.grad.abs().reshape(6, 4, 8).sum((0, 2))
    assert per_group[2] > 0
    assert torch.all(per_group[[0, 1, 3]] == 0)


def test_task_without_labels_gets_zero_gradient():
    model = network().train()
    labels = torch.full((8, 5), float("nan"))
    labels[:, 0] = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1.0])
    labels[:, 4] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1.0])  # Big_Nose, Chubby, Double_Chin unknown
    out = model.outputs(images(8))
    task_loss(out.logits, labels, model.tasks).backward()
    grads = model.routing.grad
    assert grads is not None
    assert torch.all(grads[[1, 2, 3]] == 0) and grads[0].abs().sum() > 0 and grads[4].abs().sum() > 0
    for i in (1, 2, 3):
        assert torch.all(model.heads[i].weight.grad == 0)


def test_fixed_gates_do_not_train():
    model = network("fixed")
    assert not model.routing.requires_grad
    assert torch.all(model.gates() == 1)


def test_correlation_mask():
    mask = correlation_mask(TASKS, TOGETHER)
    units = network().mcfg.units
    assert torch.all(mask.diagonal() == 0)
    assert mask[units.index("Big_Nose"), units.index("Chubby")] == 0  # never labelled together
    assert mask[units.index("Double_Chin"), units.index("Chubby")] == 1
    assert torch.all(mask[4:, 4:] == 0)  # the classes of one task never read each other
    assert torch.equal(mask, mask.T)


def test_masked_correlation_entries_stay_exactly_zero():
    model = network()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((500, 7)).astype(np.float32) * 2
    y = np.stack([rng.integers(0, 2, 500)] * 4 + [rng.integers(0, 3, 500)], 1).astype(np.float32)
    y[:250, 2:] = np.nan  # first "database" labels Male, Big_Nose only
    y[250:, 1] = np.nan
    fit_correlation(model, z, y, 50)
    mask = model.get_buffer("correlation_mask")
    assert torch.all(model.correlation[mask == 0] == 0)
    assert model.correlation[mask == 1].abs().sum() > 0


def test_planted_chubby_double_chin():
    """Chubby observed cleanly, Double_Chin noisily, P(DC | Chubby) = 0.5 against 0.05: the layer learns that a
    chubby face more likely has a double chin and the Double_Chin log-loss improves by >= 10 %."""
    rng = np.random.default_rng(0)
    n = 6000
    chubby = (rng.random(n) < 0.15).astype(np.float32)
    dc = (rng.random(n) < np.where(chubby > 0, 0.5, 0.05)).astype(np.float32)
    z = np.stack([np.where(chubby > 0, 4.0, -4.0) + 0.5 * rng.standard_normal(n),
                  np.where(dc > 0, 0.6, -0.6) + 1.5 * rng.standard_normal(n)], 1).astype(np.float32)  # fmt: skip
    tasks = (Task("Chubby"), Task("Double_Chin"))
    model = network(tasks=tasks, together=(("Chubby", "Double_Chin"),))

    def log_loss(zz: torch.Tensor) -> float:
        return float(F.binary_cross_entropy_with_logits(zz[:, 1], torch.from_numpy(dc)))

    before = log_loss(torch.from_numpy(z))
    fit_correlation(model, z, np.stack([chubby, dc], 1), 300)
    with torch.no_grad():
        after = log_loss(model.correlate(torch.from_numpy(z)))
    assert model.correlation[1, 0] > 0.5
    assert after <= 0.9 * before


def test_centre_loss_falls_without_collapse():
    model = network().train()
    centre = CentreLoss([2, 2, 2, 2, 3], 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = images(32, seed=3)
    g = torch.Generator().manual_seed(5)
    labels = torch.stack([torch.randint(0, 2, (32,), generator=g) for _ in range(4)]
                         + [torch.randint(0, 3, (32,), generator=g)], 1)  # fmt: skip
    start_norm, losses = None, []
    for _ in range(40):
        out = model.outputs(x)
        loss = centre(out.routed, labels)
        norm = out.routed.norm(dim=2).mean().item()
        start_norm = start_norm or norm
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[1]
    final = model.outputs(x).routed.norm(dim=2).mean().item()
    assert final > 0.5 * start_norm


def test_centre_loss_ignores_unknown_labels():
    centre = CentreLoss([2, 3], 4)
    h = torch.randn(5, 2, 4, requires_grad=True)
    labels = torch.tensor([[0, -1], [1, -1], [-1, -1], [0, -1], [1, -1]])
    centre(h, labels).backward()
    assert h.grad is not None
    assert torch.all(h.grad[:, 1] == 0) and torch.all(h.grad[2] == 0)
    assert centre(h, torch.full((5, 2), -1)).item() == 0


def test_gated_shared_layer_is_smaller_than_per_task_branches():
    model = network()
    prefixes = ("routing", "shared", "task_", "heads")
    shared = sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
    assert shared < branch_parameters(32, 16, TASKS)
    assert count_parameters(model) > shared


def test_config_round_trip_and_errors():
    mcfg = network().mcfg
    assert MtlConfig.from_dict(mcfg.to_dict()) == mcfg
    with pytest.raises(ValueError, match="divisible"):
        base = ModelConfig(arch="fast", num_identities=0, width=0.25, input_size=SIZE, embedding_dim=30)
        MtlCnn(mtl_model_config(base, mcfg), mcfg)
    with pytest.raises(ValueError, match="do not exist"):
        MtlConfig(TASKS, together=(("Male", "Smiling"),))
    with pytest.raises(ValueError, match="2 distinct classes"):
        Task("Age", ("young",))
