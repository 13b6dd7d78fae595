"""Rebuild a finished (or interrupted) run's networks from its folder alone."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .generator import Generator
from .models import CheckpointError, Teacher, load_weights
from .quant import QuantSpec, quantize_model
from .runs import Run, open_run, read_json
from .seeding import isolated_init
from .teachers import get_teacher


def load_teacher(run: Run | str | Path, device="cpu") -> Teacher:
    """The teacher the run was trained with (the exact weights, when the run recorded them)."""
    run = run if isinstance(run, Run) else open_run(run)
    cfg = run.config
    try:
        teacher = get_teacher(cfg.teacher, cfg.teacher_data, cfg.checkpoint, cfg.pretrained, device=device,
                              sha256=run.teacher_sha256)
    except CheckpointError as e:
        if cfg.checkpoint and not Path(cfg.checkpoint).is_absolute() and not Path(cfg.checkpoint).exists():
            raise CheckpointError(f"{e} (run {run.id} names its teacher's weights by a path relative to the folder "
                                  "it was started in: open it from there)") from e
        raise
    teacher.model.to(device)
    return teacher


def load_generator(run: Run | str | Path, device="cpu") -> Generator:
    """The run's generator in eval mode; FileNotFoundError when the run has none (real-data)."""
    run = run if isinstance(run, Run) else open_run(run)
    if not run.has_generator:
        raise FileNotFoundError(f"run {run.id} has no generator (method {run.config.method}, or no epoch done yet)")
    with isolated_init():  # its initial values, overwritten below, never land in another thread's seeded init
        gen = Generator(**read_json(run.path / "generator.json"))
    load_weights(gen, run.path / Run.GENERATOR)
    return gen.to(device).eval().requires_grad_(False)


def student_of(teacher: Teacher, cfg) -> nn.Module:
    """The fake-quantized student of ``teacher`` at the config's bit widths (a copy; untrained ranges)."""
    # with weight_clip=mse the ratios are fitted when a run starts, and saved with the weights
    return quantize_model(teacher.model, QuantSpec.from_config(cfg), example_input=teacher.example_input())


def load_student(run: Run | str | Path, teacher: Teacher | None = None, device="cpu") -> nn.Module:
    """The run's quantized student in eval mode with its frozen activation ranges."""
    run = run if isinstance(run, Run) else open_run(run)
    cfg = run.config
    teacher = teacher or load_teacher(run, device)
    student = student_of(teacher, cfg)
    load_weights(student, run.path / Run.STUDENT)
    return student.to(device).eval().requires_grad_(False)
