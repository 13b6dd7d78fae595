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
    fraction: float | None = None  # progress (0..1) of the step the text describes, e.g. a teacher's training


class ProgressText(str):
    """A log line that also says how far its step has got: ``log`` callbacks take it as the plain text
    it is, and a run turns it into ``Log(text, fraction)``."""
    fraction: float

    def __new__(cls, text: str, fraction: float):
        self = super().__new__(cls, text)
        self.fraction = float(fraction)
        return self


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
