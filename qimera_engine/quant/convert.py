"""Turn any PyTorch classifier into its fake-quantized student (torchao's "swap by filter" tier)."""
from __future__ import annotations

import copy
from collections import Counter
from typing import Iterable

import torch
import torch.nn as nn

from .functional import FULL_PRECISION
from .modules import ActQuantizer, QuantAct, QuantBatchNorm2d, QuantConv2d, QuantLinear
from .spec import QuantSpec

ACTIVATIONS = (nn.ReLU, nn.ReLU6)
# Modules whose output holds only values of their input: a quantized input stays on its grid through them.
GRID_KEEPING = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)


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


def _count_call_sites(model: nn.Module, example_input: torch.Tensor | None) -> tuple[Counter, torch.Tensor]:
    """How many times each activation module is called in one forward pass, by module name, and the input
    that ran through (``example_input``, or the first probe input that fits).

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
                    return counts, x
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


def quantize_model(model: nn.Module, spec: QuantSpec | int, abits: int | None = None, *,
                   keep_first_last_8bit: bool = False, beta: float = 0.9,
                   example_input: torch.Tensor | None = None, inplace: bool = False) -> nn.Module:
    """Return the fake-quantized student of ``model``, as ``spec`` says (a ``QuantSpec``; or the weight
    bits, with ``abits``, ``keep_first_last_8bit`` and ``beta``, for the paper's scheme).

    Every Conv2d and Linear gets ``wbits``-bit per-channel weights (the first and last
    layer 8-bit when ``keep_first_last_8bit``), and every ReLU/ReLU6 call site a
    ``abits``-bit activation quantizer. Bits of 32 mean full precision. The deployable scheme adds
    its input and output quantizers (see ``quant.spec``). Parameter and buffer names stay those of
    ``model``, so a teacher's state dict loads into its student.
    Call sites are counted on one forward pass of ``example_input`` (one batch of the model's
    input; when not given, zeros of a few common image sizes are tried). Safe to call from
    several threads at once.
    """
    if not isinstance(spec, QuantSpec):
        spec = QuantSpec(spec, abits, keep_first_last_8bit=keep_first_last_8bit, beta=beta)
    student = model if inplace else copy.deepcopy(model)
    sites = Counter()
    if spec.adds_io_quantizers or any(isinstance(m, ACTIVATIONS) for m in student.modules()):
        sites, example_input = _count_call_sites(student, example_input)  # the dataflow pass reuses the input
    layers = [name for name, m in student.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    edge = {layers[0], layers[-1]} if spec.keep_first_last_8bit else set()
    act_sites = []
    param = next(student.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    sym = spec.symmetric_weights
    for name, m in list(student.named_modules()):
        bits = max(spec.wbits, 8) if name in edge else spec.wbits
        if type(m) is nn.Conv2d:
            set_submodule(student, name, QuantConv2d.from_float(m, bits, sym))
        elif type(m) is nn.Linear:
            set_submodule(student, name, QuantLinear.from_float(m, bits, sym))
        elif isinstance(m, ACTIVATIONS) and name:
            wrapped = QuantAct(m, spec.abits, call_sites=sites.get(name, 1), beta=spec.beta,
                               zero_in_range=spec.zero_in_range).to(device)
            set_submodule(student, name, wrapped)
            act_sites.append(wrapped)
    student._qimera_act_sites = act_sites
    student.register_forward_pre_hook(_reset_call_counters)
    if spec.adds_io_quantizers:
        _add_io_quantizers(student, spec, example_input)
    if spec.weight_clip == "mse":  # ones, to load saved ratios into; the trainer fits them when a run starts
        enable_weight_clip(student)
    return student


def _dataflow(model: nn.Module, example_input: torch.Tensor) -> tuple[list, dict, int]:
    """One forward pass, recording which module call consumed which module's output: (the calls in order,
    each (name, module, [(tensor id, version) of its inputs], output id), the producer of each output id
    with the output's version then, and the id of the model's output). Activation sites (``QuantAct``) are
    seen whole; a tensor changed in place after it was made (``out += identity``) no longer counts as
    its producer's output."""
    calls, made, keep = [], {}, []
    skip = {id(c) for m in model.modules() if isinstance(m, QuantAct) for c in m.modules() if c is not m}
    skip |= {id(m) for m in model.modules() if isinstance(m, ActQuantizer)}  # seen as part of their layer
    watched = [(n, m) for n, m in model.named_modules()
               if n and id(m) not in skip and (isinstance(m, (QuantAct, QuantConv2d, QuantLinear, nn.BatchNorm2d))
                                               or not list(m.children()))]
    pending = {}

    def pre(m, args, name):
        ins = [(id(a), a._version) for a in args if isinstance(a, torch.Tensor)]
        keep.extend(a for a in args if isinstance(a, torch.Tensor))
        pending.setdefault(id(m), []).append(ins)

    def post(m, args, out, name):
        ins = pending[id(m)].pop()
        if isinstance(out, torch.Tensor) and all(i != id(out) for i, _ in ins):  # not its input passed through
            keep.append(out)
            made[id(out)] = (len(calls), out._version)
            calls.append((name, m, ins, id(out)))
    handles = []
    for n, m in watched:
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: pre(mod, a, n)))
        handles.append(m.register_forward_hook(lambda mod, a, o, n=n: post(mod, a, o, n)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters(), None)
            out = model(example_input.to(param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return calls, made, id(out)


def _batchnorm_call(after):
    """The BatchNorm call among a layer output's consumers, when it is the only one."""
    return after[0] if len(after) == 1 and isinstance(after[0][1], nn.BatchNorm2d) else None


def _add_io_quantizers(student: nn.Module, spec: QuantSpec, example_input: torch.Tensor) -> None:
    """The deployable scheme's added quantizers (see ``quant.spec``), placed by the dataflow of one forward
    pass: an input quantizer on each weight layer whose input is not already on an activation quantizer's
    grid (through max-pooling, flattening, ... only), and an output quantizer after each weight layer (or
    the BatchNorm that alone takes its output) whose output no activation site takes and that is not the
    model's output."""
    calls, made, out_id = _dataflow(student, example_input)
    device = next(student.parameters()).device

    def producer(t):
        call = made.get(t[0])
        return calls[call[0]] if call is not None and call[1] == t[1] else None

    def source(t):
        """The quantizer whose codes ``t`` holds (through grid-keeping modules), or None."""
        p, steps = producer(t), 0
        while p is not None and isinstance(p[1], GRID_KEEPING) and p[2] and steps < len(calls):
            p, steps = producer(p[2][0]), steps + 1
        if p is None:
            return None
        if isinstance(p[1], QuantAct):  # its n-th call uses its n-th quantizer
            n = sum(1 for c in calls[:calls.index(p)] if c[1] is p[1])
            return p[1].quantizers[n]
        return quantized_out.get(p[0])

    def consumers(out_id):
        return [c for c in calls if any(i == out_id and v == made[out_id][1] for i, v in c[2])]

    def quantizer():
        return ActQuantizer(spec.io_bits, spec.beta, zero_in_range=True).to(device)
    seen, quantized_out = set(), {}  # the layers (or BatchNorms) given an output quantizer so far
    for name, m, ins, oid in calls:
        if not isinstance(m, (QuantConv2d, QuantLinear)) or name in seen:
            continue
        seen.add(name)
        src = source(ins[0]) if ins else None
        if src is None:
            m.input_quantizer = quantizer()
        else:
            m.input_source = [src]
        end, end_name, end_id = m, name, oid
        bn = _batchnorm_call(consumers(oid))
        if bn is not None:
            end_name, end_id = bn[0], bn[3]
            end = QuantBatchNorm2d.from_float(bn[1])  # folds into the layer: its bias is rounded as the layer's
            end.folded_into = [m]
            m.bias_in_batchnorm = True
            set_submodule(student, end_name, end)
        if end_id == out_id or any(isinstance(c[1], QuantAct) for c in consumers(end_id)):
            continue
        end.output_quantizer = quantizer()
        quantized_out[end_name] = end.output_quantizer


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
