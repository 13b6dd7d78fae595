"""Sweeps as Ray tasks (``sweep --ray``): every cell done once, a killed worker's cell continued, not redone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_cell_is_named_by_its_settings():
    from qimera_engine.config import preset
    from qimera_engine.sweeps import cell_name
    assert cell_name(preset("digits", method="gdfq", wbits=3, abits=4, seed=2)) == "gdfq-w3a4-s2"


def test_a_finished_cell_is_only_read(tmp_path, digits_teacher):
    from qimera_engine.config import preset
    from qimera_engine.sweeps import run_cell
    cfg = preset("digits", epochs=2, iters_per_epoch=3, warmup_epochs=1, calib_epochs=1, batch_size=16,
                 diversity_images=0)
    first = run_cell(cfg.to_dict(), str(tmp_path / "c"))
    stamp = (tmp_path / "c" / "summary.json").stat().st_mtime_ns
    assert run_cell(cfg.to_dict(), str(tmp_path / "c")) == first
    assert (tmp_path / "c" / "summary.json").stat().st_mtime_ns == stamp


def test_a_cell_cut_off_before_its_first_save_starts_again(tmp_path, digits_teacher):
    """Killed between writing its first epoch's files and its resume state: nothing can be continued, so the
    retry starts the cell again (a plain resume refuses such a folder rather than replace its results)."""
    from qimera_engine.config import preset
    from qimera_engine.runs import create_run
    from qimera_engine.sweeps import run_cell
    cfg = preset("digits", epochs=2, iters_per_epoch=3, warmup_epochs=1, calib_epochs=1, batch_size=16,
                 diversity_images=0)
    folder = create_run(cfg.to_dict(), cfg.method, cfg.wbits, cfg.abits, tmp_path / "c")
    (folder.path / "metrics.csv").write_text("epoch,top1\n0,50.0\n")  # written before the kill, no state.pt
    summary = run_cell(cfg.to_dict(), str(folder.path))
    assert summary["epochs_done"] == 2


def test_sweep_ray_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from qimera_engine import cli
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    code = cli.main(["sweep", "--preset", "digits", "--bits", "4", "--methods", "ptq", "--seeds", "0",
                     "--out", str(tmp_path / "t.csv"), "--ray"])
    err = capsys.readouterr().err
    assert code == 2 and "needs Ray, which is not installed: pip install ray" in err and "Traceback" not in err
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.slow
def test_ray_sweep_survives_a_killed_worker(tmp_path, digits_teacher):
    pytest.importorskip("ray", reason="sweep --ray needs Ray (tests/requirements.txt installs it)")
    runs = tmp_path / "cells"
    cmd = [sys.executable, "-m", "qimera_engine", "sweep", "--preset", "digits", "--bits", "4",
           "--methods", "qimera,gdfq", "--seeds", "0,1", "--set", "epochs=4", "--set", "iters_per_epoch=12",
           "--set", "warmup_epochs=1", "--set", "calib_epochs=1", "--set", "diversity_images=0",
           "--out", str(tmp_path / "table.csv"), "--runs-dir", str(runs), "--ray", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    sweep = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, kept = None, None
    try:
        deadline = time.monotonic() + 600
        while killed is None and time.monotonic() < deadline and sweep.poll() is None:
            for cell in sorted(runs.glob("*")) if runs.is_dir() else []:
                try:
                    status = json.loads((cell / "status.json").read_text())
                    rows = (cell / "metrics.csv").read_text().splitlines()
                except (OSError, ValueError):
                    continue
                saved = (cell / "state.pt").is_file()
                if status.get("status") == "running" and saved and 2 <= len(rows) <= 3:  # epochs saved, not all
                    kept = rows[:2]  # the header and epoch 0, which the resume state holds
                    os.kill(status["pid"], signal.SIGKILL)  # the Ray worker running this cell
                    killed = cell
                    break
            time.sleep(0.2)
        out, _ = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert killed is not None, "no cell was caught mid-run"
    assert sweep.returncode == 0, out[-6000:]
    lines = (tmp_path / "table.csv").read_text().splitlines()
    assert len(lines) == 5, lines  # a header and the 4 cells
    assert sorted(p.name for p in runs.iterdir()) == ["gdfq-w4a4-s0", "gdfq-w4a4-s1", "qimera-w4a4-s0", "qimera-w4a4-s1"]
    for cell in runs.iterdir():
        assert json.loads((cell / "status.json").read_text())["status"] == "finished", cell
        assert json.loads((cell / "summary.json").read_text())["epochs_done"] == 4
    # the killed cell went on from its last saved epoch: those rows (their timings too) are as they were
    assert (killed / "metrics.csv").read_text().splitlines()[:2] == kept


def test_cell_folders_tell_variants_apart(tmp_path):
    from qimera_engine.config import preset
    from qimera_engine.jobs import sweep_configs
    from qimera_engine.sweeps import cell_folders
    configs = sweep_configs(preset("digits"), [4], ["qimera", {"method": "qimera", "superpose_p": 0.0}, "gdfq"], [0])
    names = [f.name for f in cell_folders(configs, tmp_path, "x-")]
    assert names == ["x-qimera-w4a4-s0", "x-qimera-w4a4-s0-2", "x-gdfq-w4a4-s0"]


def _ray_env(monkeypatch):
    pytest.importorskip("ray", reason="sweeps on Ray need Ray (tests/requirements.txt installs it)")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")


@pytest.mark.slow
def test_app_sweep_on_ray_lands_each_cell_in_its_folder(tmp_path, monkeypatch, digits_teacher):
    """The app's sweeps (Bit widths, Compare) on a local Ray instance: two variants of one method, one folder
    each, with progress read from the folders and the summaries in the job."""
    _ray_env(monkeypatch)
    from qimera_engine.config import preset
    from qimera_engine.jobs import JobRegistry
    from qimera_engine.runs import Run
    reg = JobRegistry(ray_address="local", ray_runs_dir=tmp_path / "store")
    base = preset("digits", epochs=2, iters_per_epoch=4, warmup_epochs=1, calib_epochs=1, batch_size=16,
                  diversity_images=0)
    job_id = reg.start_sweep(base, [4], ["ptq", {"method": "ptq", "weight_clip": "minmax"}], [0])
    job = reg.wait(job_id, timeout=600)
    assert job.status == "finished", (job.error, job.log[-3:])
    assert "on Ray" in job.label
    folders = [Path(r.run_dir) for r in job.runs]
    assert len(set(folders)) == 2 and all(f.parent == tmp_path / "store" for f in folders)
    for r, folder in zip(job.runs, folders):
        assert r.status == "finished" and r.summary["quant_top1"] == Run(folder).summary["quant_top1"]
        assert Run(folder).status["status"] == "finished" and r.fraction == 1.0
        assert Run(folder).config.weight_clip == r.config["weight_clip"]


@pytest.mark.slow
def test_app_sweep_on_ray_cancels_into_resumable_cells(tmp_path, monkeypatch, digits_teacher):
    _ray_env(monkeypatch)
    from qimera_engine.config import preset
    from qimera_engine.jobs import JobRegistry
    from qimera_engine.runs import Run
    reg = JobRegistry(ray_address="local", ray_runs_dir=tmp_path / "store")
    base = preset("digits", epochs=200, iters_per_epoch=20, warmup_epochs=1, calib_epochs=1, batch_size=16,
                  diversity_images=0)
    job_id = reg.start_sweep(base, [4], ["qimera"], [0, 1])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(r.epoch >= 1 for r in reg.get(job_id).runs):
        assert reg.get(job_id).active, reg.get(job_id).error
        time.sleep(0.5)
    assert any(r.status == "running" and r.epoch >= 1 for r in reg.get(job_id).runs), "no cell got going"
    asked = time.monotonic()
    assert reg.cancel(job_id)
    job = reg.wait(job_id, timeout=180)
    assert job.status == "cancelled", (job.status, job.error, job.log[-3:])
    assert all(r.status == "cancelled" for r in job.runs)
    started = [Run(Path(r.run_dir)) for r in job.runs if (Path(r.run_dir) / "config.json").is_file()]
    # each cell ended as Ctrl-C ends a run: its status says so and what it had done stays, to resume
    assert started and [f.status["status"] for f in started] == ["cancelled"] * len(started)
    assert any(f.metrics for f in started) and not any(f.writer_alive for f in started)
    print("cancelled in", round(time.monotonic() - asked, 1), "s")


def test_cells_killed_by_force_are_recorded_as_cancelled_and_live_ones_are_not(tmp_path):
    """A Ray cell that did not stop within the grace is killed mid-step and cannot write its own status: the
    sweep writes "cancelled" for it, once its process is gone, and never touches a run whose writer lives."""
    import socket
    from qimera_engine.runs import _process_start, create_run
    from qimera_engine.sweeps import mark_cancelled
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_start = _process_start(dead.pid)
    dead.wait()
    killed, live, elsewhere = (create_run({"seed": i}, "qimera", 4, 4, tmp_path / n)
                               for i, n in enumerate(("killed", "live", "elsewhere")))
    killed.set_status("running", pid=dead.pid, pid_start=dead_start, host=socket.gethostname())
    elsewhere.set_status("running", pid=dead.pid, pid_start=dead_start, host="another-machine")
    with live.lock():
        live.set_status("running", **live.writer_record())
        marked = mark_cancelled([killed.path, live.path, elsewhere.path], "stopped by force", wait_s=1)
        assert live.status["status"] == "running"  # its writer holds the lock: left alone
    assert marked == [killed.path]
    assert killed.status["status"] == "cancelled" and killed.status["reason"] == "stopped by force"
    assert elsewhere.status["status"] == "running"  # another machine's process cannot be checked from here
    assert mark_cancelled([killed.path], "again", wait_s=0) == []  # only runs that still say running


def test_the_table_tool_collects_the_finished_cells_of_a_table_cut_short(tmp_path):
    """bench/results_table.py --collect: the finished cells' CSV and table, nothing run, unfinished ones left out."""
    summary = {"fp_top1": 81.0, "quant_top1": 70.0, "best_top1": 71.0, "seconds": 10.0, "images_per_s": 5.0}
    for name, top1 in (("qimera-w4a4-s0", 70.0), ("qimera-w4a4-s1", 72.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({**summary, "quant_top1": top1}))
    (tmp_path / "qimera-w2a2-s0").mkdir()  # started, not finished
    out = tmp_path / "t.csv"
    args = [sys.executable, str(ROOT / "bench" / "results_table.py"), "--preset", "digits", "--bits", "2,4",
            "--methods", "qimera", "--seeds", "0,1", "--runs-dir", str(tmp_path), "--out", str(out), "--collect"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "2 of 4 cells have finished" in p.stdout and "| qimera | W4A4 | 71.00 ± 1.41 |" in p.stdout
    assert "W2A2" not in p.stdout and not (tmp_path / "qimera-w2a2-s0" / "summary.json").exists()
    import csv
    assert [(r["wbits"], r["seed"], r["final_top1"]) for r in csv.DictReader(out.open())] == [
        ("4", "0", "70.0"), ("4", "1", "72.0")]
    p = subprocess.run(args[:-5] + ["--runs-dir", str(tmp_path / "none"), "--out", str(out), "--collect"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "no finished cells" in p.stderr


class _FakeRay:
    """Ray as ``ray_sweep`` calls it, on a cluster with ``gpus`` GPUs: records the tasks' resource options and
    runs each task at once, in this process."""

    def __init__(self, gpus: int):
        self.gpus, self.options, self.results = gpus, [], {}

    def is_initialized(self):
        return True  # a cluster already joined: ray_sweep neither starts nor shuts one down

    def cluster_resources(self):
        return {"CPU": 2.0, **({"GPU": float(self.gpus)} if self.gpus else {})}

    def remote(self, **options):
        self.options.append(options)
        fake = self

        def wrap(fn):
            class Task:
                @staticmethod
                def remote(*args):
                    ref = len(fake.results)
                    fake.results[ref] = fn(*args)
                    return ref
            return Task
        return wrap

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return self.results[ref]


@pytest.mark.parametrize("gpus, share, expected", [(1, 0.25, 0.25), (1, 1.0, 1.0), (2, 2, 2.0), (0, 0.25, 0)])
def test_a_ray_sweep_asks_for_its_share_of_a_gpu(tmp_path, monkeypatch, gpus, share, expected):
    from qimera_engine import sweeps
    from qimera_engine.config import preset
    fake = _FakeRay(gpus)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(sweeps, "run_cell", lambda cfg, folder: {"seed": cfg["seed"], "folder": folder})
    configs = [preset("digits", seed=s) for s in (0, 1, 2)]
    out = sweeps.ray_sweep(configs, tmp_path / "runs", gpus_per_cell=share)
    assert [o["seed"] for o in out] == [0, 1, 2]
    assert fake.options == [{"num_cpus": 1, "num_gpus": expected, "max_retries": 3}]


@pytest.mark.parametrize("bad", [0, -1, 1.5, float("nan"), float("inf")])
def test_a_gpu_share_ray_cannot_take_is_refused(tmp_path, monkeypatch, bad):
    from qimera_engine import sweeps
    from qimera_engine.config import ConfigError, preset
    monkeypatch.setitem(sys.modules, "ray", _FakeRay(1))
    with pytest.raises(ConfigError, match="GPUs per cell must be a fraction in"):
        sweeps.ray_sweep([preset("digits")], tmp_path / "runs", gpus_per_cell=bad)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, message", [([], "--gpus-per-cell goes with --ray"),
                                            (["--ray"], "GPUs per cell must be a fraction in")])
def test_sweep_gpus_per_cell_on_the_command_line(tmp_path, monkeypatch, capsys, extra, message):
    from qimera_engine import cli
    monkeypatch.setitem(sys.modules, "ray", None)  # refused before Ray is needed
    code = cli.main(["sweep", "--preset", "digits", "--bits", "4", "--methods", "ptq", "--seeds", "0",
                     "--out", str(tmp_path / "t.csv"), "--gpus-per-cell", "1.5", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "t.csv").exists()


def test_a_ray_sweep_asking_for_more_gpus_than_the_cluster_has_is_refused(tmp_path, monkeypatch):
    from qimera_engine import sweeps
    from qimera_engine.config import ConfigError, preset
    fake = _FakeRay(1)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(ConfigError, match="each cell asks for 2 GPUs and the cluster has 1: lower --gpus-per-cell"):
        sweeps.ray_sweep([preset("digits")], tmp_path / "runs", gpus_per_cell=2)
    assert fake.results == {}  # nothing was started
