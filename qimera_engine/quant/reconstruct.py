"""Block-wise reconstruction of the weight rounding on generated images (``recon_iters``; not in Qimera).

AdaRound (Nagel et al. 2020) at BRECQ's granularity (Li et al. 2021), as Genie (CVPR 2023) runs it on
synthetic images; optionally with QDrop's randomly dropped input quantization (Wei et al. 2022). Unit by unit in
forward order (a residual block, or a weight layer outside any block), the rounding direction of each
quantized weight is learned so that the student's unit, fed the student's own (quantized) input,
reproduces the teacher's unit output on the same images:

    w_hat = scale * (clamp(floor(w / scale) + h(V) + zp, qmin, qmax) - zp)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
    loss = mean_over_images ||unit_q(x) - unit_fp(x_fp)||^2 + lam * sum(1 - |2 h(V) - 1|^beta)

with beta falling linearly from 20 to 2 after a warm-up (20% of the iterations, no rounding term). Scales,
zero points and BatchNorm stay as they are; only the roundings move (each weight to one of its two
neighbouring grid points). With ``act_lr`` > 0 the upper ends of the activation ranges inside each unit
are learned with them (Adam at that rate, the straight-through gradient of ``act_learn``), as BRECQ and
Genie learn activation step sizes; otherwise the ranges stay too. The learned hard roundings are then
written into the weights as grid values, so the ordinary fake quantizer gives them from then on: no new
state to save or export.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..losses import BNStatisticsLoss, generator_ce
from .convert import act_quantizers, weight_layers
from .functional import FULL_PRECISION, code_range
from .modules import QuantAct, QuantConv2d, QuantLinear

ZETA, GAMMA = 1.1, -0.1     # AdaRound's stretch of the rectified sigmoid
WARMUP = 0.2                # share of the iterations without the rounding term
BETA = (20.0, 2.0)          # the rounding term's exponent, annealed over the rest
LAMBDA = 0.01               # its weight


def units(student: nn.Module) -> list[str]:
    """The reconstruction units' names: each child of an ``nn.Sequential`` holding two or more weight
    layers (a residual block), and every weight layer outside such a block. Sorted into forward order
    by ``_forward_order`` (this list is in module order)."""
    names, taken = [], []
    for name, m in student.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        parent = student.get_submodule(name.rpartition(".")[0]) if "." in name else None
        if isinstance(parent, nn.Sequential) and len(list(weight_layers(m))) >= 2:
            names.append(name)
            taken.append(name)
        elif isinstance(m, (QuantConv2d, QuantLinear)):
            names.append(name)
    return names


def _forward_order(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(model: nn.Module, name: str, images: torch.Tensor, batch: int, output: bool):
    """The input (and with ``output`` the output) of ``model``'s module ``name`` on ``images``; the
    forward pass stops at that module."""
    unit, ins, outs = model.get_submodule(name), [], []

    def pre(m, args):
        ins.append(args[0].detach())
        if not output:
            raise _Stop

    def post(m, args, out):
        outs.append(out.detach())
        raise _Stop

    handles = [unit.register_forward_pre_hook(pre)] + ([unit.register_forward_hook(post)] if output else [])
    try:
        for i in range(0, len(images), batch):
            try:
                model(images[i:i + batch])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(ins), (torch.cat(outs) if output else None)


class _Rounding:
    """One weight layer's learnable rounding (AdaRound's V), fixed scale and zero point."""

    def __init__(self, layer: QuantConv2d | QuantLinear):
        self.layer = layer
        w = layer.weight.detach()
        self.scale, self.zp = layer.weight_qparams()  # the layer's own quantizer: affine or symmetric
        self.qmin, self.qmax = code_range(layer.wbits, layer.symmetric)
        self.floor = torch.floor(w / self.scale)
        rest = (w / self.scale - self.floor).clamp(0.01, 0.99)  # h(V) = rest at the start
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def weight(self, hard: bool = False) -> torch.Tensor:
        up = (self.v >= 0).to(self.floor.dtype) if hard else self.h()
        return (torch.clamp(self.floor + up + self.zp, self.qmin, self.qmax) - self.zp) * self.scale

    def rounding_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def __enter__(self):
        self.layer.quantized_weight = self.weight  # the instance attribute shadows the method
        return self

    def __exit__(self, *exc):
        del self.layer.quantized_weight

    @torch.no_grad()
    def write_back(self) -> int:
        """Put the hard roundings into the weights as grid values, keeping each channel's minimum and
        maximum weight where they are (they set the range, affine or symmetric, so scale and zero point
        stay); returns how
        many weights round the other way than to nearest."""
        w = self.layer.weight
        flat = w.reshape(w.shape[0], -1)
        new = self.weight(hard=True).reshape_as(flat)
        nearest = self.layer.quantized_weight()  # the ordinary quantizer's rounding (``__exit__`` has run)
        flipped = int((new != nearest.reshape_as(flat)).sum())
        lo, hi = flat.min(1, keepdim=True), flat.max(1, keepdim=True)
        new = torch.minimum(torch.maximum(new, lo.values), hi.values)
        rows = torch.arange(flat.shape[0], device=w.device)
        new[rows, lo.indices[:, 0]] = lo.values[:, 0]
        new[rows, hi.indices[:, 0]] = hi.values[:, 0]
        w.copy_(new.reshape_as(w))
        return flipped


def _reset_sites(unit: nn.Module) -> None:
    for m in unit.modules():
        if isinstance(m, QuantAct):
            m.calls = 0


def reconstruct(student: nn.Module, teacher: nn.Module, images: torch.Tensor, iters: int, *,
                batch_size: int = 32, drop: float = 0.0, lr: float = 1e-3, act_lr: float = 0.0,
                seed: int = 0) -> dict[str, int]:
    """Learn the student's weight roundings unit by unit (see the module docstring) on ``images``, with
    ``iters`` Adam steps of ``batch_size`` images per unit; ``drop`` > 0 is the probability that an
    input element of a unit is the teacher's instead of the student's (QDrop); ``act_lr`` > 0 learns
    the unit's activation ranges as well, at that rate. The student's module
    names must be the teacher's (``quantize_model`` keeps them). Returns, per unit, how many weights
    now round the other way than to nearest."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    flipped: dict[str, int] = {}
    try:
        for name in _forward_order(student, units(student), images[:1]):
            unit = student.get_submodule(name)
            layers = [m for m in weight_layers(unit) if m.wbits < FULL_PRECISION and not m.prequantized]
            if not layers:
                continue
            x_q, _ = _capture(student, name, images, 256, output=False)
            x_fp, y_fp = _capture(teacher, name, images, 256, output=True)
            roundings = [_Rounding(m) for m in layers]
            quantizers = [q for q in act_quantizers(unit) if q.bits < FULL_PRECISION] if act_lr > 0 else []
            ranges = [p for q in quantizers for p in q.make_learnable()]
            try:
                _fit_unit(unit, roundings, x_q, x_fp if drop > 0 else None, y_fp, iters, batch_size, drop, lr, gen,
                          ranges, act_lr)
            finally:
                for q in quantizers:
                    q.make_fixed()
            del x_q, x_fp, y_fp
            flipped[name] = sum(r.write_back() for r in roundings)
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    return flipped


def refine_images(teacher: nn.Module, images: torch.Tensor, steps: int, *, lr: float = 0.05,
                  batch_size: int = 64, bns_weight: float = 1.0, margin: float = 0.0) -> torch.Tensor:
    """Distil generated images further before they decide the roundings (as Genie and ZeroQ distil theirs):
    ``steps`` Adam steps (rate ``lr``) on the pixels of each batch of ``batch_size`` images, on
    ``bns_weight`` * the teacher's BN-statistics loss of the batch plus the cross-entropy to the class the
    teacher gave each image at the start (counted above ``margin``, as the generator's is). So each batch
    meets the teacher's running statistics more closely while every image keeps its class. Returns new
    images; the teacher and ``images`` are unchanged; ``steps`` = 0 returns ``images`` itself."""
    if steps <= 0:
        return images
    mode, needs = teacher.training, [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    out = []
    try:
        with BNStatisticsLoss(teacher) as bns:
            for chunk in images.split(batch_size):
                with torch.no_grad():
                    logits = teacher(chunk)
                targets = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).float()
                x = chunk.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                for _ in range(steps):
                    bns.active = True
                    try:
                        logits = teacher(x)
                    finally:
                        bns.active = False
                    loss = bns_weight * bns.pop() + generator_ce(logits.float(), targets, margin)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                out.append(x.detach())
    finally:
        teacher.train(mode)
        for p, g in zip(teacher.parameters(), needs):
            p.requires_grad_(g)
    return torch.cat(out)


def _fit_unit(unit: nn.Module, roundings: list[_Rounding], x_q: torch.Tensor, x_fp: torch.Tensor | None,
              y_fp: torch.Tensor, iters: int, batch_size: int, drop: float, lr: float,
              gen: torch.Generator, ranges: list[nn.Parameter] = (), act_lr: float = 0.0) -> None:
    """Adam on the roundings' V (and the activation ranges ``ranges``, at ``act_lr``) alone: the unit's
    other parameters are frozen for the while."""
    groups = [{"params": [r.v for r in roundings], "lr": lr}]
    if ranges:
        groups.append({"params": list(ranges), "lr": act_lr})
    opt = torch.optim.Adam(groups)
    params = [p for p in unit.parameters() if all(p is not r for r in ranges)]
    grads = [p.requires_grad for p in params]
    warm = int(WARMUP * iters)
    try:
        for p in params:
            p.requires_grad_(False)
        for p in ranges:
            p.requires_grad_(True)
        for r in roundings:
            r.__enter__()
        for it in range(iters):
            idx = torch.randint(len(x_q), (batch_size,), generator=gen).to(x_q.device)
            x = x_q[idx]
            if x_fp is not None:
                keep = torch.rand(x.shape, generator=gen).to(x.device) < drop
                x = torch.where(keep, x_fp[idx], x)
            _reset_sites(unit)
            loss = (unit(x) - y_fp[idx]).pow(2).flatten(1).sum(1).mean()
            if it >= warm:
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (it - warm) / max(1, iters - warm))
                loss = loss + LAMBDA * sum(r.rounding_loss(beta) for r in roundings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for r in roundings:
            r.__exit__()
        for p, g in zip(params, grads):
            p.requires_grad_(g)
        _reset_sites(unit)
