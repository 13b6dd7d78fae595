"""JobRegistry: runs in worker processes, sweeps and tasks in threads, recorded from the engine's events."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qimera_engine import ConfigError, preset, train_and_cache
from qimera_engine.jobs import JobRegistry, sweep_configs

TINY = dict(epochs=2, iters_per_epoch=3, warmup_epochs=1, calib_epochs=1, batch_size=8, log_every=1,
            gen_width=16)


def start_long_run(reg: JobRegistry) -> str:
    """A run far longer than any test waits for, started and past its first step; returns the job id."""
    job_id = reg.start_run(preset("digits", **{**TINY, "epochs": 50, "iters_per_epoch": 50}))
    deadline = time.time() + 120
    while reg.get(job_id).run.step < 1 and time.time() < deadline:
        time.sleep(0.05)
    return job_id


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private QIMERA_HOME with a quickly trained digits teacher in its cache."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("qimera_home")
    mp.setenv("QIMERA_HOME", str(path))
    train_and_cache("digits-cnn", "digits", epochs=2)
    yield path
    mp.undo()


def test_run_job_records_the_event_stream(home):
    reg = JobRegistry()
    job_id = reg.start_run(preset("digits", **TINY))
    job = reg.wait(job_id, timeout=120)
    assert job.status == "finished", job.error
    r = job.run
    assert r.status == "finished" and r.fraction == 1.0 and job.progress == 1.0
    assert Path(r.run_dir).is_dir() and Path(r.run_dir).parent == home / "runs"
    assert r.total_steps == 6 and r.step == 6
    assert [row["epoch"] for row in r.metrics] == [0, 1]
    assert len(r.loss_history) == 6 and {"loss_g", "loss_s"} <= set(r.loss_history[-1])
    assert r.summary["epochs_done"] == 2 and r.summary["quant_top1"] == r.metrics[-1]["top1"]
    assert r.fp_top1 == pytest.approx(r.summary["fp_top1"], abs=1e-3) and r.fp_top1 > 50  # chance: 10
    # what the job recorded is what the run folder holds
    assert json.loads((Path(r.run_dir) / "summary.json").read_text()) == r.summary


def test_a_run_trains_in_a_process_of_its_own(home):
    reg = JobRegistry()
    job_id = start_long_run(reg)
    status = json.loads((Path(reg.get(job_id).run.run_dir) / "status.json").read_text())
    assert status["status"] == "running" and status["pid"] != os.getpid()  # the writer is another process
    reg.cancel(job_id)
    assert reg.wait(job_id, 60).status == "cancelled"
    with pytest.raises(ProcessLookupError):  # and it has ended
        os.kill(status["pid"], 0)


def test_runs_beyond_the_cap_wait_for_a_free_slot(home):
    reg = JobRegistry(max_runs=1)
    long = start_long_run(reg)
    short = reg.start_run(preset("digits", **TINY))
    time.sleep(1.0)
    waiting = reg.get(short)
    assert waiting.status == "queued" and waiting.active and "1 run(s) train at a time" in waiting.message
    assert waiting.run.run_dir is None  # nothing started
    reg.cancel(long)
    assert reg.wait(short, 120).status == "finished"
    with pytest.raises(ValueError, match="max_runs"):
        JobRegistry(max_runs=0)


def test_a_queued_run_can_be_cancelled(home):
    reg = JobRegistry(max_runs=1)
    long = reg.start_run(preset("digits", **{**TINY, "epochs": 50, "iters_per_epoch": 50}))
    queued = reg.start_run(preset("digits", **TINY))
    assert reg.cancel(queued)
    job = reg.wait(queued, 30)
    assert job.status == "cancelled" and job.run.status == "cancelled" and job.run.run_dir is None
    reg.cancel(long)
    reg.wait(long, 60)


def test_a_killed_worker_is_a_failed_run_that_can_be_resumed(home):
    import signal
    reg = JobRegistry()
    job_id = start_long_run(reg)
    run_dir = reg.get(job_id).run.run_dir
    os.kill(json.loads((Path(run_dir) / "status.json").read_text())["pid"], signal.SIGKILL)
    job = reg.wait(job_id, 60)
    assert job.status == "failed" and job.error.startswith("WorkerDied: ") and "resumed" in job.error
    from qimera_engine import open_run
    assert open_run(run_dir).state == "interrupted"  # the kernel released its lock: it can be resumed


def test_cancelling_while_the_teacher_trains_stops_at_once(tmp_path, monkeypatch):
    """From an empty home a run first trains its teacher: a cancel then ends it at the teacher's next epoch,
    with nothing cached and no run folder (before, the teacher trained on to its end)."""
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    reg = JobRegistry()
    job_id = reg.start_run(preset("digits", **TINY))
    deadline = time.time() + 120
    while not reg.get(job_id).run.preparing and time.time() < deadline:
        time.sleep(0.05)
    assert reg.cancel(job_id)
    job = reg.wait(job_id, 60)
    assert job.status == "cancelled" and job.run.status == "cancelled" and job.run.run_dir is None
    assert 0 < job.run.preparing < 1 and job.progress == 0
    assert not list(tmp_path.glob("teachers/*.current")) and not (tmp_path / "runs").exists()


def test_max_runs_from_the_environment(monkeypatch):
    from qimera_engine.jobs import default_max_runs
    monkeypatch.setenv("QIMERA_MAX_RUNS", "3")
    assert default_max_runs() == 3 and JobRegistry().max_runs == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("QIMERA_MAX_RUNS", bad)
        with pytest.raises(ValueError, match="QIMERA_MAX_RUNS"):
            default_max_runs()
    monkeypatch.delenv("QIMERA_MAX_RUNS")
    assert default_max_runs() >= 1


def test_a_teacher_trained_for_a_run_reports_each_epoch(tmp_path, monkeypatch):
    """From an empty home the run trains its teacher first; its epochs arrive as they end, with a
    fraction for the progress bar, before the run starts."""
    import qimera_engine.teachers as teachers
    from qimera_engine import Log, Started, run
    real = teachers.train_and_cache
    monkeypatch.setattr(teachers, "train_and_cache", lambda *a, **k: real(*a, **{**k, "epochs": 3}))
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    events = []
    for ev in run(preset("digits", **TINY)):
        events.append(ev)
        if isinstance(ev, Started):
            break
    fractions = [ev.fraction for ev in events if isinstance(ev, Log) and ev.fraction is not None]
    assert fractions == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert any("epoch 2/3" in ev.text for ev in events if isinstance(ev, Log))


def test_cancel_stops_a_run_and_keeps_its_folder(home):
    reg = JobRegistry()
    job_id = start_long_run(reg)
    assert reg.cancel(job_id)
    job = reg.wait(job_id, timeout=60)
    assert job.status == "cancelled" and job.run.status == "cancelled"
    assert job.run.step < job.run.total_steps
    assert 0 < job.progress == job.run.fraction < 1  # its bar stops where the run stopped: it does not read as done
    assert json.loads((Path(job.run.run_dir) / "status.json").read_text())["status"] == "cancelled"
    assert not reg.cancel(job_id)  # nothing left to cancel
    assert reg.active() == []


def test_two_runs_at_once_and_snapshots_are_copies(home):
    reg = JobRegistry()
    a = reg.start_run(preset("digits", **TINY, seed=1))
    b = reg.start_run(preset("digits", **TINY, seed=2, method="gdfq"))
    assert {j.id for j in reg.jobs()} == {a, b}
    ja, jb = reg.wait(a, 120), reg.wait(b, 120)
    assert ja.status == jb.status == "finished"
    assert ja.run.run_dir != jb.run.run_dir
    assert jb.run.config["method"] == "gdfq" and jb.run.config["gen_input"] == "gdfq"
    ja.run.metrics.clear()
    assert len(reg.get(a).run.metrics) == 2


def test_sweep_runs_one_after_another(home):
    reg = JobRegistry()
    job_id = reg.start_sweep(preset("digits", **{**TINY, "epochs": 1, "warmup_epochs": 0}), bits=[8, 3],
                             methods=["ptq"], seeds=[0])
    job = reg.wait(job_id, timeout=120)
    assert job.kind == "sweep" and job.status == "finished", job.error
    assert [(r.config["wbits"], r.config["abits"]) for r in job.runs] == [(8, 8), (3, 3)]
    assert all(r.status == "finished" and r.summary["method"] == "ptq" for r in job.runs)
    assert job.progress == 1.0 and job.current == 1


def test_a_failed_run_reports_its_error(home):
    reg = JobRegistry()
    job = reg.wait(reg.start_run(preset("digits", **TINY, test_data="folder:/no/such/folder")), 60)
    assert job.status == "failed" and job.run.status == "failed"
    assert job.error and job.error == job.run.error
    assert job.error.startswith("DataError: ")  # the engine's own message, passed on


def test_sweep_configs_validate_up_front():
    base = preset("digits", **TINY)
    cfgs = sweep_configs(base, [2, (4, 8)], ["qimera", "gdfq"], [0, 1])
    assert len(cfgs) == 8
    assert [(c.wbits, c.abits, c.method, c.seed) for c in cfgs[:2]] == [(2, 2, "qimera", 0), (2, 2, "qimera", 1)]
    assert (cfgs[-1].wbits, cfgs[-1].abits) == (4, 8)
    with pytest.raises(ConfigError, match="wbits"):
        sweep_configs(base, [9], ["qimera"], [0])
    with pytest.raises(ConfigError, match="method"):
        sweep_configs(base, [4], ["nope"], [0])
    with pytest.raises(ValueError):
        JobRegistry().start_sweep(base, [], ["qimera"], [0])


def test_tasks_report_progress_and_are_reused_by_key():
    reg = JobRegistry()
    gate = threading.Event()
    calls = []

    def work(report, stop):
        calls.append(1)
        report(0.5, "half way")
        gate.wait(10)
        return {"answer": 42}

    first = reg.start_task(work, label="demo", key="k1")
    deadline = time.time() + 10
    while reg.get(first).fraction < 0.5 and time.time() < deadline:
        time.sleep(0.01)
    job = reg.get(first)
    assert job.active and job.progress == 0.5 and job.message == "half way"
    assert reg.start_task(work, label="demo", key="k1") == first  # running: reused
    gate.set()
    assert reg.wait(first, 10).result == {"answer": 42}
    assert reg.start_task(work, label="demo", key="k1") == first  # finished: reused
    assert reg.find("k1").result == {"answer": 42} and calls == [1]

    def broken(report, stop):
        raise ValueError("no such data set")
    bad = reg.wait(reg.start_task(broken, label="bad", key="k2"), 10)
    assert bad.status == "failed" and "no such data set" in bad.error
    assert reg.start_task(broken, label="bad", key="k2") != bad.id  # failures are retried


def test_keeps_only_the_newest_finished_jobs():
    reg = JobRegistry(keep=3)
    ids = []
    for i in range(6):
        ids.append(reg.start_task(lambda report, stop, i=i: i, label=f"t{i}"))
        assert reg.wait(ids[-1], 10).result == i
    reg.start_task(lambda report, stop: None, label="last")
    assert len(reg.jobs()) <= 4 and ids[0] not in {j.id for j in reg.jobs()}


def test_engine_and_jobs_do_not_import_streamlit():
    code = "import sys, qimera_engine, qimera_engine.jobs; print('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_snapshots_share_task_results_but_copy_the_record():
    reg = JobRegistry()
    big = {"features": list(range(1000))}
    job_id = reg.start_task(lambda report, stop: big, label="result")
    first, second = reg.wait(job_id, 10), reg.get(job_id)
    assert first.result is big and second.result is big  # read-only results are not copied
    first.log.append("changed")
    assert reg.get(job_id).log == []
