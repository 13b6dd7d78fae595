"""Screen student-side recipe changes cheaply: record a run's generated batches once, replay them.

    # once per seed and p: the generator's batches of a preset's schedule (about 6 minutes on 2 cores)
    python bench/screen_recipe.py record --preset cifar10-resnet20-cpu --seed 0 --set superpose_p=0.4 \
        --set checkpoint=resnet20-cifar10.th --set test_data=folder:cifar10-val --out s0p4.pt
    # then each variant: calibration and fine-tuning on the recorded batches (about 2 minutes), top-1
    python bench/screen_recipe.py replay s0p4.pt --set weight_clip=mse --set act_calib=mse
    # or only calibration (and a reconstruction after it): the calibrated student's top-1 (about 40 s)
    python bench/screen_recipe.py replay s0p4.pt --set weight_clip=mse --set act_calib=mse \
        --set recon_iters=200 --calibration-only

The generator learns from the teacher alone (the student trains on detached images), so with the same
seed and generator settings a run generates the same batches whatever the student does. ``replay``
calibrates and trains the student exactly as a run does (the runner's own ``Trainer.student_step``) on
the recorded batches instead of fresh ones, and prints one JSON line: top-1 right after calibration and
at the end. Only student-side settings may change (a generator-side one would change the batches).
The images are stored as float16 (1,600 batches of 64 CIFAR images: about 640 MB), which moves the
replayed result slightly off the run's; ``--float32`` stores them exactly (a replay without ``--set``
then ends where the run ends).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qimera_engine.config import RunConfig, parse_overrides, preset  # noqa: E402
from qimera_engine.evaluate import evaluate  # noqa: E402
from qimera_engine.runtime import keep_freed_memory  # noqa: E402
from qimera_engine.train import Batch, Parts, Trainer  # noqa: E402

# What a replay may change: everything the student's side reads, nothing the generator's side reads.
STUDENT_SIDE = {"wbits", "abits", "keep_first_last_8bit", "kd_alpha", "kd_tau", "kd_reduction", "ce_weight",
                "lr_s", "momentum", "weight_decay", "milestones", "lr_gamma", "calib_epochs", "warmup_epochs",
                "ema_beta", "student_train_mode", "weight_clip", "act_calib", "lr_schedule", "ce_rows",
                "lowpass_d0", "student_steps", "act_learn", "act_lr", "test_data", "eval_batch_size", "num_threads",
                "student_ema", "recon_iters", "recon_images", "recon_drop", "recon_at", "recon_lr", "recon_act_lr",
                "recon_refine", "recon_refine_lr"}


def _as_a_run(cfg: RunConfig) -> None:
    """The process settings a run makes: its thread count, and the allocator tuning (without it, page
    faults cost much of a replay's time)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    keep_freed_memory()


def record(cfg: RunConfig, out: Path, dtype: torch.dtype = torch.float16) -> None:
    _as_a_run(cfg)
    parts = Parts.build(cfg)
    trainer = Trainer.from_parts(parts)
    n, b = cfg.epochs * cfg.iters_per_epoch, cfg.batch_size
    size = parts.teacher.image_size
    x = torch.empty(n, b, parts.teacher.channels, size, size, dtype=dtype)
    targets = torch.empty(n, b, parts.teacher.num_classes)
    logits = torch.empty(n, b, parts.teacher.num_classes)
    t0 = time.perf_counter()
    with trainer.bn_hooks():  # the generator's epochs as a run has them (superposition dose, gen_epochs)
        for epoch in range(cfg.epochs):
            trainer.begin_generator_epoch(epoch)
            for it in range(cfg.iters_per_epoch):
                i = epoch * cfg.iters_per_epoch + it
                batch = trainer.generator_step()
                x[i], targets[i], logits[i] = batch.x, batch.targets, batch.t_logits
            trainer.end_generator_epoch()
    torch.save({"config": cfg.to_dict(), "x": x, "targets": targets, "logits": logits}, out)
    print(json.dumps({"recorded": n, "batch": b, "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}))


def replay(path: Path, overrides: dict, calibration_only: bool = False) -> dict:
    rec = torch.load(path, weights_only=True)
    refused = sorted(set(overrides) - STUDENT_SIDE)
    if refused:
        raise SystemExit(f"error: {', '.join(refused)} change the generated batches: record them again instead")
    cfg = RunConfig.from_dict({**rec["config"], **overrides}).resolved()
    _as_a_run(cfg)
    parts = Parts.build(cfg)
    trainer, student = Trainer.from_parts(parts), parts.student
    zero = torch.zeros(())
    t0 = time.perf_counter()
    out = {"overrides": overrides, "record": str(path)}
    for epoch in range(cfg.epochs):
        calibrating, train = trainer.begin_epoch(epoch)
        for it in range(cfg.iters_per_epoch):
            i = epoch * cfg.iters_per_epoch + it
            batch = Batch(rec["x"][i].float(), rec["targets"][i], rec["logits"][i], (zero, zero, zero))
            trainer.set_student_lr(epoch, it)
            trainer.student_step(batch, train, calibrating)
        trainer.end_epoch(epoch)
        if epoch == cfg.calib_epochs - 1:
            out["calibrated_top1"] = round(evaluate(student, parts.test, batch_size=cfg.eval_batch_size)["top1"], 2)
            if calibration_only:
                break
    out["top1"] = round(evaluate(student, parts.test, batch_size=cfg.eval_batch_size)["top1"], 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--preset", default="cifar10-resnet20-cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--out", required=True)
    r.add_argument("--float32", action="store_true", help="store the images exactly (twice the size); a replay "
                   "with no --set then ends exactly where the run does")
    p = sub.add_parser("replay")
    p.add_argument("record")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--calibration-only", action="store_true", help="stop after the calibration epochs (and a "
                   "reconstruction at recon_at=calib): top1 is then the calibrated student's")
    args = ap.parse_args()
    if args.cmd == "record":
        record(preset(args.preset, seed=args.seed, **parse_overrides(args.set)).resolved(), Path(args.out),
               torch.float32 if args.float32 else torch.float16)
    else:
        print(json.dumps(replay(Path(args.record), parse_overrides(args.set), args.calibration_only)))


if __name__ == "__main__":
    main()
