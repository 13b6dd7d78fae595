"""Ablation of a recipe preset: the recipe, then the recipe minus each of its changes, one at a time.

    python bench/ablation.py --preset cifar10-resnet20-fast --seeds 0,1,2 \
        --set checkpoint=resnet20-cifar10.th --set test_data=folder:cifar10-val --out docs/results/ablation-val.csv

The changes are the settings where the preset differs from the paper's preset it is built on
(``--paper``, default cifar10-resnet20-cpu), plus ``superpose_p=0`` when the recipe superposes (does
superposition pay off in the recipe?); a recipe without superposition gets ``minus superpose_p`` instead.
Each cell is one `python -m qimera_engine quantize` process (``--jobs`` at a time); finished cells are
kept, so an interrupted ablation continues where it stopped. Prints a Markdown table: final-epoch top-1
mean +- std over the seeds, and each row's difference to the recipe.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qimera_engine.config import PRESETS, preset  # noqa: E402
from results_table import fmt, one  # noqa: E402


# Settings that change what a run costs or shows, not what it learns (eval_images: the final epoch is
# evaluated on the whole test set either way): no ablation row.
NOT_LEARNING = {"eval_images", "eval_batch_size", "log_every", "num_threads", "device"}


def changes(recipe: str, paper: str) -> dict[str, object]:
    """The settings where ``recipe`` differs from ``paper`` (and change what is learnt), with the paper's values."""
    a, b = preset(recipe).to_dict(), preset(paper).to_dict()
    return {k: b[k] for k in PRESETS[recipe] if a[k] != b[k] and k not in NOT_LEARNING}


def variants(recipe: str, paper: str, only: list[str] | None = None) -> list[tuple[str, list[str]]]:
    rows = [("recipe", [])]
    for name, value in changes(recipe, paper).items():
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        rows.append((f"minus {name}", [f"{name}={value}"]))
    if preset(recipe).superposes:
        rows.append(("superpose_p=0", ["superpose_p=0"]))
    return [r for r in rows if not only or r[0] in only or r[0] == "recipe"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cifar10-resnet20-fast")
    ap.add_argument("--paper", default="cifar10-resnet20-cpu", help="the preset whose values each change goes back to")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", help="comma-separated row names to run (the recipe is always included)")
    ap.add_argument("--set", action="append", default=[], help="key=value for every cell (checkpoint, data)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, help="OMP threads per process")
    ap.add_argument("--out", default="bench/out/ablation.csv")
    args = ap.parse_args()

    rows = variants(args.preset, args.paper, args.only.split(",") if args.only else None)
    seeds = [int(s) for s in args.seeds.split(",")]
    out_csv = Path(args.out)
    out_dir = out_csv.with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = {label: label.replace(" ", "-").replace("=", "") for label, _ in rows}
    jobs = [(label, args.set + sets, s) for label, sets in rows for s in seeds]
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: (j, one(args.preset, slug[j[0]], j[1], args.bits, j[2], out_dir,
                                                  args.threads)[1]), jobs))
    table = [{"variant": label, "settings": " ".join(sets[len(args.set):]), "seed": s, "fp_top1": sm["fp_top1"],
              "final_top1": sm["quant_top1"], "best_top1": sm["best_top1"], "seconds": sm["seconds"]}
             for (label, sets, s), sm in results]
    with out_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    final = {label: [r["final_top1"] for r in table if r["variant"] == label] for label, _ in rows}
    base = statistics.mean(final["recipe"])
    print(f"\n{args.preset} W{args.bits}A{args.bits}: FP top-1 "
          f"{', '.join(f'{x:.2f}' for x in sorted({r['fp_top1'] for r in table}))}; seeds {args.seeds}; "
          f"wall {time.time() - t0:.0f} s; CSV {out_csv}\n")
    print("| variant | settings | final top-1 | vs recipe | best top-1 | seconds per run |")
    print("|---|---|---|---|---|---|")
    for label, sets in rows:
        sel = [r for r in table if r["variant"] == label]
        delta = statistics.mean(final[label]) - base
        print(f"| {label} | {' '.join(sets) or '-'} | {fmt(final[label])} | {delta:+.2f} | "
              f"{fmt([r['best_top1'] for r in sel])} | {statistics.mean(r['seconds'] for r in sel):.0f} |")


if __name__ == "__main__":
    main()
