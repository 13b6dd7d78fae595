"""Fake-quantized modules: weights of Conv2d/Linear and activations at every call site."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import (FULL_PRECISION, affine_qparams, fake_quantize, fake_quantize_learned, fake_quantize_weight,
                         mse_act_range, mse_weight_clip, weight_qparams)


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not (2 <= bits <= 8 or bits == FULL_PRECISION):
        raise ValueError(f"bit width must be 2..8 or {FULL_PRECISION} (full precision), got {bits}")
    return bits


class _WeightClip:
    """A quantized weight layer's quantizer: per output channel, affine (the paper) or ``symmetric``
    (zero point 0, the deployable scheme), with optional clipping of the range (``weight_clip="mse"``);
    and the optional quantizers of its input and output that the deployable scheme adds where an integer
    runtime needs them (``quantize_model``).

    Without clipping (the paper) a channel's range is its current min/max. ``enable_clip`` adds a
    ``clip`` buffer of ratios (saved with the weights); ``fit_clip`` sets each to the MSE-optimal
    ratio for the current weights, and the range becomes ``clip`` x (min, max) from then on.
    """

    clip: torch.Tensor | None
    symmetric: bool
    input_quantizer: "ActQuantizer | None"
    output_quantizer: "ActQuantizer | None"

    def _init_quantizers(self, wbits: int, symmetric: bool) -> None:
        self.wbits = _check_bits(wbits)
        self.symmetric = bool(symmetric)
        self.prequantized = False
        self.register_buffer("clip", None)  # a tensor only with weight clipping (not in the state dict before)
        self.register_module("input_quantizer", None)
        self.register_module("output_quantizer", None)
        # deployable scheme (set by quantize_model): the quantizer whose codes this layer reads when it has no
        # input quantizer (a list: a reference, not a child), and the BatchNorm that folds into it
        self.input_source: list[ActQuantizer] = []
        self.bias_in_batchnorm = False

    def input_scale(self) -> torch.Tensor | None:
        """The scale of the codes this layer reads (the deployable scheme), or None."""
        src = self.input_quantizer if self.input_quantizer is not None else next(iter(self.input_source), None)
        if src is None or src.bits >= FULL_PRECISION:
            return None
        lo, hi = src.range()
        return affine_qparams(lo, hi, src.bits)[0]

    def bias_correction(self, bias: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor | None:
        """How far an integer kernel moves a per-channel ``bias`` (the deployable scheme): it adds the bias as
        int32 codes in units of input scale x weight scale (x |factor|, a BatchNorm folded in), so the bias is
        rounded to that grid. Detached (a constant to the gradient); None where nothing is rounded."""
        sx = self.input_scale()
        if sx is None or not self.symmetric or self.wbits >= FULL_PRECISION:
            return None
        unit = sx.detach() * self.weight_qparams()[0].flatten()
        if factor is not None:
            unit = unit * factor.detach().abs()
        b = bias.detach()
        return torch.where(unit > 0, torch.round(b / unit.clamp(min=1e-30)) * unit - b, torch.zeros_like(b))

    def enable_clip(self) -> None:
        if self.clip is None:
            shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
            self.clip = torch.ones(shape, device=self.weight.device, dtype=self.weight.dtype)

    def fit_clip(self) -> None:
        self.enable_clip()
        if self.wbits < FULL_PRECISION:
            self.clip.copy_(mse_weight_clip(self.weight.detach(), self.wbits, symmetric=self.symmetric))

    def float_state(self) -> dict[str, torch.Tensor]:
        """The state a plain Conv2d/Linear loads (without the clipping ratios and the deployable scheme's
        input and output quantizers)."""
        return {k: v for k, v in self.state_dict().items()
                if k != "clip" and not k.startswith(("input_quantizer.", "output_quantizer."))}

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel scale and zero point the forward pass quantizes the weight with."""
        return weight_qparams(self.weight.detach(), self.wbits, self.clip, self.symmetric)

    def quantized_weight(self) -> torch.Tensor:
        if self.prequantized:
            return self.weight
        return fake_quantize_weight(self.weight, self.wbits, self.clip, self.symmetric)

    def _quantized_call(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = op(x, self.quantized_weight())
        if self.bias is not None and not self.bias_in_batchnorm and not self.training:
            shift = self.bias_correction(self.bias)
            if shift is not None:
                y = y + shift.view((1, -1) + (1,) * (y.dim() - 2))
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantConv2d(_WeightClip, nn.Conv2d):
    """Conv2d whose weight is fake-quantized per output channel at every forward.

    ``prequantized``: the weight already holds its dequantized codes (a student loaded from an
    integer export), so it is used as it is, bit for bit what fake quantization gave."""

    def __init__(self, *args, wbits: int = FULL_PRECISION, symmetric: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(wbits, symmetric)

    # from_float / to_float build on the meta device, then load the weights: no initial values are drawn
    # from torch's global generator, which another thread may be drawing a seeded init from (seeding.py)
    @classmethod
    def from_float(cls, conv: nn.Conv2d, wbits: int, symmetric: bool = False) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, wbits=wbits,
                symmetric=symmetric, device="meta", dtype=conv.weight.dtype).to_empty(device=conv.weight.device)
        q.load_state_dict(conv.state_dict())
        return q

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device="meta", dtype=self.weight.dtype).to_empty(device=self.weight.device)
        conv.load_state_dict(self.float_state())
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantized_call(x, lambda x, w: self._conv_forward(x, w, self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", wbits={self.wbits}" + (", symmetric" if self.symmetric else "")


class QuantLinear(_WeightClip, nn.Linear):
    """Linear whose weight is fake-quantized per output row at every forward (``prequantized``:
    see QuantConv2d)."""

    def __init__(self, *args, wbits: int = FULL_PRECISION, symmetric: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quantizers(wbits, symmetric)

    @classmethod
    def from_float(cls, lin: nn.Linear, wbits: int, symmetric: bool = False) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, wbits=wbits, symmetric=symmetric,
                device="meta", dtype=lin.weight.dtype).to_empty(device=lin.weight.device)
        q.load_state_dict(lin.state_dict())
        return q

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device="meta", dtype=self.weight.dtype).to_empty(device=self.weight.device)
        lin.load_state_dict(self.float_state())
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantized_call(x, lambda x, w: F.linear(x, w, self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", wbits={self.wbits}" + (", symmetric" if self.symmetric else "")


class QuantBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with an optional quantizer of its output: where the deployable scheme quantizes a
    convolution's output that no activation quantizer follows (into a residual add). The state dict keeps
    BatchNorm2d's names, with the quantizer's under ``output_quantizer``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_module("output_quantizer", None)
        self.folded_into: list = []  # the quantized layer it folds into at export (a reference, not a child)

    @classmethod
    def from_float(cls, bn: nn.BatchNorm2d) -> "QuantBatchNorm2d":
        q = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                device="meta", dtype=bn.weight.dtype if bn.weight is not None else None)
        q = q.to_empty(device=bn.running_mean.device if bn.running_mean is not None else "cpu")
        q.load_state_dict(bn.state_dict())
        q.train(bn.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.folded_into and not self.training:  # eval mode: the running statistics fold into the layer
            shift = self.folded_into[0].bias_correction(*self.folded_bias())
            if shift is not None:
                y = y + shift.view(1, -1, 1, 1)
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def folded_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias, factor a) of the layer with this BatchNorm folded in: a = gamma / sigma, bias
        beta - a * mu + a * b (b: the layer's own bias)."""
        a = self.running_var.add(self.eps).rsqrt()
        if self.weight is not None:
            a = a * self.weight
        bias = -a * self.running_mean + (self.bias if self.bias is not None else 0)
        layer = self.folded_into[0]
        if layer.bias is not None:
            bias = bias + a * layer.bias
        return bias, a


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with a range tracked by a bias-corrected EMA.

    While ``calibrating`` is set, each forward folds the batch min/max into
    m_t = beta * m_{t-1} + (1 - beta) * x_t and uses m_t / (1 - beta^t) as the range
    (METHOD.md section 2, without the reference code's double correction). Otherwise
    the range is frozen. No host-device synchronisation happens here.
    """

    def __init__(self, bits: int = FULL_PRECISION, beta: float = 0.9, zero_in_range: bool = False):
        super().__init__()
        self.bits = _check_bits(bits)
        self.beta = float(beta)
        self.zero_in_range = bool(zero_in_range)  # the deployable scheme: 0 is always a code (zero padding)
        self.calibrating = False
        self.register_buffer("ema_lo", torch.zeros(()))
        self.register_buffer("ema_hi", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.samples: SampleRing | None = None  # kept by calibrating forwards while set
        self.range_reduce = None  # (lo, hi) -> (lo, hi) over all processes of a run (distributed.World.range)

    def make_learnable(self) -> list[nn.Parameter]:
        """Turn the upper end of the range (``ema_hi``) into a parameter that training moves
        (``act_learn``); the lower end stays (0 after a ReLU) and the state dict keeps its keys.
        Returns the new parameter (none at 32 bits)."""
        if self.bits >= FULL_PRECISION:
            return []
        if not isinstance(self.ema_hi, nn.Parameter):
            value = self.ema_hi.detach().clone()
            del self._buffers["ema_hi"]
            self.register_parameter("ema_hi", nn.Parameter(value))
        return [self.ema_hi]

    def make_fixed(self) -> None:
        """Undo ``make_learnable``: the upper end, where training left it, is a buffer again."""
        if isinstance(self.ema_hi, nn.Parameter):
            value = self.ema_hi.detach().clone()
            del self._parameters["ema_hi"]
            self.register_buffer("ema_hi", value)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bias-corrected range (lo, hi); (0, 0) before any calibration batch. With ``zero_in_range``
        it is widened to hold 0 (lo <= 0 <= hi), so 0 is exactly a code and an integer runtime's zero
        point lies within the codes."""
        correction = self._correction()
        lo, hi = self.ema_lo / correction, self.ema_hi / correction
        if self.zero_in_range:
            lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
        return lo, hi

    def _correction(self) -> torch.Tensor:
        """The EMA's bias correction 1 - beta^t (t >= 1)."""
        return 1.0 - self.beta ** self.steps.clamp(min=1).to(self.ema_lo.dtype)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        if self.range_reduce is not None:  # several processes: the global batch's min and max
            lo, hi = self.range_reduce(lo, hi)
        self.ema_lo.mul_(self.beta).add_(lo.to(self.ema_lo.dtype), alpha=1 - self.beta)
        self.ema_hi.mul_(self.beta).add_(hi.to(self.ema_hi.dtype), alpha=1 - self.beta)
        self.steps.add_(1)
        if self.samples is not None:
            self.samples.add(x.detach().float())

    SAMPLE = 16384  # activation values kept per calibration batch for the range search

    def start_sampling(self, batches: int) -> None:
        """Keep a sample of the activations of the next calibrating forwards (the last ``batches``)."""
        self.samples = SampleRing(max(1, int(batches)), self.SAMPLE)

    @torch.no_grad()
    def fit_range_mse(self) -> None:
        """Move the upper end of the calibrated range to the MSE-optimal clipping point for the
        sampled activations (``act_calib="mse"``), then stop sampling. The EMA keeps the result."""
        samples, self.samples = self.samples, None
        if not samples or self.bits >= FULL_PRECISION:
            return
        lo, hi = self.range()
        new_hi = mse_act_range(samples.values().to(lo.device), lo, hi, self.bits)
        self.ema_hi.copy_(new_hi * self._correction())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FULL_PRECISION:
            return x
        x = x.float()  # under bf16 autocast the quantizer still computes in fp32 (no-op for fp32 inputs)
        if self.calibrating:
            self.observe(x)
        lo, hi = self.range()
        if isinstance(self.ema_hi, nn.Parameter) and torch.is_grad_enabled() and not self.calibrating:
            return fake_quantize_learned(x, lo, hi, self.bits)
        return fake_quantize(x, lo.detach(), hi.detach(), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, beta={self.beta}" + (", zero_in_range" if self.zero_in_range else "")


def _spread_index(x: torch.Tensor, n: int) -> torch.Tensor:
    """The flat (logical, row-major) indices of about ``n`` values of ``x`` at a fixed stride coprime to
    2, 3, 5 and 7, so the sample does not fall on the same rows or columns of every image (no random
    numbers drawn)."""
    stride = max(1, x.numel() // n)
    while stride > 1 and math.gcd(stride, 210) != 1:
        stride += 1
    return torch.arange(0, x.numel(), stride, device=x.device)[:n]


def _spread_sample(x: torch.Tensor, n: int) -> torch.Tensor:
    """The values at ``_spread_index``. ``torch.take`` reads them in logical order without first
    flattening ``x`` (a copy of the whole tensor when it is channels-last)."""
    return torch.take(x, _spread_index(x, n))


class SampleRing:
    """The samples of the last ``size`` batches (``_spread_sample``), in one buffer allocated at the first
    batch. A new small tensor per quantizer and batch, kept while each batch's large temporaries come and
    go, fragmented the heap: a calibration epoch's peak memory grew by hundreds of MB for a 46 MB sample
    (docs/benchmarks.md)."""

    def __init__(self, size: int, n: int):
        self.size, self.n = int(size), int(n)
        self.buffer: torch.Tensor | None = None
        self.lengths: list[int] = []  # of the slots, in the order they were filled
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        idx = _spread_index(x, self.n)
        if self.buffer is None or self.buffer.device != x.device:
            self.buffer, self.lengths, self.count = torch.empty(self.size, self.n, device=x.device), [], 0
        slot = self.count % self.size
        torch.take(x, idx, out=self.buffer[slot, :idx.numel()])
        if slot < len(self.lengths):
            self.lengths[slot] = idx.numel()
        else:
            self.lengths.append(idx.numel())
        self.count += 1

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[torch.Tensor]:
        """The kept batches' samples, oldest first."""
        kept = len(self.lengths)
        first = self.count % kept  # 0 until the ring has wrapped round
        return [self.buffer[i % kept, :self.lengths[i % kept]] for i in range(first, first + kept)]

    def values(self) -> torch.Tensor:
        """All kept values, oldest batch first (one tensor)."""
        return torch.cat(self.batches())


class QuantAct(nn.Module):
    """Wraps an activation module (ReLU, ReLU6, ...) and quantizes its output.

    A module that a network calls at several places (torchvision's BasicBlock calls one
    ``relu`` twice) gets one quantizer per call site: the n-th call in a forward pass
    uses ``quantizers[n]``. The root model resets the counters before each forward.
    """

    def __init__(self, act: nn.Module, abits: int, call_sites: int = 1, beta: float = 0.9, zero_in_range: bool = False):
        super().__init__()
        self.act = act
        self.quantizers = nn.ModuleList(ActQuantizer(abits, beta, zero_in_range) for _ in range(max(1, call_sites)))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls >= len(self.quantizers):
            raise RuntimeError(
                f"activation module called {self.calls + 1} times in one forward pass but converted "
                f"with {len(self.quantizers)} call site(s)")
        quantizer = self.quantizers[self.calls]
        self.calls += 1
        return quantizer(self.act(x))
