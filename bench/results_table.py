"""Accuracy table: methods x bit widths x seeds, mean +- std, as CSV and Markdown.

    python bench/results_table.py --preset digits --bits 4,3 --methods ptq,gdfq,qimera,real-data \
        --seeds 0,1,2 --out docs/results/digits.csv
    python bench/results_table.py --preset cifar10-resnet20-cpu --bits 4 --methods ptq,gdfq,qimera \
        --seeds 0,1,2 --set checkpoint=PATH --set test_data=folder:PATH --jobs 3

Each cell is one `python -m qimera_engine quantize` process (``--jobs`` of them at a time, e.g.
several on one GPU). A finished cell is kept and a broken one resumed when the same command runs again;
``--collect`` runs nothing and reports the cells that have finished. ``--variant NAME:key=value,key=value``
adds a row with changed settings. The table reports the final epoch and, separately, the best epoch on
the test set (METHOD 8).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cell_dir(out_dir, label, bits, seed) -> Path:
    """The run folder of one cell of the table."""
    return out_dir / f"{label}-w{bits}a{bits}-s{seed}"


def one(preset, label, sets, bits, seed, out_dir, threads):
    out = cell_dir(out_dir, label, bits, seed)
    if (out / "summary.json").exists():  # finished before: keep it (a rerun resumes a broken table)
        return label, json.loads((out / "summary.json").read_text())
    if (out / "state.pt").exists():
        cmd = [sys.executable, "-m", "qimera_engine", "quantize", "--resume", str(out), "--quiet"]
    else:
        if out.exists():
            import shutil
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "qimera_engine", "quantize", "--preset", preset, "--wbits", str(bits),
               "--abits", str(bits), "--seed", str(seed), "--out", str(out), "--quiet"] + \
              [a for kv in sets for a in ("--set", kv)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{label} W{bits}A{bits} seed {seed} failed:\n{p.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    print(f"{label:14s} W{bits}A{bits} seed {seed}: FP {s['fp_top1']:.2f} final {s['quant_top1']:.2f} "
          f"best {s['best_top1']:.2f}  {s['seconds']:.0f} s (wall {time.time() - t0:.0f} s)", flush=True)
    return label, s


def fmt(vals):
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--methods", default="ptq,gdfq,qimera,real-data")
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], help="key=value for every cell")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, help="OMP threads per process")
    ap.add_argument("--out", default="bench/out/table.csv")
    ap.add_argument("--runs-dir", help="where the run folders go (default: beside --out)")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: write the CSV and table of the cells that have finished (a table cut short)")
    args = ap.parse_args()

    rows = [(m, [f"method={m}"]) for m in args.methods.split(",") if m]
    for v in args.variant:
        name, _, kvs = v.partition(":")
        rows.append((name, [kv for kv in kvs.split(",") if kv]))
    bits = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out_csv = Path(args.out)
    out_dir = Path(args.runs_dir) if args.runs_dir else out_csv.with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(label, args.set + sets, b, s) for b in bits for label, sets in rows for s in seeds]
    if args.collect:
        done = [j for j in jobs if (cell_dir(out_dir, j[0], j[2], j[3]) / "summary.json").exists()]
        print(f"{len(done)} of {len(jobs)} cells have finished in {out_dir}")
        if not done:
            raise SystemExit("no finished cells to collect")
        jobs = done
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: (j, one(args.preset, j[0], j[1], j[2], j[3], out_dir, args.threads)), jobs))
    table = []
    for (label, _, b, s), (_, sm) in results:
        table.append({"method": label, "wbits": b, "abits": b, "seed": s, "fp_top1": sm["fp_top1"],
                      "final_top1": sm["quant_top1"], "best_top1": sm["best_top1"], "seconds": sm["seconds"],
                      "images_per_s": sm["images_per_s"],
                      # the generator's diversity after the last epoch (runs that record it; blank otherwise)
                      **{k: sm.get("diversity", {}).get(k, "") for k in ("coverage", "mix_coverage", "spread_vs_real")}})
    with out_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    fp = sorted({r["fp_top1"] for r in table})
    print(f"\n{args.preset}: FP top-1 {', '.join(f'{x:.2f}' for x in fp)}; {len(seeds)} seed(s); "
          f"wall {time.time() - t0:.0f} s; CSV {out_csv}\n")
    print("| method | bits | final epoch top-1 | best epoch top-1 | coverage (plain) | coverage (superposed) "
          "| spread vs real | seconds per run |")
    print("|---|---|---|---|---|---|---|---|")
    for b in bits:
        for label, _ in rows:
            sel = [r for r in table if r["method"] == label and r["wbits"] == b]
            if not sel:  # (--collect: no finished cell here yet)
                continue

            def div(key):
                return fmt([r[key] for r in sel if r[key] != ""])
            print(f"| {label} | W{b}A{b} | {fmt([r['final_top1'] for r in sel])} | "
                  f"{fmt([r['best_top1'] for r in sel])} | {div('coverage')} | {div('mix_coverage')} | "
                  f"{div('spread_vs_real')} | {statistics.mean(r['seconds'] for r in sel):.0f} |")


if __name__ == "__main__":
    main()
