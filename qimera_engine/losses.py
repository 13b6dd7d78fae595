"""Losses of METHOD.md section 7: soft cross-entropy, distillation, BN-statistics matching."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_c t_c * log_softmax(logits)_c of each row, (B,)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over the batch of -sum_c t_c * log_softmax(logits)_c."""
    return soft_cross_entropy_rows(logits, targets).mean()


def masked_soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The soft cross-entropy of the selected ``rows`` (bool, (B,)), summed and divided by the whole
    batch size, so its weight per row does not depend on how many rows are selected."""
    per_row = soft_cross_entropy_rows(logits, targets)
    return (per_row * rows).sum() / per_row.shape[0]


def ce_row_mask(which: str, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Rows where the student's cross-entropy applies: all; plain (one-hot targets, no superposition);
    agree (the teacher's top-1 class is the target's largest class)."""
    if which == "all":
        return torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
    if which == "plain":
        return targets.max(dim=1).values > 1 - 1e-6
    if which == "agree":
        return teacher_logits.argmax(dim=1) == targets.argmax(dim=1)
    raise ValueError(f"ce rows must be all, plain or agree, got {which!r}")


def low_pass(x: torch.Tensor, d0: float) -> torch.Tensor:
    """Gaussian low-pass filter of images (..., H, W): each centred frequency at distance D from the
    centre of the 2-D spectrum is scaled by exp(-D^2 / (2 d0^2)); ``d0`` <= 0 returns ``x``."""
    if d0 <= 0:
        return x
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h, device=x.device)  # the same bins as fftshift's, uncentred
    fx = torch.fft.fftfreq(w, d=1.0 / w, device=x.device)
    dist2 = fy[:, None] ** 2 + fx[None, :] ** 2
    gain = torch.exp(-dist2 / (2 * d0 ** 2)).to(x.dtype)
    return torch.fft.ifft2(torch.fft.fft2(x.float()) * gain).real.to(x.dtype)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 20.0,
            reduction: str = "mean") -> torch.Tensor:
    """tau^2 * KL(softmax(T/tau) || softmax(Q/tau)).

    reduction "mean" averages over batch x classes (the reference code, C times smaller
    than the per-sample KL); "batchmean" is the per-sample KL.
    """
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"reduction must be mean or batchmean, got {reduction!r}")
    log_q = F.log_softmax(student_logits / tau, dim=1)
    log_p = F.log_softmax(teacher_logits / tau, dim=1)
    pointwise = log_p.exp() * (log_p - log_q)  # (B, C)
    kl = pointwise.mean() if reduction == "mean" else pointwise.sum() / pointwise.shape[0]
    return kl * tau ** 2


def bn_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of a BN layer's input over (N, H, W), each (C,), in fp32 (under bf16
    autocast too). Two-pass (the mean, then the mean squared deviation) with a one-pass backward: on the
    CPU about 4x faster, forward and backward, than ``torch.var_mean``, whose results it gives to float
    rounding."""
    return _BNMoments.apply(x.float())


class _BNMoments(torch.autograd.Function):
    """(mean, var) over all but the channel dimension; d/dx = (g_mean + 2 g_var (x - mean)) / n, one
    fused multiply-add (the centring term's gradient vanishes: the deviations sum to zero)."""

    @staticmethod
    def forward(ctx, x):
        c = x.shape[1]
        if x.is_contiguous(memory_format=torch.channels_last):  # (N*H*W, C) without a copy
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)
            mean = rows.mean(0)
            var = (rows - mean).square_().mean(0)
        else:
            mean = x.mean((0, 2, 3))
            var = (x - mean.view(1, c, 1, 1)).square_().mean((0, 2, 3))
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]  # (autograd gives an unused output's gradient as zeros, never None)
        a = g_var * (2.0 / n)
        b = g_mean / n - a * mean
        shape = (1, -1, 1, 1)
        return torch.addcmul(b.view(shape), x, a.view(shape))


def slack_gap(value: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mean of max(|value - target| - margin, 0)^2: a squared error that ignores gaps within the margin."""
    return F.relu((value - target).abs() - margin).square().mean()


def generator_ce(logits: torch.Tensor, targets: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """The generator's soft cross-entropy; ``margin`` > 0 (after IntraQ's soft inception loss): each row's
    KL(t || softmax(logits)) counts only above ``margin``, so a sample that the teacher already gives its
    target (a confidence of about exp(-margin) for a one-hot one) is not pushed further to the class centre."""
    if margin <= 0:
        return soft_cross_entropy(logits, targets)
    entropy = -(targets * targets.clamp_min(1e-12).log()).sum(dim=1)
    return F.relu(soft_cross_entropy_rows(logits, targets) - entropy - margin).mean()


def mode_seeking(first: torch.Tensor, second: torch.Tensor, z_first: torch.Tensor, z_second: torch.Tensor,
                 eps: float = 1e-5, all_sum=None) -> torch.Tensor:
    """MSGAN's mode-seeking term: 1 / (mean |G(z1) - G(z2)| / mean |z1 - z2| + eps), for two halves of a
    batch with the same conditions and different noise; small when different noise gives different outputs.
    ``all_sum`` (a run over several processes, ``distributed.World.all_sum``, each holding some of the pairs):
    the means are over the pairs of every process."""
    if all_sum is None:
        ratio = (first - second).abs().mean() / (z_first - z_second).abs().mean()
    else:
        d, dz = (first - second).abs(), (z_first - z_second).abs()
        sums = all_sum(torch.stack([d.sum(), dz.sum().to(d.dtype), d.new_tensor(d.numel()), d.new_tensor(dz.numel())]))
        ratio = (sums[0] / sums[2]) / (sums[1] / sums[3])
    return 1.0 / (ratio + eps)


def layout(images: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """Each image's layout: its means over a ``grid`` x ``grid`` grid of blocks, per channel, flattened to
    (N, C * grid * grid). Two images with the same layout have their light, dark and coloured parts in the
    same places, whatever their detail (``ms_space=layout``)."""
    return F.adaptive_avg_pool2d(images, grid).flatten(1)


def class_mode_seeking(out: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor,
                       eps: float = 1e-5) -> torch.Tensor:
    """The mode-seeking term over every pair of one batch's samples with the same labels (in every slot),
    with no pairs built for it: 1 / (mean |G(z_i) - G(z_j)| / mean |z_i - z_j| + eps), the means over those
    pairs and their elements. For plain samples (one class each) a pair has the same condition and
    different noise, as in ``mode_seeking``; the batch keeps one condition per sample. 0 (with a zero
    gradient) when no two samples share their labels. Lists the pairs on the host (one sync per batch)."""
    labels = labels.reshape(labels.shape[0], -1)
    i, j = torch.triu_indices(len(labels), len(labels), 1, device=labels.device)
    same = (labels[i] == labels[j]).all(-1)
    i, j = i[same], j[same]
    if len(i) == 0:
        return out.sum() * 0.0
    return mode_seeking(out[i], out[j], noise[i], noise[j], eps)


class BNStatisticsLoss:
    """L_BNS through forward hooks on every BatchNorm2d of the teacher.

    While ``active``, each BN layer adds MSE(mu_B, running_mean) + MSE(var_B, running_var)
    of its input; ``pop()`` returns the average over layers and clears the record.
    ``slack`` > 0 (DSG's slack alignment): only the part of a gap beyond a margin counts, the margin
    being ``slack`` running standard deviations for a mean and ``slack`` running variances for a
    variance, so a batch may vary around the statistics instead of meeting them exactly.
    ``moments(x, layer)`` computes a layer's batch (mean, var); by default ``bn_statistics`` of the batch at
    hand (a run over several processes passes the global batch's, ``distributed.World.moments``).
    """

    def __init__(self, model: nn.Module, slack: float = 0.0, moments=None):
        self.active, self.slack = False, float(slack)
        self._moments = moments or (lambda x, layer: bn_statistics(x))
        self._terms: list[torch.Tensor] = []
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm2d layer: Qimera needs its running statistics")
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.BatchNorm2d, args) -> None:
        if self.active:
            mean, var = self._moments(args[0], module)
            if self.slack > 0:
                self._terms.append(slack_gap(mean, module.running_mean, self.slack * module.running_var.sqrt())
                                   + slack_gap(var, module.running_var, self.slack * module.running_var))
            else:
                self._terms.append(F.mse_loss(mean, module.running_mean) + F.mse_loss(var, module.running_var))

    def __enter__(self) -> "BNStatisticsLoss":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def pop(self) -> torch.Tensor:
        if not self._terms:
            raise RuntimeError("no BatchNorm statistics were recorded; run the teacher while active")
        loss = torch.stack(self._terms).mean()
        self._terms = []
        return loss

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``model`` on ``x``: (logits, L_BNS). Convenient outside the training loop."""
    hooks = BNStatisticsLoss(model)
    hooks.active = True
    try:
        logits = model(x)
        return logits, hooks.pop()
    finally:
        hooks.remove()
