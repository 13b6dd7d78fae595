"""One run in a process of its own: ``python -m qimera_engine.worker``, started by the JobRegistry.

The parent writes one JSON line to the worker's stdin (``{"config": {...} | null, "resume": PATH | null}``)
and reads the run's events back from its stdout, one pickled frame each:

- ``("event", Event)`` for every engine event,
- ``("error", type name, message, traceback)`` when the run raises, then the worker exits with status 1.

A sweep on Ray (``{"sweep": {"configs": [...], "folders": [...], "address": ADDRESS | null}}``) runs its
cells as Ray tasks from this process's main thread (``sweeps.ray_sweep``), each into its folder, and sends
``("cell", i, summary)`` or ``("cell_failed", i, message)`` as each cell ends; the cells' progress is in
their folders.

Stopping: SIGTERM (the JobRegistry's cancel), a line ``stop`` on stdin, or stdin closing (the parent has
gone) all end the run after the current iteration, like ``run(stop=...)``: finished epochs stay on disk
and the run can be resumed. Whatever else the run prints goes to stderr, never into the frames.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import traceback


def _watch(stream, stop: threading.Event) -> None:
    """Stop on a ``stop`` line or at end of input (the parent closed the pipe, or died)."""
    try:
        for line in stream:
            if line.strip() == b"stop":
                break
    except (OSError, ValueError):
        pass
    stop.set()


def main() -> int:
    frames = os.fdopen(os.dup(1), "wb")  # the frames' own descriptor; fd 1 from here on is stderr
    os.dup2(2, 1)
    request = json.loads(sys.stdin.buffer.readline() or b"{}")
    stop = threading.Event()
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=_watch, args=(sys.stdin.buffer, stop), daemon=True, name="qimera-stdin").start()
    listening = True

    def send(frame) -> None:
        nonlocal listening
        if not listening:
            return
        try:
            pickle.dump(frame, frames, protocol=pickle.HIGHEST_PROTOCOL)
            frames.flush()
        except (BrokenPipeError, OSError):  # nobody reads any more: finish the iteration, save, stop
            listening = False
            stop.set()

    try:
        from .config import RunConfig
        if request.get("sweep"):
            from .sweeps import ray_sweep
            sweep = request["sweep"]
            ray_sweep([RunConfig.from_dict(c) for c in sweep["configs"]], "", sweep.get("address"),
                      folders=sweep["folders"], should_stop=stop.is_set,
                      on_done=lambda i, summary: send(("cell", i, summary)),
                      on_failed=lambda i, message: send(("cell_failed", i, message)))
            return 0
        from .train import run
        config = RunConfig.from_dict(request["config"]) if request.get("config") else None
        for event in run(config, resume=request.get("resume"), stop=stop):
            send(("event", event))
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent, then the worker ends
        send(("error", type(e).__name__, str(e), traceback.format_exc(limit=4)))
        return 1
    finally:
        try:
            frames.close()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Leave without finalizing the interpreter: the stdin watcher is a daemon thread blocked in a read, and a
    # finalizing interpreter that meets it aborts ("could not acquire lock for <stdin> at interpreter
    # shutdown", status 134), after a run that had ended well. Everything the run writes is on disk by now.
    os._exit(code)
