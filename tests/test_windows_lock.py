"""The run lock's Windows branch (``msvcrt.locking`` where there is no ``fcntl``), on this machine: an
emulated ``msvcrt`` that behaves as Windows' does (an exclusive lock per open handle, refused at once with
an ``OSError`` while another handle holds it) stands in for the real one. It checks the engine's own logic
(import, lock, refuse, release, "is anyone writing?"), not Windows itself."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qimera_engine import runs
from qimera_engine.runs import Run, RunLocked

ROOT = Path(__file__).resolve().parents[1]
LK_UNLCK, LK_NBLCK = 0, 2  # msvcrt's values


def fake_msvcrt() -> types.ModuleType:
    m = types.ModuleType("msvcrt")
    m.LK_UNLCK, m.LK_NBLCK = LK_UNLCK, LK_NBLCK
    m.calls = []

    def locking(fd, mode, nbytes):
        m.calls.append((mode, nbytes, os.lseek(fd, 0, os.SEEK_CUR)))
        if mode == LK_UNLCK:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        assert mode == LK_NBLCK
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # per open handle, as Windows' LockFile
        except BlockingIOError:
            raise PermissionError(13, "Permission denied") from None  # what msvcrt raises for a held region

    m.locking = locking
    return m


@pytest.fixture
def windows(monkeypatch):
    fake = fake_msvcrt()
    monkeypatch.setattr(runs, "fcntl", None)
    monkeypatch.setattr(runs, "msvcrt", fake, raising=False)
    return fake


def test_the_engine_imports_without_fcntl():
    code = ("import sys, types, torch\n"  # the standard library first, as it is on Windows (subprocess sniffs msvcrt)
            "sys.modules['fcntl'] = None\n"
            "m = types.ModuleType('msvcrt'); m.LK_UNLCK, m.LK_NBLCK = 0, 2; m.locking = lambda *a: None\n"
            "sys.modules['msvcrt'] = m\n"
            "import qimera_engine, qimera_engine.cli, qimera_engine.jobs, qimera_engine.worker, qimera_engine.runs as r\n"
            "assert r.fcntl is None and r.msvcrt is m\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_a_held_run_is_refused_to_a_second_writer_and_free_after(windows, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    first, second = Run(tmp_path), Run(tmp_path)
    with first.lock():
        first.set_status("running")
        assert second.writer_alive and second.state == "running"  # asking does not take the lock
        with pytest.raises(RunLocked, match="being written by another run"):
            with second.lock():
                pass
        assert first.writer_alive  # a refused writer leaves the holder's lock alone
    assert not second.writer_alive and second.state == "interrupted"
    with second.lock():  # released: the next writer gets it
        assert Run(tmp_path).writer_alive
    assert not Run(tmp_path).writer_alive
    # every lock and unlock was on the first byte, with the file's position at 0 (the holder writes its pid there)
    assert windows.calls and all(n == 1 and pos == 0 for _, n, pos in windows.calls)
