"""Randomness that belongs to one run, so runs in threads of one process never share a stream.

Everything a run draws during training comes from its own ``torch.Generator`` objects (``RunRandom``).
Building modules draws from torch's global generator (PyTorch's default initialisers offer no other
way); ``seeded_init`` does that under a process-wide lock with the global state forked, so the
initial weights depend on the seed alone and the global state is left as it was. Every other module
the engine builds (a teacher or a generator whose weights are then loaded) is built under
``isolated_init``: the same lock, so no draw of another thread can fall inside a seeded block.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

_INIT_LOCK = threading.RLock()
_inside = threading.local()  # depth of this thread's seeded_init / isolated_init blocks


@contextlib.contextmanager
def _holding_init():
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            yield
        finally:
            _inside.depth -= 1


@contextlib.contextmanager
def seeded_init(seed: int):
    """Build modules under ``seed`` (CPU global generator, isolated); yields nothing.

    Inside the block, ``torch.get_rng_state()`` is the seeded stream; the caller may read it
    to continue that stream in a generator of its own.
    """
    with _holding_init():
        torch.random.default_generator.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def isolated_init():
    """Build modules whose initial values do not matter to anyone (weights are loaded over them, or the
    caller seeds nothing): their draws from torch's global generator happen under the lock of
    ``seeded_init`` and are undone afterwards, so they can never land inside another thread's seeded
    block. Inside a ``seeded_init`` block of the same thread it changes nothing (the draws then
    continue the seeded stream, as they always did)."""
    if getattr(_inside, "depth", 0):
        yield
        return
    with _holding_init():
        yield


@dataclass
class RunRandom:
    """One run's generators: ``cpu`` for host-side draws, ``device`` for tensors made on the device
    (the same object on a CPU run)."""
    cpu: torch.Generator
    device: torch.Generator

    @classmethod
    def create(cls, seed: int, device: torch.device | str, cpu_state: torch.Tensor | None = None) -> "RunRandom":
        """Generators seeded with ``seed``; ``cpu_state`` continues a stream (see ``seeded_init``)."""
        cpu = torch.Generator().manual_seed(int(seed))
        if cpu_state is not None:
            cpu.set_state(cpu_state)
        device = torch.device(device)
        dev = cpu if device.type == "cpu" else torch.Generator(device).manual_seed(int(seed))
        return cls(cpu, dev)

    def state(self) -> dict:
        """What resume needs (under the keys of earlier state files, so those still resume)."""
        st = {"rng_cpu": self.cpu.get_state()}
        if self.device is not self.cpu:
            st["rng_cuda"] = self.device.get_state()
        return st

    def load_state(self, st: dict) -> None:
        self.cpu.set_state(st["rng_cpu"])
        if self.device is not self.cpu and "rng_cuda" in st:
            self.device.set_state(st["rng_cuda"])
