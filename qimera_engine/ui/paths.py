"""The app's data boundary: which folders a page may read and write (no Streamlit here).

The app serves a web page, so a path typed into it must not reach the rest of the server's disk.
It may use ``$QIMERA_HOME`` and the folders that whoever starts the server lists in the
environment variable ``QIMERA_ALLOWED_DIRS`` (separated by ``os.pathsep``, ':' on Linux and macOS).
The command line is the user's own shell and is not limited.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .. import ShippedRun, atomic_path, qimera_home

ALLOWED_ENV = "QIMERA_ALLOWED_DIRS"
SHOWCASE_ENV = "QIMERA_SHOWCASE"


def showcase_dir() -> Path:
    """The CIFAR-10 showcase that ships with the app (assets/showcase, built by assets/build_showcase.py);
    read, never written. ``QIMERA_SHOWCASE`` points elsewhere (the tests use it)."""
    return Path(os.environ.get(SHOWCASE_ENV) or Path(__file__).resolve().parents[2] / "assets" / "showcase")
_UPLOAD_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class PathNotAllowed(ValueError):
    """A path outside the app's allowed folders. The message names no other file or folder."""


def allowed_roots() -> list[Path]:
    """$QIMERA_HOME, then the folders of QIMERA_ALLOWED_DIRS (resolved; empty entries ignored)."""
    extra = [p for p in os.environ.get(ALLOWED_ENV, "").split(os.pathsep) if p.strip()]
    roots = [qimera_home(), showcase_dir(), *(Path(p).expanduser() for p in extra)]
    return list(dict.fromkeys(Path(os.path.realpath(r)) for r in roots))


def refusal() -> str:
    return (f"This app only reads and writes inside its own folder ($QIMERA_HOME) and the folders listed in "
            f"{ALLOWED_ENV} by whoever started the server; choose a path inside one of those.")


def allowed_path(text: str) -> Path:
    """The resolved path of ``text`` if it lies inside an allowed folder, else ``PathNotAllowed``.

    Relative paths are taken inside $QIMERA_HOME. Symbolic links are followed before the check, so
    a link inside an allowed folder does not lead out of it. Uploaded files are reached only through
    the upload widget, never by a typed path (they are private to their browser session). The refusal is the same whether or not
    the path exists, so a page cannot be used to probe the disk.
    """
    text = (text or "").strip()
    if not text or "\x00" in text or len(text) > 4096:
        raise PathNotAllowed(refusal())
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = qimera_home() / p
    try:
        real = Path(os.path.realpath(p))
    except (OSError, ValueError):
        raise PathNotAllowed(refusal()) from None
    if not any(real == root or root in real.parents for root in allowed_roots()):
        raise PathNotAllowed(refusal())
    uploads = Path(os.path.realpath(qimera_home() / "uploads"))
    if real == uploads or uploads in real.parents:  # other sessions' uploads are private
        raise PathNotAllowed(refusal())
    return real


def shipped_runs() -> list[ShippedRun]:
    """The showcase's runs (read-only), in a fixed order; none when the showcase is not there."""
    folder = showcase_dir() / "runs"
    if not folder.is_dir():
        return []
    return [ShippedRun(p) for p in sorted(folder.iterdir()) if (p / ShippedRun.SHIPPED).is_file()]


def export_target(run, fmt: str) -> Path | None:
    """Where an export of ``run`` goes: its own folder (None: the default), or, for a shipped run,
    $QIMERA_HOME/exports/<run>/ (the showcase is never written to)."""
    if not run.read_only:
        return None
    return qimera_home() / "exports" / run.id / ("student.onnx" if fmt == "onnx" else "student-int.safetensors")


def is_allowed(path: str | Path) -> bool:
    try:
        allowed_path(str(path))
        return True
    except PathNotAllowed:
        return False


def allowed_data_spec(kind: str, path: str = "") -> str:
    """The engine's data spec for a data-set choice and a folder typed into the page, checked.

    digits needs no folder; CIFAR without a folder uses $QIMERA_HOME/data."""
    path = (path or "").strip()
    if kind == "digits":
        return "digits"
    if kind in ("cifar10", "cifar100") and not path:
        return kind
    if kind not in ("cifar10", "cifar100", "folder", "imagenet"):
        raise ValueError(f"unknown data set {kind!r}")
    if not path:
        raise PathNotAllowed("Give the folder that holds the images.")
    return f"{kind}:{allowed_path(path)}"


def save_upload(data: bytes, filename: str, session: str, shared: bool = False) -> Path:
    """Store an uploaded checkpoint by the hash of its content, never by its name.

    Private uploads live under uploads/<session>/, so one browser session never sees another's;
    ``shared`` keeps it under uploads/shared/ for every session. The same content is stored once.
    """
    suffix = Path(filename or "").suffix.lower()
    if suffix not in _UPLOAD_SUFFIXES:
        raise ValueError(f"a checkpoint upload must end in one of {', '.join(_UPLOAD_SUFFIXES)}")
    if not shared and not _TOKEN.match(session or ""):
        raise ValueError("invalid session token")
    folder = qimera_home() / "uploads" / ("shared" if shared else session)
    dest = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not dest.exists():
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
    return dest
