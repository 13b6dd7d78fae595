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


def test_building_modules_in_other_threads_never_moves_a_seeded_init(digits_teacher, tmp_path):
    """What the engine builds elsewhere (a student, a cached teacher, a run's generator) while a run builds
    its generator under its seed draws nothing that run can see: its initial weights and its stream stay
    those of the seed. Before the fix one start in a few drew other numbers (a race, found under load)."""
    import threading
    import torch
    from qimera_engine import run_to_end
    from qimera_engine.artifacts import load_generator
    from qimera_engine.models import build_teacher, state_dict_sha256
    from qimera_engine.quant import quantize_model
    from qimera_engine.seeding import seeded_init
    from qimera_engine.train import build_generator

    cfg = preset("digits", **SMALL).resolved()
    saved = tmp_path / "r"
    run_to_end(cfg, out=saved)  # a run whose generator is loaded

    def start():
        with seeded_init(cfg.seed):
            gen = build_generator(cfg, digits_teacher, "cpu")
            return state_dict_sha256(gen), torch.get_rng_state()

    ref_sha, ref_state = start()
    outside = torch.get_rng_state()
    stop, built = threading.Event(), [0]

    def elsewhere():
        while not stop.is_set():
            quantize_model(digits_teacher.model, 4, 4)
            build_teacher("digits-cnn", 10)
            load_generator(saved)
            built[0] += 1
    t = threading.Thread(target=elsewhere)
    t.start()
    try:
        for _ in range(100):
            sha, state = start()
            assert sha == ref_sha and torch.equal(state, ref_state)
    finally:
        stop.set()
        t.join()
    assert built[0] > 0
    assert torch.equal(torch.get_rng_state(), outside)  # nor does any of it move the caller's global stream


# --------------------------------------------------------------------------- one writer per folder

def test_creating_a_run_folder_is_exclusive(tmp_path):
    import threading
    from qimera_engine.runs import OutRefused, create_run
    out, results, refused = tmp_path / "x", [], []
    start = threading.Barrier(8)

    def create(i):
        start.wait()
        try:
            create_run({"seed": i}, "qimera", 4, 4, out)
            results.append(i)
        except (FileExistsError, OutRefused) as e:  # at the same instant, or just after the winner's config landed,
            refused.append(str(e))                # or while its config was being written (a temporary file there)
    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and len(refused) == 7
    assert all(m.startswith(str(out)) and ("already holds a run" in m or "is not empty" in m) for m in refused), refused
    assert json.loads((out / "config.json").read_text()) == {"seed": results[0]}
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # no temporary files left


def test_two_quantize_with_one_out_folder(tmp_path, digits_teacher):
    """Started at the same instant from two shells: one runs, the other says why it does not."""
    home = Path(os.environ["QIMERA_HOME"])
    env = {**os.environ, "QIMERA_HOME": str(home), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "qimera_engine", "quantize", "--quiet", "--out", str(tmp_path / "x"),
           *[f"--set={k}={v}" for k, v in SMALL.items()]]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(e for p, (_, e) in zip(procs, outs) if p.returncode == 2)
    assert "already holds a run" in err and "Traceback" not in err
    assert json.loads((tmp_path / "x" / "summary.json").read_text())["epochs_done"] == 2


def test_a_second_writer_is_refused_and_a_dead_one_detected(tmp_path, digits_teacher):
    from qimera_engine import run_to_end
    from qimera_engine.runs import Run, RunLocked
    folder = tmp_path / "r"
    run_to_end(preset("digits", **SMALL), out=folder)
    run = Run(folder)
    with run.lock():  # a resume in progress, in this process
        with pytest.raises(RunLocked, match="being written by another run"):
            run_to_end(None, resume=folder)
        p = cli("quantize", "--resume", str(folder), home=Path(os.environ["QIMERA_HOME"]))
        assert p.returncode == 2 and "being written by another run (pid" in p.stderr and "Traceback" not in p.stderr
    # a holder killed with SIGKILL: its lock goes with it, the run shows as interrupted and resumes
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from pathlib import Path; from qimera_engine.runs import Run; r = Run(Path(sys.argv[2]));"
                               "l = r.lock(); l.__enter__(); r.set_status('running'); print('held', flush=True);"
                               "time.sleep(600)", str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run.state == "running" and run.writer_alive
    finally:
        holder.kill()
        holder.wait()
    assert run.state == "interrupted"
    assert run_to_end(None, resume=folder)["epochs_done"] == 2
    assert run.state == "finished"


# --------------------------------------------------------------------------- resume refuses what it cannot continue

def test_resume_without_state_refuses_unless_restarted(tmp_path, digits_teacher):
    from qimera_engine import run_to_end
    from qimera_engine.runs import Run, RunDamaged
    folder = tmp_path / "r"
    first = run_to_end(preset("digits", **SMALL), out=folder)
    (folder / "state.pt").unlink()
    before = (folder / "metrics.csv").read_text()
    with pytest.raises(RunDamaged, match="no resume state.*--restart"):
        run_to_end(None, resume=folder)
    assert (folder / "metrics.csv").read_text() == before  # nothing replaced
    p = cli("quantize", "--resume", str(folder), home=Path(os.environ["QIMERA_HOME"]))
    assert p.returncode == 2 and "--restart" in p.stderr and "Traceback" not in p.stderr
    again = run_to_end(None, resume=folder, restart=True)
    assert again["epochs_done"] == 2 and again["quant_top1"] == first["quant_top1"]  # same seed, same result
    (folder / "state.pt").write_bytes(b"not a state file")
    with pytest.raises(RunDamaged, match="state.pt is damaged"):
        run_to_end(None, resume=folder)
    assert Run(folder).status["status"] == "finished"  # a refused resume writes nothing


def test_resume_after_metrics_file_garbage(tmp_path, digits_teacher):
    """The state carries the metrics rows: a garbage metrics.csv is rewritten, not read."""
    from qimera_engine import run, run_to_end
    from qimera_engine.events import EpochEnd
    folder = tmp_path / "r"
    events = run(preset("digits", **{**SMALL, "epochs": 3}), out=folder)
    for ev in events:
        if isinstance(ev, EpochEnd) and ev.epoch == 1:
            events.close()
    (folder / "metrics.csv").write_text("epoch,top1\nx,y\n\x00garbage")
    s = run_to_end(None, resume=folder)
    rows = [r["epoch"] for r in __import__("qimera_engine.runs", fromlist=["read_csv"]).read_csv(folder / "metrics.csv")]
    assert s["epochs_done"] == 3 and rows == [0, 1, 2]


# --------------------------------------------------------------------------- the teacher a run used

def test_retraining_makes_a_new_teacher_version(tmp_path, monkeypatch):
    from qimera_engine import run_to_end, train_and_cache
    from qimera_engine.artifacts import load_teacher
    from qimera_engine.events import EpochEnd
    from qimera_engine.models import state_dict_sha256
    from qimera_engine.runs import Run
    from qimera_engine.teachers import TeacherChanged, cached_teacher_path
    from qimera_engine import run as run_events
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    old = train_and_cache("digits-cnn", "digits", epochs=1)
    folder = tmp_path / "r"
    events = run_events(preset("digits", **{**SMALL, "epochs": 3}), out=folder)
    for ev in events:
        if isinstance(ev, EpochEnd) and ev.epoch == 0:
            events.close()
    assert Run(folder).teacher_sha256 == old.info["sha256"]
    new = train_and_cache("digits-cnn", "digits", epochs=2)  # retrained: another version, made current
    assert new.info["sha256"] != old.info["sha256"]
    assert Path(old.info["weights"]).exists() and Path(new.info["weights"]).exists()
    assert cached_teacher_path("digits-cnn", "digits") == Path(new.info["weights"])
    # the interrupted run continues with the teacher it started with, and reports it
    s = run_to_end(None, resume=folder)
    assert s["teacher_sha256"] == old.info["sha256"] and s["fp_top1"] == pytest.approx(old.info["test_top1"], abs=0.01)
    assert state_dict_sha256(load_teacher(folder).model) == old.info["sha256"]
    # a new run takes the current teacher
    assert run_to_end(preset("digits", **SMALL))["teacher_sha256"] == new.info["sha256"]
    # the old version gone: the run cannot continue with other weights
    Path(old.info["weights"]).unlink()
    (folder / "state.pt").touch()
    with pytest.raises(TeacherChanged, match="gone"):
        run_to_end(None, resume=folder)


def test_resume_refuses_a_changed_checkpoint(tmp_path, digits_teacher):
    import torch
    from qimera_engine import run_to_end
    from qimera_engine.events import EpochEnd
    from qimera_engine import run as run_events
    from qimera_engine.teachers import TeacherChanged
    ckpt = tmp_path / "teacher.pt"
    state = digits_teacher.model.state_dict()
    torch.save(state, ckpt)
    folder = tmp_path / "r"
    events = run_events(preset("digits", checkpoint=str(ckpt), **{**SMALL, "epochs": 3}), out=folder)
    for ev in events:
        if isinstance(ev, EpochEnd) and ev.epoch == 0:
            events.close()
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, ckpt)
    with pytest.raises(TeacherChanged, match="have changed since this run started"):
        run_to_end(None, resume=folder)


# --------------------------------------------------------------------------- how a run ends

def test_disk_full_during_a_save(tmp_path, digits_teacher, monkeypatch, capsys):
    import errno
    from qimera_engine import cli
    from qimera_engine import train as train_module
    from qimera_engine.runs import Run

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_module, "save_state_dict", full)
    code = cli.main(["quantize", "--quiet", "--out", str(tmp_path / "r"), *[f"--set={k}={v}" for k, v in SMALL.items()]])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: [Errno 28] No space left on device"
    st = Run(tmp_path / "r").status
    assert st["status"] == "failed" and "No space left" in st["error"]


def test_out_of_memory_is_one_line(tmp_path, digits_teacher, monkeypatch, capsys):
    from qimera_engine import cli
    from qimera_engine import train as train_module
    from qimera_engine.runs import Run

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000000000 bytes.")
    monkeypatch.setattr(train_module.Trainer, "student_step", oom)
    code = cli.main(["quantize", "--quiet", "--out", str(tmp_path / "r"), *[f"--set={k}={v}" for k, v in SMALL.items()]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: out of memory (DefaultCPUAllocator") and len(err.splitlines()) == 1
    assert "lower batch_size" in err and Run(tmp_path / "r").status["status"] == "failed"


@pytest.mark.slow
def test_ctrl_c_marks_the_run_cancelled(tmp_path, digits_teacher):
    import signal
    import time as _time
    from qimera_engine.runs import Run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    folder = tmp_path / "r"
    args = ["quantize", "--out", str(folder),
            *[f"--set={k}={v}" for k, v in {**SMALL, "epochs": 200, "iters_per_epoch": 20}.items()]]
    # as from a terminal: Ctrl-C raises KeyboardInterrupt. (Python keeps SIGINT ignored when it starts with
    # it ignored, as children of a shell's background job do: this test may run under one.)
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv = ['qimera_engine'] + sys.argv[1:]; runpy.run_module('qimera_engine', run_name='__main__')")
    p = subprocess.Popen([sys.executable, "-c", launcher, *args],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = _time.time() + 120
    while not (folder / "state.pt").exists() and _time.time() < deadline:
        _time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "--resume" in err
    run = Run(folder)
    assert run.state == "cancelled" and run.status["reason"] == "interrupted (SIGINT)"
    assert len(run.metrics) >= 1  # the completed epochs are kept


def _glibc() -> bool:
    import ctypes
    try:
        return sys.platform.startswith("linux") and bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="the allocator tuning applies to glibc's malloc only")
def test_the_allocator_is_tuned_once_unless_the_user_says_otherwise():
    code = "import qimera_engine.runtime as t; print(t.keep_freed_memory(), t.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    def out(**extra):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              check=True, cwd=ROOT).stdout.split()
    assert out() == ["True", "True"]
    assert out(QIMERA_MALLOC="default") == ["False", "False"]
    assert out(MALLOC_ARENA_MAX="2") == ["False", "False"]  # glibc's own settings win
