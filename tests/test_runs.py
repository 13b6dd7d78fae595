import json
import subprocess
import sys
import threading

import pytest
import torch

from conftest import TINY
from qimera_engine import (EpochEnd, Finished, Started, Step, list_runs, load_generator, load_student, open_run,
                           preset, run, run_to_end)
from qimera_engine.runs import Run, atomic_path
from safetensors.torch import load_file


def test_run_saves_everything_and_reloads(digits_teacher, tmp_path):
    events = []
    summary = run_to_end(preset("digits", **TINY), on_event=events.append, out=tmp_path / "r")
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] in ("Log", "Started") and kinds[-1] == "Finished"
    assert kinds.count("EpochEnd") == 2 and kinds.count("Evaluated") == 2 and "Step" in kinds
    steps = [e for e in events if isinstance(e, Step)]
    assert steps[-1].step == steps[-1].total_steps == 12 and set(steps[0].losses) >= {"loss_g", "bns", "loss_s"}
    r = open_run(tmp_path / "r")
    assert r.status["status"] == "finished"
    for name in (Run.CONFIG, Run.METRICS, Run.SUMMARY, Run.GENERATOR, Run.STUDENT, Run.STATE):
        assert (r.path / name).exists(), name
    assert len(r.metrics) == 2 and r.metrics[1]["student_trained"] == 1 and r.metrics[0]["student_trained"] == 0
    assert summary["fp_top1"] > 95 and summary["quant_top1"] > 80 and summary["wbits"] == 4  # chance: 10
    assert r.config.method == "qimera" and json.loads((r.path / Run.SUMMARY).read_text()) == summary
    student = load_student(r, digits_teacher)
    from qimera_engine import evaluate, load_data, InputSpec
    acc = evaluate(student, load_data("digits", InputSpec.of(digits_teacher)))["top1"]
    assert acc == pytest.approx(summary["quant_top1"], abs=1e-3)
    assert load_generator(r).num_classes == 10


def _weights(path):
    return load_file(str(path / Run.STUDENT))


def test_resume_after_interruption_matches_an_uninterrupted_run(digits_teacher, tmp_path):
    cfg = preset("digits", **{**TINY, "epochs": 3})
    full = run_to_end(cfg, out=tmp_path / "full")

    stop = threading.Event()
    for ev in run(cfg, out=tmp_path / "cut", stop=stop):
        if isinstance(ev, EpochEnd) and ev.epoch == 0:
            stop.set()  # the user presses cancel during epoch 1
        last = ev
    assert isinstance(last, Finished) and last.status == "cancelled"
    cut = open_run(tmp_path / "cut")
    assert cut.status["status"] == "cancelled" and len(cut.metrics) == 1 and cut.summary is None

    started = []
    resumed = run_to_end(None, resume=tmp_path / "cut", on_event=lambda e: isinstance(e, Started) and started.append(e))
    assert started[0].start_epoch == 1
    assert resumed["quant_top1"] == full["quant_top1"] and resumed["epochs_done"] == 3
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on the CPU


def test_reproducible_with_the_same_seed_and_different_with_another(digits_teacher, tmp_path):
    a = run_to_end(preset("digits", **TINY), out=tmp_path / "a")
    b = run_to_end(preset("digits", **TINY), out=tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(_weights(tmp_path / "a").values(), _weights(tmp_path / "b").values()))
    run_to_end(preset("digits", **TINY, seed=1), out=tmp_path / "c")
    assert not all(torch.equal(x, y) for x, y in zip(_weights(tmp_path / "a").values(), _weights(tmp_path / "c").values()))
    assert a["quant_top1"] == b["quant_top1"]


@pytest.mark.parametrize("method", ["gdfq", "ptq", "real-data"])
def test_baselines_run(digits_teacher, tmp_path, method):
    s = run_to_end(preset("digits", **TINY, method=method), out=tmp_path / method)
    assert s["method"] == method and s["quant_top1"] > 70  # chance is 10; seeds 0-2 give 82-99
    r = open_run(tmp_path / method)
    assert r.has_generator == (method != "real-data")
    if method == "ptq":
        assert all(row["student_trained"] == 0 for row in r.metrics)


def test_bad_data_fails_before_a_folder_is_made(digits_teacher, tmp_path):
    from qimera_engine import DataError
    with pytest.raises(DataError, match="image folder not found"):
        run_to_end(preset("digits", **TINY, test_data="folder:/no/such/place"), out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_listing_runs(digits_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    assert list_runs() == []
    import shutil
    from pathlib import Path
    (tmp_path / "teachers").mkdir()
    weights = Path(digits_teacher.info["weights"])  # reuse the trained teacher
    shutil.copy(weights, tmp_path / "teachers")
    shutil.copy(weights.with_suffix(".json"), tmp_path / "teachers")
    run_to_end(preset("digits", **TINY))
    runs = list_runs()
    assert len(runs) == 1 and runs[0].path.parent == tmp_path / "runs"
    with pytest.raises(FileNotFoundError):
        open_run("no-such-run")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qimera_engine", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_quantize_end_to_end(digits_teacher, tmp_path):
    out = tmp_path / "cli"
    p = _cli("quantize", "--preset", "digits", "--wbits", "4", "--abits", "4", "--seed", "0", "--out", str(out),
             *[f"--set={k}={v}" for k, v in TINY.items()])
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert {"fp_top1", "quant_top1", "method", "wbits", "abits", "seconds"} <= set(s)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == s
    assert "run folder" in p.stderr

    listed = _cli("runs", "--json")
    assert listed.returncode == 0
    (row,) = [r for r in json.loads(listed.stdout) if r["path"] == str(out)]
    assert row["status"] == "finished" and row["summary"] == s

    ev = _cli("evaluate", "--teacher", "digits-cnn", "--test-data", "digits")
    assert ev.returncode == 0 and json.loads(ev.stdout)["top1"] == pytest.approx(s["fp_top1"], abs=1e-3)


def test_cli_errors_are_clear(tmp_path):
    p = _cli("quantize", "--preset", "digits", "--set", "superpose_p=2")
    assert p.returncode == 2 and "superpose_p must be in [0, 1]" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.th"
    bad.write_text("nope")
    p = _cli("evaluate", "--teacher", "resnet20", "--checkpoint", str(bad), "--test-data", "digits")
    assert p.returncode == 2 and "not a valid checkpoint" in p.stderr and "Traceback" not in p.stderr


def test_cli_evaluates_the_shared_resnet20(shared_resnet20, shared_cifar_dev):
    p = _cli("evaluate", "--teacher", "resnet20", "--checkpoint", str(shared_resnet20),
             "--test-data", f"folder:{shared_cifar_dev}", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["top1"] == pytest.approx(81.02, abs=0.05)


def test_a_diverging_run_stops_with_a_clear_error(digits_teacher, tmp_path):
    with pytest.raises(FloatingPointError, match="NaN or infinite.*kd_alpha"):
        run_to_end(preset("digits", **TINY, lr_s=10.0, kd_alpha=1e6), out=tmp_path / "nan")
    r = open_run(tmp_path / "nan")
    assert r.status["status"] == "failed" and len(r.metrics) == 1  # the warm-up epoch is kept


def test_cli_sweep_writes_a_table(digits_teacher, tmp_path):
    out = tmp_path / "sweep.csv"
    p = _cli("sweep", "--preset", "digits", "--bits", "4", "--methods", "ptq,qimera", "--seeds", "0", "--quiet",
             "--out", str(out), *[f"--set={k}={v}" for k, v in TINY.items()])
    assert p.returncode == 0, p.stderr
    import csv
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["ptq", "qimera"] and all(float(r["quant_top1"]) > 70 for r in rows)
    assert "W4A4 qimera" in p.stdout


def test_running_means_a_writer_holds_the_lock(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = Run(tmp_path)
    with r.lock():
        r.set_status("running")
        assert r.writer_alive and r.state == "running"
    assert not r.writer_alive and r.state == "interrupted"  # status says running, nobody holds the lock
    r.set_status("finished")
    assert r.state == "finished"


def test_imagenet_sized_run_end_to_end(tmp_path):
    """The 224x224 path: a torchvision teacher from a checkpoint, an ImageNet-style folder, the
    class-conditional generator; tiny sizes so that it runs in seconds on a CPU."""
    import numpy as np
    import torchvision
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    ckpt = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), ckpt)
    cfg = preset("imagenet-resnet18", pretrained=False, checkpoint=str(ckpt), test_data=f"imagenet:{tmp_path / 'val'}",
                 epochs=1, iters_per_epoch=1, batch_size=2, warmup_epochs=0, calib_epochs=1, superpose_k=2,
                 gen_width=8, eval_batch_size=4)
    s = run_to_end(cfg, out=tmp_path / "run")
    assert s["epochs_done"] == 1
    run = open_run(tmp_path / "run")
    from qimera_engine import InputSpec, evaluate, load_data, load_student, load_teacher
    teacher = load_teacher(run)
    acc = evaluate(load_student(run, teacher), load_data(cfg.test_data, InputSpec.of(teacher)), batch_size=4)
    assert acc["n"] == 4 and acc["top1"] == pytest.approx(s["quant_top1"], abs=1e-3)  # what was reported
    gen = load_generator(run)
    assert gen.conditional_bn and gen.image_size == 224 and gen.embed_dim == 512


def test_a_run_sets_the_callers_thread_count_back(tmp_path):
    """num_threads holds while the run runs; afterwards (finished or refused) the process computes with the
    thread count it had, so the next run in the process is not trained with another float rounding."""
    before = torch.get_num_threads()
    seen = []
    other = 1 if before != 1 else 2
    for _ in run(preset("digits", **TINY, num_threads=other), out=tmp_path / "r"):
        seen.append(torch.get_num_threads())
    assert set(seen) == {other} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="nothing to resume"):
        list(run(None, resume=tmp_path / "r"))
    assert torch.get_num_threads() == before
