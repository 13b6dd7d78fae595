"""Pure tensor functions of the quantizer (METHOD.md section 2): the one arithmetic that training,
reconstruction and export all use.

Uniform asymmetric ("affine") quantization with b bits over a range [lo, hi] (the paper's):

    scale = max(hi - lo, 1e-8) / (2^b - 1)
    zero_point = -round(lo / scale) - 2^(b-1)
    q = clamp(round(x / scale + zero_point), -2^(b-1), 2^(b-1) - 1)
    x_hat = (q - zero_point) * scale

which is METHOD.md's form with s = 1 / scale, written the way
``torch.fake_quantize_per_channel_affine`` writes it so the two can be compared exactly.

Symmetric quantization (``symmetric=True``; the deployable scheme's weights, as integer kernels want them):
zero point 0 and the restricted code range [-(2^(b-1) - 1), 2^(b-1) - 1], so a code's sign can flip
(BatchNorm folding by a negative factor) without leaving the range:

    scale = max(max(|lo|, |hi|), 1e-8) / (2^(b-1) - 1)

Gradients pass straight through the rounding and the clamp (straight-through estimator).
"""
from __future__ import annotations

import torch

FULL_PRECISION = 32


def code_range(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """The integer codes of ``bits``: [-2^(b-1), 2^(b-1) - 1], symmetric [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    top = 2 ** (bits - 1) - 1
    return (-top if symmetric else -top - 1), top


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, float) zero point for a range; broadcasts over channels."""
    levels = 2**bits - 1
    scale = torch.clamp(hi - lo, min=1e-8) / levels
    zero_point = -torch.round(lo / scale) - 2 ** (bits - 1)
    return scale, zero_point


def symmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (0) of the symmetric quantizer covering [lo, hi]; broadcasts over channels."""
    scale = torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=1e-8) / (2 ** (bits - 1) - 1)
    return scale, torch.zeros_like(scale)


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False):
    """``symmetric_qparams`` or ``affine_qparams``."""
    return (symmetric_qparams if symmetric else affine_qparams)(lo, hi, bits)


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                    symmetric: bool = False) -> torch.Tensor:
    """The integer codes q of ``x`` (as floats), in ``code_range(bits, symmetric)``."""
    qmin, qmax = code_range(bits, symmetric)
    # one new tensor, then in-place passes: the same arithmetic as torch's fake-quantize kernels
    y = x * (1.0 / scale)
    return y.add_(zero_point).round_().clamp_(qmin, qmax)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """(q - zero_point) * scale, in place on a float ``q``; with the codes of ``quantize_affine``
    this is bit for bit what fake quantization gives."""
    return q.sub_(zero_point).mul_(scale)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   symmetric: bool = False) -> torch.Tensor:
    return dequantize_affine(quantize_affine(x, scale, zero_point, bits, symmetric), scale, zero_point)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization whose backward is the identity (the reference code's STE)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, symmetric):  # noqa: D401 - autograd signature
        return _fake_quantize(x, scale, zero_point, bits, symmetric)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  symmetric: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` to ``bits`` over [lo, hi] (broadcast), straight-through gradient."""
    if bits >= FULL_PRECISION:
        return x
    scale, zero_point = qparams(lo.to(x.dtype), hi.to(x.dtype), bits, symmetric)
    return _FakeQuantizeSTE.apply(x, scale, zero_point, bits, symmetric)


def fake_quantize_learned(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """``fake_quantize`` with gradients for the range too (``act_learn``): the same values, but the
    backward pass is that of clamp(x, lo, hi) quantized with a straight-through rounding (PACT/LSQ+):
    gradients reach ``x`` inside the range only, and ``lo``/``hi`` from the clipped values and the step."""
    if bits >= FULL_PRECISION:
        return x
    exact = fake_quantize(x, lo.detach(), hi.detach(), bits)
    scale = torch.clamp(hi - lo, min=1e-8) / (2**bits - 1)
    code = (torch.clamp(x, lo, hi) - lo) / scale
    surrogate = (code + (torch.round(code) - code).detach()) * scale + lo
    return surrogate + (exact - surrogate).detach()


def per_channel_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each output channel (dim 0), shaped to broadcast against ``w``."""
    lo, hi = torch.aminmax(w.detach().reshape(w.shape[0], -1), dim=1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return lo.reshape(shape), hi.reshape(shape)


def weight_range(w: torch.Tensor, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-output-channel range a weight is quantized over: its current min/max, times ``clip``
    (a per-channel ratio in (0, 1], broadcast against ``w``) when given."""
    lo, hi = per_channel_range(w)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    return lo, hi


def weight_qparams(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None,
                   symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scale and zero point of a weight over ``weight_range(w, clip)`` (broadcast
    against ``w``): what its forward pass, the rounding reconstruction and the exports all quantize with."""
    lo, hi = weight_range(w, clip)
    return qparams(lo, hi, bits, symmetric)


def fake_quantize_weight(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None,
                         symmetric: bool = False) -> torch.Tensor:
    """Per-output-channel fake quantization (affine, or ``symmetric``) over ``weight_range(w, clip)``."""
    if bits >= FULL_PRECISION:
        return w
    lo, hi = weight_range(w, clip)
    return fake_quantize(w, lo, hi, bits, symmetric)


# Clipping ratios searched by the MSE-optimal range searches: 0.5 .. 1.0 for weights (a 4-bit
# channel rarely gains from clipping more than half of its range), 0.2 .. 1.0 for activations.
WEIGHT_CLIP_GRID = tuple(0.5 + 0.01 * i for i in range(51))
ACT_CLIP_GRID = tuple(0.2 + 0.02 * i for i in range(41))


@torch.no_grad()
def mse_weight_clip(w: torch.Tensor, bits: int, grid=WEIGHT_CLIP_GRID, symmetric: bool = False) -> torch.Tensor:
    """Per output channel, the ratio r of the grid whose range [r*min, r*max] gives the smallest
    squared quantization error of that channel; shaped to broadcast against ``w``. Ties keep the
    largest range (the grid is searched from 1.0 down)."""
    lo, hi = per_channel_range(w)
    best = torch.full_like(lo, float("inf"))
    ratio = torch.ones_like(lo)
    for r in sorted(grid, reverse=True):
        err = (fake_quantize(w, lo * r, hi * r, bits, symmetric) - w).pow(2).flatten(1).sum(1).view_as(lo)
        better = err < best
        best = torch.where(better, err, best)
        ratio = torch.where(better, torch.full_like(ratio, r), ratio)
    return ratio


@torch.no_grad()
def mse_act_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  grid=ACT_CLIP_GRID) -> torch.Tensor:
    """The upper end of a per-tensor range: the lo + r*(hi - lo) of the grid with the smallest mean
    squared quantization error over the sample ``x`` (ties keep the largest range)."""
    best, best_hi = float("inf"), hi
    for r in sorted(grid, reverse=True):
        h = lo + (hi - lo) * r
        err = float((fake_quantize(x, lo, h, bits) - x).pow(2).mean())
        if err < best:
            best, best_hi = err, h
    return best_hi
