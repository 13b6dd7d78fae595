"""Loading weights: our own files (safetensors) and checkpoints a user supplies (weights_only)."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from ..runs import user_path


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "student", "teacher")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` without running any code from the file.

    Accepts safetensors files and ``torch.save`` files (loaded with ``weights_only=True``),
    either a bare state dict or one wrapped under a usual key such as ``state_dict``;
    a DataParallel ``module.`` prefix is removed.
    """
    path = user_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails in many ways inside the unpickler
        why = ("the file is not in PyTorch's format, or it holds objects other than tensors"
               if isinstance(e, (pickle.UnpicklingError, IndexError, EOFError, zipfile.BadZipFile)) else f"{type(e).__name__}: {str(e)[:200]}")
        raise CheckpointError(
            f"{path} is not a valid checkpoint: expected a PyTorch state dict (read with "
            f"weights_only=True) or a .safetensors file; {why}") from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    check_plain_tensors(state, path)
    return state


def _unusual(t: torch.Tensor) -> str | None:
    """What makes ``t`` other than an ordinary dense CPU tensor of real numbers, or None."""
    if t.is_nested:
        return "a nested tensor"
    if type(t) not in (torch.Tensor, nn.Parameter):
        return f"a {type(t).__name__} tensor"
    if t.layout != torch.strided:
        return f"layout {t.layout}"
    if t.is_quantized:
        return f"quantized dtype {t.dtype}"
    if t.device.type != "cpu":  # meta tensors hold no values; others were not mapped to the CPU
        return f"device {t.device.type}"
    if t.is_complex():
        return f"complex dtype {t.dtype}"
    return None


def check_plain_tensors(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``CheckpointError`` naming the first tensor that is sparse, quantized, nested, complex or not on
    the CPU: loading one would fail deep inside torch or convert it without a word."""
    for k, v in state.items():
        why = _unusual(v)
        if why:
            raise CheckpointError(f"{source}: tensor {k} has {why}; only ordinary dense CPU tensors of real "
                                  f"numbers are read")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` strictly, with a readable error when it does not fit."""
    return fit_state_dict(model, load_state_dict_file(path), path)


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` (read from ``source``) into ``model``; a readable error when it does not fit."""
    check_plain_tensors(state, source)
    own = model.state_dict()
    # checkpoints from older PyTorch releases lack BatchNorm's step counter: keep ours
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    # load_state_dict would cast: float16 or float64 weights are another model than the one saved
    cast = [k for k in own if k in state and state[k].dtype != own[k].dtype
            and (state[k].is_floating_point() or own[k].is_floating_point() or state[k].dtype == torch.bool)]
    if cast:
        k = cast[0]
        raise CheckpointError(f"{source}: tensor {k} is {state[k].dtype}, but the model's is {own[k].dtype}"
                              f"{f' (and {len(cast) - 1} more)' if len(cast) > 1 else ''}; convert the "
                              f"checkpoint to {own[k].dtype} yourself if that is what you mean")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite values (in {', '.join(bad[:3])}"
                              f"{' and more' if len(bad) > 3 else ''}): a model with them cannot be quantized")
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"{len(missing)} missing key(s): {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected key(s): {show(unexpected)}" if unexpected else "",
                 "shape mismatch at " + show([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                              for k in wrong]) if wrong else ""]
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=False)
    return model


def save_state_dict(module_or_state, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (write a temporary file, then rename)."""
    from safetensors.torch import save_file

    from ..runs import atomic_path
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def state_dict_sha256(module_or_state) -> str:
    """A content hash of a model's tensors (names, dtypes, shapes, values): its identity, whatever
    file format or path the weights came from."""
    import hashlib
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
