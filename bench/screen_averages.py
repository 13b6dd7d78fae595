"""Which average of a generator's states covers most? One generator training, several averages measured.

    python bench/screen_averages.py --preset cifar10-resnet20-fast --seed 0 --threads 1 \
        --set checkpoint=resnet20-cifar10.th --set test_data=folder:cifar10-val [--set superpose_p=0.4 ...]

Trains a run's generator as ``bench/screen_generator.py`` does (its ``gen_epochs``; ``gen_average`` must be
left at 0), and after each of its steps updates these averages of its state (weights and BN running
statistics, in float64):

- ``gen_average=1``, ``gen_average=2``: the mean over the last one or two generator epochs, as the
  setting of that name computes it (``train.GeneratorAverage``), so their figures are the setting's;
- ``ema_warmup_0.99``, ``ema_warmup_0.95``: moving averages from the first step with the usual warm-up,
  decay min(d, (1 + t) / (10 + t)) at step t (below 0.99 for the first 890 steps);
- ``ema_0.995_last2``: a moving average at decay 0.995 over the last two epochs, started from the state
  after their first step.

It then measures the last step's generator (``last``, what a run freezes without ``gen_average``) and each
average as ``screen_generator.measure`` does, and prints one JSON line. The moving averages are not
settings: this is how they were screened against the setting (docs/results.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # screen_generator, beside this file

import torch  # noqa: E402

from qimera_engine.config import parse_overrides, preset  # noqa: E402
from qimera_engine.runtime import keep_freed_memory  # noqa: E402
from qimera_engine.train import GeneratorAverage, Parts, Trainer, blend_state, float64_state  # noqa: E402
from screen_generator import measure, screen_arguments  # noqa: E402


class MovingAverage:
    """A moving average of ``module``'s state from step ``start`` on (float64): with ``warmup`` at decay
    min(decay, (1 + t) / (10 + t)) from the initial state; else at ``decay``, from the state after step ``start``."""

    def __init__(self, module, decay: float, start: int = 0, warmup: bool = False):
        self.module, self.decay, self.start, self.warmup, self.t = module, decay, start, warmup, 0
        self.state = float64_state(module) if warmup else None

    def update(self, step: int) -> None:
        if step < self.start:
            return
        if self.state is None:
            self.state = float64_state(self.module)
            return
        blend_state(self.state, self.module, keep=min(self.decay, (1 + self.t) / (10 + self.t)) if self.warmup
                    else self.decay)
        self.t += 1


def main(argv=None) -> int:
    ap = screen_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = ap.parse_args(argv)
    cfg = preset(args.preset, seed=args.seed, **parse_overrides(args.set))
    if cfg.method in ("ptq", "real-data") or cfg.gen_epochs < 2 or cfg.gen_average:
        ap.error("screen a generator that trains (gen_epochs >= 2) with gen_average=0: the averages are taken here")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    parts = Parts.build(cfg.resolved())
    trainer = Trainer.from_parts(parts)
    g, per_epoch = parts.generator, cfg.iters_per_epoch
    means = {f"gen_average={n}": (GeneratorAverage(g), (cfg.gen_epochs - n) * per_epoch) for n in (1, 2)}
    moving = {"ema_warmup_0.99": MovingAverage(g, 0.99, warmup=True),
              "ema_warmup_0.95": MovingAverage(g, 0.95, warmup=True),
              "ema_0.995_last2": MovingAverage(g, 0.995, start=(cfg.gen_epochs - 2) * per_epoch)}
    t0, step = time.perf_counter(), 0
    with trainer.bn_hooks():
        for epoch in range(cfg.gen_epochs):
            trainer.begin_generator_epoch(epoch)
            for _ in range(per_epoch):
                trainer.generator_step()
                for avg, start in means.values():
                    if step >= start:
                        avg.update()
                for avg in moving.values():
                    avg.update(step)
                step += 1
            trainer.end_generator_epoch()
            print(f"epoch {epoch + 1}/{cfg.gen_epochs}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    last = {k: v.clone() for k, v in g.state_dict().items()}
    result = {"preset": args.preset, "seed": args.seed, "set": args.set, "last": measure(parts, args.images)}
    states = {**{name: avg.state for name, (avg, _) in means.items()},
              **{name: avg.state for name, avg in moving.items()}}
    for name, state in states.items():
        g.load_state_dict({k: v.to(last[k].dtype) for k, v in state.items()})
        result[name] = measure(parts, args.images)
    g.load_state_dict(last)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
