"""A sweep's cells as Ray tasks: each cell in a process of its own, on any machine of a Ray cluster.

Each cell has a run folder of its own, named by its settings, in a folder every worker reads and writes
(``runs_root``). A cell whose worker dies is retried by Ray, and the retry continues that folder from its
last completed epoch (``run_cell``): no cell starts again from scratch once an epoch is saved, and a cell
that had finished is only read. Ray is optional (``pip install ray``) and imported only here.
"""
from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Callable

from .config import ConfigError, RunConfig
from .events import Finished
from .runs import Run, RunDamaged, RunLocked


def cell_name(cfg: RunConfig) -> str:
    """The run folder name of a sweep cell: method, bit widths, seed."""
    return f"{cfg.method}-w{cfg.wbits}a{cfg.abits}-s{cfg.seed}"


def run_cell(config: dict, folder: str) -> dict:
    """Run one cell into ``folder`` to its end and return its summary: a new run when the folder has none,
    the rest of it when an earlier attempt was cut off, and only its summary when it had finished."""
    from .train import run
    path = Path(folder)
    cfg = RunConfig.from_dict(config)
    if cfg.num_threads is None:  # the CPUs the scheduler gave the cell (ray_sweep: one)
        import torch
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if (path / Run.CONFIG).is_file():
        earlier = Run(path)
        if earlier.summary is not None and earlier.status.get("status") == "finished":
            return earlier.summary
        # cut off before its first epoch's resume state was saved: nothing of it can be continued
        events = run(None, resume=path, restart=not (path / Run.STATE).is_file())
    else:
        events = run(cfg, out=path)
    summary = {}
    for ev in events:
        if isinstance(ev, Finished):
            summary = ev.summary
    return summary


def cell_folders(configs: list[RunConfig], root: str | Path, prefix: str = "") -> list[Path]:
    """One run folder per cell under ``root``: ``prefix`` + ``cell_name``, and ``-2``, ``-3`` ... for cells
    that share a name (variants of one method that differ in other settings)."""
    root, seen, out = Path(root), {}, []
    for cfg in configs:
        name = prefix + cell_name(cfg)
        seen[name] = seen.get(name, 0) + 1
        out.append(root / (name if seen[name] == 1 else f"{name}-{seen[name]}"))
    return out


def ray_sweep(configs: list[RunConfig], runs_root: str | Path, address: str | None = None,
              max_retries: int = 3, on_done: Callable[[int, dict], None] | None = None, *,
              folders: list[str | Path] | None = None, on_failed: Callable[[int, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None, gpus_per_cell: float = 1.0) -> list[dict | None]:
    """Every config as a Ray task (``run_cell``) into ``runs_root``/``cell_name`` (or into ``folders``, one per
    config); returns the summaries in the order of ``configs``. ``address``: a running cluster's (``ray start
    --head`` prints it), or None for a local one on this machine's CPUs. One CPU per cell, and
    ``gpus_per_cell`` GPUs where the cluster has GPUs (a fraction such as 0.25 lets four cells share one
    GPU, which a small model's runs leave mostly idle); a worker that dies is retried up to ``max_retries``
    times. ``on_done(i, summary)`` as each cell finishes. A cell that fails for good raises, unless
    ``on_failed(i, message)`` is given: then it is reported there, its result is None and the other cells go
    on. When ``should_stop()`` turns true the cells still running are interrupted (each ends its current
    iteration and can be resumed) and the sweep returns what it has.

    Call it from a process's main thread: a local Ray instance started from a thread that ends is ended
    with it (its processes are tied to the thread that started them)."""
    check_gpus_per_cell(gpus_per_cell)
    try:
        import ray
    except ImportError as e:  # a one-line error on the command line, not a traceback
        raise ConfigError("sweep --ray needs Ray, which is not installed: pip install ray") from e
    if folders is None:
        root = Path(runs_root).resolve()
        paths = [root / cell_name(c) for c in configs]
        if len({p.name for p in paths}) != len(paths):
            raise ValueError("two cells of the sweep would share a run folder: give each method, bit width and seed once")
    else:
        paths = [Path(f).resolve() for f in folders]
        if len(paths) != len(configs) or len(set(paths)) != len(paths):
            raise ValueError("a sweep needs one run folder of its own per cell")
    for path in {p.parent for p in paths}:
        path.mkdir(parents=True, exist_ok=True)
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.environ[k] for k in ("QIMERA_HOME", "PYTHONPATH") if k in os.environ}
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}})
    try:
        have = ray.cluster_resources().get("GPU", 0)
        gpus = gpus_per_cell if have >= 1 else 0
        if gpus > have:  # Ray would wait for such a task for ever
            raise ConfigError(f"each cell asks for {gpus:g} GPUs and the cluster has {have:g}: "
                              f"lower --gpus-per-cell")
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=max_retries)(run_cell)
        pending = {task.remote(c.to_dict(), str(p)): i for i, (c, p) in enumerate(zip(configs, paths))}
        results: list[dict | None] = [None] * len(configs)
        while pending:
            if should_stop is not None and should_stop():
                _interrupt(ray, list(pending), [paths[i] for i in pending.values()])
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=None if should_stop is None else 0.5)
            if not done:
                continue
            i = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - the cell's own error, after Ray's retries
                if on_failed is None:
                    raise
                on_failed(i, _cell_error(e))
                continue
            if on_done is not None:
                on_done(i, results[i])
        return results
    finally:
        if started_here:
            ray.shutdown()


def check_gpus_per_cell(x: float) -> float:
    """The GPUs one Ray task may ask for: a fraction in (0, 1] (tasks then share a GPU) or a whole number."""
    if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0 and (x <= 1 or float(x).is_integer())):
        raise ConfigError(f"GPUs per cell must be a fraction in (0, 1] or a whole number (got {x!r}); "
                          f"0.25 lets four cells share one GPU")
    return float(x)


def _interrupt(ray, refs: list, folders: list[Path], grace_s: float = 60.0) -> None:
    """Stop running cells as Ctrl-C would (each saves its status and ends), then force what is left, and
    record the forced ones as cancelled too (a worker killed mid-step could not say so itself)."""
    for ref in refs:
        ray.cancel(ref, force=False, recursive=True)
    _, left = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    for ref in left:
        ray.cancel(ref, force=True)
    if left:
        ray.wait(left, num_returns=len(left), timeout=30)  # (the killed workers' ends come back as errors)
        folder_of = dict(zip(refs, folders))
        mark_cancelled([folder_of[ref] for ref in left], f"stopped by force: it did not end within {grace_s:.0f} s "
                       f"of the cancel")


def mark_cancelled(folders: list[Path], reason: str, wait_s: float = 30.0) -> list[Path]:
    """Write "cancelled" into the status of each run folder whose status still says "running" for a process
    of this machine that is gone (its lock free): what is on disk stays and resumes as after Ctrl-C. A run
    whose writer lives (or that another machine wrote: its process cannot be checked from here) is left as
    it is. Waits up to ``wait_s`` for a killed writer to go. Returns the folders it marked."""
    marked = []
    deadline = time.monotonic() + wait_s
    for folder in folders:
        run = Run(Path(folder))
        try:
            status = run.status
            if status.get("status") != "running" or status.get("host") != socket.gethostname():
                continue
            while run.writer_alive and time.monotonic() < deadline:
                time.sleep(0.2)
            with run.lock():  # RunLocked while a writer still holds it: then it is left alone
                if run.status.get("status") == "running":
                    run.set_status("cancelled", reason=reason)
                    marked.append(Path(folder))
        except (RunLocked, RunDamaged, OSError):
            continue
    return marked


def _cell_error(e: Exception) -> str:
    """The engine's own error out of Ray's wrapping: its type and message, not Ray's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"
