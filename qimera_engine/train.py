"""The runner: one function that executes a run and yields progress events (METHOD.md 7-8).

Each iteration: generate one batch; step G on L_G = CE_soft(T(x), t) + w * L_BNS; then step
the student on the same, detached batch with the teacher's logits from before G's step.
A run saves its state after every epoch, so an interrupted run resumes from the last
completed epoch and, on the CPU, ends exactly where an uninterrupted one would.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import queue
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
from .distributed import SINGLE, World, from_env, run_device, sync_batchnorm
from .evaluate import evaluate
from .events import EpochEnd, Evaluated, Event, Finished, Log, Started, Step
from .generator import BatchSampler, Generator, LatentBatch
from .losses import (BNStatisticsLoss, ce_row_mask, generator_ce, kd_loss, low_pass, masked_soft_cross_entropy,
                     class_mode_seeking, layout, mode_seeking, soft_cross_entropy)
from .models import Teacher, classifier_layer, save_state_dict
from .quant import (act_quantizers, enable_weight_clip, fit_ranges_mse, make_ranges_learnable, reconstruct,
                    refine_images, set_calibration, start_range_sampling)
from .runtime import autocast_for, compiled, cpu_layout, keep_freed_memory, pick_device
from .runs import Run, RunDamaged, RunLocked, atomic_path, check_out, create_run, open_run, write_csv, write_json
from .seeding import RunRandom, seeded_init
from .teachers import random_shift, get_teacher

StopFlag = threading.Event | Callable[[], bool] | None


def build_generator(cfg: RunConfig, teacher: Teacher, device: torch.device | str = "cpu") -> Generator:
    embed_dim = cfg.embed_dim or teacher.feature_dim
    g = Generator(teacher.num_classes, teacher.image_size, teacher.channels, embed_dim,
                  input_mode=cfg.gen_input, noise_scale=cfg.noise_scale, dm=cfg.dm, dm_width=cfg.dm_width,
                  width=cfg.gen_width, bn_eps=cfg.gen_bn_eps, embed_norm=cfg.embed_norm,
                  block_noise=cfg.block_noise)
    if cfg.embed_init == "teacher":
        g.init_embeddings_from(teacher.classifier.weight.detach().cpu(), freeze=cfg.embed_freeze)
    elif cfg.embed_freeze:
        g.embedding.weight.requires_grad_(False)
    return cpu_layout(g.to(device))


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
              teacher_sha256: str | None = None, world: World = SINGLE) -> "Parts":
        """``teacher_sha256``: the weights a resumed run must find (``TeacherChanged`` otherwise);
        ``world``: this process's place in a run over several (its own GPU)."""
        device = pick_device(run_device(cfg.device, world))
        teacher = get_teacher(cfg.teacher, cfg.teacher_data, cfg.checkpoint, cfg.pretrained,
                              device=device, log=log, sha256=teacher_sha256)
        spec = InputSpec.of(teacher)
        # another number of classes is refused before an image folder is decoded or cached
        test = load_data(cfg.test_data, spec, "test", cfg.download, num_classes=teacher.num_classes)
        train = None
        if cfg.method == "real-data":
            train = load_data(cfg.train_data or cfg.test_data, spec, "train", cfg.download,
                              num_classes=teacher.num_classes)
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

    A run with ``num_threads`` sets PyTorch's thread count for the process while it runs, and sets the
    caller's count back when it ends, fails or is stopped (the next run or model in the process would
    otherwise compute with it, and differ in float rounding).

    ``stop`` (a threading.Event or a callable) ends the run after the current iteration;
    everything up to the last completed epoch stays on disk and can be resumed. A run holds its
    folder's lock while it runs: a second writer gets ``RunLocked``. Resuming a folder whose resume
    state is missing or damaged refuses (``RunDamaged``) unless ``restart`` starts it again from
    epoch 0, which replaces its results.
    """
    threads = torch.get_num_threads()
    try:
        yield from _run(config, out=out, resume=resume, stop=stop, restart=restart)
    finally:
        torch.set_num_threads(threads)


def _run(config: RunConfig | None, *, out: str | Path | None, resume: str | Path | None, stop: StopFlag,
         restart: bool) -> Iterator[Event]:
    if resume is not None:
        if config is not None or out is not None:
            raise ValueError("a resumed run keeps the settings and folder it was started with: give resume alone "
                             "(without a config or out)")
        folder = open_run(resume)
        if folder.read_only:
            raise RunLocked(f"run {folder.id} ships with the app and is read-only: it cannot be resumed")
        cfg = folder.config.resolved()
    elif config is None:
        raise ValueError("run needs a config, or a run folder to resume")
    else:
        if restart:
            raise ValueError("restart goes with resume (it starts that run again from epoch 0)")
        cfg = config.resolved()
        if out is not None:
            check_out(out)  # say so before the work below
    if cfg.num_threads:  # process-wide: run() sets the caller's count back when the run ends
        torch.set_num_threads(cfg.num_threads)
    keep_freed_memory()
    should_stop = (stop.is_set if isinstance(stop, threading.Event) else stop) or (lambda: False)
    world = from_env(cfg.device)
    if world.size > 1:  # on every rank, before any waits for rank 0: each refuses the same way and exits
        _check_distributable(cfg, world)
    if not world.is_main:  # started by torchrun: rank 0 owns the folder and reports; this rank follows it
        _follow(cfg, world, should_stop)
        return
    loading = Log(f"loading the teacher {cfg.teacher} and the test data {cfg.test_data}"
                  + (" (the digits teacher is trained first when it is not cached yet: seconds)"
                     if cfg.teacher == "digits-cnn" else ""))
    parts = trainer = None
    if resume is None:  # a teacher, data set or setting that cannot be used fails here, before any folder exists
        yield loading
        try:
            parts = yield from _logging_while(Parts.build, cfg, should_stop=should_stop, world=world)
        except _StoppedEarly:
            yield Log("stopped before the run started (nothing was saved)")
            return
        trainer = Trainer.from_parts(parts, world)
        world.barrier()  # the other ranks build theirs now (a teacher trained for the cache is there)
        folder = create_run(cfg.to_dict(), cfg.method, cfg.wbits, cfg.abits, out)
    with folder.lock():
        # a resume's refusals (damaged state, changed config or teacher) happen before anything is written
        state = _resume_state(folder, restart) if resume is not None else None
        if parts is None:
            yield loading
            try:
                parts = yield from _logging_while(Parts.build, cfg, should_stop=should_stop,
                                                  teacher_sha256=folder.teacher_sha256 if state else None,
                                                  world=world)
            except _StoppedEarly:
                yield Log("stopped before the run resumed (nothing was changed)")
                return
            trainer = Trainer.from_parts(parts, world)
            world.barrier()
        if state is not None and int(state["epoch"]) + 1 >= cfg.epochs and folder.status.get("status") == "finished":
            raise ValueError(f"run {folder.id} has finished all its {cfg.epochs} epochs: there is nothing to resume; "
                             f"--restart (restart=True) starts it again from epoch 0, replacing its results")
        if state is None:  # the teacher's identity, checked on resume
            write_json(folder.path / Run.TEACHER, {k: parts.teacher.info.get(k) for k in ("sha256", "weights")})
        folder.set_status("running", **folder.writer_record())
        t_start = time.perf_counter()  # the run's own time: a teacher trained for the cache first is not in it
        world.share(state)  # every rank starts from the same epoch
        try:
            yield from _execute(parts, folder, should_stop, state, t_start, trainer)
        except GeneratorExit:
            _final_status(folder, "cancelled", reason="the caller stopped reading events")
            raise
        except KeyboardInterrupt:
            _final_status(folder, "cancelled", reason="interrupted (SIGINT)")
            raise
        except BaseException as e:
            _final_status(folder, "failed", error=f"{type(e).__name__}: {e}")
            raise


def _follow(cfg: RunConfig, world: World, should_stop: Callable[[], bool]) -> None:
    """A rank other than 0: build the same parts once rank 0 has built its own, start from the state rank 0
    shares, and train in step with it (no folder, no evaluation, no events)."""
    world.barrier()
    parts = Parts.build(cfg, world=world)
    trainer = Trainer.from_parts(parts, world)
    state = world.share(None)
    for _ in _execute(parts, None, should_stop, state, time.perf_counter(), trainer):
        pass


def _check_distributable(cfg: RunConfig, world: World) -> None:
    """Settings a run over several processes does not compute as one process would, refused up front."""
    if cfg.student_train_mode:
        raise ValueError(f"a run over {world.size} processes cannot use student_train_mode (the student's BatchNorm "
                         "would use each process's share): run it in one process")
    # an uneven split (or one that cuts a pair) is refused here
    world.rows(cfg.batch_size, cfg.ms_weight > 0 and cfg.ms_pairs == "paired")


_DONE = object()


class _StoppedEarly(Exception):
    """Asked to stop while the run was still being prepared (a teacher in training): nothing to save yet."""


def _logging_while(build: Callable, *args, should_stop: Callable[[], bool] = lambda: False, **kw):
    """``build(*args, log=..., **kw)`` in a thread of its own, yielding its log lines as ``Log`` events while
    it works (a teacher trained for the cache reports each epoch), then returning its result or raising
    its error. A stop asked for meanwhile ends the build at its next log line (``_StoppedEarly``): a teacher
    in training is dropped before anything of it is cached. Building draws its random numbers under
    ``seeded_init``, safe in any thread."""
    lines, box = queue.SimpleQueue(), {}

    def log(line) -> None:
        if should_stop():
            raise _StoppedEarly()
        lines.put(line)

    def work():
        try:
            box["value"] = build(*args, log=log, **kw)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = e
        finally:
            lines.put(_DONE)
    thread = threading.Thread(target=work, name="qimera-build", daemon=True)
    thread.start()
    while (line := lines.get()) is not _DONE:
        yield Log(str(line), getattr(line, "fraction", None))
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _final_status(folder: Run, status: str, **extra) -> None:
    """Record how a run ended, if the disk lets us (a full disk must not hide the first error), and never
    in a folder that was removed meanwhile (that would bring it back without its config)."""
    with contextlib.suppress(OSError, RunDamaged):
        folder.set_status(status, **extra)


_RESULTS = (Run.METRICS, Run.SUMMARY, Run.STUDENT, Run.GENERATOR, "generator.json")


def _resume_state(folder: Run, restart: bool) -> dict | None:
    """The state a resumed run continues from; None to start from epoch 0.

    Refuses (``RunDamaged``) when results exist but the state is missing or unreadable, since
    starting again would silently replace them, and when config.json or teacher.json is not what the
    state was saved with (a resumed run would mix two settings or two teachers in one table);
    ``restart`` starts again on purpose, with the folder's config as it is now.
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
    _check_unchanged(folder, st, again)
    if "rows" not in st:  # written before the state carried the metrics: read them from metrics.csv
        st["rows"] = _checked_rows(folder, int(st["epoch"]) + 1, again)
    return st


def config_sha256(config: dict) -> str:
    """A hash of a run's settings (canonical JSON), as its resume state records them."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _check_unchanged(folder: Run, st: dict, again: str) -> None:
    """``RunDamaged`` naming what changed when the folder's config.json or teacher.json differs from what the
    resume state was saved with (states written before these were recorded carry neither)."""
    saved = st.get("config")
    if isinstance(saved, dict):
        now = folder.config.to_dict()
        # a setting added by a later version, at its default, is what the run was trained with (every new
        # setting defaults to the behaviour before it): an upgrade between two epochs does not strand a run
        default = RunConfig().to_dict()
        now = {k: v for k, v in now.items() if k in saved or v != default[k]}
        if config_sha256(now) != st.get("config_sha256", config_sha256(saved)) or now != saved:
            diff = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                    if saved.get(k) != now.get(k)]
            raise RunDamaged(f"run {folder.id}: {Run.CONFIG} has changed since its last completed epoch "
                             f"({'; '.join(diff[:4]) or 'edited'}{' ...' if len(diff) > 4 else ''}); resuming would "
                             f"mix two settings in one run. Put the settings back, or start a new run{again}")
    teacher = st.get("teacher_sha256")
    if teacher is not None or "config" in st:
        if not (folder.path / Run.TEACHER).is_file():
            raise RunDamaged(f"run {folder.id}: {Run.TEACHER} is missing, so the teacher it was started with "
                             f"cannot be checked{again}")
        if folder.teacher_sha256 != teacher:
            raise RunDamaged(f"run {folder.id}: {Run.TEACHER} names other weights (sha256 "
                             f"{str(folder.teacher_sha256)[:16]}) than its resume state ({str(teacher)[:16]}){again}")


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


@dataclass
class Batch:
    """One training batch: images, soft targets, the teacher's logits on them, and the generator's
    losses (loss_g, ce_g, bns; zeros without a generator)."""
    x: torch.Tensor
    targets: torch.Tensor
    t_logits: torch.Tensor
    g_losses: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    paired: bool = False  # rows in pairs (mode seeking): a process's share is its share of each half


class Trainer:
    """A run's training state and its two steps (METHOD.md 7-8).

    Holds the networks, the optimizers and schedulers, the latent sampler and the teacher's
    BN-statistics hooks. One iteration is ``batch = next_batch()`` (``generator_step`` or, for the
    real-data baseline, ``real_batch``) then ``student_step(batch, ...)``; the runner adds epochs,
    evaluation, saving and events around them, and benchmarks call the same two steps.
    """

    def __init__(self, cfg: RunConfig, teacher: nn.Module, student: nn.Module, generator: Generator | None,
                 num_classes: int, rng: RunRandom, device: torch.device, train: ImageData | None = None,
                 image_size: int = 32, world: World = SINGLE):
        if generator is not None and not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()):
            raise ValueError("the teacher has no BatchNorm2d layer: Qimera needs its running statistics")
        self.cfg, self.teacher, self.student, self.generator = cfg, teacher, student, generator
        self.rng, self.device, self.train, self.image_size = rng, torch.device(device), train, image_size
        self.world = world
        if world.distributed:  # what a batch decides as a whole is the global batch's (distributed.py)
            _check_distributable(cfg, world)
            if generator is not None:
                sync_batchnorm(generator, world)
            for q in act_quantizers(student):
                q.range_reduce = world.range
        for m in (teacher, student, generator):  # the fast layout for the loop and the evaluations
            if m is not None:
                cpu_layout(m)
        ranges = make_ranges_learnable(student) if cfg.act_learn else []
        weights = [p for p in student.parameters() if all(p is not r for r in ranges)]
        self.opt_s = torch.optim.SGD(weights, lr=cfg.lr_s, momentum=cfg.momentum,
                                     nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
        # act_learn: the activation ranges' own optimizer; Adam, so its steps do not depend on the
        # gradients' scale (a range's gradient sums over a whole activation tensor)
        self.opt_r = torch.optim.Adam(ranges, lr=cfg.act_lr) if ranges else None
        # student_ema: a moving average of the weights, started at the first student step
        self.weights, self.ema = weights, None
        self.sched_s = torch.optim.lr_scheduler.MultiStepLR(self.opt_s, cfg.milestones, cfg.lr_gamma)
        self.opt_g = self.sched_g = None
        if generator is not None:
            self.opt_g = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=cfg.lr_g,
                                          betas=tuple(cfg.g_betas))
            self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, cfg.milestones, cfg.lr_gamma)
        self.generator_frozen = False  # set per epoch by begin_epoch (gen_epochs)
        # a frozen generator keeps its BN running statistics too (momentum 0: its training-mode batches
        # still normalise by their own statistics, so the images are the same), and is then the very
        # generator of the epoch it froze after, down to the buffers that its eval-mode samples use
        self._gen_bn_momenta = [(m, m.momentum) for m in (generator.modules() if generator else ())
                                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # gen_average: the mean of the generator's states over its last epochs, copied into it when it freezes
        self.gen_avg: GeneratorAverage | None = None
        self._gen_epoch = 0
        self.sampler = BatchSampler(num_classes, generator.embed_dim if generator else 1, cfg.superpose_p,
                                    cfg.superpose_k, cfg.coeff_sampler, cfg.dirichlet_alpha, cfg.fixed_coeffs,
                                    seed=cfg.seed, generator=rng.device,
                                    paired=cfg.ms_weight > 0 and cfg.ms_pairs == "paired",
                                    pixel_shapes=generator.noise_shapes() if generator else None)
        self.classifier = classifier_layer(teacher) if cfg.ms_weight > 0 and cfg.ms_space == "feature" else None
        self.bns: BNStatisticsLoss | None = None
        # the networks' forward passes, compiled with ``compile`` (the modules themselves stay as they are,
        # so saving, evaluation and calibration see the same parameters and buffers)
        self.gen_fwd, self.teacher_fwd, self.student_fwd = generator, teacher, student
        # CUDA graphs (compile="reduce-overhead") reuse their output memory: each step starts a new graph
        # step, and what outlives a step (the batch) is copied out
        self.graphs = cfg.compile == "reduce-overhead" and self.device.type == "cuda"
        if cfg.compile != "off":
            self.gen_fwd, self.teacher_fwd, self.student_fwd = (
                compiled(m, cfg.compile) if m is not None else None for m in (generator, teacher, student))
        # the student's steps, for a cosine learning rate: it trains from the end of the warm-up on
        self.student_total = (cfg.epochs - cfg.warmup_epochs) * cfg.iters_per_epoch
        # recon_iters: the images of the epoch it follows, then how many weights it flipped, per block
        self.recon_pool: collections.deque | None = None
        self.recon_flips: dict[str, int] = {}

    @classmethod
    def from_parts(cls, parts: Parts, world: World = SINGLE) -> "Trainer":
        return cls(parts.cfg, parts.teacher.model, parts.student, parts.generator, parts.teacher.num_classes,
                   parts.rng, parts.device, parts.train, parts.teacher.image_size, world)

    @contextlib.contextmanager
    def bn_hooks(self):
        """The teacher's BN-statistics hooks (L_BNS), installed for the block; nothing without a generator."""
        if self.generator is None:
            yield self
            return
        moments = (lambda x, layer: self.world.moments(x, layer.running_mean)) if self.world.distributed else None
        with BNStatisticsLoss(self.teacher, self.cfg.bns_slack, moments) as self.bns:
            try:
                yield self
            finally:
                self.bns = None

    # --- one iteration

    def next_batch(self) -> Batch:
        return self.generator_step() if self.generator is not None else self.real_batch()

    def generator_step(self) -> Batch:
        """Generate a batch and step G on L_G = CE_soft(T(x), t) + w * L_BNS (inside ``bn_hooks``)."""
        if self.bns is None:
            raise RuntimeError("generator_step needs the BN-statistics hooks: call it inside `with trainer.bn_hooks():`")
        cfg = self.cfg
        whole: LatentBatch = self.sampler(cfg.batch_size, self.device)
        latent = whole
        if self.world.distributed:  # every rank draws the global batch and keeps its share
            latent = whole.take(self.world.rows(cfg.batch_size, whole.paired))  # each pair on one rank
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        frozen = self.generator_frozen  # (gen_epochs) its losses are still measured, nothing is learnt
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self._generator_step(latent, frozen, whole)

    def _generator_step(self, latent: LatentBatch, frozen: bool, whole: LatentBatch) -> Batch:
        """``latent``: this process's share of ``whole``, the global batch (the same batch in one process)."""
        cfg = self.cfg
        x = self.gen_fwd(latent.labels, latent.coeffs, latent.noise, latent.pixel)
        if cfg.gen_augment != "none":
            x = self._augment(x, latent.paired)
        self.bns.active = True
        feats = []
        hook = (self.classifier.register_forward_pre_hook(lambda m, a: feats.append(a[0].flatten(1)))
                if self.classifier is not None else None)
        try:
            t_logits = self.teacher_fwd(x)
        finally:
            if hook is not None:
                hook.remove()
        self.bns.active = False
        l_bns = self.bns.pop()
        margin = cfg.ce_g_margin + (cfg.ce_g_margin_superposed if latent.superposed else 0.0)
        ce_g = generator_ce(t_logits.float(), latent.targets, margin)
        bns_weight = cfg.bns_weight * (cfg.bns_superposed if latent.superposed else 1.0)
        loss_g = ce_g + bns_weight * l_bns
        if cfg.ms_weight > 0:
            out = (feats[-1] if feats else layout(x) if cfg.ms_space == "layout" else x.flatten(1)).float()
            if latent.paired:  # halves with the same conditions, different noise (ms_pairs=paired)
                a, b = out.chunk(2)
                za, zb = latent.noise.chunk(2)
                loss_g = loss_g + cfg.ms_weight * mode_seeking(
                    a, b, za, zb, all_sum=self.world.all_sum if self.world.distributed else None)
            else:  # ms_pairs=class: the batch's own samples with the same labels
                if self.world.distributed:  # the pairs span the processes' shares: every process takes the
                    out = self.world.all_rows(out)  # term over the global batch, and each one's rows get its gradient
                loss_g = loss_g + cfg.ms_weight * class_mode_seeking(out, whole.noise, whole.labels)
        if not frozen:
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.world.average_grads(self.generator.parameters())
            self.opt_g.step()
            if self.gen_avg is not None:
                self.gen_avg.update()
        x, t_logits = (x.detach().clone(), t_logits.detach().clone()) if self.graphs else (x.detach(), t_logits.detach())
        return Batch(x, latent.targets, t_logits, (loss_g.detach(), ce_g.detach(), l_bns.detach()), latent.paired)

    def _augment(self, x: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """``gen_augment``: mirror a random half of the rows, and (flip-shift) roll the batch by up to 1/8 of its
        size. Drawn for the global batch, so every process of a distributed run draws the same numbers. In a
        paired batch (mode seeking) the two halves are mirrored alike: a pair differs by its noise alone."""
        n = self.cfg.batch_size
        flip = (torch.rand(n, generator=self.rng.cpu) < 0.5)[self.world.rows(n, paired)]
        if paired:
            half = flip[:len(flip) // 2]
            flip = torch.cat([half, half])
        flip = flip.to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.cfg.gen_augment == "flip-shift":
            pad = max(1, x.shape[-1] // 8)
            dy, dx = torch.randint(-pad, pad + 1, (2,), generator=self.rng.cpu).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        return x

    def real_batch(self) -> Batch:
        """The real-data baseline's batch: real training images (randomly shifted), one-hot targets."""
        data = self.train
        n = self.cfg.batch_size
        idx = torch.randint(len(data), (n,), generator=self.rng.cpu)[self.world.rows(n)]  # this rank's share
        images, labels = data.take(idx)
        x, y = data.normalise(images).to(self.device), labels.to(self.device)
        x = random_shift(x, max(1, self.image_size // 8), self.rng.cpu)
        with torch.no_grad():
            t_logits = self.teacher(x)
        targets = torch.nn.functional.one_hot(y, t_logits.shape[1]).float()
        zero = torch.zeros((), device=self.device)
        return Batch(x, targets, t_logits, (zero, zero, zero))

    def student_step(self, batch: Batch, train: bool, calibrating: bool) -> tuple[torch.Tensor, ...]:
        """``student_steps`` steps of the student on L_S = alpha * KD + w * CE (``train``), or only a forward
        pass that calibrates the activation ranges (``calibrating``); returns (loss_s, kd, ce_s)."""
        cfg, student = self.cfg, self.student
        x, targets, t_logits = batch.x, batch.targets, batch.t_logits
        zero = torch.zeros((), device=x.device)
        if cfg.lowpass_d0 > 0 and (train or calibrating):  # the student sees filtered images, and
            x = low_pass(x, cfg.lowpass_d0)                  # learns the teacher's view of those
            with torch.no_grad():
                t_logits = self.teacher(x)
        if self.recon_pool is not None:
            self.recon_pool.append(self.world.gather_rows(x, batch.paired))
        if not train:
            if calibrating:  # the forward pass calibrates the activation ranges
                with torch.no_grad():
                    student(x)
            return zero, zero, zero
        rows = None if cfg.ce_rows == "all" else ce_row_mask(cfg.ce_rows, targets, t_logits)
        for _ in range(cfg.student_steps):
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            s_logits = self.student_fwd(x).float()
            kd = kd_loss(s_logits, t_logits.float(), cfg.kd_tau, cfg.kd_reduction)
            ce = (soft_cross_entropy(s_logits, targets) if rows is None
                  else masked_soft_cross_entropy(s_logits, targets, rows))
            loss = cfg.kd_alpha * kd + cfg.ce_weight * ce
            self.opt_s.zero_grad(set_to_none=True)
            if self.opt_r is not None:
                self.opt_r.zero_grad(set_to_none=True)
            loss.backward()
            self.world.average_grads(self.weights + (self.opt_r.param_groups[0]["params"] if self.opt_r else []))
            self.opt_s.step()
            if self.opt_r is not None:
                self.opt_r.step()
            self._update_ema()
        return loss.detach(), kd.detach(), ce.detach()

    def _update_ema(self) -> None:
        if self.cfg.student_ema <= 0:
            return
        with torch.no_grad():
            if self.ema is None:
                self.ema = [w.detach().clone() for w in self.weights]
            else:
                torch._foreach_lerp_(self.ema, [w.detach() for w in self.weights], 1.0 - self.cfg.student_ema)

    @contextlib.contextmanager
    def averaged(self):
        """The student with its averaged weights for the block (``student_ema``; before the first step, or
        without it, the weights themselves); its own weights come back after."""
        if self.ema is None:
            yield self.student
            return
        own = [w.detach().clone() for w in self.weights]
        with torch.no_grad():
            torch._foreach_copy_([w.data for w in self.weights], self.ema)
        try:
            yield self.student
        finally:
            with torch.no_grad():
                torch._foreach_copy_([w.data for w in self.weights], own)

    def set_student_lr(self, epoch: int, it: int) -> None:
        """``lr_schedule="cosine"``: the student's lr for this iteration (from the step count alone, so
        resume needs nothing saved). The step schedule moves at ``end_epoch`` instead."""
        if self.cfg.lr_schedule == "cosine" and epoch >= self.cfg.warmup_epochs:
            step = (epoch - self.cfg.warmup_epochs) * self.cfg.iters_per_epoch + it
            self.opt_s.param_groups[0]["lr"] = cosine_lr(self.cfg.lr_s, step, self.student_total)

    # --- epochs: the schedule's phases (METHOD.md 8)

    def begin_epoch(self, epoch: int) -> tuple[bool, bool]:
        """Set the student up for ``epoch``; returns (calibrating, train_student). Activation ranges are
        calibrated in the first ``calib_epochs``; with ``act_calib="mse"`` the last of them also keeps a
        sample of the activations, whose MSE-optimal clipping ``end_epoch`` applies."""
        cfg = self.cfg
        calibrating = epoch < cfg.calib_epochs
        self.begin_generator_epoch(epoch)
        set_calibration(self.student, calibrating)
        if self._last_mse_calibration(epoch):
            start_range_sampling(self.student, ACT_SAMPLE_BATCHES)
        if cfg.recon_iters > 0 and epoch == self.recon_epoch():  # its images, for the reconstruction
            self.recon_pool = collections.deque(maxlen=math.ceil(cfg.recon_images / cfg.batch_size))
        return calibrating, epoch >= cfg.warmup_epochs and cfg.method != "ptq"

    def begin_generator_epoch(self, epoch: int) -> None:
        """The generator's side of ``begin_epoch``: this epoch's dose of superposition, and the generator frozen
        from ``gen_epochs`` on (its BN running statistics too)."""
        self.sampler.p = superpose_p(self.cfg, epoch)
        self._gen_epoch = epoch
        self.generator_frozen = 0 < self.cfg.gen_epochs <= epoch
        if self.cfg.gen_average and self.generator is not None and epoch == self.cfg.gen_epochs - self.cfg.gen_average:
            self.gen_avg = GeneratorAverage(self.generator)
        for m, momentum in self._gen_bn_momenta:
            m.momentum = 0.0 if self.generator_frozen else momentum

    def end_generator_epoch(self) -> None:
        """The generator's side of ``end_epoch``: its learning-rate schedule moves on, and a generator that freezes
        after this epoch becomes its average (``gen_average``), so the epoch's diversity figures are the average's."""
        if self.sched_g is not None:
            self.sched_g.step()
        if self.gen_avg is not None and self._gen_epoch == self.cfg.gen_epochs - 1:
            self.gen_avg.apply()
            self.gen_avg = None

    def end_epoch(self, epoch: int) -> None:
        """Step the schedulers and freeze the activation ranges (clipped first, after the last
        calibration epoch of ``act_calib="mse"``)."""
        with warnings.catch_warnings():  # warm-up epochs never step the student's optimizer
            warnings.simplefilter("ignore", UserWarning)
            if self.cfg.lr_schedule == "step":
                self.sched_s.step()
        self.end_generator_epoch()
        if self._last_mse_calibration(epoch):
            fit_ranges_mse(self.student)
            self.world.share_module(self.student)  # rank 0's fit (from its share of the sampled activations)
        set_calibration(self.student, False)
        if self.recon_pool is not None:  # the ranges are final: learn the roundings under them (for recon_at="end":
                                         # from the fine-tuned weights, on the last epoch's images)
            images = torch.cat(list(self.recon_pool))[-self.cfg.recon_images:]
            self.recon_pool = None
            self.recon_flips = reconstruct_as_configured(self.cfg, self.student, self.teacher, images)
            self.world.share_module(self.student)  # the same images on every rank: a guard against drift

    def recon_epoch(self) -> int:
        """The epoch after which ``recon_iters`` reconstructs (on that epoch's images)."""
        return self.cfg.calib_epochs - 1 if self.cfg.recon_at == "calib" else self.cfg.epochs - 1

    def _last_mse_calibration(self, epoch: int) -> bool:
        return self.cfg.act_calib == "mse" and epoch == self.cfg.calib_epochs - 1

    # --- resume

    def state_dict(self) -> dict:
        """Everything resume needs, under the keys of earlier state files (so those still resume)."""
        st = {"student": self.student.state_dict(), "opt_s": self.opt_s.state_dict(),
              "sched_s": self.sched_s.state_dict(), "rng_sampler": self.sampler.rng.getstate(), **self.rng.state()}
        if self.opt_r is not None:
            st["opt_r"] = self.opt_r.state_dict()
        if self.ema is not None:
            st["student_ema"] = self.ema
        if self.generator is not None:
            st.update(generator=self.generator.state_dict(), opt_g=self.opt_g.state_dict(),
                      sched_g=self.sched_g.state_dict())
        if self.gen_avg is not None:  # not yet copied into the generator
            st["generator_avg"] = self.gen_avg.state_dict()
        return st

    def load_state_dict(self, st: dict) -> None:
        self.student.load_state_dict(st["student"])
        self.opt_s.load_state_dict(st["opt_s"])
        self.sched_s.load_state_dict(st["sched_s"])
        if self.opt_r is not None:
            self.opt_r.load_state_dict(st["opt_r"])
        if "student_ema" in st:
            self.ema = [t.to(w.device) for t, w in zip(st["student_ema"], self.weights)]
        if self.generator is not None:
            self.generator.load_state_dict(st["generator"])
            self.opt_g.load_state_dict(st["opt_g"])
            self.sched_g.load_state_dict(st["sched_g"])
        if "generator_avg" in st:  # saved while the average was being taken
            self.gen_avg = GeneratorAverage(self.generator)
            self.gen_avg.load_state_dict(st["generator_avg"])
        self.rng.load_state(st)
        self.sampler.rng.setstate(_tuples(st["rng_sampler"]))


def _execute(parts: Parts, folder: Run | None, should_stop: Callable[[], bool], st: dict | None,
             t_start: float, trainer: Trainer | None = None) -> Iterator[Event]:
    """The epochs of a run. ``folder`` None: a rank other than 0 of a run over several processes, which
    trains in step with rank 0 and neither evaluates nor saves."""
    cfg, dev = parts.cfg, parts.device
    trainer = trainer or Trainer.from_parts(parts)
    world, main = trainer.world, folder is not None
    rows: list[dict] = []
    start_epoch, best, fp_top1, elapsed_before = 0, -1.0, None, 0.0
    if st is not None:
        _restore(trainer, st, folder)
        start_epoch, best, fp_top1 = int(st["epoch"]) + 1, float(st["best"]), float(st["fp_top1"])
        elapsed_before = float(st["seconds"])
        rows = list(st["rows"])
    if fp_top1 is None and main:
        fp_top1 = evaluate(parts.teacher.model, parts.test, batch_size=cfg.eval_batch_size, device=dev)["top1"]
    total = cfg.epochs * cfg.iters_per_epoch
    if main:
        yield Started(str(folder.path), cfg.to_dict(), str(dev), total, start_epoch, fp_top1)

    amp = autocast_for(cfg.amp, dev)
    probe = DiversityProbe(parts) if main and parts.generator is not None and cfg.diversity_images > 0 else None
    eval_subset = parts.test.sample(cfg.eval_images) if main and 0 < cfg.eval_images < len(parts.test) else None
    student = parts.student
    with trainer.bn_hooks():
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            calibrating, train_student = trainer.begin_epoch(epoch)
            sums = torch.zeros(6, device=dev)  # loss_g, ce_g, bns, loss_s, kd, ce_s
            window, t_window = torch.zeros(6, device=dev), time.perf_counter()
            for it in range(cfg.iters_per_epoch):
                if world.any(should_stop()):  # a stop on any rank stops them all
                    if not main:
                        return
                    folder.set_status("cancelled", epoch=epoch, completed_epochs=epoch)
                    yield Finished(str(folder.path), "cancelled", _summary(cfg, folder, rows, fp_top1, elapsed_before + time.perf_counter() - t_start))
                    return
                with amp:
                    batch = trainer.next_batch()
                    trainer.set_student_lr(epoch, it)
                    s_losses = trainer.student_step(batch, train_student, calibrating)
                vec = torch.stack([*batch.g_losses, *s_losses]).float()
                sums += vec
                window += vec
                if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iters_per_epoch:
                    n = (it % cfg.log_every) + 1
                    vals = world.mean(window / n).tolist()  # the one host sync per log interval
                    if not all(math.isfinite(v) for v in vals):
                        raise FloatingPointError(
                            f"a loss became NaN or infinite in epoch {epoch}, iteration {it} "
                            f"({dict(zip(_LOSS_NAMES, vals))}); lower the learning rates, kd_alpha or kd_tau. "
                            f"The run folder keeps the last completed epoch.")
                    rate = n * cfg.batch_size / max(time.perf_counter() - t_window, 1e-9)
                    step = epoch * cfg.iters_per_epoch + it + 1
                    yield Step(epoch, it, step, total, dict(zip(_LOSS_NAMES, vals)), rate)
                    window.zero_()
                    t_window = time.perf_counter()
            trainer.end_epoch(epoch)
            sums = world.mean(sums)
            if not main:
                continue
            if trainer.recon_flips and epoch == trainer.recon_epoch():
                yield Log(f"reconstructed the roundings of {len(trainer.recon_flips)} blocks on generated images: "
                          f"{sum(trainer.recon_flips.values())} weights now round the other way")
            on = eval_subset if eval_subset is not None and epoch < cfg.epochs - 1 else parts.test
            with trainer.averaged():
                result = evaluate(student, on, batch_size=cfg.eval_batch_size, device=dev)
            best = max(best, result["top1"])
            row = _metrics_row(cfg, trainer, epoch, result, best, sums, calibrating, train_student,
                               time.perf_counter() - t_epoch)
            if probe is not None:  # a frozen generator is the one measured after an earlier epoch
                row.update(probe(unchanged=trainer.generator_frozen))
            rows.append(row)
            elapsed = elapsed_before + time.perf_counter() - t_start
            _save_epoch(folder, parts, trainer, epoch, best, fp_top1, elapsed, rows)
            yield Evaluated(epoch, result["top1"], best)
            yield EpochEnd(epoch, row)
    if not main:
        return
    summary = _summary(cfg, folder, rows, fp_top1, elapsed_before + time.perf_counter() - t_start,
                       probe.reference if probe is not None else None)
    folder.check_present()
    write_json(folder.path / Run.SUMMARY, summary)
    folder.set_status("finished")
    yield Finished(str(folder.path), "finished", summary)


ACT_SAMPLE_BATCHES = 40  # act_calib="mse": activations of the last 40 calibration batches choose the clipping

_LOSS_NAMES = ("loss_g", "ce_g", "bns", "loss_s", "kd", "ce_s")


def _restore(trainer: Trainer, st: dict, folder: Run | None) -> None:
    try:
        trainer.load_state_dict(st)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        which = folder.id if folder is not None else f"(rank {trainer.world.rank})"
        raise RunDamaged(f"run {which}: its resume state {Run.STATE} does not fit the run "
                         f"({type(e).__name__}: {str(e)[:120]}); resume with --restart to start it again") from None


def _metrics_row(cfg: RunConfig, trainer: Trainer, epoch: int, result: dict, best: float, sums: torch.Tensor,
                 calibrating: bool, train_student: bool, seconds: float) -> dict:
    """One line of metrics.csv: accuracy, mean losses, learning rates, phase, time."""
    means = (sums / cfg.iters_per_epoch).tolist()
    return {"epoch": epoch, "top1": round(result["top1"], 4), "best_top1": round(best, 4),
            **{k: round(v, 6) for k, v in zip(_LOSS_NAMES, means)},
            "lr_g": trainer.opt_g.param_groups[0]["lr"] if trainer.opt_g else 0.0,
            "lr_s": trainer.opt_s.param_groups[0]["lr"],
            "calibrating": int(calibrating), "student_trained": int(train_student),
            "seconds": round(seconds, 3), "images_per_s": round(cfg.iters_per_epoch * cfg.batch_size / seconds, 1),
            "eval_images": result["n"]}


def superpose_p(cfg: RunConfig, epoch: int) -> float:
    """The probability that a batch of ``epoch`` is superposed: ``superpose_p``, or with
    ``superpose_ramp`` = R > 0, ``superpose_p * min(1, epoch / R)`` (none in epoch 0); none at all before
    epoch ``superpose_start``."""
    if epoch < cfg.superpose_start:
        return 0.0
    if cfg.superpose_ramp == 0:
        return cfg.superpose_p
    return cfg.superpose_p * min(1.0, epoch / cfg.superpose_ramp)


def cosine_lr(base: float, step: int, total: int) -> float:
    """The learning rate after ``step`` of ``total`` steps of a cosine decay from ``base`` to 0."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _tuples(x):
    """Python's random state comes back from torch.load with lists where it had tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _save_epoch(folder: Run, parts: Parts, trainer: Trainer, epoch: int, best: float, fp_top1: float,
                seconds: float, rows: list[dict]) -> None:
    folder.check_present()  # a folder removed while the run went on is not brought back
    config = parts.cfg.to_dict()
    state = {"epoch": epoch, "best": best, "fp_top1": fp_top1, "seconds": seconds, "rows": rows,
             "config": config, "config_sha256": config_sha256(config), "teacher_sha256": folder.teacher_sha256,
             **trainer.state_dict()}
    if parts.generator is not None:
        save_state_dict(parts.generator, folder.path / Run.GENERATOR)
        write_json(folder.path / "generator.json", parts.generator.config())
    with trainer.averaged():  # the student that was evaluated
        save_state_dict(parts.student, folder.path / Run.STUDENT)
    write_csv(folder.path / Run.METRICS, rows)
    with atomic_path(folder.path / Run.STATE) as tmp:
        torch.save(state, tmp)


DIVERSITY_KEYS = ("coverage", "precision", "recall", "density", "spread_vs_real", "spread_ratio")


def reconstruct_as_configured(cfg: RunConfig, student: nn.Module, teacher: nn.Module,
                              images: torch.Tensor) -> dict[str, int]:
    """``quant.reconstruct`` with a run's ``recon_*`` settings: what a run does after its reconstruction epoch,
    and what ``bench/screen_recon.py`` does again on a saved student."""
    images = refine_images(teacher, images, cfg.recon_refine, lr=cfg.recon_refine_lr, batch_size=cfg.batch_size,
                           bns_weight=cfg.bns_weight, margin=cfg.ce_g_margin)
    return reconstruct(student, teacher, images, cfg.recon_iters, drop=cfg.recon_drop, lr=cfg.recon_lr,
                       act_lr=cfg.recon_act_lr, seed=cfg.seed)


def float64_state(module: nn.Module) -> dict:
    """A copy of ``module``'s state, its floating tensors in float64 (a copy even where they are float64 already)."""
    return {k: v.detach().to(torch.float64 if v.dtype.is_floating_point else v.dtype, copy=True)
            for k, v in module.state_dict().items()}


@torch.no_grad()
def blend_state(state: dict, module: nn.Module, keep: float) -> None:
    """``state`` <- keep * state + (1 - keep) * ``module``'s state, for its floating tensors; the others are copied."""
    for k, v in module.state_dict().items():
        if v.dtype.is_floating_point:
            state[k].mul_(keep).add_(v.double(), alpha=1 - keep)
        else:
            state[k].copy_(v)


class GeneratorAverage:
    """``gen_average``: the running mean of a module's state after each optimizer step (its weights and its BN
    running statistics, which the eval-mode samples use; integer buffers are the last step's), kept in float64."""

    def __init__(self, module: nn.Module):
        self.module, self.steps, self.state = module, 0, None

    @torch.no_grad()
    def update(self) -> None:
        if self.state is None:
            self.state = float64_state(self.module)
        else:
            blend_state(self.state, self.module, keep=self.steps / (self.steps + 1))
        self.steps += 1

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the mean into the module in place (compiled forward passes keep their tensors)."""
        if self.state is None:
            return  # no step was taken
        for k, v in self.module.state_dict().items():
            v.copy_(self.state[k])

    def state_dict(self) -> dict:
        return {"state": self.state, "steps": self.steps}

    def load_state_dict(self, st: dict) -> None:
        device = next(self.module.parameters()).device
        self.steps = int(st["steps"])
        self.state = None if st["state"] is None else {k: v.to(device) for k, v in st["state"].items()}


class DiversityProbe:
    """The generator's diversity after an epoch (``cfg.diversity_images``): the ``analysis.diversity`` figures
    of a fixed draw of plain samples, and of superposed ones as ``mix_*``, against the teacher's features of a
    fixed draw of test images (taken once). Every draw has its own seed: the run's random streams are untouched.
    The figures depend on the generator's weights and buffers alone, so for a generator that has not changed
    since the last measurement (``unchanged``: frozen, ``gen_epochs``) they are that measurement's."""

    def __init__(self, parts: Parts):
        from .analysis import as_one_class, diversity, kth_radii, real_and_others
        self.parts = parts
        self.n = min(parts.cfg.diversity_images, len(parts.test))
        self.real, self.reference = None, {}
        if self.n > 5:
            self.real, other = real_and_others(parts.teacher, parts.test, self.n, seed=0)
            if len(other["labels"]) > 5:
                figures = diversity(as_one_class(other), self.real)
                self.reference = {key: round(figures[key], 4) for key in DIVERSITY_KEYS}
                self.reference["images"] = len(other["labels"])
        self.radii = kth_radii(self.real["features"], 5) if self.real is not None else None  # the same every epoch
        self.last: dict | None = None

    def __call__(self, unchanged: bool = False) -> dict:
        from .analysis import generator_diversity
        if self.real is None:
            return {}
        if unchanged and self.last is not None:
            return dict(self.last)
        parts = self.parts
        kinds = generator_diversity(parts.generator, parts.teacher, self.real, self.n, parts.cfg.superpose_k,
                                    seed=0, real_radii=self.radii)
        row = {("mix_" if name == "superposed" else "") + key: round(figures[key], 4)
               for name, figures in kinds.items() for key in DIVERSITY_KEYS}
        self.last = dict(row)
        return row


def _summary(cfg: RunConfig, folder: Run, rows: list[dict], fp_top1: float, seconds: float,
             reference: dict | None = None) -> dict:
    last = rows[-1] if rows else {}
    best_row = max(rows, key=lambda r: r["top1"]) if rows else {}
    images = len(rows) * cfg.iters_per_epoch * cfg.batch_size
    return {"run": folder.id, "method": cfg.method, "teacher": cfg.teacher, "test_data": cfg.test_data,
            "wbits": cfg.wbits, "abits": cfg.abits, "seed": cfg.seed, "fp_top1": round(fp_top1, 4),
            "teacher_sha256": folder.teacher_sha256,
            "quant_top1": last.get("top1"), "best_top1": best_row.get("top1"), "best_epoch": best_row.get("epoch"),
            "epochs_done": len(rows), "epochs": cfg.epochs, "images": images, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
            **({"diversity": {k: v for k, v in last.items() if k.removeprefix("mix_") in DIVERSITY_KEYS}}
               if "coverage" in last else {}),
            **({"diversity_reference": reference} if reference else {})}
