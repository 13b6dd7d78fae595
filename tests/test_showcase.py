"""The shipped CIFAR-10 showcase: read-only runs whose paths are relative to their folder, shown by
every page from an empty $QIMERA_HOME, offline."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import SHOWCASE
from qimera_engine import RunLocked, ShippedRun, delete_run, load_student, load_teacher, preset, run_to_end

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_runs_resolve_their_paths_and_stay_read_only(tmp_path, digits_teacher):
    """A run moved into a shipped folder, its checkpoint and data given relative to it."""
    from qimera_engine.models import save_state_dict
    src = tmp_path / "src"
    save_state_dict(digits_teacher.model, tmp_path / "show" / "teacher.safetensors")
    run_to_end(preset("digits", checkpoint=str(tmp_path / "show" / "teacher.safetensors"), epochs=1,
                      iters_per_epoch=2, warmup_epochs=0, calib_epochs=1, batch_size=8), out=src)
    dest = tmp_path / "show" / "runs" / "r"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("run.lock", "state.pt"))
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "checkpoint": "../../teacher.safetensors"}))
    shutil.rmtree(src)
    run = ShippedRun(dest)
    assert run.read_only and run.config.checkpoint == str((tmp_path / "show" / "teacher.safetensors").resolve())
    student = load_student(run, load_teacher(run))
    assert student is not None
    with pytest.raises(RunLocked, match="ships with the app"):
        delete_run(run)
    assert dest.exists() and not (dest / "run.lock").exists()  # nothing written


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    if page != "app.py":
        at.switch_page(page)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at
