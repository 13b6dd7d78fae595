"""The run store, as a careless or a hostile user meets it: a run folder is the engine's or nobody's, a run is
what it was created as, and locks and deletes cannot be fooled.

Every refused case checks the message, the exit status (2, one ``error:`` line, no traceback) and that
nothing changed: the run store, the teacher cache and every file the case set up, byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qimera_engine import cli, preset
from qimera_engine.runs import Run, RunDamaged, RunLocked, delete_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(epochs=2, iters_per_epoch=3, warmup_epochs=1, calib_epochs=1, batch_size=8, log_every=1, gen_width=16)
SETS = [f"--set={k}={v}" for k, v in SMALL.items()] + ["--quiet"]


def contents(*roots: Path) -> dict:
    """Every file, folder and link under the roots: its kind and, for files, a hash of its bytes."""
    out = {}
    for root in roots:
        if root.is_symlink() or root.is_file():
            out[str(root)] = _one(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                out[str(p)] = _one(p)
    return out


def _one(p: Path):
    if p.is_symlink():
        return ("link", os.readlink(p))
    if p.is_file():
        return ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return ("dir" if p.is_dir() else "other",)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, digits_teacher):
    """A run stopped after its first of two epochs (resumable), made once; cases work on copies."""
    from qimera_engine import run
    from qimera_engine.events import EpochEnd
    folder = tmp_path_factory.mktemp("store") / "stopped"
    events = run(preset("digits", **SMALL), out=folder)
    for ev in events:
        if isinstance(ev, EpochEnd) and ev.epoch == 0:
            events.close()
    assert Run(folder).status["status"] == "cancelled"
    return folder


@pytest.fixture
def copy_of(stopped_run, tmp_path):
    def make() -> Path:
        dest = tmp_path / "run"
        shutil.copytree(stopped_run, dest)
        return dest
    return make


def _edit_config(key, value):
    def edit(*where: Path):  # (tmp, home, run) as a set-up, or the run alone
        run = where[-1]
        cfg = json.loads((run / "config.json").read_text())
        cfg[key] = value
        (run / "config.json").write_text(json.dumps(cfg, indent=2))
    return edit


def _edit_teacher(run: Path):
    rec = json.loads((run / "teacher.json").read_text())
    rec["sha256"] = "0" * 64
    (run / "teacher.json").write_text(json.dumps(rec))


def _user_files(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "metrics.csv", "student.safetensors"):
        (d / name).write_text(f"the user's own {name}\n")


def _lock_link(run: Path, outside: Path):
    outside.write_text("precious\n")
    (run / "run.lock").unlink(missing_ok=True)
    (run / "run.lock").symlink_to(outside)


def _lock_fifo(run: Path):
    (run / "run.lock").unlink(missing_ok=True)
    os.mkfifo(run / "run.lock")


# (id, set-up given (tmp, home, run) -> None, argv with {tmp} {home} {run}, words the message must contain)
# A case whose set-up names {run} works on a fresh copy of the stopped run.
CASES = [
    ("out-with-users-files", lambda t, h, r: _user_files(t / "mine"), ["quantize", "--out={tmp}/mine", *SETS],
     "is not empty"),
    ("out-teacher-cache", None, ["quantize", "--out={home}/teachers", *SETS], "one of this tool's own folders"),
    ("out-inside-teacher-cache", None, ["quantize", "--out={home}/teachers/new", *SETS],
     "one of this tool's own folders"),
    ("out-home-itself", None, ["quantize", "--out={home}", *SETS], "one of this tool's own folders"),
    ("out-runs-folder", None, ["quantize", "--out={home}/runs", *SETS], "one of this tool's own folders"),
    ("out-cache", None, ["quantize", "--out={home}/cache/x", *SETS], "one of this tool's own folders"),
    ("out-uploads", None, ["quantize", "--out={home}/uploads/x", *SETS], "one of this tool's own folders"),
    ("out-finished-run-without-config", lambda t, h, r: (r / "config.json").unlink(),
     ["quantize", "--out={run}", *SETS], "is not empty"),
    ("out-a-run", lambda t, h, r: None, ["quantize", "--out={run}", *SETS], "already holds a run; resume it"),
    ("out-inside-a-run", lambda t, h, r: None, ["quantize", "--out={run}/sub", *SETS], "lies inside the run folder"),
    ("out-empty", None, ["quantize", "--out=", *SETS], "--out is empty"),
    ("out-blank", None, ["quantize", "--out=   ", *SETS], "--out is empty"),
    ("out-a-file", lambda t, h, r: (t / "thesis.pdf").write_text("mine"), ["quantize", "--out={tmp}/thesis.pdf", *SETS],
     "exists and is not a folder"),
    ("out-dangling-link", lambda t, h, r: (t / "link").symlink_to(t / "nowhere"), ["quantize", "--out={tmp}/link", *SETS],
     "symbolic link to nothing"),
    ("out-link-to-teachers", lambda t, h, r: (t / "link").symlink_to(h / "teachers"),
     ["quantize", "--out={tmp}/link", *SETS], "one of this tool's own folders"),
    ("resume-empty", None, ["quantize", "--resume="], "--resume is empty"),
    ("resume-blank", None, ["quantize", "--resume= "], "--resume is empty"),
    ("resume-with-wbits", lambda t, h, r: None, ["quantize", "--resume={run}", "--wbits=2"], "--wbits cannot change"),
    ("resume-with-method", lambda t, h, r: None, ["quantize", "--resume={run}", "--method=gdfq"], "--method"),
    ("resume-with-set", lambda t, h, r: None, ["quantize", "--resume={run}", "--set=epochs=5"], "--set"),
    ("resume-with-out", lambda t, h, r: None, ["quantize", "--resume={run}", "--out={tmp}/elsewhere"], "--out"),
    ("resume-with-preset", lambda t, h, r: None, ["quantize", "--resume={run}", "--preset=digits"], "--preset"),
    ("resume-with-seed", lambda t, h, r: None, ["quantize", "--resume={run}", "--seed=3"], "--seed"),
    ("resume-with-test-data", lambda t, h, r: None, ["quantize", "--resume={run}", "--test-data=digits"],
     "--test-data"),
    ("resume-edited-bits", _edit_config("wbits", 2), ["quantize", "--resume={run}"], "wbits 4 -> 2"),
    ("resume-edited-abits", _edit_config("abits", 8), ["quantize", "--resume={run}"], "abits 4 -> 8"),
    ("resume-edited-seed", _edit_config("seed", 7), ["quantize", "--resume={run}"], "seed 0 -> 7"),
    ("resume-edited-lr", _edit_config("lr_s", 0.5), ["quantize", "--resume={run}"], "lr_s 0.001 -> 0.5"),
    ("resume-edited-epochs", _edit_config("epochs", 5), ["quantize", "--resume={run}"], "epochs 2 -> 5"),
    ("resume-edited-method", _edit_config("method", "gdfq"), ["quantize", "--resume={run}"], "method 'qimera' -> 'gdfq'"),
    ("resume-edited-bad-config", lambda t, h, r: (r / "config.json").write_text("{"), ["quantize", "--resume={run}"],
     "config.json is damaged"),
    ("resume-without-teacher-json", lambda t, h, r: (r / "teacher.json").unlink(), ["quantize", "--resume={run}"],
     "teacher.json is missing"),
    ("resume-other-teacher-json", lambda t, h, r: _edit_teacher(r), ["quantize", "--resume={run}"],
     "teacher.json names other weights"),
    ("resume-lock-is-a-link", lambda t, h, r: _lock_link(r, t / "precious.txt"), ["quantize", "--resume={run}"],
     "run.lock is a symbolic link"),
    ("resume-lock-is-a-fifo", lambda t, h, r: _lock_fifo(r), ["quantize", "--resume={run}"],
     "run.lock is not a regular file"),
    ("restart-lock-is-a-link", lambda t, h, r: _lock_link(r, t / "precious.txt"),
     ["quantize", "--resume={run}", "--restart"], "run.lock is a symbolic link"),
    ("resume-lock-is-a-folder", lambda t, h, r: ((r / "run.lock").unlink(missing_ok=True), (r / "run.lock").mkdir()),
     ["quantize", "--resume={run}"], "run.lock is not a regular file"),
    ("resume-config-text-for-a-number", _edit_config("wbits", "4"), ["quantize", "--resume={run}"],
     "wbits holds the text '4', not a int"),
    ("out-unknown-user", None, ["quantize", "--out=~nosuchuser-qimera/x", *SETS], "cannot expand '~nosuchuser-qimera'"),
    ("data-unknown-user", None, ["evaluate", "--teacher=digits-cnn", "--test-data=folder:~nosuchuser-qimera/x"],
     "cannot expand '~nosuchuser-qimera'"),
    ("checkpoint-unknown-user", None, ["quantize", "--checkpoint=~nosuchuser-qimera/t.pt", *SETS],
     "cannot expand '~nosuchuser-qimera'"),
    ("export-over-the-runs-index", lambda t, h, r: None,
     ["export", "{orig}", "--format=int", "--out={home}/runs-elsewhere/x.txt", "--force"], "one of this tool's own folders"),
    ("export-into-the-teacher-cache", lambda t, h, r: None,
     ["export", "{orig}", "--format=int", "--out={home}/teachers/x.safetensors"], "one of this tool's own folders"),
    ("export-into-another-run", lambda t, h, r: None,
     ["export", "{orig}", "--format=int", "--out={run}/student-int.safetensors"], "an export of run stopped is not written"),
    ("export-into-another-run-forced", lambda t, h, r: None,
     ["export", "{orig}", "--format=onnx", "--out={run}/sub/mine.onnx", "--force"], "into another run's folder"),
    ("sweep-out-config", lambda t, h, r: None, ["sweep", "--out={run}/config.json", "--seeds=0", "--bits=4"],
     "lies inside the run folder"),
    ("sweep-out-metrics", lambda t, h, r: None, ["sweep", "--out={run}/metrics.csv", "--seeds=0", "--bits=4"],
     "lies inside the run folder"),
    ("sweep-out-existing", lambda t, h, r: (t / "thesis.pdf").write_text("mine"),
     ["sweep", "--out={tmp}/thesis.pdf", "--seeds=0", "--bits=4"], "exists; choose another file, or --force"),
    ("sweep-out-empty", None, ["sweep", "--out=", "--seeds=0", "--bits=4"], "the table to write is empty"),
    ("sweep-out-folder", None, ["sweep", "--out={tmp}", "--seeds=0", "--bits=4"], "is a folder"),
    ("sweep-out-teachers", None, ["sweep", "--out={home}/teachers/t.csv", "--seeds=0", "--bits=4"],
     "one of this tool's own folders"),
    ("sweep-out-runs", None, ["sweep", "--out={home}/runs/t.csv", "--seeds=0", "--bits=4"],
     "one of this tool's own folders"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_store_refuses(case, copy_of, stopped_run, tmp_path, digits_teacher, capsys):
    _, setup, argv, words = case
    home = Path(os.environ["QIMERA_HOME"])
    work = tmp_path / "work"
    work.mkdir()
    run = copy_of() if any("{run}" in a for a in argv) else tmp_path / "no-run"
    if setup is not None:
        setup(work, home, run)
    argv = [a.replace("{tmp}", str(work)).replace("{home}", str(home)).replace("{run}", str(run))
            .replace("{orig}", str(stopped_run)) for a in argv]
    watched = (home / "runs", home / "teachers", work, stopped_run, *([run] if run.exists() else []))
    before = contents(*watched)
    elsewhere = contents(home / "runs-elsewhere") if (home / "runs-elsewhere").exists() else None
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert contents(*watched) == before
    assert (contents(home / "runs-elsewhere") if (home / "runs-elsewhere").exists() else None) == elsewhere


def test_an_empty_folder_takes_a_run(tmp_path, digits_teacher):
    from qimera_engine import run_to_end
    (tmp_path / "empty").mkdir()
    assert run_to_end(preset("digits", **SMALL), out=tmp_path / "empty")["epochs_done"] == 2


def test_an_unchanged_run_still_resumes(copy_of, digits_teacher):
    """The checks refuse only what changed: the same folder resumes and ends where a whole run ends."""
    from qimera_engine import run_to_end
    folder = copy_of()
    s = run_to_end(None, resume=folder)
    whole = run_to_end(preset("digits", **SMALL), out=folder.parent / "whole")
    assert s["epochs_done"] == 2 and s["quant_top1"] == whole["quant_top1"]
    state = __import__("torch").load(folder / "state.pt", weights_only=True)
    assert state["config"] == json.loads((folder / "config.json").read_text())
    assert state["teacher_sha256"] == json.loads((folder / "teacher.json").read_text())["sha256"]
    summary = (folder / "summary.json").read_text()
    with pytest.raises(ValueError, match="has finished all its 2 epochs: there is nothing to resume"):
        run_to_end(None, resume=folder)  # a finished run is not run again, nor its summary rewritten
    assert (folder / "summary.json").read_text() == summary


def _as_before(folder: Path, key: str) -> None:
    """The run folder as a version without ``key`` wrote it: neither its config.json nor its resume state
    names the setting."""
    import torch
    from qimera_engine.train import config_sha256
    cfg = json.loads((folder / "config.json").read_text())
    del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    state = torch.load(folder / "state.pt", weights_only=True)
    del state["config"][key]
    state["config_sha256"] = config_sha256(state["config"])
    torch.save(state, folder / "state.pt")


def test_a_run_stopped_before_a_setting_was_added_resumes(copy_of, digits_teacher):
    """A setting added since the run stopped holds its default, the behaviour the run was trained with, so
    the run resumes (and ends where a whole run ends); a value other than the default is still refused."""
    from qimera_engine import run_to_end
    folder = copy_of()
    _as_before(folder, "ms_pairs")
    s = run_to_end(None, resume=folder)
    whole = run_to_end(preset("digits", **SMALL), out=folder.parent / "whole")
    assert s["epochs_done"] == 2 and s["quant_top1"] == whole["quant_top1"]


def test_a_setting_added_since_is_refused_at_another_value(copy_of, digits_teacher):
    from qimera_engine import run_to_end
    folder = copy_of()
    _as_before(folder, "ms_pairs")
    _edit_config("ms_pairs", "class")(folder)
    with pytest.raises(RunDamaged, match="ms_pairs None -> 'class'"):
        run_to_end(None, resume=folder)


def test_restart_takes_the_edited_config(copy_of, digits_teacher):
    """An edited config is refused on resume, but --restart starts the run again with it, on purpose."""
    from qimera_engine import run_to_end
    folder = copy_of()
    _edit_config("seed", 3)(folder)
    with pytest.raises(RunDamaged, match="seed 0 -> 3"):
        run_to_end(None, resume=folder)
    s = run_to_end(None, resume=folder, restart=True)
    assert s["seed"] == 3 and s["epochs_done"] == 2


def test_the_api_refuses_a_config_with_resume(copy_of, tmp_path, digits_teacher):
    from qimera_engine import run_to_end
    folder = copy_of()
    with pytest.raises(ValueError, match="give resume alone"):
        run_to_end(preset("digits", wbits=2), resume=folder)
    with pytest.raises(ValueError, match="give resume alone"):
        run_to_end(None, resume=folder, out=tmp_path / "x")
    with pytest.raises(ValueError, match="restart goes with resume"):
        run_to_end(preset("digits", **SMALL), restart=True)
    assert not (tmp_path / "x").exists()


def test_a_lock_link_never_touches_its_target(copy_of, tmp_path):
    folder = copy_of()
    _lock_link(folder, tmp_path / "precious.txt")
    run = Run(folder)
    with pytest.raises(RunDamaged, match="symbolic link"):
        delete_run(run)
    with pytest.raises(RunDamaged, match="symbolic link"):
        run.writer_alive
    assert (tmp_path / "precious.txt").read_text() == "precious\n" and folder.is_dir()


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds the run as a live run does: its lock, and status.json naming it."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
            "from qimera_engine.runs import Run; r = Run(Path(sys.argv[2])); l = r.lock(); l.__enter__();"
            "r.set_status('running', **r.writer_record()); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_removed_lock_file_does_not_hide_a_live_writer(copy_of, digits_teacher):
    from qimera_engine import run_to_end
    folder = copy_of()
    holder = _holder(folder)
    try:
        (folder / "run.lock").unlink()  # by hand, while the run is live
        run = Run(folder)
        assert run.writer_alive and run.state == "running"
        with pytest.raises(RunLocked, match="its run.lock was removed"):
            run_to_end(None, resume=folder)
        with pytest.raises(RunLocked, match="its run.lock was removed"):
            delete_run(run)
        assert (folder / "config.json").is_file() and (folder / "state.pt").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert Run(folder).state == "interrupted"  # the holder is dead: the run is free again
    assert run_to_end(None, resume=folder)["epochs_done"] == 2


def test_a_thread_of_this_process_is_seen_without_its_lock_file(copy_of):
    folder = copy_of()
    run = Run(folder)
    with run.lock():
        run.set_status("running", **run.writer_record())
        (folder / "run.lock").unlink()
        assert run.writer_alive
        with pytest.raises(RunLocked):
            delete_run(Run(folder))
    assert not run.writer_alive and run.state == "interrupted"
    delete_run(run)
    assert not folder.exists()


def test_a_folder_removed_while_running_is_not_brought_back(tmp_path, digits_teacher):
    """Remove a live run's folder by hand: the run stops at its next save and does not recreate it."""
    from qimera_engine import run
    from qimera_engine.events import EpochEnd
    folder = tmp_path / "r"
    events = run(preset("digits", **{**SMALL, "epochs": 3}), out=folder)
    with pytest.raises(RunDamaged, match="was removed while the run was writing it"):
        for ev in events:
            if isinstance(ev, EpochEnd) and ev.epoch == 0:
                shutil.rmtree(folder)
    assert not folder.exists()


def test_a_status_is_recorded_on_a_full_disk(tmp_path, monkeypatch):
    """When no new file fits, the run's end is still written over its old status file."""
    import errno
    from qimera_engine import runs
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    run = Run(folder)
    run.set_status("running", pid=1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs, "write_text", full)
    run.set_status("failed", error="OSError: No space left on device")
    assert run.status["status"] == "failed" and "No space" in run.status["error"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "status.json"]


def test_a_failed_save_on_a_full_disk_marks_the_run_failed(tmp_path, digits_teacher, monkeypatch, capsys):
    """Every new file fails (the disk is full), yet the run ends 'failed' with the reason, not 'interrupted'."""
    import errno
    from qimera_engine import runs
    from qimera_engine import train as train_module
    real = runs.write_text

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(*a, **k):  # the first save fills the disk: from then on no new file fits
        monkeypatch.setattr(runs, "write_text", full)
        full()
    monkeypatch.setattr(train_module, "save_state_dict", save)
    code = cli.main(["quantize", "--out", str(tmp_path / "r"), *SETS])
    assert code == 2 and "No space left" in capsys.readouterr().err
    monkeypatch.setattr(runs, "write_text", real)
    run = Run(tmp_path / "r")
    assert run.state == "failed" and "No space left" in run.status["error"]


def test_a_refused_setting_writes_no_run_folder(tmp_path, digits_teacher, monkeypatch):
    """What refuses a run while its parts are put together (the trainer included: optimizers, sampler, the
    teacher's BatchNorm layers) refuses it before any folder exists."""
    from qimera_engine import run_to_end
    from qimera_engine import train as train_module

    def refuse(parts, world=None):
        raise ValueError("the teacher has no BatchNorm2d layer: Qimera needs its running statistics")
    monkeypatch.setattr(train_module.Trainer, "from_parts", staticmethod(refuse))
    before = contents(Path(os.environ["QIMERA_HOME"]) / "runs")
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        run_to_end(preset("digits", **SMALL), out=tmp_path / "r")
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        run_to_end(preset("digits", **SMALL))
    assert not (tmp_path / "r").exists()
    assert contents(Path(os.environ["QIMERA_HOME"]) / "runs") == before


def test_sweep_force_replaces_only_a_plain_file(tmp_path):
    from qimera_engine.runs import OutRefused, check_file_out
    (tmp_path / "t.csv").write_text("old")
    assert check_file_out(tmp_path / "t.csv", force=True) == tmp_path / "t.csv"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")
    with pytest.raises(OutRefused, match="inside the run folder"):
        check_file_out(tmp_path / "r" / "config.json", force=True)
    with pytest.raises(OutRefused, match="inside the run folder"):
        check_file_out(tmp_path / "r" / "new.csv", force=True)


def test_a_lock_held_in_another_thread_refuses_a_delete(copy_of):
    folder = copy_of()
    run, held, release = Run(folder), threading.Event(), threading.Event()

    def hold():
        with run.lock():
            held.set()
            release.wait(30)
    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        with pytest.raises(RunLocked):
            delete_run(Run(folder))
        assert folder.is_dir()
    finally:
        release.set()
        t.join()


def test_runs_written_elsewhere_are_noted_one_file_each(tmp_path, monkeypatch):
    """No shared append-only file: each run folder outside runs/ is noted in a file of its own (written whole),
    so writers on other processes or hosts never touch one file; an earlier version's list is still read."""
    import multiprocessing

    from qimera_engine import runs as store
    home = tmp_path / "home"
    monkeypatch.setenv("QIMERA_HOME", str(home))
    folders = [tmp_path / f"out{i}" for i in range(6)]
    for f in folders:
        f.mkdir()
        (f / "config.json").write_text("{}")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:  # six notes from three processes at once
        pool.map(store._remember_elsewhere, [f.resolve() for f in folders])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (home / "runs-elsewhere.txt").write_text(f"{legacy}\n")
    assert len(list((home / "runs-elsewhere").glob("*.txt"))) == 6
    store._remember_elsewhere(folders[0].resolve())  # noted again: the same file
    assert len(list((home / "runs-elsewhere").glob("*.txt"))) == 6
    assert {r.path.resolve() for r in store.list_runs()} == {f.resolve() for f in [*folders, legacy]}
    assert store.in_engine_folder(home / "runs-elsewhere" / "x.txt")


def test_a_killed_writer_not_yet_reaped_is_not_alive():
    """A writer killed with -9 stays a zombie until its parent (a Ray raylet, a shell) reaps it; a resume
    meanwhile must not take it for a live writer."""
    import signal
    import subprocess
    import time

    from qimera_engine.runs import _process_alive, _process_start
    child = subprocess.Popen(["sleep", "60"])
    start = _process_start(child.pid)
    try:
        assert _process_alive(child.pid, start)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _process_alive(child.pid, start) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _process_alive(child.pid, start)  # not reaped yet: a zombie
    finally:
        child.kill()
        child.wait()
