"""Take the quantized student away: integer weights (safetensors) and an ONNX model in QDQ form.

``int``: one ``.safetensors`` file. Each quantized layer's weight is stored as its integer codes
(int8 containers for 2-8 bits) with a per-channel scale and zero point; each activation call site
keeps its calibrated range and gets its scale and zero point; the rest of the student (biases,
BatchNorm) is stored as it is, and the metadata carries the bits, method, config and the teacher's
identity. ``load_int`` rebuilds the fake-quantized student from the file alone, bit for bit.

``onnx``: the student as an ONNX graph in QDQ form: int8 weight codes with a per-channel
DequantizeLinear, and a QuantizeLinear/DequantizeLinear pair after every activation call site.
Codes of fewer than 8 bits live in int8 containers; activations are clipped to their b-bit range
first, so the graph computes exactly the b-bit quantizer. The affine quantizer of METHOD.md
section 2, q = clamp(round(x / scale) + zero_point), x_hat = (q - zero_point) * scale, is what
QuantizeLinear and DequantizeLinear compute.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .artifacts import load_student, load_teacher
from .models import build_teacher
from .quant import ActQuantizer, QuantConv2d, QuantLinear, quantize_model
from .quant.convert import set_submodule
from .quant.functional import FULL_PRECISION, affine_qparams, dequantize_affine, quantize_affine, weight_range
from .runs import Run, atomic_path, open_run

FORMAT = "qimera-int/1"
FORMATS = ("int", "onnx")
ONNX_OPSET = 17  # per-channel DequantizeLinear (13+); what ONNX Runtime's CPU provider runs


class ExportError(ValueError):
    """A run or a file that cannot be exported or loaded back."""

# --------------------------------------------------------------------------- integer codes


def weight_codes(layer: QuantConv2d | QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 like the weight, scale (C,) float32, zero point (C,) int8) of a quantized layer,
    with the arithmetic of its forward pass, so dequantizing them gives its fake-quantized weight."""
    w = layer.weight.detach().float().cpu()
    lo, hi = weight_range(w, None if layer.clip is None else layer.clip.float().cpu())  # the forward pass's range
    scale, zp = affine_qparams(lo, hi, layer.wbits)
    q = quantize_affine(w, scale, zp, layer.wbits)
    return q.to(torch.int8), scale.flatten(), _int8(zp.flatten(), "weight zero point")


def act_codes(q: ActQuantizer) -> tuple[float, int]:
    """(scale, zero point) of an activation call site's frozen range."""
    lo, hi = q.range()
    scale, zp = affine_qparams(lo.float(), hi.float(), q.bits)
    return float(scale), int(_int8(zp.reshape(1), "activation zero point"))


def dequantized_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The fake-quantized weight from its codes (any integer dtype), per-channel scale and zero point (C,):
    bit for bit what the layer's forward pass computes."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return dequantize_affine(q.float(), scale.reshape(shape), zero_point.float().reshape(shape))


def _int8(zp: torch.Tensor, what: str) -> torch.Tensor:
    if zp.numel() and (zp.min() < -128 or zp.max() > 127):
        raise ExportError(f"a {what} ({int(zp.min())}..{int(zp.max())}) does not fit an int8 container: "
                          f"that range lies far from zero; this model part cannot be exported")
    return zp.to(torch.int8)


def _layers(student: nn.Module):
    return [(n, m) for n, m in student.named_modules()
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.wbits < FULL_PRECISION]


def _sites(student: nn.Module):
    return [(n, m) for n, m in student.named_modules() if isinstance(m, ActQuantizer) and m.bits < FULL_PRECISION]

# --------------------------------------------------------------------------- checks


def exportable_run(run: Run | str | Path, out: str | Path | None = None) -> Run:
    """The run, if it has a finished (or stopped) student; ``ExportError`` saying why not."""
    run = run if isinstance(run, Run) else open_run(run)
    if run.read_only and out is None:
        raise ExportError(f"run {run.id} ships with the app and is read-only: give a file to write (--out FILE)")
    if run.state == "running":
        raise ExportError(f"run {run.id} is still running; export it when it has finished or been stopped")
    if not (run.path / Run.STUDENT).exists():
        raise ExportError(f"run {run.id} has no student yet (no epoch was completed)")
    return run


def _run_student(run: Run | str | Path, out: str | Path | None):
    """(run, teacher, student) of an exportable run."""
    run = exportable_run(run, out)
    teacher = load_teacher(run)
    return run, teacher, load_student(run, teacher)


def _metadata(run: Run, layer_bits: dict, sites: dict, teacher) -> dict[str, str]:
    cfg = run.config
    summary = run.summary or {}
    return {"format": FORMAT, "teacher": cfg.teacher, "num_classes": str(teacher.num_classes),
            "image_size": str(teacher.image_size), "channels": str(teacher.channels),
            "mean": json.dumps(list(teacher.mean)), "std": json.dumps(list(teacher.std)),
            "teacher_sha256": str(run.teacher_sha256), "method": cfg.method, "wbits": str(cfg.wbits),
            "abits": str(cfg.abits), "keep_first_last_8bit": str(cfg.keep_first_last_8bit),
            "ema_beta": str(cfg.ema_beta), "layer_bits": json.dumps(layer_bits), "activation_sites": json.dumps(sites),
            "config": json.dumps(cfg.to_dict()), "run": run.id, "quant_top1": str(summary.get("quant_top1"))}

# --------------------------------------------------------------------------- int


def int_tensors(student: nn.Module) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The tensors of an integer export: codes, scales and zero points in place of quantized
    weights, everything else of the student's state as it is; with each layer's bits and each
    activation site's (bits, scale, zero point)."""
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    layer_bits, sites = {}, {}
    for name, layer in _layers(student):
        q, scale, zp = weight_codes(layer)
        del state[f"{name}.weight"]
        state.pop(f"{name}.clip", None)  # weight_clip: already in the codes' scale and zero point
        state.update({f"{name}.weight_int8": q, f"{name}.weight_scale": scale, f"{name}.weight_zero_point": zp})
        layer_bits[name] = layer.wbits
    for name, site in _sites(student):
        scale, zp = act_codes(site)
        state.update({f"{name}.scale": torch.tensor(scale), f"{name}.zero_point": torch.tensor(zp, dtype=torch.int8)})
        sites[name] = {"bits": site.bits, "scale": scale, "zero_point": zp}
    return state, layer_bits, sites


def export_int(run: Run | str | Path, out: str | Path | None = None) -> Path:
    """Write the run's student as integer codes to ``out`` (default RUN/student-int.safetensors)."""
    from safetensors.torch import save_file
    run, teacher, student = _run_student(run, out)
    state, layer_bits, sites = int_tensors(student)
    out = Path(out) if out else run.path / "student-int.safetensors"
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=_metadata(run, layer_bits, sites, teacher))
    return out


def read_int(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an integer export; ``ExportError`` for anything else."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no export at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports a damaged header or body in several ways
        raise ExportError(f"{path} is not a readable integer export (damaged or another format: "
                          f"{type(e).__name__}: {str(e)[:120]})") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not an integer export of this tool (format {meta.get('format')!r}, "
                          f"expected {FORMAT!r})")
    return tensors, meta


def load_int(path: str | Path) -> nn.Module:
    """Rebuild the fake-quantized student from an integer export alone (eval mode).

    Its outputs equal those of the student that was exported, bit for bit: each weight holds the
    dequantized codes (``prequantized``), each activation site its calibrated range.
    """
    tensors, meta = read_int(path)
    try:
        teacher = build_teacher(meta["teacher"], int(meta["num_classes"]))
        student = quantize_model(teacher.model, int(meta["wbits"]), int(meta["abits"]),
                                 keep_first_last_8bit=meta["keep_first_last_8bit"] == "True",
                                 beta=float(meta["ema_beta"]), example_input=teacher.example_input(), inplace=True)
        layer_bits = json.loads(meta["layer_bits"])
        state = dict(tensors)
        for name, layer in _layers(student):
            if layer_bits.get(name) != layer.wbits:
                raise ExportError(f"layer {name}: {layer_bits.get(name)} bits in the file, {layer.wbits} in the model")
            state[f"{name}.weight"] = dequantized_weight(state.pop(f"{name}.weight_int8"),
                                                         state.pop(f"{name}.weight_scale"),
                                                         state.pop(f"{name}.weight_zero_point"))
            layer.prequantized = True
        for name, _ in _sites(student):
            state.pop(f"{name}.scale"), state.pop(f"{name}.zero_point")
        student.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"{path} does not hold a complete student ({type(e).__name__}: {str(e)[:160]})") from None
    return student.eval().requires_grad_(False)

# --------------------------------------------------------------------------- ONNX


class _QDQLayer(nn.Module):
    """A quantized Conv2d/Linear for export: int8 codes through a per-channel QuantizeLinear/
    DequantizeLinear pair (folded to an int8 initializer and a DequantizeLinear afterwards)."""

    def __init__(self, layer: QuantConv2d | QuantLinear):
        super().__init__()
        q, scale, zp = weight_codes(layer)
        self.layer = layer
        self.register_buffer("w", dequantized_weight(q, scale, zp))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp.to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.fake_quantize_per_channel_affine(self.w, self.scale, self.zero_point, 0, -128, 127)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


class _QDQAct(nn.Module):
    """An activation call site for export: clip to the b-bit range, then QuantizeLinear/DequantizeLinear."""

    def __init__(self, site: ActQuantizer):
        super().__init__()
        self.scale, self.zero_point = act_codes(site)
        qmin, qmax = -(2 ** (site.bits - 1)), 2 ** (site.bits - 1) - 1
        s = torch.tensor(self.scale)
        self.lo = float((torch.tensor(float(qmin)) - self.zero_point) * s)
        self.hi = float((torch.tensor(float(qmax)) - self.zero_point) * s)
        self.clip = site.bits < 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip:
            x = torch.clamp(x, self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, -128, 127)


def qdq_model(student: nn.Module) -> nn.Module:
    """A copy of the student whose quantizers are ONNX's QuantizeLinear/DequantizeLinear ops."""
    m = copy.deepcopy(student).cpu().eval()
    for name, layer in _layers(m):
        set_submodule(m, name, _QDQLayer(layer))
    for name, site in _sites(m):
        set_submodule(m, name, _QDQAct(site))
    return m


def export_onnx_model(model: nn.Module, example: torch.Tensor, out: str | Path) -> Path:
    """Export ``model`` (a QDQ student, or a float model) with a dynamic batch axis, checked."""
    import warnings

    import onnx
    out = Path(out)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        try:
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as e:
            raise ExportError(f"this model has a part that ONNX export does not support "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        graph = onnx.load(str(tmp))
        _fold_weight_quantize(graph)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
    return out


def _fold_weight_quantize(model) -> None:
    """QuantizeLinear of a constant weight becomes its int8 codes: the file holds 1 byte per weight."""
    import numpy as np
    from onnx import numpy_helper
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}

    def const(name):
        name = consts[name].input[0] if name in consts else name
        return numpy_helper.to_array(inits[name]) if name in inits else None
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        x, scale, zp = (const(n) for n in node.input[:3])
        if x is None or scale is None or zp is None:
            continue  # an activation: quantized at run time
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * x.ndim
        if scale.ndim:
            shape[axis] = -1
        q = np.clip(np.rint(x / scale.reshape(shape)) + zp.reshape(shape), -128, 127).astype(np.int8)
        codes = numpy_helper.from_array(q, name=node.output[0])
        graph.node.remove(node)
        graph.initializer.append(codes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in used]:
        graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def export_onnx(run: Run | str | Path, out: str | Path | None = None) -> Path:
    """Write the run's student as an ONNX QDQ model to ``out`` (default RUN/student.onnx)."""
    run, teacher, student = _run_student(run, out)
    out = Path(out) if out else run.path / "student.onnx"
    return export_onnx_model(qdq_model(student), teacher.example_input(), out)


def export(run: Run | str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """``fmt`` int or onnx; returns the file written."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return (export_int if fmt == "int" else export_onnx)(run, out)


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for an exported model; ``ExportError`` when it cannot be read."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own exception types for unreadable files
        raise ExportError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:160]})") from None
