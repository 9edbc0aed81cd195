"""Importance estimators and penalties against their formulas and naive loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram.memory.importance import (
    SynapticIntelligence,
    _linear_sums,
    fisher_diagonal,
    mas_importance,
    per_sample_grads,
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
            g = torch.zeros_like(p) if p.grad is None else p.grad  # None: unused
            sums[k] += g
            sums.setdefault("_sq_" + k, torch.zeros_like(p))
            sums["_sq_" + k] += g.pow(2)
            sums.setdefault("_abs_" + k, torch.zeros_like(p))
            sums["_abs_" + k] += g.abs()
    return sums


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().abs().max()
    err = (a.double() - b.double()).abs().max()
    return (err / scale if scale > 0 else err).item()


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


# ----------------------------------------------- the closed form for nn.Linear layers


class ConvNet(nn.Module):
    """Conv2d (per-sample vmap path) feeding Linear layers (closed form), in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc1 = nn.Linear(2 * 4 * 4, 6)
        self.act = nn.ReLU(inplace=True)  # modifies fc1's output in place
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


class Reused(nn.Module):
    """A Linear called twice and a weight tied into a second use: no closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 5)
        self.twice = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.twice(torch.tanh(self.twice(self.inp(x)))))
        return self.out(h) + 0.5 * F.linear(h, self.out.weight)  # out.weight used twice


def conv_data(n: int = 17, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def vmap_sums(net: nn.Module, x, y, loss_fn, transform) -> dict[str, torch.Tensor]:
    """The per-sample path alone (torch.func vmap over every parameter)."""
    net.eval()
    grads = per_sample_grads(net, x, y, loss_fn)
    return {k: transform(g).sum(dim=0) for k, g in grads.items()}


@pytest.mark.parametrize("factory", [make_net, lambda: ConvNet(), lambda: Reused()])
def test_closed_form_fisher_and_mas_equal_the_naive_loop(factory) -> None:
    torch.manual_seed(0)
    net = factory()
    x, y = conv_data() if isinstance(net, ConvNet) else make_data()
    halves = [(x[:9].double(), y[:9]), (x[9:].double(), y[9:])]
    fisher = fisher_diagonal(net.double(), halves)
    mas = mas_importance(net, halves)
    torch.manual_seed(0)
    naive_ce = naive_per_sample(factory(), x, y, F.cross_entropy)
    torch.manual_seed(0)
    naive_norm = naive_per_sample(factory(), x, y, lambda out, _: out.pow(2).sum())
    assert fisher.keys() == mas.keys() == {k for k in naive_ce if not k.startswith("_")}
    for name in fisher:
        assert max_rel_err(fisher[name], naive_ce["_sq_" + name] / len(x)) <= 1e-6, name
        assert max_rel_err(mas[name], naive_norm["_abs_" + name] / len(x)) <= 1e-6, name
    if isinstance(net, Reused):
        assert torch.equal(fisher["unused.weight"], torch.zeros(3, 5, dtype=torch.float64))


def test_true_fisher_closed_form_equals_naive_loop_on_sampled_labels() -> None:
    torch.manual_seed(0)
    net = ConvNet().double()
    x, _ = conv_data()
    x = x.double()
    fisher = fisher_diagonal(
        net, [(x, torch.zeros(len(x), dtype=torch.long))], estimator="true",
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    with torch.no_grad():
        probs = F.softmax(net.eval()(x), dim=-1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert len(set(labels.tolist())) > 1
    naive = naive_per_sample(net, x, labels, F.cross_entropy)
    for name in fisher:
        assert max_rel_err(fisher[name], naive["_sq_" + name] / len(x)) <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_form_equals_the_vmap_path(dtype) -> None:
    torch.manual_seed(0)
    net = ConvNet().to(dtype)
    x, y = conv_data(n=32)
    x = x.to(dtype)
    fisher = fisher_diagonal(net, [(x, y)])
    mas = mas_importance(net, [(x, y)])
    sq = vmap_sums(net, x, y, F.cross_entropy, torch.square)
    ab = vmap_sums(net, x, y, lambda out, _: out.pow(2).sum(), torch.abs)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name in sq:
        assert max_rel_err(fisher[name], sq[name] / len(x)) <= tol, name
        assert max_rel_err(mas[name], ab[name] / len(x)) <= tol, name


def test_closed_form_covers_exactly_the_single_use_linear_layers() -> None:
    """Which parameters take the closed form; the others go to the vmap path."""
    torch.manual_seed(0)
    x, y = conv_data()
    done, rest = _linear_sums(
        ConvNet().eval(), x, y, None, lambda out, y: y,
        lambda out, t: F.cross_entropy(out, t, reduction="sum"), torch.square,
    )  # fmt: skip
    assert set(done) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert set(rest) == {"conv.weight", "conv.bias", "__target__"}
    x, y = make_data()
    done, rest = _linear_sums(
        Reused().eval(), x, y, None, lambda out, y: y,
        lambda out, t: F.cross_entropy(out, t, reduction="sum"), torch.square,
    )  # fmt: skip
    assert set(done) == {"inp.weight", "inp.bias", "unused.weight", "unused.bias"}
    assert set(rest) == {"twice.weight", "twice.bias", "out.weight", "out.bias", "__target__"}
