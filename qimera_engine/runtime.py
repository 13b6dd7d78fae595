"""The process around a run, apart from the training loop: which device, the CPU's memory layout and
allocator, bfloat16 autocast where the hardware has it, and ``torch.compile`` where it is available."""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import warnings

import torch
import torch.nn as nn


def pick_device(name: str = "auto") -> torch.device:
    """auto (a CUDA GPU when there is one), cpu, cuda or cuda:N; a clear error for anything else."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda was asked for, but no CUDA GPU is available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def cpu_layout(module: nn.Module) -> nn.Module:
    """On the CPU, ``module``'s 4-D weights in channels-last layout (in place): its convolutions then run
    in oneDNN's channels-last kernels, which are much faster than its NCHW ones for ResNet-20's narrow
    layers (docs/benchmarks.md). The values are the same; sums may round differently. Elsewhere a no-op."""
    first = next(module.parameters(), None)
    if first is not None and first.device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module


_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """On Linux with glibc, tune its malloc for the training loop (process-wide, once): allocations under
    32 MB come from the heap (a fixed mmap threshold) and freed memory stays for reuse (a 1 GB trim
    threshold). Each iteration allocates and frees tensors of a few MB; by default glibc maps and unmaps
    them or trims the heap after them, and every page is then faulted in again: 16.5 M page faults and
    30 s of system time in one Qimera+ run, against 0.29 M and 1.7 s tuned, and 34 s more wall
    time (docs/benchmarks.md). The process keeps its peak memory once reached. ``QIMERA_MALLOC=default``
    leaves the allocator alone, as do glibc's own ``MALLOC_*`` environment variables. Returns whether
    the allocator is tuned."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if (os.environ.get("QIMERA_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux")
            or any(k.startswith("MALLOC_") for k in os.environ)):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl's malloc has no such options)
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    _MALLOC_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
    return _MALLOC_TUNED


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX); Linux's /proc/cpuinfo, else False."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def autocast_for(amp: bool, device: torch.device):
    """``amp``: bfloat16 autocast on a CUDA GPU, or on a CPU with native bf16 (about 1.5x the images/s of
    fp32 on a 2-core AVX512_BF16 machine); elsewhere plain fp32 (emulated bf16 would be slower). The
    quantizers and the BN statistics compute in fp32 either way."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled(module: nn.Module, mode: str = "default"):
    """``torch.compile(module, mode=mode)``, falling back to the module itself where compiling fails here.

    torch.compile compiles lazily, at a call, so a missing C++ compiler or Triton shows only then: the
    wrapper catches what compiling raises there (torch's dynamo and inductor errors, a missing module or
    tool) at any call, warns once and runs eagerly from then on. Errors of the computation itself (a shape
    that does not fit) come from the eager call too and are raised as they are."""
    try:
        fn = torch.compile(module, mode=mode)
    except (RuntimeError, ImportError) as e:  # e.g. no compiler for this platform
        warnings.warn(f"torch.compile is unavailable ({type(e).__name__}: {str(e)[:100]}); running eagerly")
        return module
    return _CompiledOrEager(module, fn)


def _compile_failures() -> tuple[type[BaseException], ...]:
    failures: list[type[BaseException]] = [ImportError, FileNotFoundError]  # no Triton; no C++ compiler on PATH
    with contextlib.suppress(ImportError, AttributeError):
        from torch._dynamo.exc import TorchDynamoException  # BackendCompilerFailed, InductorError, ...
        failures.append(TorchDynamoException)
    return tuple(failures)


class _CompiledOrEager:
    """A compiled forward that becomes its eager module for good at the first compile failure."""

    def __init__(self, module: nn.Module, fn):
        self.module, self.fn = module, fn

    def __call__(self, *args, **kwargs):
        if self.fn is self.module:
            return self.module(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except _compile_failures() as e:
            warnings.warn(f"torch.compile failed here ({type(e).__name__}: {str(e).strip()[:160]}); "
                          f"running eagerly from now on")
            self.fn = self.module
            return self.module(*args, **kwargs)
