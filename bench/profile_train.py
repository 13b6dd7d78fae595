"""Where a training iteration's time goes: torch.profiler over the generator step and the student step.

    python bench/profile_train.py [--batch 64] [--iters 5] [--device cpu] [--rows 12]

Builds the ResNet-20 W4A4 loop as a run does (the runner's ``Trainer``; random weights, the arithmetic is
the same), warms up, then profiles ``iters`` generator steps and ``iters`` student steps separately and
prints, for each, its wall time per step and the operators with the most self time. Also prints the
arithmetic of each network per image (multiply-adds as executed, forward).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from qimera_engine.config import preset  # noqa: E402
from qimera_engine.models import build_teacher  # noqa: E402
from qimera_engine.quant import quantize_model  # noqa: E402
from qimera_engine.seeding import RunRandom  # noqa: E402
from qimera_engine.train import Trainer, build_generator  # noqa: E402


def macs_per_image(run) -> float:
    """Forward multiply-adds of one image, as executed (torch's FLOP counter: convolutions and matrix
    products, whichever way a module calls them), at batch size one."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops() / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = preset("cifar10-resnet20-cpu", batch_size=args.batch, device=args.device).resolved()
    torch.manual_seed(0)
    teacher = build_teacher("resnet20")
    teacher.model.to(dev).eval().requires_grad_(False)
    student = quantize_model(teacher.model, 4, 4).requires_grad_(True).eval()
    gen = build_generator(cfg, teacher, dev)
    trainer = Trainer(cfg, teacher.model, student, gen, teacher.num_classes, RunRandom.create(0, dev), dev)

    one = trainer.sampler(1, dev)
    gen.eval()
    g_macs = macs_per_image(lambda: gen(one.labels, one.coeffs, one.noise))
    gen.train()
    t_macs = macs_per_image(lambda: teacher.model(torch.zeros(1, 3, 32, 32, device=dev)))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.device}")
    print(f"forward multiply-adds per image: generator {g_macs / 1e6:.1f} M, teacher/student {t_macs / 1e6:.1f} M")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with trainer.bn_hooks():
        batch = trainer.generator_step()
        for _ in range(3):
            batch = trainer.generator_step()
            trainer.student_step(batch, True, False)
        for name, step in (("generator step", trainer.generator_step),
                           ("student step", lambda: trainer.student_step(batch, True, False))):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync()
            per = (time.perf_counter() - t0) / args.iters
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(args.iters):
                    step()
                sync()
            print(f"\n## {name}: {per * 1000:.1f} ms per step (unprofiled)")
            sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
