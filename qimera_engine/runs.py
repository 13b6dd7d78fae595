"""Run folders under $QIMERA_HOME/runs: config, per-epoch metrics, weights, summary, resume state.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file behind.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def qimera_home() -> Path:
    """$QIMERA_HOME, default ~/.qimera (created on first use)."""
    home = Path(os.environ.get("QIMERA_HOME") or Path.home() / ".qimera").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def runs_dir() -> Path:
    d = qimera_home() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_csv(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    except (TypeError, ValueError):
        return v


@dataclass
class Run:
    """A run folder. ``status`` is running, finished, cancelled or failed."""
    path: Path

    CONFIG, METRICS, SUMMARY, STATUS, STATE = "config.json", "metrics.csv", "summary.json", "status.json", "state.pt"
    GENERATOR, STUDENT = "generator.safetensors", "student.safetensors"

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def config(self):
        from .config import RunConfig
        return RunConfig.from_dict(read_json(self.path / self.CONFIG))

    @property
    def metrics(self) -> list[dict]:
        return read_csv(self.path / self.METRICS)

    @property
    def summary(self) -> dict | None:
        p = self.path / self.SUMMARY
        return read_json(p) if p.exists() else None

    @property
    def status(self) -> dict:
        p = self.path / self.STATUS
        return read_json(p) if p.exists() else {"status": "unknown"}

    def set_status(self, status: str, **extra) -> None:
        write_json(self.path / self.STATUS, {"status": status, "time": time.time(), **extra})

    @property
    def process_alive(self) -> bool:
        """Whether the process that wrote status "running" still exists on this machine."""
        st = self.status
        if st.get("status") != "running" or st.get("host") != socket.gethostname() or not st.get("pid"):
            return False
        try:
            os.kill(int(st["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def has_generator(self) -> bool:
        return (self.path / self.GENERATOR).exists()


def new_run_dir(method: str, wbits: int, abits: int, out: str | Path | None = None) -> Path:
    """A fresh folder: ``out`` when given, else runs/<date>-<time>-<method>-w<b>a<b>[-n]."""
    if out is not None:
        path = Path(out).expanduser()
        if (path / Run.CONFIG).exists():
            raise FileExistsError(f"{path} already holds a run; resume it or choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-w{wbits}a{abits}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = Path(f"{base}-{n}")


def list_runs(root: str | Path | None = None) -> list[Run]:
    """Runs (folders with a config), newest first."""
    root = Path(root) if root else runs_dir()
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if (p / Run.CONFIG).is_file()]
    return sorted(runs, key=lambda r: (r.path / Run.CONFIG).stat().st_mtime, reverse=True)


def open_run(run: str | Path) -> Run:
    """A run by folder path or by id under runs/."""
    p = Path(run).expanduser()
    if not (p / Run.CONFIG).is_file():
        p = runs_dir() / str(run)
    if not (p / Run.CONFIG).is_file():
        raise FileNotFoundError(f"no run at {run} (looked for {Run.CONFIG})")
    return Run(p)
