"""Fake-quantized modules: weights of Conv2d/Linear and activations at every call site."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import FULL_PRECISION, fake_quantize, fake_quantize_weight


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not (2 <= bits <= 8 or bits == FULL_PRECISION):
        raise ValueError(f"bit width must be 2..8 or {FULL_PRECISION} (full precision), got {bits}")
    return bits


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weight is fake-quantized per output channel at every forward.

    ``prequantized``: the weight already holds its dequantized codes (a student loaded from an
    integer export), so it is used as it is, bit for bit what fake quantization gave."""

    def __init__(self, *args, wbits: int = FULL_PRECISION, **kwargs):
        super().__init__(*args, **kwargs)
        self.wbits = _check_bits(wbits)
        self.prequantized = False

    @classmethod
    def from_float(cls, conv: nn.Conv2d, wbits: int) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, wbits=wbits,
                device=conv.weight.device, dtype=conv.weight.dtype)
        q.load_state_dict(conv.state_dict())
        return q

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.load_state_dict(self.state_dict())
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.prequantized else fake_quantize_weight(self.weight, self.wbits)
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", wbits={self.wbits}"


class QuantLinear(nn.Linear):
    """Linear whose weight is fake-quantized per output row at every forward (``prequantized``:
    see QuantConv2d)."""

    def __init__(self, *args, wbits: int = FULL_PRECISION, **kwargs):
        super().__init__(*args, **kwargs)
        self.wbits = _check_bits(wbits)
        self.prequantized = False

    @classmethod
    def from_float(cls, lin: nn.Linear, wbits: int) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, wbits=wbits,
                device=lin.weight.device, dtype=lin.weight.dtype)
        q.load_state_dict(lin.state_dict())
        return q

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.load_state_dict(self.state_dict())
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.prequantized else fake_quantize_weight(self.weight, self.wbits)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", wbits={self.wbits}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a range tracked by a bias-corrected EMA.

    While ``calibrating`` is set, each forward folds the batch min/max into
    m_t = beta * m_{t-1} + (1 - beta) * x_t and uses m_t / (1 - beta^t) as the range
    (METHOD.md section 2, without the reference code's double correction). Otherwise
    the range is frozen. No host-device synchronisation happens here.
    """

    def __init__(self, bits: int = FULL_PRECISION, beta: float = 0.9):
        super().__init__()
        self.bits = _check_bits(bits)
        self.beta = float(beta)
        self.calibrating = False
        self.register_buffer("ema_lo", torch.zeros(()))
        self.register_buffer("ema_hi", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bias-corrected range (lo, hi); (0, 0) before any calibration batch."""
        correction = 1.0 - self.beta ** self.steps.clamp(min=1).to(self.ema_lo.dtype)
        return self.ema_lo / correction, self.ema_hi / correction

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        self.ema_lo.mul_(self.beta).add_(lo.to(self.ema_lo.dtype), alpha=1 - self.beta)
        self.ema_hi.mul_(self.beta).add_(hi.to(self.ema_hi.dtype), alpha=1 - self.beta)
        self.steps.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return x
        if self.calibrating:
            self.observe(x)
        lo, hi = self.range()
        return fake_quantize(x, lo, hi, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, beta={self.beta}"


class QuantAct(nn.Module):
    """Wraps an activation module (ReLU, ReLU6, ...) and quantizes its output.

    A module that a network calls at several places (torchvision's BasicBlock calls one
    ``relu`` twice) gets one quantizer per call site: the n-th call in a forward pass
    uses ``quantizers[n]``. The root model resets the counters before each forward.
    """

    def __init__(self, act: nn.Module, abits: int, call_sites: int = 1, beta: float = 0.9):
        super().__init__()
        self.act = act
        self.quantizers = nn.ModuleList(ActQuantizer(abits, beta) for _ in range(max(1, call_sites)))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls >= len(self.quantizers):
            raise RuntimeError(
                f"activation module called {self.calls + 1} times in one forward pass but converted "
                f"with {len(self.quantizers)} call site(s)")
        quantizer = self.quantizers[self.calls]
        self.calls += 1
        return quantizer(self.act(x))
