"""Run folders under $QIMERA_HOME/runs: config, per-epoch metrics, weights, summary, resume state.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file behind.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def user_path(path: str | Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; ``ValueError`` (one line, not a traceback)
    when there is no such user or home folder."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib's answer for ~nosuchuser
        first = str(path).split("/", 1)[0]
        raise ValueError(f"cannot expand {first!r} in {str(path)[:200]!r}: there is no such user or home "
                         f"folder; write the path out") from None


def qimera_home() -> Path:
    """$QIMERA_HOME, default ~/.qimera (created on first use)."""
    home = user_path(os.environ.get("QIMERA_HOME") or Path.home() / ".qimera")
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


class RunLocked(RuntimeError):
    """Another run (thread or process) is writing to this run folder."""


class RunDamaged(ValueError):
    """A run folder whose files cannot be read as a run."""


class OutRefused(ValueError):
    """A folder that a new run may not be written to (it holds other files, or belongs to the engine)."""


# Folders of $QIMERA_HOME that hold the engine's own files: a run is never written inside them.
ENGINE_FOLDERS = ("teachers", "cache", "data", "uploads", "exports", "runs-elsewhere")


def _read_metrics(path: Path) -> list[dict]:
    rows = read_csv(path)
    if not rows and path.read_text().strip():
        raise ValueError("no rows under its header")
    for i, row in enumerate(rows):
        if row.get("epoch") != i or not isinstance(row.get("top1"), (int, float)):
            raise ValueError(f"row {i + 1} is not epoch {i} with a top-1 value")
    return rows


def _read_teacher(path: Path) -> dict:
    record = _object(read_json(path))
    sha = record.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ValueError("sha256 is not a SHA-256 hex digest")
    return record


def _object(obj) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _try_lock(fd: int, exclusive: bool) -> bool:
    """Lock the file ``fd`` without waiting: True when this descriptor now holds it, False when another does.

    POSIX: ``flock``, which the kernel releases when its holder dies; Linux NFS clients map it to byte-range
    locks the NFS server keeps (NFSv4, or NFSv3 with its lock manager), so it holds across hosts that share
    the runs folder, but not on a mount with ``nolock``. Windows: a lock on the file's first byte
    (``msvcrt.locking``; it has no shared locks, so asking takes the lock for a moment)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _read_at_start(fd: int, n: int = 200) -> bytes:
    """The first ``n`` bytes of a file another process has locked (on Windows, the first byte is the lock)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, n)
    except OSError:
        return b""


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


# Run folders whose lock a thread of this process holds (a lock file removed by hand cannot hide them).
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), so that a reused pid is not
    taken for the process that wrote a run; None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5), counted after the command name
    except (OSError, IndexError, ValueError):
        return None


def _process_state(pid: int) -> bytes | None:
    """The state letter of process ``pid`` (Linux; R, S, ..., Z for a zombie), None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: int | None) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send that process Ctrl-C there: a recorded writer counts as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    except OSError:
        return False
    if _process_state(pid) in (b"Z", b"X"):  # killed, not yet reaped by its parent: it writes nothing more
        return False
    now = _process_start(pid)
    return start is None or now is None or now == start


@dataclass
class Run:
    """A run folder. ``status`` is running, finished, cancelled or failed."""
    path: Path

    read_only: ClassVar[bool] = False  # shipped runs (ShippedRun) are never written to

    CONFIG, METRICS, SUMMARY, STATUS, STATE = "config.json", "metrics.csv", "summary.json", "status.json", "state.pt"
    GENERATOR, STUDENT, TEACHER, LOCK = "generator.safetensors", "student.safetensors", "teacher.json", "run.lock"
    SHIPPED = "shipped.json"  # marks a run that ships with the app (ShippedRun)

    @property
    def id(self) -> str:
        return self.path.name

    def _read(self, name: str, reader, default=None):
        """A file of the run read by ``reader``; ``RunDamaged`` names the run and the file when it is not
        readable, ``default`` when it is not there."""
        p = self.path / name
        if not p.exists():
            return default
        try:
            return reader(p)
        except (OSError, ValueError, TypeError, csv.Error) as e:
            raise RunDamaged(f"run {self.id}: {name} is damaged ({type(e).__name__}: {str(e)[:160]})") from None

    @property
    def config(self):
        from .config import RunConfig
        cfg = self._read(self.CONFIG, lambda p: RunConfig.from_dict(_object(read_json(p)), strict=True))
        if cfg is None:
            raise RunDamaged(f"run {self.id}: {self.CONFIG} is missing")
        return cfg

    @property
    def metrics(self) -> list[dict]:
        """One row per completed epoch (``epoch`` 0, 1, ... and a numeric ``top1`` at least)."""
        return self._read(self.METRICS, _read_metrics, [])

    @property
    def summary(self) -> dict | None:
        return self._read(self.SUMMARY, lambda p: _object(read_json(p)))

    @property
    def status(self) -> dict:
        return self._read(self.STATUS, lambda p: _object(read_json(p)), {"status": "unknown"})

    @property
    def problem(self) -> str | None:
        """What is wrong with this folder (its first unreadable file), or None."""
        try:
            self.config, self.status, self.summary, self.metrics, self.teacher_sha256
        except RunDamaged as e:
            return str(e)
        return None

    def set_status(self, status: str, **extra) -> None:
        self.check_present()
        path = self.path / self.STATUS
        text = json.dumps({"status": status, "time": time.time(), **extra}, indent=2, default=str) + "\n"
        try:
            write_text(path, text)
        except OSError:
            # A full disk leaves no room for a new file to rename into place, but the old status file's
            # own blocks are freed by truncating it, so the run's end is still recorded
            if not path.is_file() or path.is_symlink():
                raise
            with open(path, "r+") as f:
                f.truncate(0)
                f.write(text)

    def check_present(self) -> None:
        """``RunDamaged`` when the run's folder or its config.json has gone (removed while a run was writing
        it): the run then stops instead of writing its files into a folder that no longer describes it."""
        if not (self.path / self.CONFIG).is_file():
            raise RunDamaged(f"run {self.id}: its folder or {self.CONFIG} was removed while the run was writing it")

    def _open_lock(self, create: bool) -> int | None:
        """The lock file's descriptor, never following a symbolic link and never opening anything but a
        regular file inside the run folder (a link to a file elsewhere would be truncated); None when there
        is no lock file and ``create`` is False."""
        flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | getattr(os, "O_NONBLOCK", 0)
        flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.path / self.LOCK, flags, 0o644)
        except FileNotFoundError:
            if create:
                raise
            return None
        except IsADirectoryError:
            raise RunDamaged(f"run {self.id}: {self.LOCK} is not a regular file; remove it if no run is writing "
                             f"this folder") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # O_NOFOLLOW's answer for a symbolic link
                raise RunDamaged(f"run {self.id}: {self.LOCK} is a symbolic link, not the run's own lock file; "
                                 f"remove it if no run is writing this folder") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDamaged(f"run {self.id}: {self.LOCK} is not a regular file; remove it if no run is writing "
                             f"this folder")
        return fd

    @property
    def writer_alive(self) -> bool:
        """Whether a live thread or process holds the run's lock, or (when its lock file was removed) the
        process that status.json names as writing the run is still running."""
        fd = self._open_lock(create=False)
        if fd is not None:
            try:
                if not _try_lock(fd, exclusive=False):  # read-only: asking about a lock writes nothing
                    return True
                if fcntl is None:
                    _unlock(fd)
            finally:
                os.close(fd)  # closing releases the shared lock
        return self._recorded_writer_alive()

    def _recorded_writer_alive(self) -> bool:
        """Whether status.json says "running" for a process that is alive: this process while one of its
        threads holds the run, or another process on this machine (the same pid and start time)."""
        try:
            st = self.status
        except RunDamaged:
            return False
        if st.get("status") != "running" or st.get("host") != socket.gethostname():
            return False
        pid = st.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if pid == os.getpid():
            with _HELD_LOCK:
                return _key(self.path) in _HELD
        return _process_alive(pid, st.get("pid_start"))

    @property
    def state(self) -> str:
        """The status as it really is: "running" only while a writer holds the lock, else
        "interrupted" for a run whose process died (kill -9, power loss)."""
        status = self.status.get("status", "unknown")
        if status == "running" and not self.writer_alive:
            return "interrupted"
        return status

    @contextlib.contextmanager
    def lock(self):
        """Hold the run's lock while writing to it (new run, resume, delete). A second writer, in this
        process or another, gets ``RunLocked``; the kernel releases the lock of a dead holder. A live
        writer whose lock file was removed is still found, by the process that status.json names."""
        fd = self._open_lock(create=True)
        if not _try_lock(fd, exclusive=True):
            holder = _read_at_start(fd).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"run {self.id} is being written by another run ({holder}); wait for it to end or "
                            f"cancel it") from None
        key = _key(self.path)
        try:
            if self._recorded_writer_alive():  # the kernel's lock is ours, but its file was replaced
                st = self.status
                raise RunLocked(f"run {self.id} is being written by pid {st.get('pid')} on {st.get('host')} "
                                f"(its {self.LOCK} was removed); wait for it to end or stop that process")
            with _HELD_LOCK:
                _HELD.add(key)
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                yield self
            finally:
                with _HELD_LOCK:
                    _HELD.discard(key)
        finally:
            _unlock(fd)
            os.close(fd)

    def writer_record(self) -> dict:
        """What status.json records of the process writing the run (pid, its start time, host)."""
        return {"pid": os.getpid(), "pid_start": _process_start(os.getpid()), "host": socket.gethostname()}

    @property
    def teacher_sha256(self) -> str | None:
        """The content hash of the teacher the run was started with (None for older runs)."""
        return self._read(self.TEACHER, _read_teacher, {}).get("sha256")

    @property
    def has_generator(self) -> bool:
        return (self.path / self.GENERATOR).exists()


def run_folder_above(real: Path) -> Path | None:
    """The nearest folder above ``real`` (a resolved path) that is a run's (it holds config.json) or a
    shipped run's (shipped.json), or None."""
    return next((p for p in real.parents if (p / Run.CONFIG).is_file() or (p / Run.SHIPPED).is_file()), None)


def check_out(out: str | Path) -> Path:
    """The folder a new run may be written to, or ``OutRefused`` saying why not: it must be new or an
    empty folder, not a file, not inside another run's folder (or a shipped one), and not one of the
    engine's own folders in $QIMERA_HOME (the teacher cache, decoded data, uploads, exports)."""
    text = str(out)
    if not text.strip():
        raise OutRefused("--out is empty: give the folder to write the run to, or leave --out out "
                         "(runs go to $QIMERA_HOME/runs)")
    path = user_path(text)
    real = Path(os.path.realpath(path))
    home = Path(os.path.realpath(qimera_home()))
    engine = [home, home / "runs", *(home / f for f in ENGINE_FOLDERS)]
    if real in engine or any(home / f in real.parents for f in ENGINE_FOLDERS):
        raise OutRefused(f"{text} is one of this tool's own folders in $QIMERA_HOME; choose a new folder "
                         f"(or leave --out out: runs go to $QIMERA_HOME/runs)")
    if (parent := run_folder_above(real)) is not None:
        raise OutRefused(f"{text} lies inside the run folder {parent}; choose a folder outside it")
    if path.is_symlink() and not path.exists():
        raise OutRefused(f"{text} is a symbolic link to nothing; choose a new or empty folder")
    if path.exists():
        if not path.is_dir():
            raise OutRefused(f"{text} exists and is not a folder; a run needs a new or empty folder")
        if (path / Run.CONFIG).exists():
            raise OutRefused(f"{text} already holds a run; resume it (--resume {text}) or choose another --out")
        try:
            empty = next(os.scandir(path), None) is None
        except OSError as e:
            raise OutRefused(f"{text} cannot be read ({e.strerror}); choose another --out") from None
        if not empty:
            raise OutRefused(f"{text} is not empty: a run writes config.json, metrics.csv, summary.json and "
                             f"more into its folder and would replace files there; choose a new or empty folder")
    return path


def in_engine_folder(path: str | Path) -> bool:
    """Whether ``path`` (links resolved) is $QIMERA_HOME itself, a file directly in it (such as the index
    of runs written elsewhere), or lies in one of its engine folders (the teacher cache, decoded data,
    uploads, exports): places only the engine writes."""
    real = Path(os.path.realpath(user_path(path)))
    home = Path(os.path.realpath(qimera_home()))
    return real == home or real.parent == home or any(home / f == real or home / f in real.parents
                                                      for f in ENGINE_FOLDERS)


def check_file_out(out: str | Path, force: bool = False, what: str = "file") -> Path:
    """A file a table or export may be written to, or ``OutRefused``: never a run's own files or anything
    inside a run folder (shipped ones included) or the engine's folders, never a folder, and an existing
    file only with ``force``."""
    text = str(out)
    if not text.strip():
        raise OutRefused(f"the {what} to write is empty: give a file name")
    path = user_path(text)
    real = Path(os.path.realpath(path))
    home = Path(os.path.realpath(qimera_home()))
    if (in_engine_folder(real) or home / "runs" == real or home / "runs" in real.parents) and \
            not any((p / Run.CONFIG).is_file() for p in real.parents):
        raise OutRefused(f"{text} lies in one of this tool's own folders in $QIMERA_HOME; choose another file")
    if (parent := run_folder_above(real)) is not None:
        raise OutRefused(f"{text} lies inside the run folder {parent}, whose files are the run's own; "
                         f"choose a file outside it")
    if path.is_dir():
        raise OutRefused(f"{text} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise OutRefused(f"{text} exists; choose another file, or --force to replace it")
    return path


def create_run(config: dict, method: str, wbits: int, abits: int, out: str | Path | None = None) -> "Run":
    """A new run folder holding ``config``: ``out`` when given (new or empty, see ``check_out``), else
    runs/<date>-<time>-<method>-w<b>a<b>[-n].

    Creation is exclusive: of two runs started at the same instant with the same ``out``, one gets
    ``FileExistsError`` (the config file is linked into place, which fails when one is there).
    """
    if out is not None:
        path = check_out(out)
        path.mkdir(parents=True, exist_ok=True)
        _create_exclusive(path / Run.CONFIG, json.dumps(config, indent=2) + "\n",
                          f"{path} already holds a run; resume it or choose another --out")
        if path.resolve().parent != runs_dir().resolve():
            _remember_elsewhere(path.resolve())
        return Run(path)
    base = runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-w{wbits}a{abits}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            path = Path(f"{base}-{n}")
    write_json(path / Run.CONFIG, config)
    return Run(path)


def _create_exclusive(path: Path, text: str, exists_message: str) -> None:
    """Write ``text`` to ``path`` complete and at once, failing if ``path`` exists."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(exists_message) from None
    finally:
        os.unlink(tmp)


@dataclass
class ShippedRun(Run):
    """A finished run that ships with the app (assets/): read-only, and the file paths in its config
    (checkpoint, test data folder) are relative to its own folder, so it works wherever it is. Its
    folder holds ``shipped.json``; ``open_run`` and ``list_runs`` return one for such a folder."""

    read_only: ClassVar[bool] = True

    @property
    def config(self):
        cfg = super().config
        if cfg.checkpoint and not Path(cfg.checkpoint).is_absolute():
            cfg.checkpoint = str((self.path / cfg.checkpoint).resolve())
        kind, sep, arg = cfg.test_data.partition(":")
        if sep and arg and not Path(arg).is_absolute():
            cfg.test_data = f"{kind}:{(self.path / arg).resolve()}"
        return cfg


def run_at(path: Path) -> Run:
    """The run in folder ``path``: a ShippedRun when the folder is marked as shipped."""
    return ShippedRun(path) if (path / Run.SHIPPED).is_file() else Run(path)


def delete_run(run: Run) -> None:
    """Remove a run folder and all its files; ``RunLocked`` while a run is writing to it."""
    if run.read_only:
        raise RunLocked(f"run {run.id} ships with the app and cannot be deleted")
    with run.lock():  # no writer can start while the folder goes
        shutil.rmtree(run.path)


ELSEWHERE = "runs-elsewhere"  # in $QIMERA_HOME: one small file per run folder written outside runs/ (--out)
ELSEWHERE_LIST = "runs-elsewhere.txt"  # the same, one per line, as earlier versions wrote it (still read)


def _remember_elsewhere(path: Path) -> None:
    """Note a run folder written outside runs/ for ``list_runs``: a file of its own, named by a hash of the
    path and written whole by a rename, so no two writers (processes, hosts on shared storage) ever append
    to one file."""
    index = qimera_home() / ELSEWHERE
    index.mkdir(parents=True, exist_ok=True)
    write_text(index / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.txt", f"{path}\n")


def _elsewhere() -> list[Path]:
    """The run folders noted by ``_remember_elsewhere`` (and in an earlier version's list)."""
    home, lines = qimera_home(), []
    with contextlib.suppress(OSError):
        lines += (home / ELSEWHERE_LIST).read_text().splitlines()
    with contextlib.suppress(OSError):
        for entry in sorted((home / ELSEWHERE).glob("*.txt")):
            with contextlib.suppress(OSError):
                lines += entry.read_text().splitlines()
    return [Path(line) for line in dict.fromkeys(lines) if line.strip()]


def list_runs(root: str | Path | None = None) -> list[Run]:
    """Runs (folders with a config), newest first: those under ``root``, or under runs/ together with
    those written elsewhere with ``out`` (while their folders exist)."""
    folders = []
    if root is None:
        root = runs_dir()
        folders = _elsewhere()
    root = Path(root)
    if root.is_dir():
        folders = [*root.iterdir(), *folders]
    runs, seen = [], set()
    for p in folders:
        try:
            if (p / Run.CONFIG).is_file() and p.resolve() not in seen:
                seen.add(p.resolve())
                runs.append((run_at(p), (p / Run.CONFIG).stat().st_mtime))
        except OSError:  # a folder that vanished or cannot be read
            continue
    return [r for r, _ in sorted(runs, key=lambda x: x[1], reverse=True)]


def open_run(run: str | Path) -> Run:
    """A run by folder path or by id under runs/."""
    if not str(run).strip():
        raise FileNotFoundError("no run given: name a run folder or a run id (python -m qimera_engine runs lists them)")
    p = user_path(run)
    if not (p / Run.CONFIG).is_file():
        p = runs_dir() / str(run)
    if not (p / Run.CONFIG).is_file():
        raise FileNotFoundError(f"no run at {run} (looked for {Run.CONFIG})")
    return run_at(p)
