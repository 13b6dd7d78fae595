"""The runner: one function that executes a run and yields progress events (METHOD.md 7-8).

Each iteration: generate one batch; step G on L_G = CE_soft(T(x), t) + w * L_BNS; then step
the student on the same, detached batch with the teacher's logits from before G's step.
A run saves its state after every epoch, so an interrupted run resumes from the last
completed epoch and, on the CPU, ends exactly where an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .artifacts import student_of
from .config import RunConfig
from .data import ImageData, InputSpec, load_data
from .evaluate import evaluate
from .events import EpochEnd, Evaluated, Event, Finished, Log, Started, Step
from .generator import BatchSampler, Generator, LatentBatch
from .losses import BNStatisticsLoss, ce_row_mask, kd_loss, low_pass, masked_soft_cross_entropy, soft_cross_entropy
from .models import Teacher, save_state_dict
from .quant import enable_weight_clip, fit_ranges_mse, set_calibration, start_range_sampling
from .runs import Run, RunDamaged, RunLocked, atomic_path, create_run, open_run, write_csv, write_json
from .seeding import RunRandom, seeded_init
from .teachers import random_shift, get_teacher

StopFlag = threading.Event | Callable[[], bool] | None


def pick_device(name: str = "auto") -> torch.device:
    """auto (a CUDA GPU when there is one), cpu, cuda or cuda:N; a clear error for anything else."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda was asked for, but no CUDA GPU is available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def build_generator(cfg: RunConfig, teacher: Teacher, device: torch.device | str = "cpu") -> Generator:
    embed_dim = cfg.embed_dim or teacher.feature_dim
    g = Generator(teacher.num_classes, teacher.image_size, teacher.channels, embed_dim,
                  input_mode=cfg.gen_input, noise_scale=cfg.noise_scale, dm=cfg.dm, dm_width=cfg.dm_width,
                  width=cfg.gen_width, bn_eps=cfg.gen_bn_eps)
    if cfg.embed_init == "teacher":
        g.init_embeddings_from(teacher.classifier.weight.detach().cpu(), freeze=cfg.embed_freeze)
    elif cfg.embed_freeze:
        g.embedding.weight.requires_grad_(False)
    g.to(device)
    if torch.device(device).type == "cpu":
        g.to(memory_format=torch.channels_last)  # ~25% faster convolutions on the CPU
    return g


@dataclass
class Parts:
    """Everything a run trains or reads, built from its config."""
    cfg: RunConfig
    device: torch.device
    teacher: Teacher
    test: ImageData
    student: nn.Module
    generator: Generator | None
    train: ImageData | None  # real images, for the real-data baseline only
    rng: RunRandom           # the run's own random streams (never torch's global one)

    @classmethod
    def build(cls, cfg: RunConfig, log: Callable[[str], None] = lambda s: None,
              teacher_sha256: str | None = None) -> "Parts":
        """``teacher_sha256``: the weights a resumed run must find (``TeacherChanged`` otherwise)."""
        device = pick_device(cfg.device)
        teacher = get_teacher(cfg.teacher, cfg.teacher_data, cfg.checkpoint, cfg.pretrained,
                              device=device, log=log, sha256=teacher_sha256)
        spec = InputSpec.of(teacher)
        test = load_data(cfg.test_data, spec, "test", cfg.download)
        if test.num_classes != teacher.num_classes:
            raise ValueError(f"the test data has {test.num_classes} classes but the teacher {teacher.num_classes}")
        train = None
        if cfg.method == "real-data":
            train = load_data(cfg.train_data or cfg.test_data, spec, "train", cfg.download)
        teacher.model.to(device).eval().requires_grad_(False)
        student = student_of(teacher, cfg).requires_grad_(True)
        student.train(cfg.student_train_mode)
        if cfg.weight_clip == "mse":  # a resumed run loads its saved ratios over these
            enable_weight_clip(student, fit=True)
        with seeded_init(cfg.seed):  # the generator's initial weights, then the run's stream continues
            generator = None if cfg.method == "real-data" else build_generator(cfg, teacher, device)
            rng = RunRandom.create(cfg.seed, device, cpu_state=torch.get_rng_state())
        return cls(cfg, device, teacher, test, student, generator, train, rng)


def run(config: RunConfig | None, *, out: str | Path | None = None, resume: str | Path | None = None,
        stop: StopFlag = None, restart: bool = False) -> Iterator[Event]:
    """Execute a run (new, or ``resume`` an interrupted one) and yield its events.

    ``stop`` (a threading.Event or a callable) ends the run after the current iteration;
    everything up to the last completed epoch stays on disk and can be resumed. A run holds its
    folder's lock while it runs: a second writer gets ``RunLocked``. Resuming a folder whose resume
    state is missing or damaged refuses (``RunDamaged``) unless ``restart`` starts it again from
    epoch 0, which replaces its results.
    """
    t_start = time.perf_counter()
    logs: list[str] = []
    if resume is not None:
        folder = open_run(resume)
        if folder.read_only:
            raise RunLocked(f"run {folder.id} ships with the app and is read-only: it cannot be resumed")
        cfg = folder.config.resolved()
    elif config is None:
        raise ValueError("run needs a config, or a run folder to resume")
    else:
        cfg = config.resolved()
        if out is not None and (Path(out).expanduser() / Run.CONFIG).exists():  # say so before the work below
            raise FileExistsError(f"{out} already holds a run; resume it or choose another --out")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    should_stop = (stop.is_set if isinstance(stop, threading.Event) else stop) or (lambda: False)
    yield Log(f"loading the teacher {cfg.teacher} and the test data {cfg.test_data} (a teacher that is not cached "
              f"yet is trained first: seconds for digits)")
    parts = None
    if resume is None:  # a teacher or data set that cannot be used fails here, before any folder exists
        parts = Parts.build(cfg, logs.append)
        folder = create_run(cfg.to_dict(), cfg.method, cfg.wbits, cfg.abits, out)
    with folder.lock():
        # a resume's refusals (damaged state, another teacher) happen before anything is written
        state = _resume_state(folder, restart) if resume is not None else None
        if parts is None:
            parts = Parts.build(cfg, logs.append, teacher_sha256=folder.teacher_sha256 if state else None)
        if state is None or folder.teacher_sha256 is None:  # the teacher's identity, checked on resume
            write_json(folder.path / Run.TEACHER, {k: parts.teacher.info.get(k) for k in ("sha256", "weights")})
        folder.set_status("running", pid=os.getpid(), host=socket.gethostname())
        try:
            for text in logs:
                yield Log(text)
            yield from _execute(parts, folder, should_stop, state, t_start)
        except GeneratorExit:
            _final_status(folder, "cancelled", reason="the caller stopped reading events")
            raise
        except KeyboardInterrupt:
            _final_status(folder, "cancelled", reason="interrupted (SIGINT)")
            raise
        except BaseException as e:
            _final_status(folder, "failed", error=f"{type(e).__name__}: {e}")
            raise


def _final_status(folder: Run, status: str, **extra) -> None:
    """Record how a run ended, if the disk lets us (a full disk must not hide the first error)."""
    with contextlib.suppress(OSError):
        folder.set_status(status, **extra)


_RESULTS = (Run.METRICS, Run.SUMMARY, Run.STUDENT, Run.GENERATOR, "generator.json")


def _resume_state(folder: Run, restart: bool) -> dict | None:
    """The state a resumed run continues from; None to start from epoch 0.

    Refuses (``RunDamaged``) when results exist but the state is missing or unreadable, since
    starting again would silently replace them; ``restart`` does that on purpose.
    """
    path = folder.path / Run.STATE
    if restart:
        for name in (Run.STATE, Run.TEACHER, *_RESULTS):
            with contextlib.suppress(FileNotFoundError):
                (folder.path / name).unlink()
        return None
    again = "; to start it again from epoch 0 (its results are replaced), resume with --restart (restart=True)"
    if not path.exists():
        if any((folder.path / name).exists() for name in _RESULTS):
            raise RunDamaged(f"run {folder.id} has results but no resume state ({Run.STATE} is missing){again}")
        return None  # stopped before its first epoch ended: nothing to lose
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(st, dict) or not {"epoch", "best", "fp_top1", "seconds", "student"} <= set(st):
            raise ValueError("keys are missing")
    except Exception as e:
        raise RunDamaged(f"run {folder.id}: its resume state {Run.STATE} is damaged "
                         f"({type(e).__name__}: {str(e)[:120]}){again}") from None
    if "rows" not in st:  # written before the state carried the metrics: read them from metrics.csv
        st["rows"] = _checked_rows(folder, int(st["epoch"]) + 1, again)
    return st


def _checked_rows(folder: Run, n: int, again: str) -> list[dict]:
    try:
        rows = folder.metrics[:n]  # checked row by row
    except RunDamaged:
        rows = []
    if len(rows) != n:
        raise RunDamaged(f"run {folder.id}: {Run.METRICS} does not hold the {n} completed epoch(s) its resume "
                         f"state records{again}")
    return rows


def run_to_end(config: RunConfig, on_event: Callable[[Event], None] | None = None, **kw) -> dict:
    """Run to the end and return the summary (the events go to ``on_event``)."""
    summary = {}
    for ev in run(config, **kw):
        if on_event:
            on_event(ev)
        if isinstance(ev, Finished):
            summary = ev.summary
    return summary


def _execute(parts: Parts, folder: Run, should_stop: Callable[[], bool], st: dict | None,
             t_start: float) -> Iterator[Event]:
    cfg = parts.cfg
    dev, teacher, student, gen = parts.device, parts.teacher.model, parts.student, parts.generator

    opt_s = torch.optim.SGD(student.parameters(), lr=cfg.lr_s, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                            weight_decay=cfg.weight_decay)
    sched_s = torch.optim.lr_scheduler.MultiStepLR(opt_s, cfg.milestones, cfg.lr_gamma)
    opt_g = sched_g = None
    if gen is not None:
        opt_g = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=cfg.lr_g,
                                 betas=tuple(cfg.g_betas))
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, cfg.milestones, cfg.lr_gamma)
    sampler = BatchSampler(parts.teacher.num_classes, gen.embed_dim if gen else 1, cfg.superpose_p,
                           cfg.superpose_k, cfg.coeff_sampler, cfg.dirichlet_alpha, cfg.fixed_coeffs, seed=cfg.seed,
                           generator=parts.rng.device)

    rows: list[dict] = []
    start_epoch, best, fp_top1, elapsed_before = 0, -1.0, None, 0.0
    if st is not None:
        try:
            student.load_state_dict(st["student"])
            opt_s.load_state_dict(st["opt_s"])
            sched_s.load_state_dict(st["sched_s"])
            if gen is not None:
                gen.load_state_dict(st["generator"])
                opt_g.load_state_dict(st["opt_g"])
                sched_g.load_state_dict(st["sched_g"])
            parts.rng.load_state(st)
            sampler.rng.setstate(_tuples(st["rng_sampler"]))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunDamaged(f"run {folder.id}: its resume state {Run.STATE} does not fit the run "
                             f"({type(e).__name__}: {str(e)[:120]}); resume with --restart to start it again") from None
        start_epoch, best, fp_top1 = int(st["epoch"]) + 1, float(st["best"]), float(st["fp_top1"])
        elapsed_before = float(st["seconds"])
        rows = list(st["rows"])
    if fp_top1 is None:
        fp_top1 = evaluate(teacher, parts.test, batch_size=cfg.eval_batch_size, device=dev)["top1"]
    total = cfg.epochs * cfg.iters_per_epoch
    yield Started(str(folder.path), cfg.to_dict(), str(dev), total, start_epoch, fp_top1)

    bns = BNStatisticsLoss(teacher) if gen is not None else None
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and dev.type == "cuda"
           else contextlib.nullcontext())
    cosine = cfg.lr_schedule == "cosine"
    student_start = cfg.warmup_epochs  # the student's first epoch (ptq never trains it)
    student_total = (cfg.epochs - student_start) * cfg.iters_per_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            calibrating = epoch < cfg.calib_epochs
            train_student = epoch >= cfg.warmup_epochs and cfg.method != "ptq"
            set_calibration(student, calibrating)
            last_calibration = cfg.act_calib == "mse" and epoch == cfg.calib_epochs - 1
            if last_calibration:  # the ranges of the last calibration batches are then clipped (MSE)
                start_range_sampling(student, ACT_SAMPLE_BATCHES)
            sums = torch.zeros(6, device=dev)  # loss_g, ce_g, bns, loss_s, kd, ce_s
            window, t_window = torch.zeros(6, device=dev), time.perf_counter()
            for it in range(cfg.iters_per_epoch):
                if should_stop():
                    folder.set_status("cancelled", epoch=epoch, completed_epochs=epoch)
                    yield Finished(str(folder.path), "cancelled", _summary(cfg, folder, rows, fp_top1, elapsed_before + time.perf_counter() - t_start))
                    return
                with amp:
                    if gen is not None:
                        x, targets, t_logits, g_losses = _generator_step(cfg, gen, teacher, bns, opt_g, sampler, dev)
                    else:
                        x, targets, t_logits, g_losses = _real_batch(cfg, parts, teacher, dev)
                    if cosine and train_student:  # per step, from the step count: nothing to save for resume
                        opt_s.param_groups[0]["lr"] = cosine_lr(cfg.lr_s, (epoch - student_start) * cfg.iters_per_epoch
                                                                + it, student_total)
                    s_losses = _student_step(cfg, student, opt_s, x, targets, t_logits, train_student, calibrating,
                                             teacher)
                vec = torch.stack([*g_losses, *s_losses]).float()
                sums += vec
                window += vec
                step = epoch * cfg.iters_per_epoch + it + 1
                if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iters_per_epoch:
                    n = (it % cfg.log_every) + 1
                    vals = (window / n).tolist()  # the one host sync per log interval
                    if not all(math.isfinite(v) for v in vals):
                        raise FloatingPointError(
                            f"a loss became NaN or infinite in epoch {epoch}, iteration {it} "
                            f"({dict(zip(_LOSS_NAMES, vals))}); lower the learning rates, kd_alpha or kd_tau. "
                            f"The run folder keeps the last completed epoch.")
                    rate = n * cfg.batch_size / max(time.perf_counter() - t_window, 1e-9)
                    yield Step(epoch, it, step, total, dict(zip(_LOSS_NAMES, vals)), rate)
                    window.zero_()
                    t_window = time.perf_counter()
            with warnings.catch_warnings():  # warm-up epochs never step the student's optimizer
                warnings.simplefilter("ignore", UserWarning)
                if not cosine:  # cosine sets the student's lr at every step instead
                    sched_s.step()
            if sched_g is not None:
                sched_g.step()
            if last_calibration:
                fit_ranges_mse(student)
            set_calibration(student, False)
            acc = evaluate(student, parts.test, batch_size=cfg.eval_batch_size, device=dev)["top1"]
            best = max(best, acc)
            seconds = time.perf_counter() - t_epoch
            means = (sums / cfg.iters_per_epoch).tolist()
            row = {"epoch": epoch, "top1": round(acc, 4), "best_top1": round(best, 4),
                   **{k: round(v, 6) for k, v in zip(_LOSS_NAMES, means)},
                   "lr_g": opt_g.param_groups[0]["lr"] if opt_g else 0.0, "lr_s": opt_s.param_groups[0]["lr"],
                   "calibrating": int(calibrating), "student_trained": int(train_student),
                   "seconds": round(seconds, 3), "images_per_s": round(cfg.iters_per_epoch * cfg.batch_size / seconds, 1)}
            rows.append(row)
            elapsed = elapsed_before + time.perf_counter() - t_start
            _save_epoch(folder, parts, epoch, best, fp_top1, elapsed, rows, opt_s, sched_s, opt_g, sched_g, sampler)
            yield Evaluated(epoch, acc, best)
            yield EpochEnd(epoch, row)
    finally:
        if bns is not None:
            bns.remove()
    summary = _summary(cfg, folder, rows, fp_top1, elapsed_before + time.perf_counter() - t_start)
    write_json(folder.path / Run.SUMMARY, summary)
    folder.set_status("finished")
    yield Finished(str(folder.path), "finished", summary)


ACT_SAMPLE_BATCHES = 40  # act_calib="mse": activations of the last 40 calibration batches choose the clipping

_LOSS_NAMES = ("loss_g", "ce_g", "bns", "loss_s", "kd", "ce_s")


def _generator_step(cfg, gen, teacher, bns, opt_g, sampler, dev):
    batch: LatentBatch = sampler(cfg.batch_size, dev)
    x = gen(batch.labels, batch.coeffs, batch.noise)
    bns.active = True
    t_logits = teacher(x)
    bns.active = False
    l_bns = bns.pop()
    ce_g = soft_cross_entropy(t_logits.float(), batch.targets)
    loss_g = ce_g + cfg.bns_weight * l_bns
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return x.detach(), batch.targets, t_logits.detach(), (loss_g.detach(), ce_g.detach(), l_bns.detach())


def _real_batch(cfg, parts, teacher, dev):
    """The real-data baseline's batch: real training images, one-hot targets."""
    data = parts.train
    idx = torch.randint(len(data), (cfg.batch_size,), generator=parts.rng.cpu)
    images, labels = data.take(idx)
    x, y = data.normalise(images).to(dev), labels.to(dev)
    x = random_shift(x, max(1, parts.teacher.image_size // 8), parts.rng.cpu)
    with torch.no_grad():
        t_logits = teacher(x)
    targets = torch.nn.functional.one_hot(y, parts.teacher.num_classes).float()
    zero = torch.zeros((), device=dev)
    return x, targets, t_logits, (zero, zero, zero)


def _student_step(cfg, student, opt_s, x, targets, t_logits, train_student: bool, calibrating: bool,
                  teacher=None):
    zero = torch.zeros((), device=x.device)
    if cfg.lowpass_d0 > 0 and (train_student or calibrating):  # the student sees filtered images, and
        x = low_pass(x, cfg.lowpass_d0)                        # learns the teacher's view of those
        with torch.no_grad():
            t_logits = teacher(x)
    if not train_student:
        if calibrating:  # the forward pass calibrates the activation ranges
            with torch.no_grad():
                student(x)
        return zero, zero, zero
    rows = None if cfg.ce_rows == "all" else ce_row_mask(cfg.ce_rows, targets, t_logits)
    for _ in range(cfg.student_steps):
        s_logits = student(x).float()
        kd = kd_loss(s_logits, t_logits.float(), cfg.kd_tau, cfg.kd_reduction)
        ce = soft_cross_entropy(s_logits, targets) if rows is None else masked_soft_cross_entropy(s_logits, targets, rows)
        loss = cfg.kd_alpha * kd + cfg.ce_weight * ce
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()
    return loss.detach(), kd.detach(), ce.detach()


def cosine_lr(base: float, step: int, total: int) -> float:
    """The learning rate after ``step`` of ``total`` steps of a cosine decay from ``base`` to 0."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _tuples(x):
    """Python's random state comes back from torch.load with lists where it had tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _save_epoch(folder, parts, epoch, best, fp_top1, seconds, rows, opt_s, sched_s, opt_g, sched_g, sampler):
    state = {"epoch": epoch, "best": best, "fp_top1": fp_top1, "seconds": seconds, "rows": rows,
             "student": parts.student.state_dict(), "opt_s": opt_s.state_dict(), "sched_s": sched_s.state_dict(),
             "rng_sampler": sampler.rng.getstate(), **parts.rng.state()}
    if parts.generator is not None:
        state.update(generator=parts.generator.state_dict(), opt_g=opt_g.state_dict(), sched_g=sched_g.state_dict())
        save_state_dict(parts.generator, folder.path / Run.GENERATOR)
        write_json(folder.path / "generator.json", parts.generator.config())
    save_state_dict(parts.student, folder.path / Run.STUDENT)
    write_csv(folder.path / Run.METRICS, rows)
    with atomic_path(folder.path / Run.STATE) as tmp:
        torch.save(state, tmp)


def _summary(cfg: RunConfig, folder: Run, rows: list[dict], fp_top1: float, seconds: float) -> dict:
    last = rows[-1] if rows else {}
    best_row = max(rows, key=lambda r: r["top1"]) if rows else {}
    images = len(rows) * cfg.iters_per_epoch * cfg.batch_size
    return {"run": folder.id, "method": cfg.method, "teacher": cfg.teacher, "test_data": cfg.test_data,
            "wbits": cfg.wbits, "abits": cfg.abits, "seed": cfg.seed, "fp_top1": round(fp_top1, 4),
            "teacher_sha256": folder.teacher_sha256,
            "quant_top1": last.get("top1"), "best_top1": best_row.get("top1"), "best_epoch": best_row.get("epoch"),
            "epochs_done": len(rows), "epochs": cfg.epochs, "images": images, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None}
