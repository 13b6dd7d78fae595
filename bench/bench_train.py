"""Training throughput: images/s of one full iteration (generator step + student step).

    python bench/bench_train.py [--iters 20] [--batch 64] [--device cpu] [--cases digits,resnet20]

One iteration = sample latents, G forward, teacher forward with BN-statistics hooks, G backward
and Adam step, then student forward/backward and SGD step on the detached batch. Activation
calibration is off and the student is stepped (the steady state after warm-up). Prints one line
per case; the figure is the median over timed blocks after warm-up iterations.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qimera_engine.config import preset  # noqa: E402
from qimera_engine.models import build_teacher  # noqa: E402
from qimera_engine.quant import quantize_model  # noqa: E402
from qimera_engine.seeding import RunRandom  # noqa: E402
from qimera_engine.runtime import autocast_for  # noqa: E402
from qimera_engine.train import Trainer, build_generator  # noqa: E402

CASES = {"digits": ("digits", "digits-cnn"), "resnet20": ("cifar10-resnet20-cpu", "resnet20")}


def bench(case: str, batch: int, iters: int, device: str, warmup: int = 3, blocks: int = 3, amp: bool = False,
          compile: str = "off") -> dict:
    preset_name, teacher_name = CASES[case]
    cfg = preset(preset_name, batch_size=batch, device=device, compile=compile).resolved()
    torch.manual_seed(0)
    teacher = build_teacher(teacher_name)  # random weights: the arithmetic is the same as a trained one
    dev = torch.device(device)
    teacher.model.to(dev).eval().requires_grad_(False)
    student = quantize_model(teacher.model, 4, 4).requires_grad_(True).eval()
    gen = build_generator(cfg, teacher, dev)
    # the runner's own training state and steps (optimizers, sampler, BN hooks as a run builds them)
    trainer = Trainer(cfg, teacher.model, student, gen, teacher.num_classes, RunRandom.create(0, dev), dev)

    def step():
        with autocast_for(amp, dev):  # as a run with amp=True: bf16 on a GPU or a CPU with native bf16
            trainer.student_step(trainer.generator_step(), train=True, calibrating=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with trainer.bn_hooks():
        warmup = warmup if compile == "off" else max(warmup, 10)  # compilation and recompiles happen in these
        return {**_time(step, sync, case, batch, iters, device, warmup, blocks), "amp": amp, "compile": compile}


def _time(step, sync, case, batch, iters, device, warmup, blocks) -> dict:
    for _ in range(warmup):
        step()
    sync()
    rates = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        rates.append(iters * batch / (time.perf_counter() - t0))
    return {"case": case, "batch": batch, "device": device, "threads": torch.get_num_threads(),
            "images_per_s": round(statistics.median(rates), 1), "blocks": [round(r, 1) for r in rates],
            "peak_mb": _peak_mb(device)}


def _peak_mb(device: str) -> float:
    """Peak memory so far: the GPU's max allocated, or the process's peak RSS on the CPU (Linux: KiB)."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="digits,resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as amp=True (GPU, or a CPU with native bf16)")
    p.add_argument("--compile", default="off", help="torch.compile mode of the three networks, as compile=MODE "
                   "(off | default | reduce-overhead)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for case in args.cases.split(","):
        print(json.dumps(bench(case, args.batch, args.iters, args.device, amp=args.amp, compile=args.compile)), flush=True)


if __name__ == "__main__":
    main()
