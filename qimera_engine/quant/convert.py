"""Turn any PyTorch classifier into its fake-quantized student (torchao's "swap by filter" tier)."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Iterable

import torch
import torch.nn as nn

from .functional import FULL_PRECISION
from .modules import ActQuantizer, QuantAct, QuantConv2d, QuantLinear, _check_bits

ACTIVATIONS = (nn.ReLU, nn.ReLU6)


# Input sizes tried, smallest first, when the caller gives no example input: 8x8 digits,
# 32x32 CIFAR, 64x64, 224x224 ImageNet.
_PROBE_SIZES = (8, 32, 64, 224)


def _probe_inputs(model: nn.Module):
    """Example inputs to try for a model whose input shape is not given."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Linear):
        return [torch.zeros(1, first.in_features)]
    if first is None:
        return []
    return [torch.zeros(1, first.in_channels, s, s) for s in _PROBE_SIZES]


def _count_call_sites(model: nn.Module, example_input: torch.Tensor | None) -> Counter:
    """How many times each activation module is called in one forward pass, by module name.

    The calls are counted by forward hooks on a real forward pass (eval mode, no grad). Nothing
    global is touched: torch.fx's symbolic tracing patches ``nn.Module.__call__`` for the whole
    process while it runs, which breaks forward passes in other threads.
    """
    names = {m: name for name, m in model.named_modules() if isinstance(m, ACTIVATIONS) and name}
    counts: Counter = Counter()
    handles = [m.register_forward_hook(lambda mod, i, o: counts.update([names[mod]])) for m in names]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    candidates = [example_input] if example_input is not None else _probe_inputs(model)
    errors = []
    try:
        model.eval()
        with torch.no_grad():
            for x in candidates:
                counts.clear()
                try:
                    model(x.to(device))
                    return counts
                except RuntimeError as e:  # wrong input shape for this model: try the next size
                    errors.append(f"{tuple(x.shape)}: {e}")
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if example_input is not None:
        raise ValueError(f"the example input does not run through the model ({errors[-1]})")
    raise ValueError("could not find an input shape that runs through the model; pass example_input "
                     "(one batch of the model's input) to quantize_model")


def _reset_call_counters(root: nn.Module, args) -> None:
    for site in root._qimera_act_sites:
        site.calls = 0


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``root`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_model(model: nn.Module, wbits: int, abits: int, *, keep_first_last_8bit: bool = False,
                   beta: float = 0.9, example_input: torch.Tensor | None = None,
                   inplace: bool = False) -> nn.Module:
    """Return the fake-quantized student of ``model``.

    Every Conv2d and Linear gets ``wbits``-bit per-channel weights (the first and last
    layer 8-bit when ``keep_first_last_8bit``), and every ReLU/ReLU6 call site a
    ``abits``-bit activation quantizer. Bits of 32 mean full precision. Parameter and
    buffer names stay those of ``model``, so a teacher's state dict loads into its student.
    Call sites are counted on one forward pass of ``example_input`` (one batch of the model's
    input; when not given, zeros of a few common image sizes are tried). Safe to call from
    several threads at once.
    """
    wbits, abits = _check_bits(wbits), _check_bits(abits)
    student = model if inplace else copy.deepcopy(model)
    sites = _count_call_sites(student, example_input) if any(isinstance(m, ACTIVATIONS) for m in student.modules()) \
        else Counter()
    layers = [name for name, m in student.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    edge = {layers[0], layers[-1]} if keep_first_last_8bit else set()
    act_sites = []
    param = next(student.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    for name, m in list(student.named_modules()):
        bits = max(wbits, 8) if name in edge else wbits
        if type(m) is nn.Conv2d:
            set_submodule(student, name, QuantConv2d.from_float(m, bits))
        elif type(m) is nn.Linear:
            set_submodule(student, name, QuantLinear.from_float(m, bits))
        elif isinstance(m, ACTIVATIONS) and name:
            wrapped = QuantAct(m, abits, call_sites=sites.get(name, 1), beta=beta).to(device)
            set_submodule(student, name, wrapped)
            act_sites.append(wrapped)
    student._qimera_act_sites = act_sites
    student.register_forward_pre_hook(_reset_call_counters)
    return student


def act_quantizers(model: nn.Module) -> Iterable[ActQuantizer]:
    return (m for m in model.modules() if isinstance(m, ActQuantizer))


def set_calibration(model: nn.Module, on: bool) -> None:
    """Start (``on``) or freeze the activation-range calibration of every quantizer."""
    for q in act_quantizers(model):
        q.calibrating = bool(on)


def weight_layers(model: nn.Module) -> Iterable[QuantConv2d | QuantLinear]:
    return (m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear)))


def enable_weight_clip(model: nn.Module, fit: bool = False) -> None:
    """Give every quantized weight layer a per-channel clipping ratio (``weight_clip="mse"``):
    ones (to load saved ratios into), or with ``fit`` the MSE-optimal ratios for its current weights."""
    for m in weight_layers(model):
        m.fit_clip() if fit else m.enable_clip()


def start_range_sampling(model: nn.Module, batches: int) -> None:
    """Every activation quantizer keeps a sample of its next ``batches`` calibrating forwards."""
    for q in act_quantizers(model):
        q.start_sampling(batches)


def fit_ranges_mse(model: nn.Module) -> None:
    """Clip every sampled activation range at its MSE-optimal point (see ActQuantizer.fit_range_mse)."""
    for q in act_quantizers(model):
        q.fit_range_mse()


def make_ranges_learnable(model: nn.Module) -> list[nn.Parameter]:
    """Every activation range's upper end becomes a trainable parameter (see ActQuantizer.make_learnable)."""
    return [p for q in act_quantizers(model) for p in q.make_learnable()]


@torch.no_grad()
def reset_calibration(model: nn.Module) -> None:
    for q in act_quantizers(model):
        q.ema_lo.zero_(), q.ema_hi.zero_(), q.steps.zero_()


def count_quantized(model: nn.Module) -> dict[str, int]:
    """How many weight layers and activation call sites are quantized below 32 bits."""
    weights = sum(1 for m in model.modules()
                  if isinstance(m, (QuantConv2d, QuantLinear)) and m.wbits < FULL_PRECISION)
    acts = sum(1 for q in act_quantizers(model) if q.bits < FULL_PRECISION)
    return {"weight_layers": weights, "activation_sites": acts}
