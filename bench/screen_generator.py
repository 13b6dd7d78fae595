"""Screen generator-side settings cheaply: train only the generator of a run, then measure its diversity.

    python bench/screen_generator.py --preset cifar10-resnet20-fast --seed 0 \
        --set checkpoint=resnet20-cifar10.th --set test_data=folder:cifar10-val --set ms_weight=1

The generator learns from the teacher alone (the student trains on detached images), so this trains
exactly the generator a run with the same seed and settings would end with (the run's own
``Trainer.generator_step``, its schedule and superposition dose per epoch), at about half a run's cost,
and prints one JSON line: precision, recall, density and coverage (Naeem et al. 2020, k = 5) of 1,000
plain and 1,000 superposed samples (K = 2) against 1,000 images of ``test_data``, their within-class
spread against the real one, the share of each near the teacher's decision boundary, and the seconds it
took. ``--save PATH.safetensors`` keeps the generator's weights. ``--variety cat,dog``: also how different the images
of eight noise seeds are (mixed and plain, against real images; ``bench/seed_variety.py``'s figures).
Tune on a training split (``cifar10-val``), report on the test images.

    python bench/screen_generator.py --run RUN --set test_data=folder:cifar10-dev

measures the generator a run saved instead (its config, with the ``--set`` overrides; nothing is trained):
a generator does not depend on the test images, so this gives its figures against another split.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qimera_engine.analysis import BOUNDARY_THRESHOLD, generator_diversity, real_features  # noqa: E402
from qimera_engine.config import RunConfig, parse_overrides, preset  # noqa: E402
from qimera_engine.models import save_state_dict  # noqa: E402
from qimera_engine.models.checkpoint import load_weights  # noqa: E402
from qimera_engine.runs import Run, open_run  # noqa: E402
from qimera_engine.runtime import keep_freed_memory  # noqa: E402
from qimera_engine.train import Parts, Trainer  # noqa: E402
from seed_variety import refuse_unknown_classes, variety  # noqa: E402  (this folder's)


def train_generator(parts: Parts) -> Trainer:
    cfg = parts.cfg
    trainer = Trainer.from_parts(parts)
    with trainer.bn_hooks():
        for epoch in range(min(cfg.epochs, cfg.gen_epochs) if cfg.gen_epochs else cfg.epochs):  # then frozen
            trainer.begin_generator_epoch(epoch)
            t0 = time.perf_counter()
            for _ in range(cfg.iters_per_epoch):
                trainer.generator_step()
            trainer.end_generator_epoch()
            print(f"epoch {epoch + 1}/{cfg.epochs}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return trainer


def measure(parts: Parts, n: int = 1000, seed: int = 0) -> dict:
    """Diversity of ``parts.generator``'s plain and superposed samples against ``n`` test images, and the
    share of each kind that sits near the teacher's decision boundary (``near_boundary``: top-1 minus top-2
    probability under ``BOUNDARY_THRESHOLD``, the app's default threshold)."""
    real = real_features(parts.teacher, parts.test, n, seed)
    kinds = generator_diversity(parts.generator, parts.teacher, real, n, parts.cfg.superpose_k, seed=seed,
                                boundary=BOUNDARY_THRESHOLD)
    return {name: {k: round(v, 4) for k, v in figures.items()} for name, figures in kinds.items()}


def screen_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments that name the generator to train and how to measure it (shared with screen_averages.py)."""
    ap.add_argument("--preset", default="cifar10-resnet20-fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--images", type=int, default=1000, help="real and synthetic samples per measurement")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def main(argv=None) -> int:
    ap = screen_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--save", type=Path, default=None,
                    help="write the generator's weights here (safetensors: a path ending in .safetensors)")
    ap.add_argument("--variety", default=None, metavar="CLASS,CLASS",
                    help="also the eight-seed variety of these two classes (bench/seed_variety.py)")
    ap.add_argument("--run", type=Path, default=None,
                    help="measure this run folder's saved generator instead of training one")
    args = ap.parse_args(argv)
    if args.save is not None and args.save.suffix != ".safetensors":  # the loaders read a .pt as a pickle
        ap.error(f"--save {args.save}: the weights are written as safetensors; give a path ending in .safetensors")
    try:
        run = open_run(args.run) if args.run else None
    except FileNotFoundError as e:
        ap.error(str(e))
    if run is not None:
        cfg = RunConfig.from_dict({**run.config.to_dict(), **parse_overrides(args.set)})
    else:
        cfg = preset(args.preset, seed=args.seed, **parse_overrides(args.set))
    if cfg.method in ("ptq", "real-data"):
        ap.error(f"method {cfg.method} trains no generator worth screening")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    t0 = time.perf_counter()
    parts = Parts.build(cfg.resolved())
    if args.variety:  # a class name that is not there is refused now, not after the training
        refuse_unknown_classes(ap, "--variety", parts.teacher, parts.test, args.variety)
    if run is not None:
        load_weights(parts.generator, run.path / Run.GENERATOR)
        source = {"run": str(run.path), "seed": cfg.seed}
    else:
        train_generator(parts)
        source = {"preset": args.preset, "seed": args.seed}
    seconds = time.perf_counter() - t0
    result = {**source, "set": args.set, "train_seconds": round(seconds, 1) if run is None else 0.0,
              **measure(parts, args.images)}
    if args.variety:
        result["variety"] = variety(parts.generator, parts.teacher, parts.test, args.variety)
    if args.save:
        save_state_dict(parts.generator, args.save)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
