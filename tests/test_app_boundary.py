"""The app's data boundary covers what runs point at, and its pages never crash (AppTest).

A run made on the command line may point anywhere (``--test-data folder:/elsewhere``, a checkpoint
elsewhere, a file of its folder linked elsewhere): the pages list it but read none of that.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from qimera_engine import Run, RunLocked, delete_run, list_runs, preset, run_to_end
from qimera_engine import jobs as jobs_module
from qimera_engine.teachers import train_and_cache
from qimera_engine.ui import common, logic, paths, tasks
from qimera_engine.ui.paths import PathNotAllowed, allowed_data_spec, allowed_path

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(epochs=2, iters_per_epoch=4, warmup_epochs=1, calib_epochs=1, batch_size=16, gen_width=16)
SECRET = ["secret-alpha", "secret-beta"]  # class names of a data set outside the allowed folders


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def _fresh_registry():
    for job in jobs_module.shared_registry().active():
        jobs_module.shared_registry().cancel(job.id)
    jobs_module._shared = None
    common.registry.clear()
    return jobs_module.shared_registry()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A home with a finished digits Qimera run, and a data set and a checkpoint outside it."""
    mp = pytest.MonkeyPatch()
    home, outside = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("outside")
    mp.setenv("QIMERA_HOME", str(home))
    mp.delenv(paths.ALLOWED_ENV, raising=False)
    train_and_cache("digits-cnn", "digits", epochs=1)
    run_to_end(preset("digits", **TINY))
    (run,) = list_runs()
    for i, name in enumerate(SECRET):
        _png(outside / "data" / name / "a.png", 60 * i)
    shutil.copy(next((home / "teachers").rglob("*.safetensors")), outside / "teacher.safetensors")
    (outside / "secret.csv").write_text("epoch,top1\n0,99\n")
    yield SimpleNamespace(home=home, outside=outside, run=run)
    mp.undo()


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(world.home))
    monkeypatch.delenv(paths.ALLOWED_ENV, raising=False)
    registry = _fresh_registry()
    yield world
    for job in registry.active():
        registry.cancel(job.id)
    for job in registry.jobs():
        registry.wait(job.id, 120)


def clone(world, name: str, **config) -> Run:
    """A copy of the finished run, its config changed as a command line could have made it."""
    dest = world.home / "runs" / name
    shutil.copytree(world.run.path, dest)
    cfg = json.loads((dest / Run.CONFIG).read_text())
    cfg.update(config)
    (dest / Run.CONFIG).write_text(json.dumps(cfg))
    summary = json.loads((dest / Run.SUMMARY).read_text())
    summary.update({k: v for k, v in config.items() if k in summary})  # it repeats some settings
    (dest / Run.SUMMARY).write_text(json.dumps(summary))
    return Run(dest)


def page(name: str, run_id: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.switch_page(name)
    if run_id:
        at.query_params["run"] = run_id
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    return " ".join(str(e.value) for kind in ("markdown", "caption", "info", "error", "warning", "success")
                    for e in getattr(at, kind))


@pytest.fixture
def spy(monkeypatch):
    """Every data spec the pages and tasks hand to load_data."""
    seen = []
    for module in (common, tasks):
        real = module.load_data
        monkeypatch.setattr(module, "load_data", lambda spec, *a, _real=real, **k: seen.append(spec) or _real(spec, *a, **k))
    return seen

# --------------------------------------------------------------------------- typed paths


@pytest.mark.parametrize("text", ["~root", "~root/data", "~no-such-account-q7", "~no-such-account-q7/data", "~nobody/.."])
def test_tilde_names_are_refused_alike_whoever_they_name(tmp_path, monkeypatch, text):
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    with pytest.raises(PathNotAllowed) as e:
        allowed_path(text)
    assert str(e.value) == paths.refusal()


def test_tilde_alone_is_still_the_users_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert allowed_path("~/data") == (tmp_path / "data").resolve()
    assert paths.data_label("folder:~no-such-account-q7/x") == "folder …/x (outside the app's folders)"


def test_a_data_set_outside_is_named_by_its_folder_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    label = paths.data_label(f"folder:{tmp_path}/srv/cifar10-dev/")
    assert label == "folder …/cifar10-dev (outside the app's folders)"  # two such data sets stay apart
    assert str(tmp_path) not in label and "srv" not in label  # and no server path shows
    shipped = tmp_path / "app" / "assets" / "showcase"
    (shipped / "data" / "cifar10-sample").mkdir(parents=True)
    monkeypatch.setenv("QIMERA_SHOWCASE", str(shipped))  # the showcase's data: short, and alike on every install
    assert paths.data_label(f"folder:{shipped}/data/cifar10-sample") == \
        "folder:…/showcase/data/cifar10-sample (shipped with the app)"
    inside = tmp_path / "home" / "data" / "mine"
    inside.mkdir(parents=True)
    assert paths.data_label(f"folder:{inside}") == f"folder:{inside}"  # the user's own data: as typed


def test_teacher_page_answers_every_tilde_name_alike(tmp_path, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    at = page("pages/1_Teacher.py")
    at.selectbox(key="t_data").select("folder").run()
    answers = []
    for text in ("~root/data", "~no-such-account-q7/data"):
        at.text_input(key="t_root").input(text).run()
        assert not at.exception
        answers.append([e.value for e in at.error])
    assert answers == [[paths.refusal()]] * 2

# --------------------------------------------------------------------------- links inside data folders


def test_linked_class_folders_and_images_are_refused(tmp_path, monkeypatch):
    home, outside = tmp_path / "home", tmp_path / "outside"
    monkeypatch.setenv("QIMERA_HOME", str(home))
    monkeypatch.delenv(paths.ALLOWED_ENV, raising=False)
    _png(outside / "dog" / "a.png")
    _png(home / "ok" / "cat" / "a.png")
    (home / "ok" / "cat" / "same.png").symlink_to(home / "ok" / "cat" / "a.png")  # a link inside is fine
    (home / "ok" / "loop").symlink_to(home / "ok")  # links in a circle end
    os.mkfifo(home / "ok" / "cat" / "pipe.png")  # never opened: the walk reads entries only
    assert allowed_data_spec("folder", str(home / "ok")) == f"folder:{(home / 'ok').resolve()}"

    _png(home / "class-link" / "cat" / "a.png")
    (home / "class-link" / "dog").symlink_to(outside / "dog")
    _png(home / "image-link" / "cat" / "a.png")
    (home / "image-link" / "cat" / "b.png").symlink_to(outside / "dog" / "a.png")
    _png(home / "deep" / "cat" / "a" / "b" / "a.png")
    (home / "deep" / "cat" / "a" / "b" / "c").symlink_to(outside)
    for root in ("class-link", "image-link", "deep"):
        with pytest.raises(PathNotAllowed) as e:
            allowed_data_spec("folder", str(home / root))
        assert str(e.value) == paths.refusal()
        assert not paths.data_allowed(f"imagenet:{home / root}")
    (home / "data" / "cifar-10-batches-py").mkdir(parents=True)
    (home / "data" / "cifar-10-batches-py" / "test_batch").symlink_to(outside / "dog" / "a.png")
    assert not paths.data_allowed("cifar10")  # the default CIFAR folder, $QIMERA_HOME/data, too
    with pytest.raises(PathNotAllowed):
        allowed_data_spec("cifar10")
    with pytest.raises(PathNotAllowed):
        paths.check_tree(outside)


def test_teacher_page_does_not_read_a_linked_class_folder(tmp_path, monkeypatch, spy):
    home, outside = tmp_path / "home", tmp_path / "outside"
    monkeypatch.setenv("QIMERA_HOME", str(home))
    monkeypatch.delenv(paths.ALLOWED_ENV, raising=False)
    _png(outside / "dog" / "a.png")
    _png(home / "imgs" / "cat" / "a.png")
    (home / "imgs" / "dog").symlink_to(outside / "dog")
    at = page("pages/1_Teacher.py")
    at.selectbox(key="t_data").select("folder").run()
    at.text_input(key="t_root").input(str(home / "imgs")).run()
    assert not at.exception
    assert [e.value for e in at.error] == [paths.refusal()]
    assert not at.get("image") and not at.warning and spy == ["digits"]  # the page's first choice only

# --------------------------------------------------------------------------- runs that point outside


def test_a_run_with_data_outside_is_listed_but_its_data_never_read(env, spy):
    out = env.outside / "data"
    run = clone(env, "outside-data", test_data=f"folder:{out}")
    assert "outside the app's folders" in common.resume_note(run) and common.resume_note(env.run) is None
    table = logic.runs_table([run])
    assert table["data"].tolist() == ["folder …/data (outside the app's folders)"]
    assert logic.bitwidth_table([run])["data"].tolist() == ["folder …/data (outside the app's folders)"]  # Bit widths
    at = page("pages/2_Quantize.py")
    table = at.dataframe[0].value
    shown = table[table["run"] == run.id]
    assert shown["data"].tolist() == ["folder …/data (outside the app's folders)"] and shown["FP top-1"].notna().all()
    assert str(out) not in table.to_string() and str(out) not in texts(at)

    at = page("pages/3_Boundary_samples.py", run.id)
    options = at.selectbox(key="b_class_0").options
    assert options[:2] == ["0: class 0", "1: class 1"] and not any("secret" in o for o in options)
    assert "outside the app's folders" in texts(at) and "secret" not in texts(at)
    assert at.get("image")  # the generated images are shown: they are the run's own

    at = page("pages/4_Feature_space.py", run.id)
    assert any("outside the app's folders" in i.value and run.id in i.value for i in at.info)
    assert not any(run.id in j.label for j in common.registry().jobs())
    assert all(not s.startswith("folder:") for s in spy)  # nothing of it read on any page
    with pytest.raises(PathNotAllowed):  # nor by a features task started some other way
        tasks.features_task(str(run.path), None, 50, 0, "pca")(lambda *a: None, SimpleNamespace(is_set=lambda: False))


def test_a_run_with_a_checkpoint_outside_loads_no_network(env, monkeypatch):
    run = clone(env, "outside-ckpt", checkpoint=str(env.outside / "teacher.safetensors"))
    loaded, real = [], common.load_teacher
    monkeypatch.setattr(common, "load_teacher", lambda r, *a, **k: loaded.append(r.id) or real(r, *a, **k))
    assert common.networks_note(run) and common.resume_note(run)
    for name in ("pages/3_Boundary_samples.py", "pages/4_Feature_space.py"):
        at = page(name, run.id)
        assert any("checkpoint lies outside" in i.value for i in at.info)
    at = page("pages/2_Quantize.py")
    assert not any(run.id in o for o in at.selectbox(key="q-export-run").options)  # exporting loads the teacher
    partner = clone(env, "gdfq-outside-ckpt", method="gdfq", checkpoint=str(env.outside / "teacher.safetensors"))
    assert logic.partner_runs(env.run, [env.run, partner])  # like for like, but not loadable here:
    at = page("pages/3_Boundary_samples.py", env.run.id)
    assert any("No GDFQ run" in c.value for c in at.caption) and partner.id not in texts(at)
    assert set(loaded) <= {env.run.id}  # the page's own run only (unless cached already)


def test_a_run_whose_file_links_outside_is_not_read(env):
    run = clone(env, "linked-metrics")
    (run.path / Run.METRICS).unlink()
    (run.path / Run.METRICS).symlink_to(env.outside / "secret.csv")
    at = page("pages/2_Quantize.py")
    table = at.dataframe[0].value
    assert run.id not in table["run"].tolist()
    notice = next(e for e in at.expander if "damaged" in e.label)
    assert run.id in " ".join(m.value for m in notice.markdown) and "links outside" in " ".join(
        m.value for m in notice.markdown)
    assert not [b for b in at.get("download_button") if run.id in str(b.proto.label)]
    with pytest.raises(PathNotAllowed):
        paths.check_run(run)

def test_relative_paths_of_a_run_are_judged_where_the_engine_reads_them(env, monkeypatch):
    monkeypatch.chdir(env.outside)  # the loaders take a run's relative paths in the current directory
    assert not paths.data_allowed("folder:data") and paths.data_label("folder:data").endswith("(outside the app's folders)")
    assert not paths.run_allowed(clone(env, "relative-ckpt", checkpoint="teacher.safetensors"))
    monkeypatch.chdir(env.home)
    assert paths.data_allowed("digits") and not paths.data_allowed("folder:../" + env.outside.name + "/data")

# --------------------------------------------------------------------------- deleting


def test_delete_refuses_a_run_that_a_live_writer_holds(env):
    run = clone(env, "held")
    at = page("pages/2_Quantize.py")
    with run.lock():  # a live writer (the kernel lock is per open file, so this process counts)
        with pytest.raises(RunLocked):
            delete_run(run)
        at.selectbox(key="q-delete-run").select(run.id).run()
        at.checkbox(key="q-delete-sure").check().run()
        at.button(key="q-delete-go").click().run()
        assert not at.exception
        assert any(e.value.startswith(f"Cannot delete {run.id}") for e in at.error)
    assert (run.path / Run.CONFIG).is_file() and (run.path / Run.STUDENT).is_file()  # nothing deleted

# --------------------------------------------------------------------------- an unusable home


PAGES = ["app.py", "pages/1_Teacher.py", "pages/2_Quantize.py", "pages/3_Boundary_samples.py",
         "pages/4_Feature_space.py", "pages/5_Bit_widths.py"]


@pytest.mark.parametrize("name", PAGES)
def test_every_page_says_what_to_set_when_its_home_is_unusable(tmp_path, monkeypatch, name):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("QIMERA_HOME", str(not_a_folder))
    _fresh_registry()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    if name != "app.py":
        at.switch_page(name)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert [e.value for e in at.error] == [paths.home_problem()]
    assert "QIMERA_HOME" in at.error[0].value


@pytest.mark.parametrize("how", ["home is a file", "qimera home below a file", "no such account", "read-only"])
def test_an_unusable_home_is_named_whatever_makes_it_so(tmp_path, monkeypatch, how):
    f = tmp_path / "a-file"
    f.write_text("")
    if how == "home is a file":
        monkeypatch.delenv("QIMERA_HOME")
        monkeypatch.setenv("HOME", str(f))
    elif how == "no such account":
        monkeypatch.setenv("QIMERA_HOME", "~no-such-account-q7/qimera")
    elif how == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro" / "runs").mkdir(parents=True)
        (tmp_path / "ro" / "runs").chmod(0o500)
        monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "ro"))
    else:
        monkeypatch.setenv("QIMERA_HOME", str(f / "sub"))
    assert "QIMERA_HOME" in paths.home_problem()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=90)
    at.switch_page("pages/2_Quantize.py")
    at.run()
    assert not at.exception and [e.value for e in at.error] == [paths.home_problem()]


def test_a_usable_home_has_no_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "new"))
    assert paths.home_problem() is None and (tmp_path / "new" / "runs").is_dir()

# --------------------------------------------------------------------------- a clean exit


EXIT_SCRIPT = textwrap.dedent("""
    import sys, time
    from streamlit.testing.v1 import AppTest
    from qimera_engine import jobs
    at = AppTest.from_file(sys.argv[1], default_timeout=120)
    at.switch_page("pages/4_Feature_space.py")
    at.query_params["run"] = sys.argv[2]
    at.run()
    at.select_slider(key="f_n").set_value(2000).run()
    deadline = time.time() + 120  # leave while the features are computed (torch at work in a thread)
    while time.time() < deadline and not jobs.shared_registry().active():
        time.sleep(0.01)
    print("exiting while:", [j.label for j in jobs.shared_registry().active()], flush=True)
""")


@pytest.mark.slow
def test_a_process_that_opened_feature_space_exits_cleanly(env, tmp_path):
    script = tmp_path / "open_feature_space.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "app.py"), env.run.id], capture_output=True,
                          text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "QIMERA_HOME": str(env.home)})
    assert "exiting while: ['" in proc.stdout, proc.stdout + proc.stderr[-2000:]  # it did leave mid-job
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate" not in proc.stderr
