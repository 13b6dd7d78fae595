"""Runs that cannot mix: their own randomness, exclusive folders, locks, teacher identity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qimera_engine import preset
from qimera_engine.jobs import JobRegistry

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(epochs=2, iters_per_epoch=4, warmup_epochs=1, calib_epochs=1, batch_size=16, log_every=2,
             gen_width=16, superpose_p=0.5)
NUMBERS = ("top1", "loss_g", "ce_g", "bns", "loss_s", "kd", "ce_s")


def numbers(metrics: list[dict]) -> list[tuple]:
    return [tuple(row[k] for k in NUMBERS) for row in metrics]


def cli(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "QIMERA_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qimera_engine", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_same_seed_same_numbers_in_threads_and_on_the_command_line(tmp_path, monkeypatch):
    """Two app runs at once, from an empty home (both train the teacher first), equal the CLI run."""
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    reg = JobRegistry()
    cfg = preset("digits", **SMALL)
    jobs = [reg.start_run(cfg), reg.start_run(cfg)]
    a, b = (reg.wait(j, timeout=300) for j in jobs)
    assert a.status == b.status == "finished", (a.error, b.error)
    assert numbers(a.run.metrics) == numbers(b.run.metrics)
    sets = [f"--set={k}={v}" for k, v in SMALL.items()]
    done = cli("quantize", "--preset", "digits", "--quiet", *sets, home=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    from qimera_engine.runs import read_csv
    rows = read_csv(tmp_path / "runs" / summary["run"] / "metrics.csv")
    assert numbers(rows) == numbers(a.run.metrics)
    assert summary["fp_top1"] == a.run.summary["fp_top1"]
