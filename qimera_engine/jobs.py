"""Background jobs: runs, sweeps and slow tasks, watched by any number of pages.

The app holds one ``JobRegistry`` per server process (Streamlit's ``st.cache_resource``), so a
job keeps going when a page is left or reloaded, and two browser sessions see the same jobs.
Each run trains in a process of its own (``qimera_engine.worker``; at most ``max_runs`` at a time),
so a page that is being drawn costs the run nothing but the reading of its events; a thread per job
records the run's event stream, and pages read frozen snapshots. Tasks (teacher loading, features,
projections) run in threads of this process. This module never imports Streamlit.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .config import RunConfig
from .events import EpochEnd, Evaluated, Finished, Log, Started, Step

ACTIVE = ("queued", "running")
_MAX_LOSS_POINTS = 2000  # live loss curve: older points are thinned out beyond this
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


def default_max_runs() -> int:
    """Runs that train at once: $QIMERA_MAX_RUNS, else one per two CPU cores (each run uses several
    threads, so more would only share the same cores), at least one."""
    text = os.environ.get("QIMERA_MAX_RUNS", "").strip()
    if text:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"QIMERA_MAX_RUNS must be a whole number >= 1, got {text!r}") from None
        if n < 1:
            raise ValueError(f"QIMERA_MAX_RUNS must be a whole number >= 1, got {text!r}")
        return n
    return max(1, (os.cpu_count() or 2) // 2)


class RunFailed(Exception):
    """A run that failed in its worker process, with the engine's own error type and message."""

    def __init__(self, kind: str, message: str, trace: str = ""):
        super().__init__(message)
        self.kind, self.message, self.trace = kind, message, trace

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class _Child:
    """One run (or one sweep on Ray) in a worker process: its frames as an iterator; ``stop()`` asks it to
    end (SIGTERM). ``request``: what the worker reads (see ``qimera_engine.worker``)."""

    def __init__(self, request: dict):
        # A sweep's worker is Ray's driver, and Ray takes over SIGTERM there (it exits at once): it is asked
        # to stop by a line on its stdin instead, which lets it interrupt its cells so that each saves.
        self.by_signal = os.name == "posix" and not request.get("sweep")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "qimera_engine.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)  # the server's working folder: relative paths read the same
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # it died at once: its status below says so
            pass

    def events(self):
        return (frame[1] for frame in self.frames() if frame[0] == "event")

    def frames(self):
        """Every frame but errors; a reported error (or a worker that died before its end) is raised after."""
        error, ended = None, False
        try:
            while True:
                try:
                    frame = pickle.load(self.proc.stdout)
                except EOFError:
                    break
                if frame[0] == "error":
                    error = RunFailed(*frame[1:])
                else:
                    ended = ended or (frame[0] == "event" and isinstance(frame[1], Finished))
                    yield frame
        finally:
            self.close()
        code = self.proc.wait()
        if error is not None:
            raise error
        if code != 0 and not ended:  # (a worker that dies after its run has ended and said so loses nothing)
            raise RunFailed("WorkerDied", f"the run's process ended with status {code} before the run did "
                                          f"(killed, or out of memory?); its finished epochs can be resumed")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            if self.by_signal:  # a signal, handled between iterations
                self.proc.send_signal(signal.SIGTERM)
            else:
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()
        except OSError:
            pass

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


@dataclass
class RunProgress:
    """What one run has reported so far."""
    config: dict
    run_dir: str | None = None
    device: str | None = None
    status: str = "queued"        # queued | running | finished | cancelled | failed
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    fp_top1: float | None = None
    losses: dict = field(default_factory=dict)       # latest Step's losses
    images_per_s: float = 0.0
    loss_history: list = field(default_factory=list)  # [{"step": s, **losses}]
    metrics: list = field(default_factory=list)       # EpochEnd rows (metrics.csv)
    summary: dict | None = None
    error: str | None = None
    preparing: float | None = None  # before the run starts: progress of what it waits for (a teacher in training)

    @property
    def fraction(self) -> float:
        if self.status == "finished":
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass
class Job:
    """A snapshot of a job, safe to read anywhere (a copy; the worker keeps its own)."""
    id: str
    kind: str                     # run | sweep | task
    label: str
    key: str | None = None        # tasks: the cache key (one result per key)
    status: str = "queued"
    created: float = field(default_factory=time.time)
    finished_at: float | None = None
    runs: list = field(default_factory=list)   # RunProgress, one per run (sweeps: in order)
    current: int = 0                            # index of the run in progress
    fraction: float = 0.0                       # tasks: reported progress
    message: str = ""
    log: list = field(default_factory=list)
    error: str | None = None
    result: Any = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def run(self) -> RunProgress | None:
        """The run in progress (or the last one)."""
        return self.runs[min(self.current, len(self.runs) - 1)] if self.runs else None

    @property
    def progress(self) -> float:
        """0..1 over the whole job."""
        if self.status == "finished":
            return 1.0
        if self.kind == "task" or not self.runs:
            return self.fraction
        # a cancelled run counts as far as it got (a full bar would read as done)
        done = sum(r.status in ("finished", "failed") for r in self.runs)
        partial = sum(r.fraction for r in self.runs if r.status in ("running", "cancelled"))
        return min(1.0, (done + partial) / len(self.runs))

    def snapshot(self) -> "Job":
        # Results (arrays of features, projections) are read-only and can be large: share, do not copy.
        return copy.deepcopy(self, {id(self.result): self.result})


def sweep_configs(base: RunConfig, bits: Iterable[int | tuple[int, int]], methods: Iterable[str | dict],
                  seeds: Iterable[int]) -> list[RunConfig]:
    """The runs of a sweep, bit width outermost, then method, then seed: ``bits`` are b (for WbAb) or
    (w, a) pairs; a method is a name, or the settings that make a variant (``{"method": "qimera",
    "superpose_p": 0}``) over ``base``.

    Every config is validated here, so an impossible setting fails before anything starts.
    """
    out = []
    for b, method, seed in itertools.product(list(bits), list(methods), list(seeds)):
        w, a = (b, b) if isinstance(b, int) else b
        settings = dict(method) if isinstance(method, dict) else {"method": method}
        out.append(base.with_overrides(**settings, wbits=int(w), abits=int(a), seed=int(seed)))
    return out


class JobRegistry:
    """Thread-safe registry of background jobs. Keeps the newest ``keep`` finished jobs.

    Runs train in worker processes, at most ``max_runs`` at a time (default: ``default_max_runs()``);
    a run that waits for a free slot is "queued". ``processes=False`` trains in this process's threads
    instead (the engine's own events either way).

    ``ray_address``: sweeps run as Ray tasks on that cluster ("local": a Ray instance on this machine, one
    cell per CPU), each cell into its own folder under ``ray_runs_dir`` (default: the run store), which every
    Ray worker must reach. Sweeps on Ray take no run slot: the cluster schedules them."""

    def __init__(self, keep: int = 100, *, max_runs: int | None = None, processes: bool = True,
                 ray_address: str | None = None, ray_runs_dir: str | Path | None = None):
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._stops: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._children: dict[str, _Child] = {}
        self._ids = itertools.count(1)
        self.keep = keep
        self.processes = processes
        self.max_runs = default_max_runs() if max_runs is None else int(max_runs)
        if self.max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs!r}")
        self._slots = threading.BoundedSemaphore(self.max_runs)
        self.ray_address = (ray_address or "").strip() or None
        self.ray_runs_dir = ray_runs_dir

    # ------------------------------------------------------------------ starting jobs
    def start_run(self, config: RunConfig | None, *, resume: str | None = None, label: str | None = None) -> str:
        """Start one run (or resume the run folder ``resume``); returns the job id."""
        if config is None and resume is None:
            raise ValueError("start_run needs a config or a run folder to resume")
        cfg_dict = config.to_dict() if config is not None else {}
        if label is None:
            label = (f"resume {resume}" if resume else
                     f"{config.method} W{config.wbits}A{config.abits} seed {config.seed} ({config.teacher})")
        job = self._new("run", label, runs=[RunProgress(cfg_dict)])
        return self._spawn(job, lambda stop: self._do_runs(job.id, [(config, resume)], stop))

    def start_sweep(self, base: RunConfig, bits, methods, seeds, *, label: str | None = None,
                    on_ray: bool = True) -> str:
        """Runs over bit widths x methods x seeds, one after another (or as Ray tasks, when the registry has
        a ``ray_address`` and ``on_ray``); returns the job id."""
        configs = sweep_configs(base, bits, methods, seeds)
        if not configs:
            raise ValueError("a sweep needs at least one bit width, one method and one seed")
        label = label or f"sweep of {len(configs)} runs ({base.teacher})"
        if self.ray_address and on_ray:
            from .runs import runs_dir, user_path
            from .sweeps import cell_folders
            root = user_path(self.ray_runs_dir) if self.ray_runs_dir else runs_dir()
            folders = [str(f) for f in cell_folders(configs, root, time.strftime("%Y%m%d-%H%M%S-ray-"))]
            job = self._new("sweep", f"{label} on Ray",
                            runs=[RunProgress(c.to_dict(), run_dir=f) for c, f in zip(configs, folders)])
            return self._spawn(job, lambda stop: self._do_ray_sweep(job.id, configs, folders, stop))
        job = self._new("sweep", label, runs=[RunProgress(c.to_dict()) for c in configs])
        return self._spawn(job, lambda stop: self._do_runs(job.id, [(c, None) for c in configs], stop))

    def start_task(self, fn: Callable[..., Any], *, label: str, key: str | None = None) -> str:
        """Run ``fn(report, stop)`` in the background; ``report(fraction, message)`` shows progress.

        With a ``key``, a task that is running or has finished under that key is reused
        instead of starting again: slow results (teacher training, UMAP) are computed once.
        """
        if key is not None:
            with self._lock:
                for j in reversed(list(self._jobs.values())):
                    if j.key == key and j.kind == "task" and j.status in ("queued", "running", "finished"):
                        return j.id
        job = self._new("task", label, key=key)
        return self._spawn(job, lambda stop: self._do_task(job.id, fn, stop))

    # ------------------------------------------------------------------ reading and steering
    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise KeyError(f"no job {job_id!r}")
            return self._jobs[job_id].snapshot()

    def find(self, key: str) -> Job | None:
        """The newest task with this key, if any."""
        with self._lock:
            for j in reversed(list(self._jobs.values())):
                if j.key == key:
                    return j.snapshot()
        return None

    def jobs(self, kind: str | None = None) -> list[Job]:
        """Snapshots, newest first."""
        with self._lock:
            js = [j.snapshot() for j in self._jobs.values() if kind is None or j.kind == kind]
        return js[::-1]

    def active(self, kind: str | None = None) -> list[Job]:
        return [j for j in self.jobs(kind) if j.active]

    def active_run_dirs(self) -> set[str]:
        """Run folders that a job of this process is writing to right now."""
        return {r.run_dir for j in self.active() for r in j.runs if r.run_dir and r.status == "running"}

    def cancel(self, job_id: str) -> bool:
        """Ask a job to stop (after the current iteration). False if it is not active."""
        with self._lock:
            job, stop = self._jobs.get(job_id), self._stops.get(job_id)
            if job is None or not job.active or stop is None:
                return False
            stop.set()
            job.message = "cancelling..."
            child = self._children.get(job_id)
        if child is not None:
            child.stop()
        return True

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job ends (or ``timeout`` seconds pass); returns its snapshot."""
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(job_id)

    # ------------------------------------------------------------------ internals
    def _new(self, kind: str, label: str, **kw) -> Job:
        with self._lock:
            job = Job(id=f"{kind}-{next(self._ids)}", kind=kind, label=label, **kw)
            self._jobs[job.id] = job
            self._stops[job.id] = threading.Event()
            self._forget_old()
            return job

    def _forget_old(self) -> None:
        done = [j for j in self._jobs.values() if not j.active]
        for j in done[:max(0, len(done) - self.keep)]:
            for d in (self._jobs, self._stops, self._threads):
                d.pop(j.id, None)

    def _spawn(self, job: Job, target: Callable[[threading.Event], None]) -> str:
        stop = self._stops[job.id]
        t = threading.Thread(target=target, args=(stop,), name=f"qimera-{job.id}", daemon=True)
        self._threads[job.id] = t
        t.start()
        return job.id

    def _update(self, job_id: str, fn: Callable[[Job], None]) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                fn(job)

    def _finish(self, job_id: str, status: str, error: str | None = None) -> None:
        def fin(job: Job):
            job.status, job.finished_at, job.message = status, time.time(), status
            if error:
                job.error = error
        self._update(job_id, fin)

    def _take_slot(self, job_id: str, stop: threading.Event) -> bool:
        """Wait for a free run slot (False: the job was cancelled meanwhile)."""
        if self._slots.acquire(blocking=False):
            return True
        self._update(job_id, lambda j: (setattr(j, "status", "queued"),
                                        setattr(j, "message", f"waiting: {self.max_runs} run(s) train at a time")))
        while not self._slots.acquire(timeout=0.2):
            if stop.is_set():
                return False
        return True

    def _events(self, job_id: str, cfg: RunConfig | None, resume: str | None, stop: threading.Event):
        """The run's events, from a worker process (or this thread)."""
        if not self.processes:
            from .train import run  # imported here: the registry itself stays light to import
            yield from run(cfg, resume=resume, stop=stop)
            return
        child = _Child({"config": cfg.to_dict() if cfg is not None else None,
                        "resume": str(resume) if resume is not None else None})
        with self._lock:
            self._children[job_id] = child
        if stop.is_set():  # cancelled while it started
            child.stop()
        try:
            yield from child.events()
        finally:
            with self._lock:
                self._children.pop(job_id, None)

    def _do_runs(self, job_id: str, items: list[tuple[RunConfig | None, str | None]], stop: threading.Event) -> None:
        errors = []
        for i, (cfg, resume) in enumerate(items):
            if stop.is_set() or not self._take_slot(job_id, stop):
                self._update(job_id, lambda j, i=i: [setattr(r, "status", "cancelled") for r in j.runs[i:]])
                break
            self._update(job_id, lambda j, i=i: (setattr(j, "status", "running"), setattr(j, "current", i),
                                                 setattr(j.runs[i], "status", "running")))
            try:
                for ev in self._events(job_id, cfg, resume, stop):
                    self._update(job_id, lambda j, ev=ev, i=i: _record(j, j.runs[i], ev))
                if stop.is_set():  # stopped before it started (a teacher in training): it never reported an end
                    self._update(job_id, lambda j, i=i: j.runs[i].status == "running"
                                 and setattr(j.runs[i], "status", "cancelled"))
            except Exception as e:  # a failed run is reported, and a sweep goes on with the next one
                msg = str(e) if isinstance(e, RunFailed) else f"{type(e).__name__}: {e}"
                tb = e.trace if isinstance(e, RunFailed) else traceback.format_exc(limit=4)
                if isinstance(e, RunFailed) and e.kind == "KeyboardInterrupt":  # Ctrl-C on the server
                    stop.set()
                    self._update(job_id, lambda j, i=i: setattr(j.runs[i], "status", "cancelled"))
                    continue
                errors.append(msg)

                def failed(j, i=i, msg=msg, tb=tb):
                    j.runs[i].status, j.runs[i].error = "failed", msg
                    j.log.append(tb)
                self._update(job_id, failed)
            finally:
                self._slots.release()
        cancelled = stop.is_set()
        if cancelled:
            status = "cancelled"
        elif errors and len(errors) == len(items):
            status = "failed"
        else:
            status = "finished"
        self._finish(job_id, status, "; ".join(errors) or None)

    def _do_ray_sweep(self, job_id: str, configs: list[RunConfig], folders: list[str], stop: threading.Event) -> None:
        """A sweep as Ray tasks, driven by one worker process (Ray's driver needs a main thread of its own);
        each cell's progress is read from its run folder, its end from the worker's frames."""
        where = "a local Ray instance" if self.ray_address == "local" else f"Ray at {self.ray_address}"
        self._update(job_id, lambda j: (setattr(j, "status", "running"), setattr(j, "message", f"starting on {where}")))
        child = _Child({"sweep": {"configs": [c.to_dict() for c in configs], "folders": folders,
                                  "address": None if self.ray_address == "local" else self.ray_address}})
        with self._lock:
            self._children[job_id] = child
        if stop.is_set():
            child.stop()
        ended = threading.Event()
        watcher = threading.Thread(target=self._watch_cells, args=(job_id, folders, ended), daemon=True,
                                   name=f"qimera-{job_id}-cells")
        watcher.start()
        error = None
        try:
            for frame in child.frames():
                if frame[0] == "cell":
                    def done(j, i=frame[1], summary=frame[2]):
                        r = j.runs[i]
                        r.status, r.summary, r.step = "finished", dict(summary or {}), r.total_steps
                    self._update(job_id, done)
                elif frame[0] == "cell_failed":
                    def failed(j, i=frame[1], message=frame[2]):
                        j.runs[i].status, j.runs[i].error = "failed", message
                    self._update(job_id, failed)
        except RunFailed as e:
            error = str(e)
            self._update(job_id, lambda j: j.log.append(e.trace or str(e)))
        finally:
            ended.set()
            watcher.join()
            with self._lock:
                self._children.pop(job_id, None)
        self._read_cells(job_id, folders)
        cancelled = stop.is_set()

        def close(j):
            for r in j.runs:
                if r.status in ACTIVE:
                    r.status = "cancelled" if cancelled else "failed"
                    if not cancelled:
                        r.error = r.error or error or "the cell did not finish"
        self._update(job_id, close)
        runs = self.get(job_id).runs
        if cancelled:
            status = "cancelled"
        elif error is not None or all(r.status == "failed" for r in runs):
            status = "failed"
        else:
            status = "finished"
        errors = [r.error for r in runs if r.error]
        self._finish(job_id, status, error or ("; ".join(errors) or None))

    def _watch_cells(self, job_id: str, folders: list[str], ended: threading.Event, every_s: float = 1.0) -> None:
        while not ended.wait(every_s):
            self._read_cells(job_id, folders)

    def _read_cells(self, job_id: str, folders: list[str]) -> None:
        """Each cell's progress from its run folder: status, finished epochs and their metrics."""
        from .runs import Run
        with self._lock:  # a cell that has ended is not read again
            ended = {i for i, r in enumerate(self._jobs[job_id].runs) if r.status in ("finished", "failed")}
        seen = []
        for i, folder in enumerate(folders):
            path = Path(folder)
            if i in ended or not (path / Run.CONFIG).is_file():
                seen.append(None)
                continue
            run = Run(path)
            try:
                seen.append((run.status.get("status"), run.metrics))
            except Exception:  # noqa: BLE001 - a file caught mid-write: read again next time
                seen.append(None)

        def update(j):
            for r, got in zip(j.runs, seen):
                if got is None or r.status in ("finished", "failed"):
                    continue
                status, metrics = got
                per_epoch = int(r.config.get("iters_per_epoch") or 0)
                r.total_steps = per_epoch * int(r.config.get("epochs") or 0)
                r.metrics, r.epoch = list(metrics), len(metrics)
                r.step = min(r.total_steps, per_epoch * len(metrics))
                if status in ("running", "finished"):  # (finished: once the worker says so, with its summary)
                    r.status = "running"
            running = [i for i, r in enumerate(j.runs) if r.status == "running"]
            if running:
                j.current = running[0]
                done = sum(r.status == "finished" for r in j.runs)
                j.message = f"{len(running)} cell(s) running, {done}/{len(j.runs)} done"
        self._update(job_id, update)

    def _do_task(self, job_id: str, fn: Callable, stop: threading.Event) -> None:
        self._update(job_id, lambda j: setattr(j, "status", "running"))

        def report(fraction: float, message: str = "") -> None:
            self._update(job_id, lambda j: (setattr(j, "fraction", float(fraction)), setattr(j, "message", message)))
        try:
            result = fn(report, stop)
        except Exception as e:
            self._update(job_id, lambda j: j.log.append(traceback.format_exc(limit=4)))
            self._finish(job_id, "failed", f"{type(e).__name__}: {e}")
            return
        self._update(job_id, lambda j: (setattr(j, "result", result), setattr(j, "fraction", 1.0)))
        self._finish(job_id, "cancelled" if stop.is_set() else "finished")


def _record(job: Job, r: RunProgress, ev) -> None:
    """Fold one engine event into the job's record (called under the registry's lock)."""
    if isinstance(ev, Started):
        r.run_dir, r.device, r.total_steps, r.fp_top1 = ev.run_dir, ev.device, ev.total_steps, ev.fp_top1
        r.config = ev.config
        r.step = ev.start_epoch * ev.config.get("iters_per_epoch", 0)
        r.epoch = ev.start_epoch
        r.preparing = None
        job.message = f"started in {ev.run_dir}"
    elif isinstance(ev, Log):
        if ev.fraction is not None:
            r.preparing = ev.fraction
        job.log.append(ev.text)
        job.message = ev.text
        del job.log[:-200]
    elif isinstance(ev, Step):
        r.step, r.total_steps, r.epoch, r.losses, r.images_per_s = ev.step, ev.total_steps, ev.epoch, dict(ev.losses), ev.images_per_s
        r.loss_history.append({"step": ev.step, **ev.losses})
        if len(r.loss_history) > _MAX_LOSS_POINTS:
            r.loss_history = r.loss_history[::2]
        job.message = f"epoch {ev.epoch + 1}, step {ev.step}/{ev.total_steps}"
    elif isinstance(ev, Evaluated):
        job.message = f"epoch {ev.epoch + 1}: top-1 {ev.top1:.2f}% (best {ev.best_top1:.2f}%)"
    elif isinstance(ev, EpochEnd):
        r.metrics.append(dict(ev.metrics))
    elif isinstance(ev, Finished):
        r.status, r.summary = ev.status, dict(ev.summary)
        if ev.status == "finished":
            r.step = r.total_steps


_shared: JobRegistry | None = None
_shared_lock = threading.Lock()


def shared_registry() -> JobRegistry:
    """One registry per process (the app wraps this in ``st.cache_resource``)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = JobRegistry(ray_address=os.environ.get("QIMERA_RAY_ADDRESS"),
                                  ray_runs_dir=os.environ.get("QIMERA_RAY_RUNS_DIR") or None)
        return _shared
