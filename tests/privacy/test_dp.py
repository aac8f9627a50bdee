"""DP-SGD at the data holder: clipping and noise against plainly written per-example loops and opacus itself."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitnn.data import Dataset
from splitnn.errors import ConfigurationError
from splitnn.privacy.defenses.dp import DPSegment, dp_noise_multiplier, rdp_epsilon
from splitnn.split import SplitNN
from splitnn.workers import VirtualWorker


def _parts(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    bottom = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5))
    head = nn.Sequential(nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(dim=1))
    return bottom, head


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 3, 4, generator=g) * 3, torch.randint(0, 3, (n,), generator=g)


def _plain_dp_grads(bottom, head, x, y, clip, sigma, seed):
    """One example at a time with ordinary autograd: clip the whole-segment gradient, sum, noise, average."""
    params = list(bottom.parameters())
    summed = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = F.nll_loss(head(bottom(x[i : i + 1])), y[i : i + 1])
        gs = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in gs))
        scale = min(1.0, clip / (norm + 1e-6))
        for s, g in zip(summed, gs):
            s += g * scale
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in summed:
        if sigma > 0:
            s = s + torch.normal(0, sigma * clip, size=s.shape, generator=gen)
        out.append(s / x.shape[0])
    return out


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_dp_segment_gradient_equals_a_plain_per_example_loop(sigma):
    bottom, head = _parts()
    x, y = _batch()
    expected = _plain_dp_grads(copy.deepcopy(bottom), copy.deepcopy(head), x, y, clip=0.5, sigma=sigma, seed=3)
    layer = DPSegment(bottom, sigma, 0.5, sample_rate=0.1, seed=3)
    F.nll_loss(head(layer(x)), y).backward()
    for p, e in zip(bottom.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    # the clipping does bind here (otherwise this test checks nothing about it)
    params = list(bottom.parameters())
    unclipped = [torch.autograd.grad(F.nll_loss(head(bottom(x[i : i + 1])), y[i : i + 1]), params) for i in range(8)]
    assert max(math.sqrt(sum(float(g.pow(2).sum()) for g in gs)) for gs in unclipped) > 0.5
    assert layer.steps == 1


def test_dp_segment_matches_opacus_dp_sgd_on_the_unsplit_model():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    bottom, head = _parts()
    x, y = _batch(16, seed=5)
    # opacus clips the whole model's per-example gradient; the split twin clips the bottom alone, so
    # the head is frozen on the opacus side to compare the same thing
    frozen_head = copy.deepcopy(head).requires_grad_(False)
    full = GradSampleModule(nn.Sequential(copy.deepcopy(bottom), frozen_head))
    opt = DPOptimizer(
        torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=0.1),
        noise_multiplier=1.3,
        max_grad_norm=0.8,
        expected_batch_size=16,
        generator=torch.Generator().manual_seed(11),
    )
    F.nll_loss(full(x), y).backward()
    opt.pre_step()
    layer = DPSegment(bottom, 1.3, 0.8, sample_rate=16 / 160, seed=11)
    F.nll_loss(head(layer(x)), y).backward()
    for mine, theirs in zip(bottom.parameters(), full._module[0].parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_accountant_epsilon_equals_opacus_privacy_engine():
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    bottom, head = _parts()
    x, y = _batch(64, seed=2)
    engine = PrivacyEngine(accountant="rdp")
    model = nn.Sequential(copy.deepcopy(bottom), copy.deepcopy(head))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
    )
    steps = 0
    for _ in range(2):
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            opt.zero_grad()
            F.nll_loss(model(xb), yb).backward()
            opt.step()
            steps += 1
    theirs = engine.get_epsilon(1e-5)
    layer = DPSegment(bottom, 1.1, 1.0, sample_rate=16 / 64)
    for _ in range(steps):
        layer.zero_grad()
        F.nll_loss(head(layer(x[:16])), y[:16]).backward()
    assert layer.epsilon(1e-5) == pytest.approx(theirs, rel=1e-12)
    assert rdp_epsilon(1.1, 0.25, steps, 1e-5) == pytest.approx(theirs, rel=1e-12)


def test_target_epsilon_is_met_after_the_planned_epochs():
    sigma = dp_noise_multiplier(3.0, 1e-5, 0.01, epochs=5)
    spent = rdp_epsilon(sigma, 0.01, 500, 1e-5)
    assert 2.9 < spent <= 3.0
    layer = DPSegment.for_target_epsilon(nn.Linear(3, 2), 3.0, 1e-5, sample_rate=0.01, epochs=5)
    assert layer.noise_multiplier == sigma


def test_fit_reports_epsilon_after_every_epoch():
    torch.manual_seed(0)
    n, bs = 96, 16
    data = Dataset(torch.randn(n, 1, 3, 4), torch.randint(0, 3, (n,)), "dp-toy", 3)
    bottom, head = _parts()
    layer = DPSegment(bottom, 1.0, 1.0, seed=4).bind(n, bs)
    model = SplitNN([layer, head], [VirtualWorker("alice"), VirtualWorker("bob")], optimizer="sgd:lr=0.1")
    history = model.fit(data, epochs=3, batch_size=bs, on_epoch=layer.epoch_reporter(1e-5), progress=False)
    eps = history.metric("epsilon")
    expected = [rdp_epsilon(1.0, bs / n, (e + 1) * (n // bs), 1e-5) for e in range(3)]
    assert eps == pytest.approx(expected, rel=1e-12)
    assert eps[0] < eps[1] < eps[2]


def test_dp_segment_refuses_batch_norm_and_bad_arguments():
    with pytest.raises(ConfigurationError, match="BatchNorm1d"):
        DPSegment(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), 1.0)
    with pytest.raises(ConfigurationError, match="max_grad_norm"):
        DPSegment(nn.Linear(3, 3), 1.0, 0.0)
    layer = DPSegment(nn.Linear(3, 3), 1.0)
    with pytest.raises(ConfigurationError, match="sampling rate is unknown"):
        layer(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ConfigurationError, match="delta"):
        layer.epsilon(0)
