"""Importance estimators and penalties against their formulas and naive loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.memory.importance import (
    SynapticIntelligence,
    fisher_diagonal,
    mas_importance,
    quadratic_penalty,
)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def make_data(n: int = 23, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def naive_per_sample(model: nn.Module, x, y, loss_of_output) -> dict[str, torch.Tensor]:
    """sum_i f(grad_i) by a plain Python loop, one backward per sample, in float64."""
    model = model.double()
    sums = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        loss_of_output(model(x[i : i + 1].double()), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            sums[k] += p.grad
            sums.setdefault("_sq_" + k, torch.zeros_like(p))
            sums["_sq_" + k] += p.grad.pow(2)
            sums.setdefault("_abs_" + k, torch.zeros_like(p))
            sums["_abs_" + k] += p.grad.abs()
    return sums


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_fisher_equals_naive_per_sample_loop() -> None:
    net = make_net()
    x, y = make_data()
    fisher = fisher_diagonal(net.double(), [(x[:10].double(), y[:10]), (x[10:].double(), y[10:])])
    naive = naive_per_sample(make_net(), x, y, F.cross_entropy)
    for name, value in fisher.items():
        assert max_rel_err(value, naive["_sq_" + name] / len(x)) <= 1e-6, name


def test_fisher_is_not_the_squared_batch_gradient() -> None:
    """E[g^2] (ours) differs from E[g]^2 (Avalanche's batch-gradient EWC)."""
    net = make_net()
    x, y = make_data()
    fisher = fisher_diagonal(net, [(x, y)])
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    batch_sq = net[0].weight.grad.pow(2)
    assert (fisher["0.weight"] >= batch_sq - 1e-7).all()  # Jensen
    assert (fisher["0.weight"] - batch_sq).abs().max() > 1e-4


def test_true_fisher_samples_labels_from_the_model_reproducibly() -> None:
    net = make_net()
    x, y = make_data(n=200)
    a = fisher_diagonal(net, [(x, y)], estimator="true", generator=torch.Generator().manual_seed(3))
    b = fisher_diagonal(net, [(x, y)], estimator="true", generator=torch.Generator().manual_seed(3))
    emp = fisher_diagonal(net, [(x, y)])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], emp[k]) for k in a)
    # the true Fisher's labels do not depend on y
    c = fisher_diagonal(
        net,
        [(x, torch.zeros_like(y))],
        estimator="true",
        generator=torch.Generator().manual_seed(3),
    )
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_fisher_restores_training_mode_and_rejects_bad_input() -> None:
    net = make_net().train()
    x, y = make_data()
    fisher_diagonal(net, [(x, y)])
    assert net.training
    with pytest.raises(ValueError, match="estimator"):
        fisher_diagonal(net, [(x, y)], estimator="batch")
    with pytest.raises(ValueError, match="empty"):
        fisher_diagonal(net, [])


class TwoHeads(nn.Module):
    """The multi-head calling convention: forward(x, task_id)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](torch.relu(self.body(x)))


def test_fisher_with_task_labels_routes_each_sample_to_its_head() -> None:
    torch.manual_seed(0)
    net = TwoHeads()
    x, y = make_data(n=12)
    t = torch.tensor([0, 1] * 6)
    fisher = fisher_diagonal(net, [(x, y, t)])
    expected = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1], int(t[i])), y[i : i + 1]).backward()
        for k, p in net.named_parameters():
            if p.grad is not None:  # the other head gets no gradient
                expected[k] += p.grad.pow(2) / len(x)
    for k in expected:
        assert torch.allclose(fisher[k], expected[k], rtol=1e-5, atol=1e-8), k


def test_mas_equals_naive_per_sample_loop() -> None:
    net = make_net()
    x, y = make_data()
    mas = mas_importance(net.double(), [(x.double(), y)])
    naive = naive_per_sample(make_net(), x, y, lambda out, _: out.pow(2).sum())
    for name, value in mas.items():
        assert max_rel_err(value, naive["_abs_" + name] / len(x)) <= 1e-6, name


def test_quadratic_penalty_formula() -> None:
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
        net.bias.fill_(3.0)
    anchors = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([1.0])}
    importance = {"weight": torch.tensor([[2.0, 3.0]]), "bias": torch.tensor([0.5])}
    # 2*(1-0)^2 + 3*(2-1)^2 + 0.5*(3-1)^2 = 2 + 3 + 2
    assert quadratic_penalty(net, anchors, importance).item() == 7.0
    quadratic_penalty(net, anchors, importance).backward()
    assert torch.equal(net.weight.grad, torch.tensor([[4.0, 6.0]]))  # 2*F*(theta-anchor)


class TwoParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, 0.0]))

    def forward(self) -> torch.Tensor:
        # L(w) = (w0 - 1)^2 + 2 (w1 + 2)^2
        return (self.w[0] - 1) ** 2 + 2 * (self.w[1] + 2) ** 2


def test_si_omega_matches_hand_computation() -> None:
    model = TwoParams()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si = SynapticIntelligence(xi=0.5)
    si.begin(model)
    for _ in range(2):
        opt.zero_grad()
        model().backward()
        si.before_step(model)
        opt.step()
        si.after_step(model)
    # step 1: g = (-2, 8), dw = (0.2, -0.8) -> omega += (0.4, 6.4); w = (0.2, -0.8)
    # step 2: g = (-1.6, 4.8), dw = (0.16, -0.48) -> omega += (0.256, 2.304); w = (0.36, -1.28)
    assert torch.allclose(si.omega["w"], torch.tensor([0.656, 8.704]))
    si.consolidate(model)
    # importance = omega / (delta^2 + xi), delta = (0.36, -1.28)
    expected = torch.tensor([0.656 / (0.36**2 + 0.5), 8.704 / (1.28**2 + 0.5)])
    assert torch.allclose(si.importance["w"], expected)
    assert torch.equal(si.omega["w"], torch.zeros(2))
    assert torch.allclose(si.anchors["w"], torch.tensor([0.36, -1.28]))
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.36, -1.28]))
    assert torch.allclose(si.penalty(model), expected[0] * 1.0)


def test_si_state_round_trips_through_its_state_dict() -> None:
    model = TwoParams()
    si = SynapticIntelligence(xi=0.25)
    si.begin(model)
    si.omega["w"] += 1.0
    restored = SynapticIntelligence()
    restored.load_state_dict(si.state_dict())
    assert restored.xi == 0.25 and torch.equal(restored.omega["w"], si.omega["w"])
    si.omega["w"] += 1.0  # state_dict returned copies
    assert torch.equal(restored.omega["w"], torch.ones(2))
