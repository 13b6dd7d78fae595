"""Training-loop throughput of this checkout against another one, side by side on one machine.

    git worktree add /tmp/qimera-old 2dc3c7b
    python bench/compare_loops.py --old /tmp/qimera-old [--rounds 4] [--iters 20] [--batch 64] [--amp]

Each round times one full iteration (generator step + student step, ResNet-20 W4A4, random weights)
in a fresh process of each checkout, alternating old/new so that both see the same machine state.
Both loops are set up the way their runner sets them up (teacher frozen and in eval mode, student in
eval mode and stepped, activation calibration off): this checkout through its public ``Trainer``, an
older one through the step functions it had then. ``--amp`` runs this checkout's loop as a run with
``amp=true`` does (bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere); the other
checkout runs as it is. Prints each round, the medians and their ratio, and each process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the checkout under test (cwd = that checkout); prints one JSON line.
HARNESS = r"""
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, ".")
from qimera_engine.config import preset
from qimera_engine.models import build_teacher
from qimera_engine.quant import quantize_model
from qimera_engine import train
batch, iters, blocks, amp = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
cfg = preset("cifar10-resnet20-cpu", batch_size=batch, device="cpu").resolved()
torch.manual_seed(0)
teacher = build_teacher("resnet20")
teacher.model.eval().requires_grad_(False)
student = quantize_model(teacher.model, 4, 4).requires_grad_(True).eval()
gen = train.build_generator(cfg, teacher, "cpu")
if hasattr(train, "Trainer"):
    from qimera_engine.seeding import RunRandom
    tr = train.Trainer(cfg, teacher.model, student, gen, teacher.num_classes, RunRandom.create(0, "cpu"),
                       torch.device("cpu"))
    hooks = tr.bn_hooks()
    def step():
        with train.autocast_for(amp, torch.device("cpu")):
            tr.student_step(tr.generator_step(), train=True, calibrating=False)
else:  # an older checkout: its private step functions, built as its runner built them
    from qimera_engine.generator import BatchSampler
    from qimera_engine.losses import BNStatisticsLoss
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=tuple(cfg.g_betas))
    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr_s, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sampler = BatchSampler(teacher.num_classes, gen.embed_dim, cfg.superpose_p, cfg.superpose_k, seed=0)
    bns = BNStatisticsLoss(teacher.model)
    import contextlib
    hooks = contextlib.nullcontext()
    def step():
        x, t, logits, _ = train._generator_step(cfg, gen, teacher.model, bns, opt_g, sampler, torch.device("cpu"))
        train._student_step(cfg, student, opt_s, x, t, logits, True, False)
with hooks:
    for _ in range(3):
        step()
    rates = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        rates.append(iters * batch / (time.perf_counter() - t0))
print(json.dumps({"images_per_s": statistics.median(rates), "blocks": rates,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(tree: Path, batch: int, iters: int, blocks: int, amp: bool = False) -> dict:
    p = subprocess.run([sys.executable, "-c", HARNESS, str(batch), str(iters), str(blocks), str(int(amp))], cwd=tree,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{tree}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return ", ".join(have) or "none of avx2/avx512f/avx512_bf16/amx_bf16"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="another checkout of this project (e.g. a git worktree)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--amp", action="store_true", help="this checkout's loop with amp=true (bf16 where native)")
    args = ap.parse_args()
    import torch
    print(f"# {cpu_name()} ({cpu_flags()}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ResNet-20 W4A4, batch {args.batch}; this checkout {'with' if args.amp else 'without'} amp")
    results = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, tree in (("old", Path(args.old)), ("new", ROOT)):
            m = measure(tree, args.batch, args.iters, args.blocks, amp=args.amp and name == "new")
            results[name].append(m)
            print(f"round {r}: {name} {m['images_per_s']:7.1f} images/s  peak RSS {m['peak_rss_mb']:.0f} MB",
                  flush=True)
    med = {k: statistics.median(m["images_per_s"] for m in v) for k, v in results.items()}
    print(json.dumps({"old_images_per_s": round(med["old"], 1), "new_images_per_s": round(med["new"], 1),
                      "speedup": round(med["new"] / med["old"], 3),
                      "old_peak_rss_mb": round(max(m["peak_rss_mb"] for m in results["old"])),
                      "new_peak_rss_mb": round(max(m["peak_rss_mb"] for m in results["new"]))}))


if __name__ == "__main__":
    main()
