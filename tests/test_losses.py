import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qimera_engine.losses import (BNStatisticsLoss, _BNMoments, bn_statistics, bn_statistics_loss, kd_loss,
                                  soft_cross_entropy)


def test_soft_cross_entropy_equals_hard_ce_on_one_hot():
    logits = torch.randn(6, 5)
    y = torch.randint(5, (6,))
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y))


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.25, 0.75, 0.0]])
    expected = -(t * torch.log_softmax(logits, 1)).sum()
    torch.testing.assert_close(soft_cross_entropy(logits, t), expected)


def test_kd_reductions():
    # float64, seeded: the check is about the reduction, not about float32 rounding times tau^2
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    tau = 20.0
    p = F.softmax(t / tau, 1)
    per_sample = (p * (p.log() - F.log_softmax(s / tau, 1))).sum(1)  # KL(p || q) per sample
    torch.testing.assert_close(kd_loss(s, t, tau, "batchmean"), per_sample.mean() * tau**2)
    torch.testing.assert_close(kd_loss(s, t, tau, "mean"), per_sample.mean() * tau**2 / 10)  # C times smaller
    assert float(kd_loss(t, t, tau)) == pytest.approx(0.0, abs=1e-6)


def test_bn_statistics_loss_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 3, 6, 6)
    _, loss = bn_statistics_loss(net, x)
    h1 = net[0](x)
    h2 = net[3](net[2](net[1](h1)))
    terms = []
    for h, bn in ((h1, net[1]), (h2, net[4])):
        mu, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        terms.append(F.mse_loss(mu, bn.running_mean) + F.mse_loss(var, bn.running_var))
    torch.testing.assert_close(loss, sum(terms) / 2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bn_statistics_match_var_mean_in_value_and_gradient(layout):
    """The fast two-pass statistics and their one-pass backward against autograd through torch.var_mean."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 8, 5, 5, generator=g) * 3 + 1).contiguous(memory_format=layout)
    w_mean, w_var = torch.randn(8, generator=g), torch.randn(8, generator=g)
    grads = []
    for stats in (bn_statistics, lambda v: torch.var_mean(v, dim=(0, 2, 3), unbiased=False)[::-1]):
        xi = x.clone().requires_grad_()
        mean, var = stats(xi)
        ((mean * w_mean).sum() + (var * w_var).sum()).backward()
        grads.append((mean.detach(), var.detach(), xi.grad))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert grads[0][2].is_contiguous(memory_format=layout)  # the gradient keeps the input's layout
    x64 = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=g).contiguous(memory_format=layout)
    assert torch.autograd.gradcheck(_BNMoments.apply, (x64.requires_grad_(),))


def test_bn_loss_is_zero_on_matching_statistics_and_gradients_reach_the_input():
    bn = nn.BatchNorm2d(2).eval()
    x = torch.randn(64, 2, 4, 4)
    with torch.no_grad():
        bn.running_mean.copy_(x.mean((0, 2, 3)))
        bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    _, loss = bn_statistics_loss(nn.Sequential(bn), x)
    assert float(loss) < 1e-10
    # x doubled: every mean doubles and every variance quadruples, so L = mean(mu^2) + mean((3 var)^2),
    # and its gradient is that of the two mean squared errors through the batch moments
    x2 = (x * 2).double().requires_grad_()
    _, loss2 = bn_statistics_loss(nn.Sequential(bn.double()), x2)
    mu, var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(loss2, (mu**2).mean() + ((3 * var) ** 2).mean())
    loss2.backward()
    n, c = x.numel() // 2, 2
    rm, rv = bn.running_mean.view(1, c, 1, 1), bn.running_var.view(1, c, 1, 1)
    mu2, var2 = x2.mean((0, 2, 3), keepdim=True), x2.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = (2 / c) * ((mu2 - rm) / n + (var2 - rv) * 2 * (x2 - mu2) / n)
    torch.testing.assert_close(x2.grad, expected.detach())


def test_bn_hooks_record_only_while_active():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    hooks = BNStatisticsLoss(net)
    net(torch.randn(2, 1, 3, 3))
    with pytest.raises(RuntimeError, match="no BatchNorm statistics were recorded"):
        hooks.pop()
    hooks.active = True
    x = torch.randn(2, 1, 3, 3)
    with torch.no_grad():
        net(x)
        h = net[0](x)
    expected = F.mse_loss(h.mean((0, 2, 3)), net[1].running_mean) + \
        F.mse_loss(h.var((0, 2, 3), unbiased=False), net[1].running_var)
    torch.testing.assert_close(hooks.pop(), expected)
    with pytest.raises(RuntimeError, match="no BatchNorm statistics"):  # popped: the terms are gone
        hooks.pop()
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStatisticsLoss(nn.Linear(2, 2))
