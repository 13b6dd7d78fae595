"""Teachers from weights, from the cache, or trained on the spot (digits always; CIFAR on a GPU)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .config import ZOO_TEACHERS
from .data import ImageData, InputSpec, load_data, parse_spec
from .evaluate import evaluate
from .events import ProgressText
from .models import Teacher, build_teacher, check_teacher_name, load_weights, save_state_dict, state_dict_sha256
from .runs import qimera_home, read_json, write_json, write_text
from .seeding import seeded_init


class TeacherChanged(ValueError):
    """The weights a run was started with are no longer where it found them."""


def cached_teacher_path(name: str, data_spec: str, sha256: str | None = None) -> Path:
    """Where the cache keeps a teacher: the version with this content hash, else the current one.

    Each trained teacher is a version of its own (``<name>-<data>-<hash>.safetensors``); retraining
    adds a version and makes it current, so the weights an existing run used never change.
    """
    kind, _ = parse_spec(data_spec)
    folder, stem = qimera_home() / "teachers", f"{name}-{kind}"
    if sha256:
        return folder / f"{stem}-{sha256[:16]}.safetensors"
    current = folder / f"{stem}.current"
    if current.is_file():
        return folder / Path(current.read_text().strip()).name
    return folder / f"{stem}.safetensors"  # a cache written before teachers had versions


def train_teacher(teacher: Teacher, train: ImageData, *, epochs: int = 40, batch_size: int = 64, lr: float = 3e-3,
                  seed: int = 0, device="cpu", augment: bool = True,
                  on_epoch: Callable[[int, float], None] | None = None) -> Teacher:
    """Train ``teacher.model`` on real images with Adam + cosine schedule (random shifts of 1/8 image).

    The order and shifts come from a generator of its own seeded with ``seed``."""
    rng = torch.Generator().manual_seed(seed)
    model = teacher.model.to(device).requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x_all, y_all = train.subset(len(train), seed=seed)
    pad = max(1, teacher.image_size // 8)
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all), generator=rng)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            if augment:
                x = random_shift(x, pad, rng)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        if on_epoch:
            on_epoch(epoch, float(total) / max(1, len(perm) // batch_size))
    model.eval().requires_grad_(False)
    return teacher


def random_shift(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each batch by up to ``pad`` pixels (one shift per batch keeps it cheap), flip for RGB.

    ``generator`` is a CPU generator (None: torch's global one)."""
    dx, dy = torch.randint(-pad, pad + 1, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if x.shape[1] == 3 and torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    return x


def get_teacher(name: str, data_spec: str, checkpoint: str | None = None, pretrained: bool = False,
                num_classes: int | None = None, device="cpu", log: Callable[[str], None] | None = None,
                sha256: str | None = None) -> Teacher:
    """The teacher for a run: from ``checkpoint``, the zoo, or the cache (training digits on a miss).

    ``teacher.info["sha256"]`` is the content hash of its weights. With ``sha256`` (a run being
    resumed), exactly those weights are loaded, or ``TeacherChanged`` says why they cannot be.
    """
    check_teacher_name(name)
    if checkpoint or pretrained:
        teacher = build_teacher(name, num_classes, checkpoint=checkpoint, pretrained=pretrained)
    else:
        path = cached_teacher_path(name, data_spec, sha256)
        if path.exists():
            teacher = build_teacher(name, num_classes)
            load_weights(teacher.model, path)
            teacher.info = {"weights": str(path), **_read_info(path)}
        elif sha256:
            raise TeacherChanged(f"the cached teacher {name} ({sha256[:16]}) that this run was started with is "
                                 f"gone from {path.parent}; the run cannot continue with other weights")
        elif name == "digits-cnn" and parse_spec(data_spec)[0] == "digits":
            teacher = train_and_cache(name, data_spec, device=device, log=log)
        else:
            zoo = "pretrained=True for zoo weights, " if name in ZOO_TEACHERS else ""
            raise ValueError(f"no weights for teacher {name!r} on {parse_spec(data_spec)[0]} data in the cache: give "
                             f"a checkpoint (--checkpoint PATH), {zoo}or train one first "
                             f"(python -m qimera_engine train-teacher --teacher {name} --data {data_spec})")
    teacher.info["sha256"] = state_dict_sha256(teacher.model)
    if sha256 and teacher.info["sha256"] != sha256:
        raise TeacherChanged(f"the teacher's weights ({teacher.info['weights']}) have changed since this run "
                             f"started (sha256 {sha256[:16]}, now {teacher.info['sha256'][:16]}); the run "
                             f"cannot continue with other weights")
    return teacher


def _read_info(path) -> dict:
    info = path.with_suffix(".json")
    return read_json(info) if info.exists() else {}


def train_and_cache(name: str, data_spec: str, *, epochs: int | None = None, device="cpu", seed: int = 0,
                    log: Callable[[str], None] | None = None) -> Teacher:
    """Train a teacher on the data set's train split, evaluate it, and cache it under $QIMERA_HOME/teachers."""
    kind, _ = parse_spec(data_spec)
    check_teacher_name(name)
    if kind not in ("digits", "cifar10", "cifar100"):
        raise ValueError("teachers are trained on digits, cifar10 or cifar100 (their train split)")
    if kind != "digits" and not str(device).startswith("cuda"):
        raise ValueError("training a CIFAR teacher needs a GPU; on a CPU use a checkpoint (--checkpoint PATH)")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    with seeded_init(seed):  # the initial weights too, so the cached teacher is reproducible
        teacher = build_teacher(name, 100 if kind == "cifar100" else 10)
    spec = InputSpec.of(teacher)
    train, test = load_data(data_spec, spec, "train"), load_data(data_spec, spec, "test")
    epochs = epochs if epochs is not None else (30 if kind == "digits" else 60)
    start = time.perf_counter()
    if log:
        log(f"training teacher {name} on {kind} ({len(train)} images, {epochs} epochs)")

    def on_epoch(epoch: int, loss: float) -> None:
        log(ProgressText(f"training teacher {name} on {kind}: epoch {epoch + 1}/{epochs} (loss {loss:.3f}); "
                         f"once only, it is cached for later runs", (epoch + 1) / epochs))
    train_teacher(teacher, train, epochs=epochs, seed=seed, device=device,
                  batch_size=64 if kind == "digits" else 256, lr=3e-3 if kind == "digits" else 0.05,
                  on_epoch=on_epoch if log else None)
    top1 = evaluate(teacher.model, test, device=device)["top1"]
    teacher.model.cpu()
    sha = state_dict_sha256(teacher.model)
    path = cached_teacher_path(name, data_spec, sha)
    info = {"teacher": name, "data": kind, "epochs": epochs, "seed": seed, "test_top1": top1,
            "seconds": round(time.perf_counter() - start, 2), "sha256": sha, "time": time.time()}
    # a new version beside the others (the same weights again: the same file), then made current
    save_state_dict(teacher.model, path)
    write_json(path.with_suffix(".json"), info)
    write_text(path.parent / f"{name}-{kind}.current", path.name + "\n")
    teacher.info = {"weights": str(path), **info}
    if log:
        log(f"teacher {name}: {top1:.2f}% top-1 on {kind} test, cached at {path}")
    return teacher
