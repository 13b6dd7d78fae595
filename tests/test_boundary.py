"""The app's data boundary: a page reads and writes only under $QIMERA_HOME and allowed folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from qimera_engine.ui import paths
from qimera_engine.ui.paths import PathNotAllowed, allowed_data_spec, allowed_path, save_upload

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("QIMERA_HOME", str(h))
    monkeypatch.delenv(paths.ALLOWED_ENV, raising=False)
    return h


OUTSIDE = ["/etc", "/etc/passwd", "/root", "/", "~", "/nonexistent/folder", "../../../etc", "..", "home/../..",
           "/proc/self/environ", "\x00", "x" * 5000, ""]


@pytest.mark.parametrize("text", OUTSIDE)
def test_paths_outside_are_refused_alike(home, text):
    """One message for every refused path, whether it exists or not, naming none of them."""
    with pytest.raises(PathNotAllowed) as e:
        allowed_path(text)
    assert str(e.value) == paths.refusal()
    assert "/etc" not in str(e.value) and str(home) not in str(e.value)


def test_paths_inside_and_links_out(home, tmp_path):
    (home / "data" / "a").mkdir(parents=True)
    assert allowed_path(str(home / "data" / "a")) == (home / "data" / "a").resolve()
    assert allowed_path("data/a") == (home / "data" / "a").resolve()  # relative: inside $QIMERA_HOME
    assert allowed_path(str(home / "not-yet")) == (home / "not-yet").resolve()  # may not exist yet
    (home / "link").symlink_to("/etc")
    with pytest.raises(PathNotAllowed):
        allowed_path(str(home / "link"))
    with pytest.raises(PathNotAllowed):
        allowed_path(str(home / "data" / ".." / ".." / "elsewhere"))


def test_the_server_owner_allows_more_folders(home, tmp_path, monkeypatch):
    extra, other = tmp_path / "datasets", tmp_path / "other"
    extra.mkdir(), other.mkdir()
    with pytest.raises(PathNotAllowed):
        allowed_path(str(extra / "cifar"))
    monkeypatch.setenv(paths.ALLOWED_ENV, f"{extra}{os.pathsep}{os.pathsep}")
    assert allowed_path(str(extra / "cifar")) == (extra / "cifar").resolve()
    with pytest.raises(PathNotAllowed):
        allowed_path(str(other))
    assert allowed_data_spec("folder", str(extra)) == f"folder:{extra.resolve()}"
    assert allowed_data_spec("cifar10") == "cifar10" and allowed_data_spec("digits", "/etc") == "digits"
    with pytest.raises(PathNotAllowed):
        allowed_data_spec("imagenet", "/etc")
    with pytest.raises(PathNotAllowed, match="Give the folder"):
        allowed_data_spec("folder", " ")


def test_uploads_by_content_and_private_to_their_session(home):
    a = save_upload(b"first", "model.pt", "session-aaaaaaaa")
    b = save_upload(b"second", "model.pt", "session-aaaaaaaa")  # same name, other content
    c = save_upload(b"first", "other-name.pt", "session-bbbbbbbb")
    assert a != b and a.read_bytes() == b"first" and b.read_bytes() == b"second"
    assert a.parent.name == "session-aaaaaaaa" and c.parent.name == "session-bbbbbbbb" and a.name == c.name
    assert "model" not in a.name
    shared = save_upload(b"first", "m.safetensors", "session-aaaaaaaa", shared=True)
    assert shared.parent.name == "shared" and shared.suffix == ".safetensors"
    with pytest.raises(ValueError, match="must end in"):
        save_upload(b"x", "evil.sh", "session-aaaaaaaa")
    with pytest.raises(ValueError, match="session"):
        save_upload(b"x", "m.pt", "../../etc")
    for typed in (str(a), str(a.parent), "uploads", str(shared)):  # another session's upload, by its path
        with pytest.raises(PathNotAllowed):
            allowed_path(typed)


def _teacher_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/1_Teacher.py")
    at.run()
    return at


@pytest.mark.parametrize("kind", ["folder", "imagenet", "cifar10"])
def test_teacher_page_cannot_read_outside(home, kind):
    at = _teacher_page()
    at.selectbox(key="t_data").select(kind).run()
    for text in ("/etc", "/root", "/nonexistent", str(home / ".." )):
        at.text_input(key="t_root").input(text).run()
        assert not at.exception
        assert [e.value for e in at.error] == [paths.refusal()]
        assert not at.get("image") and not at.warning  # nothing read, nothing listed
    assert not (Path("/nonexistent")).exists()  # "download if missing" made no folder


def test_teacher_page_checkpoint_path_outside(home):
    at = _teacher_page()
    at.radio(key="t_source").set_value("Checkpoint file path").run()
    for text in ("/etc/passwd", "/etc/shadow-not-there"):
        at.text_input(key="t_ckpt").input(text).run()
        assert not at.exception and [e.value for e in at.error] == [paths.refusal()]


def test_app_shows_no_tracebacks():
    import tomllib
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["showErrorDetails"] == "none" and cfg["client"]["toolbarMode"] == "minimal"
    from streamlit import config
    _teacher_page()  # the pages set it too, for servers started elsewhere
    assert config.get_option("client.showErrorDetails") == "none"
