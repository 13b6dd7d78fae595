"""Progress events: the one stream that the app, the command line and the tests consume."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Started:
    run_dir: str
    config: dict
    device: str
    total_steps: int
    start_epoch: int   # > 0 when resumed
    fp_top1: float


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class Step:
    epoch: int
    iteration: int
    step: int          # global, 1-based
    total_steps: int
    losses: dict = field(default_factory=dict)  # means over the iterations since the last Step
    images_per_s: float = 0.0


@dataclass(frozen=True)
class Evaluated:
    epoch: int
    top1: float
    best_top1: float


@dataclass(frozen=True)
class EpochEnd:
    epoch: int
    metrics: dict      # the row written to metrics.csv


@dataclass(frozen=True)
class Finished:
    run_dir: str
    status: str        # finished | cancelled
    summary: dict


Event = Started | Log | Step | Evaluated | EpochEnd | Finished
