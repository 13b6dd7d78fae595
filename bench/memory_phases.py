"""Where a run's memory goes: resident memory (RSS) phase by phase through one run.

    python bench/memory_phases.py --preset cifar10-resnet20-fast --set epochs=2 --set iters_per_epoch=60 \
        --set checkpoint=resnet20-cifar10.th --set test_data=folder:cifar10-dev
    python bench/memory_phases.py --repo ../other-checkout ...   # the same run with another checkout's engine

A thread reads the process's RSS every 2 ms; the run's events split the time into phases: setup (up to
``Started``: teacher, data, student, the FP evaluation), each epoch's training iterations (up to its last
``Step``) and each epoch's end (range fitting, evaluation and saving, up to ``EpochEnd``). Prints one row
per phase: RSS when it began, its highest RSS, RSS when it ended, and the run's peak (``ru_maxrss``). A
phase whose end is far above its start kept memory; one whose highest is far above both needed it for a
while. Linux only (reads /proc/self/status).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PhaseMemory:
    """RSS sampled in a thread, attributed to the phase named last."""

    def __init__(self, every_s: float = 0.002):
        self.rows: list[list] = []  # [name, start, highest, end]
        self.every_s, self.lock, self.stopped = every_s, threading.Lock(), False
        self.begin("setup")
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def begin(self, name: str) -> None:
        now = rss_mb()
        with self.lock:
            if self.rows:
                self.rows[-1][3] = now
            self.rows.append([name, now, now, None])

    def _sample(self) -> None:
        while not self.stopped:
            now = rss_mb()
            with self.lock:
                self.rows[-1][2] = max(self.rows[-1][2], now)
            time.sleep(self.every_s)

    def stop(self) -> None:
        self.stopped = True
        self.thread.join()
        self.rows[-1][3] = rss_mb()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cifar10-resnet20-fast")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="key=value config override")
    ap.add_argument("--repo", default=str(HERE), help="the checkout whose engine runs (default: this one)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.repo).resolve()))
    from qimera_engine.config import parse_overrides, preset
    from qimera_engine.events import EpochEnd, Started, Step
    from qimera_engine.train import run_to_end

    cfg = preset(args.preset, wbits=args.wbits, abits=args.abits, seed=args.seed, **parse_overrides(args.set))
    mem = PhaseMemory()

    def on_event(ev):
        if isinstance(ev, Started):
            mem.begin("epoch 0 training")
        elif isinstance(ev, Step) and ev.iteration + 1 == cfg.iters_per_epoch:
            mem.begin(f"epoch {ev.epoch} end (ranges, evaluation, save)")
        elif isinstance(ev, EpochEnd):
            mem.begin(f"epoch {ev.epoch + 1} training")

    with tempfile.TemporaryDirectory() as out:
        summary = run_to_end(cfg, on_event=on_event, out=out)
    mem.stop()
    if mem.rows[-1][0].endswith("training") and len(mem.rows) > 1:  # the epoch after the last does not exist
        mem.rows.pop()
    print(f"engine: {Path(args.repo).resolve()}; {args.preset} W{args.wbits}A{args.abits} seed {args.seed}; "
          f"final top-1 {summary.get('quant_top1')}")
    print("| phase | RSS at start (MB) | highest (MB) | at end (MB) |")
    print("|---|---:|---:|---:|")
    for name, start, high, end in mem.rows:
        print(f"| {name} | {start:,.0f} | {high:,.0f} | {end:,.0f} |")
    print(f"peak RSS of the process (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
