"""One run across several processes (``torchrun``): the pieces of a run that must see the whole batch.

Every process (rank) of a run draws the same global batch from the run's seeded streams and keeps its own
slice of it (``World.rows``), so N ranks with B/N images each see exactly the images one process with B
sees. What a batch decides as a whole is computed over the whole batch:

- the moments of a BatchNorm's input: the generator's own BatchNorm layers (``sync_batchnorm``) and the
  teacher's BN-statistics loss (``World.moments``), all-reduced with a backward that reaches every rank;
- the activation ranges the student calibrates (each batch's min and max, ``World.range``);
- the mode-seeking term: over each rank's whole pairs (``ms_pairs=paired``: its means, ``World.all_sum``), or
  over the global batch's samples of one class (``ms_pairs=class``: the batch gathered, ``World.all_rows``);
- the gradients (``World.average_grads``, averaged as DistributedDataParallel averages them; a wrapper is not
  used because its buffer broadcast would replace the all-reduced range statistics with rank 0's).

Rank 0 alone writes the run folder, evaluates and reports; the others follow it. A one-process run uses
``SINGLE``, whose methods do nothing, so the training loop reads the same either way.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class World:
    """This process's place in a run: ``rank`` of ``size`` processes (1: an ordinary run).

    ``as_if_distributed``: one process that computes what a whole batch decides with the same operations as
    a run over several (the reference a test compares such a run with, operation for operation)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    as_if_distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the run takes the global-batch code paths (several processes, or ``as_if_distributed``)."""
        return self.size > 1 or self.as_if_distributed

    @property
    def _collective(self) -> bool:
        return self.size > 1

    def rows(self, n: int, paired: bool = False) -> slice | torch.Tensor:
        """This rank's rows of a global batch of ``n`` (which must split evenly). ``paired``: a batch whose
        second half pairs row by row with its first (mode seeking); this rank takes the same share of each
        half, as an index, so that each pair stays on one rank."""
        if n % self.size:
            raise ValueError(f"a batch of {n} does not split evenly over {self.size} processes: "
                             f"choose a batch_size that {self.size} divides")
        if not paired:
            share = n // self.size
            return slice(self.rank * share, (self.rank + 1) * share)
        half = n // 2
        if n % 2 or half % self.size:
            raise ValueError(f"a batch of {n} pairs (mode seeking) does not split into whole pairs over {self.size} "
                             f"processes: choose a batch_size that {2 * self.size} divides")
        first = torch.arange(self.rank * (half // self.size), (self.rank + 1) * (half // self.size))
        return torch.cat([first, first + half])

    # --- what the whole batch decides

    def moments(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance over (N, H, W) of the global batch whose slice ``x`` (N, C, H, W) is, in
        fp32, differentiable on every rank. ``shift`` (C,), the same on every rank (a running mean), centres
        the sums so that the one-pass variance keeps its precision."""
        c = x.shape[1]
        d = x.float() - shift.detach().float().view(1, c, 1, 1)
        local = torch.stack([d.sum((0, 2, 3)), d.square().sum((0, 2, 3))])
        total = self.all_sum(local)
        n = x.numel() // c * self.size
        offset = total[0] / n
        return shift.detach().float() + offset, (total[1] / n - offset.square()).clamp_min(0)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks, with a backward that sums the gradients the same way."""
        return _AllSum.apply(t) if self._collective else t

    def range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's (min, max) from this rank's."""
        if not self._collective:
            return lo, hi
        both = torch.stack([-lo.float(), hi.float()])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -both[0], both[1]

    def average_grads(self, params) -> None:
        """Average the gradients over the ranks in one flat all-reduce (a missing gradient counts as 0)."""
        if not self._collective:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.size
        start = 0
        for p in params:
            n = p.numel()
            p.grad = flat[start:start + n].view_as(p).clone()
            start += n

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (for what a run reports)."""
        if not self._collective:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.size

    def gather_rows(self, x: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """The global batch from each rank's rows (``rows(n, paired)``), in the order one process would hold it."""
        if not self._collective:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        if paired:  # each rank holds its share of the first half, then the same share of the second
            share = len(x) // 2
            parts = [p[:share] for p in parts] + [p[share:] for p in parts]
        return torch.cat(parts)

    def all_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch from each rank's rows of an unpaired batch (``rows(n)``), in one process's order, on
        every rank and differentiable: each rank's rows get the sum of every rank's gradient of them (each rank's
        loss depends on all of them), as ``all_sum`` gives it."""
        if not self._collective:
            return x
        before, after = x.new_zeros((self.rank * len(x), *x.shape[1:])), x.new_zeros(
            ((self.size - 1 - self.rank) * len(x), *x.shape[1:]))
        return self.all_sum(torch.cat([before, x, after]))

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on one (a stop asked for on one rank stops them all)."""
        if not self._collective:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def share(self, obj):
        """Rank 0's ``obj`` on every rank (a picklable object: a path, a resume state)."""
        if not self._collective:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def share_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers in ``module`` on every rank (after work done on rank 0 alone)."""
        if not self._collective:
            return
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self._collective:
            dist.barrier()

    def _device(self) -> torch.device:
        nccl = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


SINGLE = World()


class _AllSum(torch.autograd.Function):
    """The sum over the ranks; its gradient is the sum of every rank's gradient (each rank's loss depends on
    the sum, so each contributes to every rank's input)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def from_env(device: str = "auto") -> World:
    """This process's ``World``: ``SINGLE`` unless started by ``torchrun`` (or Slurm's ``srun`` with the same
    variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), in which case the process group is
    joined here: NCCL when the run's device is a GPU, gloo on CPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    gpu = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if gpu:
            torch.cuda.set_device(local % torch.cuda.device_count())
        # torch.distributed.nn.functional's collectives take ``group=group.WORLD`` as a default argument, which
        # is evaluated when the module is imported: imported after the group exists (the optimizer imports
        # torch._dynamo, which imports it), ten defaults hold the group, ``close`` cannot free it, and gloo's
        # threads live on into the interpreter's teardown, where they can abort the process. Imported first,
        # the defaults are None.
        from torch.distributed.nn import functional  # noqa: F401
        dist.init_process_group(backend(gpu), timeout=datetime.timedelta(minutes=30))
        atexit.register(close)
    return World(dist.get_rank(), dist.get_world_size(), local)


def close() -> None:
    """Leave the process group, if this process is in one. ``from_env`` has this run at exit for the group it
    joins: a process that exits in it leaves gloo's threads to the interpreter's teardown, which can abort it
    ("terminate called without an active exception", SIGABRT) after a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


BACKENDS = ("nccl", "gloo")


def backend(gpu: bool) -> str:
    """The process group's backend: NCCL on GPUs, gloo on CPUs, or ``$QIMERA_DIST_BACKEND``. gloo on GPUs
    serves several processes that share one GPU, which NCCL refuses (it wants one GPU per process)."""
    chosen = os.environ.get("QIMERA_DIST_BACKEND", "").strip().lower()
    if not chosen:
        return "nccl" if gpu else "gloo"
    if chosen not in BACKENDS:
        raise ValueError(f"QIMERA_DIST_BACKEND={chosen!r}: choose one of {', '.join(BACKENDS)}")
    if chosen == "nccl" and not gpu:
        raise ValueError("QIMERA_DIST_BACKEND=nccl needs the run on a GPU (device cuda or auto with a GPU)")
    return chosen


def run_device(device: str, world: World) -> str:
    """The device this rank trains on: its own GPU (``cuda:LOCAL_RANK``) in a multi-GPU run."""
    if world.distributed and (str(device) in ("auto", "cuda")) and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are the global batch's (``World.moments``); in eval mode,
    and in a one-process run, the same as BatchNorm2d. torch's own SyncBatchNorm runs only on GPUs."""

    world: World = SINGLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.world.distributed):
            return super().forward(x)
        shift = self.running_mean if self.running_mean is not None else torch.zeros(x.shape[1], device=x.device)
        mean, var = self.world.moments(x, shift)
        if self.track_running_stats:
            with torch.no_grad():
                n = x.numel() // x.shape[1] * self.world.size
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), m)
        y = (x.float() - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, world: World) -> nn.Module:
    """Every plain BatchNorm2d of ``module`` computes its training statistics over the global batch (in
    place: the same parameters, buffers and state-dict keys)."""
    if not world.distributed:
        return module
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
            m.world = world
    return module


__all__ = ["World", "SINGLE", "from_env", "close", "run_device", "sync_batchnorm", "GlobalBatchNorm2d"]
