"""Take the quantized student away: integer weights (safetensors) and an ONNX model in QDQ form.

``int``: one ``.safetensors`` file. Each quantized layer's weight is stored as its integer codes
(int8 containers for 2-8 bits) with a per-channel scale and zero point; each activation call site
keeps its calibrated range and gets its scale and zero point; the rest of the student (biases,
BatchNorm) is stored as it is, and the metadata carries the bits, method, config and the teacher's
identity. ``load_int`` rebuilds the fake-quantized student from the file alone, bit for bit.
The metadata also carries a SHA-256 of every tensor and metadata value (``sha256``): an edited file is
refused naming what changed, and what would load NaN or out-of-range values is checked on its own
as well (codes within their bits, finite positive scales, integer codes), for a file re-hashed after
editing.

Exports never overwrite a run's own files (of any run folder), never write into a shipped run, and
replace an existing file only with ``force`` (except the run's own default export, re-derived from the
same student).

``onnx``: the student as an ONNX graph in QDQ form: int8 weight codes with a per-channel
DequantizeLinear, and a QuantizeLinear/DequantizeLinear pair after every activation call site.
Codes of fewer than 8 bits live in int8 containers; activations are clipped to their b-bit range
first, so the graph computes exactly the b-bit quantizer. The affine quantizer of METHOD.md
section 2, q = clamp(round(x / scale) + zero_point), x_hat = (q - zero_point) * scale, is what
QuantizeLinear and DequantizeLinear compute.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import stat
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .artifacts import load_student, load_teacher
from .models import TEACHERS, build_teacher
from .quant import SCHEMES, ActQuantizer, QuantBatchNorm2d, QuantConv2d, QuantLinear, QuantSpec, quantize_model
from .quant.convert import set_submodule
from .quant.functional import FULL_PRECISION, affine_qparams, dequantize_affine, quantize_affine, weight_qparams
from .runs import Run, in_engine_folder, open_run, qimera_home, user_path

FORMAT = "qimera-int/2"
OLD_FORMATS = ("qimera-int/1",)  # before exports carried their SHA-256
FORMATS = ("int", "onnx")
ONNX_OPSET = 17  # per-channel DequantizeLinear (13+); what ONNX Runtime's CPU provider runs


class ExportError(ValueError):
    """A run or a file that cannot be exported or loaded back."""

# --------------------------------------------------------------------------- integer codes


def weight_codes(layer: QuantConv2d | QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 like the weight, scale (C,) float32, zero point (C,) int8) of a quantized layer,
    with the arithmetic of its forward pass, so dequantizing them gives its fake-quantized weight."""
    w = layer.weight.detach().float().cpu()
    clip = None if layer.clip is None else layer.clip.float().cpu()
    scale, zp = weight_qparams(w, layer.wbits, clip, layer.symmetric)  # the forward pass's quantizer
    q = quantize_affine(w, scale, zp, layer.wbits, layer.symmetric)
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


DEFAULT_FILES = {"int": "student-int.safetensors", "onnx": "student.onnx"}  # in the run's folder


def _run_files() -> set[str]:
    """The names of a run's own files (Run.CONFIG, Run.STUDENT, ...)."""
    return {v for k, v in vars(Run).items() if k.isupper() and isinstance(v, str)}


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a folder we may not look into holds no run of ours
        return False


def home_exports() -> Path:
    """$QIMERA_HOME/exports (links resolved): where the app writes exports of the runs that ship with it."""
    return Path(os.path.realpath(qimera_home() / "exports"))


def export_target(run: Run, fmt: str, out: str | Path | None, force: bool = False) -> Path:
    """The file an export of ``run`` writes (``out``, or the run's default file); ``ExportError`` when
    writing there would overwrite what it must not. Checked where the file really lands: the folders
    of the path with links and ``..`` resolved (a link as the file itself is replaced, not followed)."""
    if out is None:
        path = run.path / DEFAULT_FILES[fmt]
    else:
        text = os.fspath(out)
        if not text.strip():
            raise ExportError("the output file name is empty: give a file to write (--out FILE)")
        path = user_path(text)
        if text.endswith(("/", os.sep)) or path.name in ("", ".", "..") or path.is_dir():
            raise ExportError(f"{text} is a folder: give a file to write, e.g. {path / DEFAULT_FILES[fmt]}")
    land = path.parent.resolve() / path.name
    if any(_exists(d / Run.SHIPPED) for d in (land.parent, *land.parent.parents)):
        raise ExportError(f"{land.parent} belongs to a run that ships with the app and is read-only: "
                          f"write the export elsewhere (--out FILE)")
    if land.name in _run_files() and _exists(land.parent / Run.CONFIG):
        raise ExportError(f"{land} is a file of run {land.parent.name} ({land.name}); an export never "
                          f"replaces it: write the export elsewhere")
    other = next((d for d in (land.parent, *land.parent.parents) if _exists(d / Run.CONFIG)), None)
    if other is not None and other != run.path.resolve():
        raise ExportError(f"{land.parent} belongs to run {other.name}; an export of run {run.id} is not written "
                          f"into another run's folder (it would pass for that run's own): write it elsewhere")
    if in_engine_folder(land) and not (home_exports() in land.parents and force):
        raise ExportError(f"{land} lies in one of this tool's own folders in $QIMERA_HOME (its teacher cache, "
                          f"data, uploads, or the index of runs); write the export elsewhere")
    if land.name in (Run.CONFIG, Run.SHIPPED):  # the file that would make its folder look like a run
        raise ExportError(f"an export is never named {land.name}: that name marks a run folder")
    try:
        st = os.lstat(land)
    except FileNotFoundError:
        return land
    except OSError as e:
        raise ExportError(f"cannot write {land}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise ExportError(f"{land} exists and is not a regular file; an export does not replace it")
    default = run.path.resolve() / DEFAULT_FILES[fmt]  # re-derived from the same student: replaced freely
    if land != default and not force:
        raise ExportError(f"{land} exists; --force replaces it")
    return land


@contextlib.contextmanager
def _writing(path: Path, replace: bool):
    """A temporary file beside ``path``, moved into place when the block ends. Without ``replace`` it
    is linked into place, which fails if a file appeared meanwhile. On any failure or interrupt the
    temporary file, and the folders made for it, are removed."""
    import tempfile
    made = [d for d in (path.parent, *path.parent.parents) if not _exists(d)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ExportError(f"{path} exists; --force replaces it") from None
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        for d in made:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _run_student(run: Run | str | Path, fmt: str, out: str | Path | None, force: bool):
    """(run, teacher, student, the file to write) of an exportable run."""
    run = exportable_run(run, out)
    target = export_target(run, fmt, out, force)
    teacher = load_teacher(run)
    return run, teacher, load_student(run, teacher), target


def _metadata(run: Run, layer_bits: dict, sites: dict, teacher) -> dict[str, str]:
    cfg = run.config
    summary = run.summary or {}
    return {"format": FORMAT, "teacher": cfg.teacher, "num_classes": str(teacher.num_classes),
            "image_size": str(teacher.image_size), "channels": str(teacher.channels),
            "mean": json.dumps(list(teacher.mean)), "std": json.dumps(list(teacher.std)),
            "teacher_sha256": str(run.teacher_sha256), "method": cfg.method, "wbits": str(cfg.wbits),
            "abits": str(cfg.abits), "scheme": cfg.scheme, "keep_first_last_8bit": str(cfg.keep_first_last_8bit),
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


def export_int(run: Run | str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Write the run's student as integer codes to ``out`` (default RUN/student-int.safetensors);
    ``force`` replaces an existing file (see ``export_target``)."""
    from safetensors.torch import save_file
    run, teacher, student, out = _run_student(run, "int", out, force)
    state, layer_bits, sites = int_tensors(student)
    meta = _metadata(run, layer_bits, sites, teacher)
    parts = _parts(state, meta)
    meta.update(sha256=_seal(parts), sha256_parts=json.dumps(parts, sort_keys=True))
    with _writing(out, replace=_exists(out)) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return out


# --------------------------------------------------------------------------- integrity

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # those torch checks for NaN
_SEAL_KEYS = ("sha256", "sha256_parts")  # the metadata that records the hash, not hashed itself


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _parts(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, dict[str, str]]:
    """A SHA-256 per tensor (dtype, shape, bytes) and per metadata value: what lets a check name the part
    that changed."""
    return {"tensors": {k: _digest(v) for k, v in sorted(tensors.items())},
            "metadata": {k: hashlib.sha256(str(v).encode()).hexdigest() for k, v in sorted(meta.items())
                         if k not in _SEAL_KEYS}}


def _seal(parts: dict) -> str:
    """The file's SHA-256: of all its parts' hashes."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _verify_hash(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        recorded = json.loads(meta["sha256_parts"])
        if not (isinstance(recorded, dict) and set(recorded) == {"tensors", "metadata"}
                and all(isinstance(v, dict) for v in recorded.values())):
            raise ValueError("not two tables of hashes")
    except (KeyError, ValueError, RecursionError) as e:
        raise ExportError(f"{path}: its SHA-256 record is missing or damaged ({str(e)[:80]}); export the run "
                          f"again") from None
    now = _parts(tensors, meta)
    changed = [f"{'tensor' if kind == 'tensors' else 'metadata'} {k}" for kind in ("tensors", "metadata")
               for k in sorted(set(recorded[kind]) | set(now[kind])) if recorded[kind].get(k) != now[kind].get(k)]
    if changed:
        raise ExportError(f"{path} was changed after export ({', '.join(changed[:4])}"
                          f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''} differ from its "
                          f"SHA-256 record); export the run again")
    if meta.get("sha256") != _seal(recorded):
        raise ExportError(f"{path}: its SHA-256 does not match its contents (edited or damaged); export the run again")


def _meta_value(meta: dict[str, str], key: str, parse, ok, want: str):
    """``parse(meta[key])`` when ``ok`` accepts it; ``ExportError`` naming the key otherwise."""
    try:
        value = parse(meta[key])
        if ok(value):
            return value
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError):
        pass
    shown = repr(meta[key])[:60] if key in meta else "missing"
    raise ExportError(f"the export's metadata {key} must be {want} (found {shown})")


def _bits(b) -> bool:
    return type(b) is int and (2 <= b <= 8 or b == FULL_PRECISION)


def _finite(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def export_info(meta: dict[str, str]) -> dict:
    """The metadata that ``load_int`` uses, typed and checked; ``ExportError`` naming a bad value."""
    def codes(b):
        return type(b) is int and 2 <= b <= 8

    def site(d):
        return (isinstance(d, dict) and codes(d.get("bits")) and _finite(d.get("scale")) and d["scale"] > 0
                and type(d.get("zero_point")) is int and -128 <= d["zero_point"] <= 127)
    info = {"teacher": _meta_value(meta, "teacher", str, lambda v: v in TEACHERS, "a known teacher"),
            "num_classes": _meta_value(meta, "num_classes", int, lambda v: 1 <= v <= 100_000, "an integer 1..100000"),
            "wbits": _meta_value(meta, "wbits", int, _bits, f"2..8 or {FULL_PRECISION}"),
            "abits": _meta_value(meta, "abits", int, _bits, f"2..8 or {FULL_PRECISION}"),
            # files written before the deployable scheme existed hold the paper's
            "scheme": _meta_value({"scheme": "paper", **meta}, "scheme", str, lambda v: v in SCHEMES,
                                  " or ".join(SCHEMES)),
            "keep_first_last_8bit": _meta_value(meta, "keep_first_last_8bit", lambda v: {"True": True, "False": False}[v],
                                                lambda v: True, "True or False"),
            "ema_beta": _meta_value(meta, "ema_beta", float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
            "layer_bits": _meta_value(meta, "layer_bits", json.loads, lambda v: isinstance(v, dict) and all(
                codes(b) for b in v.values()), "a JSON object of bit widths 2..8"),
            "activation_sites": _meta_value(meta, "activation_sites", json.loads, lambda v: isinstance(v, dict) and all(
                site(d) for d in v.values()), "a JSON object of {bits 2..8, scale > 0, zero_point -128..127}")}
    for key, low in (("mean", -math.inf), ("std", 0.0)):
        _meta_value(meta, key, json.loads, lambda v, low=low: isinstance(v, list) and v and all(
            _finite(x) and x > low for x in v), f"a JSON list of numbers > {low}")
    _meta_value(meta, "config", json.loads, lambda v: isinstance(v, dict), "a JSON object")
    return info


def _tensor(tensors: dict, key: str, dtype: torch.dtype, dim: int | None = None) -> torch.Tensor:
    t = tensors.get(key)
    if t is None:
        raise ExportError(f"the export has no tensor {key}")
    if t.dtype != dtype or (dim is not None and t.dim() != dim):
        raise ExportError(f"tensor {key} is {t.dtype} with {t.dim()} dimension(s), expected {dtype}"
                          f"{f' with {dim}' if dim is not None else ''}")
    return t


def check_int_tensors(tensors: dict[str, torch.Tensor], info: dict) -> None:
    """What would make the student compute NaN or other codes than its bits allow, checked on its own
    (a re-hashed file passes the SHA-256): integer codes within each layer's bits with a finite scale
    > 0 and an int8 zero point per channel, each activation site's scale and zero point as recorded,
    finite floating tensors, and BatchNorm variances >= 0."""
    for name, b in info["layer_bits"].items():
        q = _tensor(tensors, f"{name}.weight_int8", torch.int8)
        if q.dim() < 1 or q.numel() == 0:
            raise ExportError(f"tensor {name}.weight_int8 is empty")
        lo, hi = -(2 ** (b - 1)), 2 ** (b - 1) - 1
        if int(q.min()) < lo or int(q.max()) > hi:
            raise ExportError(f"layer {name}: codes {int(q.min())}..{int(q.max())} lie outside its {b}-bit "
                              f"range {lo}..{hi}")
        scale = _tensor(tensors, f"{name}.weight_scale", torch.float32, 1)
        zp = _tensor(tensors, f"{name}.weight_zero_point", torch.int8, 1)
        if len(scale) != q.shape[0] or len(zp) != q.shape[0]:
            raise ExportError(f"layer {name}: {q.shape[0]} channels but {len(scale)} scales and {len(zp)} zero points")
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ExportError(f"layer {name}: a weight scale is not a finite number > 0")
    for name, d in info["activation_sites"].items():
        scale = _tensor(tensors, f"{name}.scale", torch.float32, 0)
        zp = _tensor(tensors, f"{name}.zero_point", torch.int8, 0)
        if float(scale) != d["scale"] or int(zp) != d["zero_point"]:
            raise ExportError(f"activation site {name}: its scale and zero point differ from the metadata's")
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ExportError(f"tensor {k} holds NaN or infinite values")
        if k.endswith("running_var") and (t < 0).any():
            raise ExportError(f"tensor {k} holds a negative variance")


def read_int(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an integer export, its SHA-256 and values checked; ``ExportError``
    for anything else (never another exception, whatever the file holds)."""
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
    if meta.get("format") in OLD_FORMATS:
        raise ExportError(f"{path} was written by an earlier version, without a SHA-256 of its contents; "
                          f"export the run again (python -m qimera_engine export RUN --format int)")
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not an integer export of this tool (format {meta.get('format')!r}, "
                          f"expected {FORMAT!r})")
    odd = [k for k, t in tensors.items() if t.is_floating_point() and t.dtype not in _FLOATS]
    if odd:
        raise ExportError(f"tensor {odd[0]} is {tensors[odd[0]].dtype}, which an integer export never holds")
    _verify_hash(path, tensors, meta)
    check_int_tensors(tensors, export_info(meta))
    return tensors, meta


def load_int(path: str | Path) -> nn.Module:
    """Rebuild the fake-quantized student from an integer export alone (eval mode).

    Its outputs equal those of the student that was exported, bit for bit: each weight holds the
    dequantized codes (``prequantized``), each activation site its calibrated range.
    """
    tensors, meta = read_int(path)
    info = export_info(meta)
    try:
        teacher = build_teacher(info["teacher"], info["num_classes"])
        spec = QuantSpec(info["wbits"], info["abits"], info["scheme"], info["keep_first_last_8bit"],
                         beta=info["ema_beta"])
        student = quantize_model(teacher.model, spec, example_input=teacher.example_input(), inplace=True)
        layer_bits, state = info["layer_bits"], dict(tensors)
        layers, sites = _layers(student), _sites(student)
        if set(layer_bits) != {n for n, _ in layers} or set(info["activation_sites"]) != {n for n, _ in sites}:
            raise ExportError(f"{path}: its quantized layers and activation sites are not those of a "
                              f"{info['teacher']} at W{info['wbits']}A{info['abits']}")
        for name, layer in layers:
            if layer_bits[name] != layer.wbits:
                raise ExportError(f"layer {name}: {layer_bits[name]} bits in the file, {layer.wbits} in the model")
            w = dequantized_weight(state.pop(f"{name}.weight_int8"), state.pop(f"{name}.weight_scale"),
                                   state.pop(f"{name}.weight_zero_point"))
            if not torch.isfinite(w).all():
                raise ExportError(f"layer {name}: its scales make infinite weights")
            state[f"{name}.weight"] = w
            layer.prequantized = True
        for name, _ in sites:
            state.pop(f"{name}.scale"), state.pop(f"{name}.zero_point")
        own = student.state_dict()
        for k, t in state.items():  # load_state_dict would cast without a word
            if k in own and t.dtype != own[k].dtype:
                raise ExportError(f"tensor {k} is {t.dtype}, the model's is {own[k].dtype}")
        student.load_state_dict(state, strict=True)
        for name, site in sites:  # the range the student computes gives the scale the file records
            if act_codes(site) != (float(tensors[f"{name}.scale"]), int(tensors[f"{name}.zero_point"])):
                raise ExportError(f"activation site {name}: its calibrated range does not give the scale and "
                                  f"zero point the file records")
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, OverflowError) as e:
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


# --------------------------------------------------------------------------- ONNX, deployable scheme

NOT_INTEGER_READY = ("the paper's scheme: affine weights with per-channel zero points, BatchNorm between each "
                     "convolution and its quantizer, and float tensors at the model's input, the residual adds and "
                     "the classifier's input, so ONNX Runtime runs floating-point convolutions on dequantized "
                     "weights; train with scheme=deploy for integer kernels")


def integer_ready(student: nn.Module) -> str | None:
    """None when the student's ONNX export runs on integer kernels (the deployable scheme), else why not."""
    layers = [m for _, m in _layers(student)]
    if not layers:
        return "no layer is quantized (32-bit weights)"
    if not all(m.symmetric for m in layers):
        return NOT_INTEGER_READY
    if not _sites(student):
        return "the activations are not quantized (32-bit activations): the convolutions run in floating point"
    return None


class _UQDQ(nn.Module):
    """An activation quantizer as ONNX's uint8 QuantizeLinear/DequantizeLinear: the same grid as the
    quantizer's signed codes, shifted by 2^(b-1) (a range holding 0 gives a zero point within 0..2^b - 1).
    Below 8 bits the values are first clipped to the b-bit codes' range; the export moves that clip after
    the QuantizeLinear, onto the uint8 codes."""

    def __init__(self, site: ActQuantizer):
        super().__init__()
        scale, zp = act_codes(site)
        self.scale, self.zero_point = scale, zp + 2 ** (site.bits - 1)
        if not 0 <= self.zero_point <= 255:
            raise ExportError(f"an activation range ({self.zero_point}) does not hold 0; this student cannot be "
                              f"exported to integer kernels")
        s = torch.tensor(scale)
        self.lo = float((torch.tensor(0.0) - self.zero_point) * s)
        self.hi = float((torch.tensor(float(2 ** site.bits - 1)) - self.zero_point) * s)
        self.clip = site.bits < 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip:
            x = torch.clamp(x, self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


def _unsigned(site: ActQuantizer | None) -> nn.Module:
    return nn.Identity() if site is None or site.bits >= FULL_PRECISION else _UQDQ(site)


class _FoldedLayer(nn.Module):
    """A deployable scheme's weight layer for export, with the BatchNorm that follows it folded in: the
    symmetric codes stay (their sign flips where the BatchNorm's factor a = gamma / sigma is negative), the
    scale becomes |a| x scale and the bias beta - a (mu - b); then its input and output quantizers."""

    def __init__(self, layer: QuantConv2d | QuantLinear, bn: QuantBatchNorm2d | None):
        super().__init__()
        q, scale, zp = weight_codes(layer)
        if zp.any():
            raise ExportError("a layer has per-channel zero points (affine weights); " + NOT_INTEGER_READY)
        bias = layer.bias.detach().float().cpu() if layer.bias is not None else torch.zeros(q.shape[0])
        out_site = layer.output_quantizer
        factor = None
        if bn is not None:
            with torch.no_grad():
                bias, a = (t.detach().float().cpu() for t in bn.folded_bias())  # as the student rounds it
            sign = torch.where(a < 0, -1, 1).to(torch.int8)
            q = q * sign.reshape((-1,) + (1,) * (q.dim() - 1))
            scale, factor = scale * a.abs(), a
            out_site = getattr(bn, "output_quantizer", None) or out_site
            dead = scale == 0  # a channel BatchNorm zeroes: its output is the constant bias
            q[dead], scale[dead] = 0, 1.0
        with torch.no_grad():  # the bias an integer kernel adds: rounded to its int32 grid, as the student does
            rounding = layer.bias_correction(bias.to(layer.weight.device), factor)
        if rounding is not None:
            bias = bias + rounding.float().cpu()
        self.linear = isinstance(layer, nn.Linear)
        self.geometry = layer.to_float().requires_grad_(False) if not self.linear else None
        self.register_buffer("w", dequantized_weight(q, scale, torch.zeros_like(scale)))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(len(scale), dtype=torch.int32))
        self.register_buffer("bias", bias)
        self.input_q = _unsigned(layer.input_quantizer)
        self.output_q = _unsigned(out_site)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        w = torch.fake_quantize_per_channel_affine(self.w, self.scale, self.zero_point, 0, -128, 127)
        y = F.linear(x, w, self.bias) if self.linear else self.geometry._conv_forward(x, w, self.bias)
        return self.output_q(y)


def folded_model(student: nn.Module) -> nn.Module:
    """A copy of a deployable-scheme student as it is exported: every BatchNorm that folds into a quantized
    layer (``QuantBatchNorm2d.folded_into``, set by ``quantize_model``) folded into it, every quantizer an ONNX
    uint8 (activations) or int8 (weights) QuantizeLinear/DequantizeLinear pair. Its logits are the student's,
    up to float rounding."""
    reason = integer_ready(student)
    if reason:
        raise ExportError(f"this student cannot be exported to integer kernels: {reason}")
    m = copy.deepcopy(student).cpu().eval()
    folds = {id(bn.folded_into[0]): (name, bn) for name, bn in m.named_modules()
             if isinstance(bn, QuantBatchNorm2d) and bn.folded_into}
    for name, layer in _layers(m):
        bn_name, bn = folds.get(id(layer), (None, None))
        set_submodule(m, name, _FoldedLayer(layer, bn))
        if bn is not None:
            set_submodule(m, bn_name, nn.Identity())
    for name, site in _sites(m):
        if not name.endswith(("input_quantizer", "output_quantizer")):
            set_submodule(m, name, _UQDQ(site))
    return m


def _integer_domain(model) -> None:
    """The graph edits that let ONNX Runtime fuse each QuantizeLinear-DequantizeLinear-Conv-QuantizeLinear
    group into one integer kernel: a Clip right before a uint8 QuantizeLinear becomes a Clip of the codes
    after it (the same values: the clip's ends are codes), and a float bias of a Conv or Gemm whose input and
    weight are dequantized becomes int32 codes with scale input scale x weight scale (what QLinearConv adds).

    A convolution whose input codes have a zero point other than 0 (the image: values of both signs, codes
    around 128) gets its weights as uint8 codes with zero point 128 (the same values). ONNX Runtime's uint8 x
    int8 kernels on x86 without VNNI (AVX2) add pairs of products in int16, which saturates when large input
    codes meet large weights: on ResNet-20 W8A8 the stem alone moved 1 image in 10 (0.55 points of top-1);
    its uint8 x uint8 kernel does not saturate, and the other layers' inputs (after a ReLU, zero point 0)
    rarely reach such codes."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def const(name):
        while name in producer and producer[name].op_type in ("Identity", "Constant"):
            node = producer[name]
            if node.op_type == "Constant":
                return numpy_helper.to_array(node.attribute[0].t)
            name = node.input[0]
        return numpy_helper.to_array(inits[name]) if name in inits else None

    new_nodes, counter = [], iter(range(10**9))
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in producer:
            continue
        clip = producer[node.input[0]]
        scale, zp = const(node.input[1]), const(node.input[2])
        if clip.op_type != "Clip" or zp is None or zp.dtype != np.uint8 or scale is None:
            continue
        lo, hi = const(clip.input[1]), const(clip.input[2])
        qlo = np.clip(np.rint(lo / scale) + zp, 0, 255).astype(np.uint8)
        qhi = np.clip(np.rint(hi / scale) + zp, 0, 255).astype(np.uint8)
        k = next(counter)
        codes = f"{node.output[0]}_unclipped"
        graph.initializer.extend([numpy_helper.from_array(qlo, f"clip_lo_{k}"), numpy_helper.from_array(qhi, f"clip_hi_{k}")])
        new_nodes.append((node, helper.make_node("Clip", [codes, f"clip_lo_{k}", f"clip_hi_{k}"], [node.output[0]],
                                                 name=f"IntegerClip_{k}")))
        node.output[0] = codes
        node.input[0] = clip.input[0]
    for node, clip_node in new_nodes:
        graph.node.insert(list(graph.node).index(node) + 1, clip_node)
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        while dq_x is not None and dq_x.op_type in ("MaxPool", "Flatten", "Reshape", "Identity"):  # codes kept
            dq_x = producer.get(dq_x.input[0])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        sx, sw = const(dq_x.input[1]), const(dq_w.input[1])
        if sx is None or sw is None:
            continue
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        bscale = (np.float32(sx) * sw.astype(np.float32)).astype(np.float32) * np.ones_like(b, dtype=np.float32)
        codes = np.clip(np.rint(b / bscale), -2**31, 2**31 - 1).astype(np.int32)
        k = next(counter)
        graph.initializer.extend([numpy_helper.from_array(codes, f"bias_codes_{k}"),
                                  numpy_helper.from_array(bscale, f"bias_scale_{k}"),
                                  numpy_helper.from_array(np.zeros_like(codes), f"bias_zero_point_{k}")])
        dq = helper.make_node("DequantizeLinear", [f"bias_codes_{k}", f"bias_scale_{k}", f"bias_zero_point_{k}"],
                              [f"bias_{k}"], name=f"BiasDequantize_{k}", axis=0)
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = f"bias_{k}"
    for node in graph.node:  # a layer reading codes of both signs (the image): uint8 weights, see below
        if node.op_type != "Conv":
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        zx, w = const(dq_x.input[2]), inits.get(dq_w.input[0])
        if zx is None or not zx.any() or w is None or w.data_type != onnx.TensorProto.INT8:
            continue
        k = next(counter)
        codes = (numpy_helper.to_array(w).astype(np.int16) + 128).astype(np.uint8)
        scale = const(dq_w.input[1])
        graph.initializer.extend([numpy_helper.from_array(codes, f"weight_u8_{k}"),
                                  numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), f"weight_u8_zp_{k}")])
        dq_w.input[0], dq_w.input[2] = f"weight_u8_{k}", f"weight_u8_zp_{k}"
    _prune(graph)


def _prune(graph) -> None:
    """Remove the nodes whose outputs nothing reads (an Identity left by a folded weight, a float clip moved
    into the integer domain), then the initializers nothing reads."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def export_onnx_model(model: nn.Module, example: torch.Tensor, out: str | Path, replace: bool = True,
                      integer: str | None = None) -> Path:
    """Export ``model`` (a QDQ student, or a float model) with a dynamic batch axis, checked; an
    existing ``out`` is replaced only with ``replace``. ``integer``: "ready" when ``model`` is a
    ``folded_model`` (its clips and biases are then moved into the integer domain), else why its
    convolutions do not run as integer kernels; kept in the file's metadata (``qimera.integer_kernels``)."""
    import warnings

    import onnx
    out = Path(out)
    with _writing(out, replace) as tmp, warnings.catch_warnings():
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
        if integer == "ready":
            _integer_domain(graph)
        if integer is not None:
            onnx.helper.set_model_props(graph, {"qimera.integer_kernels": integer})
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
    _prune(graph)


def export_onnx(run: Run | str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Write the run's student as an ONNX QDQ model to ``out`` (default RUN/student.onnx);
    ``force`` replaces an existing file (see ``export_target``)."""
    run, teacher, student, out = _run_student(run, "onnx", out, force)
    reason = integer_ready(student)
    model = qdq_model(student) if reason else folded_model(student)
    return export_onnx_model(model, teacher.example_input(), out, replace=_exists(out), integer=reason or "ready")


def export(run: Run | str | Path, fmt: str, out: str | Path | None = None, force: bool = False) -> Path:
    """``fmt`` int or onnx; returns the file written. An existing ``out`` is replaced only with ``force``
    (the run's own default export always: it comes from the same student); a run's own files, of any
    run, and a shipped run's folder never."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return (export_int if fmt == "int" else export_onnx)(run, out, force)


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


def onnx_check(run: Run | str | Path, path: str | Path, images: int = 500, threads: int | None = None,
               repeat: int = 3) -> dict:
    """An exported ONNX model measured on the spot beside the run's full-precision teacher (exported to a
    temporary file), in ONNX Runtime on this machine: file sizes, top-1 on ``images`` test images, images/s
    on one batch of them (median of ``repeat``, the two models side by side), and whether its convolutions
    run as integer kernels (the reason when they do not)."""
    import statistics
    import tempfile
    import time

    import onnx

    from .data import InputSpec, load_data
    run = run if isinstance(run, Run) else open_run(run)
    path = Path(path)
    teacher = load_teacher(run)
    data = load_data(run.config.test_data, InputSpec.of(teacher), "test")
    x, y = data.subset(min(images, len(data)))
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        fp = export_onnx_model(teacher.model.cpu().eval(), teacher.example_input(), Path(tmp) / "fp.onnx")
        sessions = {"fp": onnx_session(fp, threads), "export": onnx_session(path, threads)}
        sizes = {"fp": fp.stat().st_size, "export": path.stat().st_size}
    batch = x.numpy()
    out = {k: s.run(None, {"images": batch})[0] for k, s in sessions.items()}  # also warms them up
    speed = {k: [] for k in sessions}
    for _ in range(repeat):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"images": batch})
            speed[k].append(len(batch) / (time.perf_counter() - t))
    top1 = {k: 100.0 * float((o.argmax(1) == y.numpy()).mean()) for k, o in out.items()}
    ips = {k: statistics.median(v) for k, v in speed.items()}
    return {"images": len(y), "size_mb": sizes["export"] / 2**20, "fp_size_mb": sizes["fp"] / 2**20,
            "top1": top1["export"], "fp_top1": top1["fp"], "images_per_s": ips["export"],
            "fp_images_per_s": ips["fp"], "speed_vs_fp": ips["export"] / ips["fp"],
            "integer_kernels": meta.get("qimera.integer_kernels", "")}

