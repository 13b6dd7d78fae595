"""How much of a run's coverage figure is its generator's, and how much the draw of samples that measured it?

    python bench/coverage_draws.py RUN [RUN ...] [--draws 10] [--images N]

A run records its generator's diversity after each epoch on one fixed draw of samples (sample seed 0) against
one fixed draw of real test images (``DiversityProbe``; ``diversity_images`` of each). This script measures the
saved generator again on ``--draws`` sample draws (seeds 0, 1, ...) against the same real images, so draw 0 is
the figure the run recorded after its last epoch, and prints per run and kind of sample (plain; superposed
where the generator mixes classes) each draw's coverage, their mean and standard deviation. A target such as
"coverage >= 0.70" met or missed by less than that deviation is one draw's luck; the mean over draws is the
generator's. The run's test data must be on this machine (as the run named it). One JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # seed_variety, beside this file

import torch  # noqa: E402

from qimera_engine import InputSpec, load_data  # noqa: E402
from qimera_engine.analysis import generator_diversity, kth_radii, real_and_others  # noqa: E402
from seed_variety import open_finished  # noqa: E402


def coverage_draws(gen, teacher, test, draws: int, images: int, superpose_k: int = 2) -> dict:
    """Each kind of sample's coverage over ``draws`` sample draws of ``images`` each, against the first
    ``images`` of the real draw a run's probe makes (seed 0), with their mean and standard deviation."""
    # as the probe takes them (its first half of a 2n draw), so that draw 0 is the run's own figure to the digit
    real, _ = real_and_others(teacher, test, images, seed=0)
    radii = kth_radii(real["features"], 5)
    per_draw: dict[str, list[float]] = {}
    for seed in range(draws):
        kinds = generator_diversity(gen, teacher, real, images, superpose_k, seed=seed, real_radii=radii)
        for name, figures in kinds.items():
            per_draw.setdefault(name, []).append(round(figures["coverage"], 4))
    return {name: {"draws": values, "mean": round(statistics.mean(values), 4),
                   "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
            for name, values in per_draw.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders")
    ap.add_argument("--draws", type=int, default=10, help="sample draws (seeds 0 .. draws - 1)")
    ap.add_argument("--images", type=int, default=None,
                    help="samples per draw and real images (default: the run's diversity_images)")
    a = ap.parse_args(argv)
    if a.draws < 1 or (a.images is not None and a.images < 6):
        ap.error("--draws must be >= 1 and --images >= 6")
    torch.set_num_threads(1)
    for path in a.runs:
        run, teacher, gen = open_finished(ap, path)
        try:
            test = load_data(run.config.test_data, InputSpec.of(teacher), "test")
        except (OSError, ValueError) as e:
            ap.error(f"{path}: its test data {run.config.test_data!r} is not here ({e})")
        n = min(a.images or run.config.diversity_images, len(test))
        recorded = (run.summary or {}).get("diversity", {})
        row = {"run": run.id, "method": run.config.method, "superpose_p": run.config.superpose_p, "images": n,
               "recorded": {"plain": recorded.get("coverage"), "superposed": recorded.get("mix_coverage")},
               **coverage_draws(gen, teacher, test, a.draws, n, run.config.superpose_k)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
