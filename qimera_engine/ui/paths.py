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
from pathlib import Path, PurePath

from .. import DataError, ShippedRun, atomic_path, parse_spec, qimera_home

ALLOWED_ENV = "QIMERA_ALLOWED_DIRS"
SHOWCASE_ENV = "QIMERA_SHOWCASE"


def showcase_dir() -> Path:
    """The CIFAR-10 showcase that ships with the app (assets/showcase, built by assets/build_showcase.py);
    read, never written. ``QIMERA_SHOWCASE`` points elsewhere (the tests use it)."""
    return Path(os.environ.get(SHOWCASE_ENV) or Path(__file__).resolve().parents[2] / "assets" / "showcase")


def curves_file() -> Path:
    """The showcase's precomputed bit-width rows (summaries of runs that do not ship; assets/build_curves.py)."""
    return showcase_dir() / "bit_widths.csv"


def shipped_teacher() -> tuple[str, str] | None:
    """(checkpoint, data spec) of the ResNet-20 and CIFAR-10 test sample that ship with the app, or None."""
    weights, sample = showcase_dir() / "teacher" / "resnet20-cifar10.safetensors", showcase_dir() / "data" / "cifar10-sample"
    return (str(weights), f"folder:{sample}") if weights.is_file() and sample.is_dir() else None


_UPLOAD_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class PathNotAllowed(ValueError):
    """A path outside the app's allowed folders. The message names no other file or folder."""


def allowed_roots() -> list[Path]:
    """$QIMERA_HOME, then the folders of QIMERA_ALLOWED_DIRS (resolved; empty entries and entries
    that cannot be expanded ignored)."""
    roots = [qimera_home(), showcase_dir()]
    for p in os.environ.get(ALLOWED_ENV, "").split(os.pathsep):
        if not p.strip():
            continue
        try:
            roots.append(Path(p).expanduser())
        except RuntimeError:  # ~name of no account: nothing to allow
            continue
    return list(dict.fromkeys(Path(os.path.realpath(r)) for r in roots))


def _inside(real: Path, roots: list[Path]) -> bool:
    return any(real == root or root in real.parents for root in roots)


def _expand(text: str, typed: bool = True) -> Path:
    """``text`` as a path, '~' and '~/...' expanded. '~name' is refused for every name: expanding it
    answers one way for an account that exists and another for one that does not. A relative path
    is taken inside $QIMERA_HOME when ``typed`` into a page, else (a path stored in a run's config)
    where the engine's loaders take it: in the current directory."""
    if text.startswith("~") and not (text == "~" or text[1] in "/" + os.sep):
        raise PathNotAllowed(refusal())
    try:
        p = Path(text).expanduser()
    except RuntimeError:  # no home directory to expand '~' to
        raise PathNotAllowed(refusal()) from None
    if p.is_absolute():
        return p
    return qimera_home() / p if typed else Path(os.path.abspath(p))


def refusal() -> str:
    return (f"This app only reads and writes inside its own folder ($QIMERA_HOME) and the folders listed in "
            f"{ALLOWED_ENV} by whoever started the server; choose a path inside one of those.")


def allowed_path(text: str) -> Path:
    """The resolved path of ``text`` if it lies inside an allowed folder, else ``PathNotAllowed``.

    Relative paths are taken inside $QIMERA_HOME. Symbolic links are followed before the check, so
    a link inside an allowed folder does not lead out of it. Uploaded files are reached only through
    the upload widget, never by a typed path (they are private to their browser session). The refusal is the same whether or not
    the path exists, so a page cannot be used to probe the disk; so is '~name', whoever the name is.
    """
    text = (text or "").strip()
    if not text or "\x00" in text or len(text) > 4096:
        raise PathNotAllowed(refusal())
    real = _resolve(text)
    if not _inside(real, allowed_roots()):
        raise PathNotAllowed(refusal())
    uploads = Path(os.path.realpath(qimera_home() / "uploads"))
    if real == uploads or uploads in real.parents:  # other sessions' uploads are private
        raise PathNotAllowed(refusal())
    return real


def _resolve(text: str, typed: bool = True) -> Path:
    try:
        return Path(os.path.realpath(_expand(text, typed)))
    except (OSError, ValueError):
        raise PathNotAllowed(refusal()) from None


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
        check_data_spec(kind)  # $QIMERA_HOME/data may hold links too
        return kind
    if kind not in ("cifar10", "cifar100", "folder", "imagenet"):
        raise ValueError(f"unknown data set {kind!r}")
    if not path:
        raise PathNotAllowed("Give the folder that holds the images.")
    spec = f"{kind}:{allowed_path(path)}"
    check_data_spec(spec)
    return spec


MAX_DEPTH = 32  # folders below a data root that a check walks (torchvision's ImageFolder walks them all)


def check_tree(root: str | Path) -> None:
    """Refuse (``PathNotAllowed``) a folder inside the allowed ones any of whose entries, at any
    depth, is a symbolic link that leads out of them: a class folder or an image linked to the rest
    of the disk. Reads directory entries only, never opens a file (a FIFO or a device cannot block
    it); each folder is walked once, so links in a circle end."""
    roots = allowed_roots()
    start = Path(os.path.realpath(root))
    if not _inside(start, roots):
        raise PathNotAllowed(refusal())
    seen, stack = set(), [(start, 0)]
    while stack:
        folder, depth = stack.pop()
        if folder in seen or depth > MAX_DEPTH:
            continue
        seen.add(folder)
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:  # not a folder, or unreadable: the loader says so itself
            continue
        for e in entries:
            real = Path(os.path.realpath(e.path)) if e.is_symlink() else Path(e.path)
            if not _inside(real, roots):
                raise PathNotAllowed(refusal())
            try:
                if e.is_dir():
                    stack.append((real, depth + 1))
            except OSError:
                continue


def _data_root(spec: str) -> Path | None:
    """The folder a data spec reads (None: built-in digits); ``PathNotAllowed`` when it cannot be
    parsed or lies outside the allowed folders."""
    try:
        kind, arg = parse_spec(spec)
    except (DataError, ValueError):
        raise PathNotAllowed(refusal()) from None
    if kind == "digits":
        return None
    if not arg:
        return qimera_home() / "data"  # CIFAR's default place
    root = _resolve(arg, typed=False)
    if not _inside(root, allowed_roots()):
        raise PathNotAllowed(refusal())
    return root


def check_data_spec(spec: str) -> None:
    """Refuse a data spec (a typed one, or a run's ``test_data``) whose folder, or anything in it,
    lies outside the allowed folders. Runs created on the command line may point anywhere."""
    root = _data_root(spec)
    if root is not None:
        check_tree(root)


def data_allowed(spec: str) -> bool:
    try:
        check_data_spec(spec)
        return True
    except PathNotAllowed:
        return False


def data_label(spec: str) -> str:
    """A data spec as a page may show it: its kind and its folder's own name alone (no path, so nothing of the
    server's folders shows) when the folder is outside the allowed ones, so two such data sets stay apart; the
    showcase's data by its place in the showcase (one label wherever the app is installed, and short)."""
    kind, _, arg = str(spec).partition(":")
    try:
        root = _data_root(spec)
    except PathNotAllowed:
        name = PurePath(arg.rstrip("/\\")).name if arg else ""
        return f"{kind or 'data'}{' …/' + name if name else ''} (outside the app's folders)"
    shipped = Path(os.path.realpath(showcase_dir()))
    if root is not None and _inside(root, [shipped]):  # wherever the app is installed
        return f"{kind}:…/showcase/{root.relative_to(shipped).as_posix()} (shipped with the app)"
    return spec


def check_run(run) -> None:
    """Refuse a run whose networks the app may not load: a file of its folder linked out of the
    allowed folders, or a teacher checkpoint outside them (uploads count: the run was started from
    one). Zoo weights come from the server's own download cache and are allowed."""
    check_tree(run.path)
    checkpoint = run.config.checkpoint
    if checkpoint and not _inside(_resolve(str(checkpoint), typed=False), allowed_roots()):
        raise PathNotAllowed(refusal())


def run_allowed(run) -> bool:
    try:
        check_run(run)
        return True
    except PathNotAllowed:
        return False


def home_problem() -> str | None:
    """Why the app cannot use its own folder, as one line saying what to set; None when it can.
    It must be a folder this server can create files in (probed with a file deleted at once)."""
    import tempfile
    try:
        runs = qimera_home() / "runs"
        runs.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=runs):
            return None
    except (OSError, RuntimeError, ValueError):
        return ("The app cannot use its folder: set the environment variable QIMERA_HOME to a folder this "
                "server can write to (without it, the app uses $HOME/.qimera, so HOME must be usable), then "
                "restart the server.")


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
