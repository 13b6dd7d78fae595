"""How long the Feature-space page waits for a UMAP of ~3,000 digits-teacher features.

    python bench/bench_umap.py [--plain 800] [--superposed 800] [--prepare]

Fits on the real digits train split (1,347 images) and maps plain and superposed synthetic
features into it. Prints the import time of umap, the first call in this process (numba compiles),
a second call on different features (a new fit, compiled code warm), a call where only the
synthetic sets change (the fitted projection is reused), and the identical call again (cached).
Uses a temporary QIMERA_HOME (removed afterwards) unless one is set; trains the digits teacher there (seconds).
Wall and CPU seconds are both printed: on a shared machine the wall time includes waiting for a core.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain", type=int, default=800, help="plain synthetic samples")
    ap.add_argument("--superposed", type=int, default=800, help="superposed synthetic samples (K = 2)")
    ap.add_argument("--prepare", action="store_true", help="call analysis.prepare_umap() first (as the app may)")
    args = ap.parse_args()
    if os.environ.get("QIMERA_HOME"):
        bench(args)
        return
    with tempfile.TemporaryDirectory(prefix="qimera-bench-") as home:
        os.environ["QIMERA_HOME"] = home
        bench(args)


def bench(args) -> None:
    from qimera_engine import InputSpec, load_data, load_generator, load_teacher, preset, run_to_end
    from qimera_engine import analysis

    t = time.perf_counter()
    summary = run_to_end(preset("digits", epochs=2, iters_per_epoch=20, warmup_epochs=1, calib_epochs=1,
                                batch_size=32))
    print(f"setup: digits teacher and a short Qimera run in {time.perf_counter() - t:.1f} s "
          f"(QIMERA_HOME={os.environ['QIMERA_HOME']})")
    teacher, generator = load_teacher(summary["run"]), load_generator(summary["run"])
    train = load_data("digits", InputSpec.of(teacher), "train")

    def features(real_seed: int, synth_seed: int):
        real = analysis.real_features(teacher, train, len(train), seed=real_seed)["features"]
        real = real[: len(real) - real_seed]  # a different real set per seed: a new fit
        plain = analysis.synthetic_features(generator, teacher, args.plain, False, seed=synth_seed)["features"]
        mixed = analysis.synthetic_features(generator, teacher, args.superposed, True, seed=synth_seed)["features"]
        return real, {"plain": plain, "superposed": mixed}

    def timed(label: str, real, others, method: str = "umap") -> None:
        t, cpu = time.perf_counter(), time.process_time()
        out = analysis.project(real, others, method=method, seed=0)
        points = sum(len(v) for v in out.values())
        print(f"{label:<48} {time.perf_counter() - t:7.2f} s  (CPU {time.process_time() - cpu:5.2f} s; "
              f"{points} points, fit on {len(real)})")

    first, second, third = features(0, 0), features(1, 1), features(1, 2)
    t, cpu = time.perf_counter(), time.process_time()
    import umap  # noqa: F401  (what project() pays on its first UMAP)
    print(f"{'import umap':<48} {time.perf_counter() - t:7.2f} s  (CPU {time.process_time() - cpu:5.2f} s)")
    if args.prepare:
        t = time.perf_counter()
        analysis.prepare_umap()
        print(f"{'prepare_umap() (compiles on 40 points)':<48} {time.perf_counter() - t:7.2f} s")
    timed("UMAP, first call in this process", *first)
    timed("UMAP, second call, different features", *second)
    timed("UMAP, same real set, new synthetic sets", *third)
    timed("UMAP, identical call again (cached)", *third)
    timed("PCA, for comparison", *first, method="pca")


if __name__ == "__main__":
    main()
