"""One run over 1 and over N processes (torchrun), side by side: images/s, wall time, top-1.

    python bench/bench_ddp.py [--nproc 1,2] [--device cpu|cuda] [--out-dir DIR] [--json FILE] [-- QUANTIZE ARGS]

Each case is the same `python -m qimera_engine quantize ...` (the arguments after `--`; default: the digits
preset), started plainly for 1 process and with `python -m torch.distributed.run --standalone
--nproc-per-node=N` for N. The global batch is the same, so the runs see the same images; the figure is the
median of the epochs' images/s after the first (which holds start-up and compiling), from the run's
metrics.csv. On CPUs each process gets cores/N threads. Processes that share one GPU use gloo (NCCL wants
one GPU per process): `QIMERA_DIST_BACKEND=gloo` is set when N exceeds the GPUs. The wall time includes what a
fresh home prepares once (the digits teacher is trained on first use): compare the images/s.

Examples:
    python bench/bench_ddp.py --nproc 1,2                          # digits on this machine's CPUs
    python bench/bench_ddp.py --nproc 1,2 --device cuda -- --preset cifar10-resnet20-fast \\
        --checkpoint resnet20-cifar10.th --set epochs=3 --set milestones=[] --set warmup_epochs=1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(n: int, out: Path, device: str, args: list[str]) -> list[str]:
    quantize = ["-m", "qimera_engine", "quantize", *args, "--set", f"device={device}", "--out", str(out), "--quiet"]
    if n == 1:
        return [sys.executable, *quantize]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *quantize]


def environment(n: int, device: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
    if device.startswith("cuda") and n > 1:
        import torch
        if n > torch.cuda.device_count():
            env["QIMERA_DIST_BACKEND"] = "gloo"
    return env


def measure(n: int, out: Path, device: str, args: list[str]) -> dict:
    env = environment(n, device)
    start = time.perf_counter()
    done = subprocess.run(command(n, out, device, args), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:  # the ranks' own errors come first, torchrun's report of them last: show both ends
        err = done.stderr if len(done.stderr) <= 6000 else f"{done.stderr[:3000]}\n[...]\n{done.stderr[-3000:]}"
        raise SystemExit(f"{n} process(es) failed (exit {done.returncode}):\n{err}")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows[1:]] or [float(rows[0]["images_per_s"])]
    summary = json.loads((out / "summary.json").read_text())
    default = "nccl" if device.startswith("cuda") else "gloo"
    return {"processes": n, "images_per_s": statistics.median(rates), "wall_s": round(wall, 1),
            "top1": summary.get("quant_top1"), "epochs": len(rows),
            "backend": env.get("QIMERA_DIST_BACKEND", default) if n > 1 else "-"}


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", default="1,2", help="process counts, comma-separated (default 1,2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the run folders go (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(own)
    counts = [int(x) for x in a.nproc.split(",")]
    args = rest or ["--preset", "digits"]
    base = a.out_dir or Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for n in counts:
        out = base / f"n{n}"
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out} is not empty: choose another --out-dir")
        results.append(measure(n, out, a.device, args))
        r = results[-1]
        ratio = r["images_per_s"] / results[0]["images_per_s"]
        print(f"{n} process(es) [{r['backend']}]: {r['images_per_s']:.0f} images/s ({ratio:.2f}x the first), "
              f"wall {r['wall_s']} s, top-1 {r['top1']}", flush=True)
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": a.device,
            "quantize_args": args, "date": time.strftime("%Y-%m-%d"), "results": results}
    if a.device.startswith("cuda"):
        import torch
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if a.json:
        a.json.write_text(json.dumps(info, indent=2))
    return results


if __name__ == "__main__":
    main()
