"""A sweep's cells as Ray tasks: each cell in a process of its own, on any machine of a Ray cluster.

Each cell has a run folder of its own, named by its settings, in a folder every worker reads and writes
(``runs_root``). A cell whose worker dies is retried by Ray, and the retry continues that folder from its
last completed epoch (``run_cell``): no cell starts again from scratch once an epoch is saved, and a cell
that had finished is only read. Ray is optional (``pip install ray``) and imported only here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .config import ConfigError, RunConfig
from .events import Finished
from .runs import Run


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


def ray_sweep(configs: list[RunConfig], runs_root: str | Path, address: str | None = None,
              max_retries: int = 3, on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Every config as a Ray task (``run_cell``) into ``runs_root``/``cell_name``; returns the summaries in
    the order of ``configs``. ``address``: a running cluster's (``ray start --head`` prints it), or None for
    a local one on this machine's CPUs. One CPU per cell, and one GPU where the cluster has GPUs; a worker
    that dies is retried up to ``max_retries`` times. ``on_done(i, summary)`` as each cell finishes."""
    try:
        import ray
    except ImportError as e:  # a one-line error on the command line, not a traceback
        raise ConfigError("sweep --ray needs Ray, which is not installed: pip install ray") from e
    root = Path(runs_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    names = [cell_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ValueError("two cells of the sweep would share a run folder: give each method, bit width and seed once")
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.environ[k] for k in ("QIMERA_HOME", "PYTHONPATH") if k in os.environ}
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}})
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=max_retries)(run_cell)
        pending = {task.remote(c.to_dict(), str(root / n)): i for i, (c, n) in enumerate(zip(configs, names))}
        results: list[dict | None] = [None] * len(configs)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            if on_done is not None:
                on_done(i, results[i])
        return results
    finally:
        if started_here:
            ray.shutdown()
