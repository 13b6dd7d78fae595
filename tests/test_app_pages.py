"""The app: every page with nothing run yet and with small finished runs (AppTest), and the
functions that build its figures and tables (AppTest cannot look inside charts and images)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from qimera_engine import ConfigError, list_runs, load_generator, load_student, load_teacher, preset, run_to_end
from qimera_engine import jobs as jobs_module
from qimera_engine.teachers import train_and_cache
from qimera_engine import analysis
from qimera_engine.ui import figures, logic, paths, tasks

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["app.py", "pages/1_Teacher.py", "pages/2_Quantize.py", "pages/3_Boundary_samples.py",
         "pages/4_Feature_space.py", "pages/5_Bit_widths.py", "pages/6_Compare.py", "pages/7_Guided_tour.py"]
TINY = dict(epochs=2, iters_per_epoch=4, warmup_epochs=1, calib_epochs=1, batch_size=16, gen_width=16)


def fresh_registry():
    """A new process-wide job registry (the app's st.cache_resource wraps the shared one)."""
    from qimera_engine.ui import common
    for job in jobs_module.shared_registry().active():
        jobs_module.shared_registry().cancel(job.id)
    jobs_module._shared = None
    common.registry.clear()
    return jobs_module.shared_registry()


def open_page(page: str, timeout: float = 60) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    if page != "app.py":
        at.switch_page(page)  # the app's own entry point, so page links resolve as in a browser
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def wait_idle(registry, timeout: float = 120) -> None:
    for job in registry.jobs():
        registry.wait(job.id, timeout)


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """Nothing run yet; the digits teacher, when a test needs it, trains for 2 epochs only."""
    import qimera_engine.teachers as teachers
    monkeypatch.setattr(teachers, "train_and_cache", _quick_train(teachers.train_and_cache))
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    yield fresh_registry()


def by_method() -> dict:
    """The fixture's runs by method (a sweep test adds others to the same home)."""
    return {r.config.method: r for r in reversed(list_runs())}


@pytest.fixture(scope="module")
def finished_home(tmp_path_factory):
    """A QIMERA_HOME with a quickly trained teacher, a small Qimera run and a small GDFQ run."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("home")
    mp.setenv("QIMERA_HOME", str(home))
    train_and_cache("digits-cnn", "digits", epochs=3)
    run_to_end(preset("digits", method="gdfq", **TINY))
    time.sleep(0.02)  # distinct modification times: the Qimera run is the newest
    run_to_end(preset("digits", **TINY))
    yield home
    mp.undo()


@pytest.fixture
def with_runs(finished_home, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(finished_home))
    registry = fresh_registry()
    yield registry
    for job in registry.active():
        registry.cancel(job.id)
    wait_idle(registry)

# --------------------------------------------------------------------------- nothing run yet


@pytest.mark.parametrize("page", PAGES)
def test_every_page_loads_with_nothing_run(empty_home, page):
    at = open_page(page)
    assert at.title[0].value
    texts = " ".join(m.value for m in [*at.info, *at.markdown, *at.caption])
    assert "127.0.0.1" not in texts  # (sanity: pages do not print server settings)
    if page in ("pages/3_Boundary_samples.py", "pages/4_Feature_space.py"):
        assert any("No run with a generator yet" in m.value for m in at.info)
    if page == "pages/5_Bit_widths.py":
        assert any("No finished runs" in m.value for m in at.info)
        assert at.button(key="FormSubmitter:sweep-form-Start sweep")
    if page == "pages/2_Quantize.py":
        assert any("No runs yet" in m.value for m in at.info)
    if page == "pages/6_Compare.py":
        assert any("No finished runs yet" in m.value for m in at.info)
    if page == "pages/7_Guided_tour.py":  # (the suite hides the showcase): a run of one's own is needed
        assert any("No Qimera run yet" in m.value for m in at.info)


def test_home_runs_the_demo_in_the_background(empty_home):
    at = open_page("app.py")
    demo = at.button(key="run-demo")
    assert demo.label == "Run the demo"
    demo.click().run()
    assert not at.exception
    (job,) = empty_home.jobs("run")  # (beside it, UMAP's code may be compiling: a task)
    assert job.kind == "run" and job.runs[0].config["test_data"] == "digits"
    empty_home.cancel(job.id)
    assert empty_home.wait(job.id, 120).status in ("cancelled", "finished")  # stopped, or done before the cancel: never failed
    assert any("Runs are stored in" in m.value for m in at.markdown)


def test_teacher_page_trains_and_reports_accuracy(empty_home):
    at = open_page("pages/1_Teacher.py")
    assert at.selectbox(key="t_data").value == "digits"
    assert len(at.get("image")) == 1  # the grid of real digits
    assert any("Press **Load or train" in m.value for m in at.info)
    at.button(key="t_go").click().run()
    wait_idle(empty_home)
    at.run()
    assert not at.exception
    assert at.metric[0].label == "FP top-1" and float(at.metric[0].value.rstrip("%")) > 50
    assert at.session_state["teacher_choice"]["teacher"] == "digits-cnn"


def test_teacher_page_reports_a_missing_folder_and_a_bad_checkpoint(empty_home, tmp_path):
    at = open_page("pages/1_Teacher.py")
    at.selectbox(key="t_data").select("folder").run()
    at.text_input(key="t_root").input(str(tmp_path / "home" / "nowhere")).run()
    assert not at.exception and any("image folder not found" in w.value for w in at.warning)
    at.selectbox(key="t_data").select("digits").run()
    bad = tmp_path / "home" / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    at.radio(key="t_source").set_value("Checkpoint file path").run()
    at.text_input(key="t_ckpt").input(str(bad)).run()
    at.button(key="t_go").click().run()
    wait_idle(empty_home)
    at.run()
    assert not at.exception
    assert any("not a valid checkpoint" in e.value for e in at.error)
    assert at.text_input(key="t_ckpt").value == str(bad)  # nothing lost


def _quick_train(real):
    def quick(name, spec, **kw):
        return real(name, spec, **{**kw, "epochs": 2})
    return quick


def test_quantize_rejects_an_impossible_setting_and_keeps_the_form(empty_home):
    at = open_page("pages/2_Quantize.py")
    at.number_input(key="q_digits_epochs").set_value(1)
    at.number_input(key="q_digits_warmup_epochs").set_value(3)
    at.button(key="FormSubmitter:quantize-form-Start quantizing").click().run()
    assert not at.exception
    assert any("warmup_epochs" in e.value for e in at.error)
    assert at.number_input(key="q_digits_warmup_epochs").value == 3
    assert empty_home.jobs() == []


def test_quantize_starts_a_run_and_shows_its_progress(empty_home):
    import qimera_engine.teachers as teachers
    teachers.train_and_cache("digits-cnn", "digits")  # quickly (the fixture's): the run's own process would take 30 epochs
    at = open_page("pages/2_Quantize.py")
    for name, value in dict(epochs=1, iters_per_epoch=2, batch_size=8, warmup_epochs=0, calib_epochs=1).items():
        at.number_input(key=f"q_digits_{name}").set_value(value)
    at.selectbox(key="q_digits_wbits").select(8)
    at.button(key="FormSubmitter:quantize-form-Start quantizing").click().run()
    assert not at.exception and not at.error
    (job,) = empty_home.jobs()
    assert job.runs[0].config["wbits"] == 8 and job.runs[0].config["iters_per_epoch"] == 2
    assert empty_home.wait(job.id, 180).status == "finished"
    at = open_page("pages/2_Quantize.py")  # a reload: the job and its run are still there
    assert len(at.get("progress")) >= 1
    table = at.dataframe[0].value
    assert list(table["status"]) == ["finished"] and table["W"].iloc[0] == 8
    # the ended job's panel: no Cancel, and its run folder's caption full width, not indented beside where it was
    assert not [b for b in at.button if str(b.key).startswith("cancel-")]
    assert [c for c in at.caption if c.value.startswith("Run folder:")]
    assert not [c for col in at.columns for c in col.caption if c.value.startswith("Run folder:")]

# --------------------------------------------------------------------------- with finished runs


def test_quantize_lists_the_runs(with_runs):
    at = open_page("pages/2_Quantize.py")
    table = at.dataframe[0].value
    assert {"gdfq", "qimera"} <= set(table["method"])
    assert set(table["status"]) == {"finished"}
    assert table["final top-1"].notna().all()


def test_boundary_samples_page(with_runs):
    at = open_page("pages/3_Boundary_samples.py")
    slider = at.slider(key="b_coeff_b")
    assert slider.label.startswith("Coefficient")
    slider.set_value(0.3).run()
    assert not at.exception
    assert "0.70" in at.latex[0].value and "0.30" in at.latex[0].value
    assert len(at.get("image")) == 1  # the grid; the path's images are drawn inside its chart
    paths = [c for c in at.get("plotly_chart") if "From " in c.proto.spec and "layout" in c.proto.spec]
    assert len(paths) == 2
    assert all(c.proto.spec.count("data:image\\u002fpng;base64") == 7 for c in paths)  # the default 7 steps
    assert any("GDFQ run" in h.value for h in at.subheader)  # the GDFQ run beside the Qimera one
    at.radio(key="b_k").set_value(3).run()
    assert not at.exception and [s.label for s in at.slider][:3] == [f"Coefficient of class {c}" for c in "ABC"]
    at.selectbox(key="b_run").select(by_method()["gdfq"].id).run()  # the GDFQ run: nothing to mix
    assert not at.exception and any("GDFQ run" in w.value for w in at.warning)


def test_feature_space_page_computes_in_the_background(with_runs):
    at = open_page("pages/4_Feature_space.py")
    at.select_slider(key="f_n").set_value(200).run()
    wait_idle(with_runs)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    numbers = at.dataframe[0].value
    # the real row: 200 other test images against the 200 shown, the reference a generator is measured against
    assert list(numbers["source"]) == ["real (other 200 test images)", "plain", "superposed", "gdfq"]
    assert numbers["near boundary"].between(0, 1).all()
    assert numbers["coverage"].between(0, 1).all() and numbers["coverage"].iloc[0] > 0.5
    assert (numbers["spread"] > 0).all() and 0.7 < numbers["spread"].iloc[0] < 1.3
    at.slider(key="f_threshold").set_value(1.0).run()
    assert (at.dataframe[0].value["near boundary"] == 1.0).all()
    # UMAP chosen but not yet computed: the PCA chart stays, said to be the previous one
    at.segmented_control(key="f_method").set_value("umap").run()
    assert not at.exception and at.button(key="f_go")
    assert any("PCA of the teacher" in c.proto.spec for c in at.get("plotly_chart"))
    assert any("previous projection" in m.value for m in at.info)


def test_bit_widths_page(with_runs):
    at = open_page("pages/5_Bit_widths.py")
    part = at.dataframe[0].value
    part = part[part["method"] != "ptq"]
    assert sorted(part["method"]) == ["gdfq", "qimera"] and set(part["bits"]) == {4}
    assert at.get("download_button")
    at.radio(key="w_gap").set_value(True).run()
    assert not at.exception and '"type":"log"' in at.get("plotly_chart")[0].proto.spec.replace(" ", "")
    at.multiselect(key="w_bits").set_value([8])
    at.multiselect(key="w_methods").set_value(["ptq"])
    at.number_input(key="w_epochs").set_value(1)
    at.number_input(key="w_iters").set_value(2)
    at.button(key="FormSubmitter:sweep-form-Start sweep").click().run()
    assert not at.exception and not at.error
    (job,) = with_runs.jobs("sweep")
    assert [r.config["wbits"] for r in job.runs] == [8] and job.runs[0].config["method"] == "ptq"
    assert with_runs.wait(job.id, 180).status == "finished"

# --------------------------------------------------------------------------- building blocks


def test_image_grid_tiles_and_unnormalises():
    imgs = np.zeros((5, 1, 8, 8), np.uint8)
    imgs[1] = 255
    g = figures.image_grid(imgs, ncols=3, scale=2, pad=1)
    assert g.shape == (2 * 17 + 1, 3 * 17 + 1, 3) and g.dtype == np.uint8
    assert (g[1:17, 18:34] == 255).all() and (g[1:17, 1:17] == 0).all()
    x = torch.zeros(2, 3, 4, 4)  # normalised zeros are the mean colour
    shown = figures.image_grid(x, 2, mean=(0.5, 0.25, 1.0), std=(1, 1, 1), scale=1, pad=0)
    assert shown.shape == (4, 8, 3) and tuple(shown[0, 0]) == (128, 64, 255)
    with pytest.raises(ValueError):
        figures.image_grid(np.zeros((0, 1, 8, 8)))
    # by default each image gets at least 96 pixels a side, pixel for pixel (nearest neighbour)
    digits = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8)
    g = figures.image_grid(digits, 2, pad=0)
    assert g.shape == (96, 192, 3) and (g[:12, :12] == digits[0, 0, 0, 0]).all() and (g[84:, 180:] == 127).all()
    assert figures.image_grid(np.zeros((1, 3, 32, 32), np.uint8), pad=0).shape == (96, 96, 3)


def test_progress_figures():
    hist = [{"step": 1, "loss_g": 2.0, "loss_s": 0.0}, {"step": 2, "loss_g": 1.5, "loss_s": 0.7}]
    fig = figures.loss_figure(hist)
    assert [t.name for t in fig.data] == ["loss_g", "loss_s"] and list(fig.data[0].y) == [2.0, 1.5]
    rows = [{"epoch": 0, "top1": 50.0, "best_top1": 50.0}, {"epoch": 1, "top1": 40.0, "best_top1": 50.0}]
    acc = figures.accuracy_figure(rows, fp_top1=98.0)
    assert list(acc.data[0].x) == [1, 2] and list(acc.data[0].y) == [50.0, 40.0]
    assert acc.layout.shapes[0].y0 == 98.0


def test_path_figure_marks_the_crossing_and_disagreement():
    path = {"alphas": np.linspace(0, 1, 5), "p_a": np.array([.9, .8, .5, .2, .1]),
            "p_b": np.array([.1, .2, .5, .8, .9]), "teacher_pred": np.array([0, 0, 0, 1, 1]),
            "student_pred": np.array([0, 1, 0, 1, 1]), "student_p_a": None, "student_p_b": None,
            "p_other": np.array([0, 0, 0, 0, 0]), "boundary": {"alpha": 0.55, "from": 0, "to": 1}}
    fig = figures.path_figure(path, "cat", "dog", ["cat", "dog"])
    assert [t.name for t in fig.data] == ["teacher p(cat)", "teacher p(dog)", "teacher p(any other class)"]
    kinds = [(s.type, s.x0) for s in fig.layout.shapes]
    assert ("line", 0.55) in kinds  # the boundary
    assert fig.layout.annotations[0].text == "top-1 → dog at 0.55"
    assert sum(k == "rect" for k, _ in kinds) == 1  # one step where the student disagrees
    path.update(student_p_a=path["p_a"], student_p_b=path["p_b"], boundary=None)
    assert len(figures.path_figure(path, "cat", "dog").data) == 5
    tiles = [np.full((96, 96, 3), i * 50, np.uint8) for i in range(5)]
    fig = figures.path_figure(path, "cat", "dog", tiles=tiles)
    assert [im.x for im in fig.layout.images] == list(path["alphas"])  # each image over its own step
    assert fig.layout.xaxis.range == (-0.125, 1.125) and fig.layout.yaxis.domain == (0, 0.62)


def test_feature_scatter_colours_by_class_and_marks_sources():
    coords = {"real": np.zeros((4, 2)), "superposed": np.ones((3, 2))}
    labels = {"real": np.array([0, 0, 1, 1]), "superposed": np.array([1, 1, 2])}
    hover = {"superposed": logic.hover_coefficients(np.array([[1, 2], [1, 0], [2, 1]]),
                                                    np.array([[.6, .4], [.9, .1], [.7, .3]]), ["a", "b", "c"])}
    fig = figures.feature_scatter(coords, labels, ["a", "b", "c"], hover)
    assert [t.name for t in fig.data[:4]] == ["real: a", "real: b", "superposed: b", "superposed: c"]
    legend = [(t.name, t.legend) for t in fig.data if t.showlegend is not False]
    assert legend == [("a", None), ("b", None), ("c", None), ("real", "legend2"), ("superposed", "legend2")]
    assert fig.data[1].legendgroup == fig.data[2].legendgroup == "b"  # one legend entry toggles a class everywhere
    assert fig.data[2].marker.symbol == "x" and fig.data[0].marker.symbol == "circle-open"  # real: open rings
    assert fig.data[2].marker.color == fig.data[1].marker.color  # same class, same colour
    assert fig.data[2].customdata[0][2] == "0.60 x b + 0.40 x c"
    assert [int(r[3]) for r in fig.data[3].customdata] == [2]  # index within its source, for selections
    sources = {"superposed": {"probs": np.array([[.1, .5, .4], [.2, .7, .1], [.0, .1, .9]])}}
    table = logic.selected_points([{"customdata": list(fig.data[3].customdata[0])}, {"x": 1}], sources,
                                  ["a", "b", "c"])
    assert table.to_dict("records") == [{"source": "superposed", "index": 2, "class": "c", "mix": "0.70 x c + 0.30 x b",
                                         "teacher top-3": "c 0.90, b 0.10, a 0.00", "margin": pytest.approx(0.8)}]


def test_bitwidth_figure_averages_over_seeds():
    df = pd.DataFrame({"method": ["qimera", "qimera", "gdfq"], "bits": [4, 4, 4], "top1": [80.0, 90.0, 70.0]})
    fig = figures.bitwidth_figure(df, 95.0)
    by_name = {t.name.split(" (")[0]: t for t in fig.data}  # names: "qimera (n = 2 per point)"
    assert list(by_name["qimera"].y) == [85.0] and list(by_name["gdfq"].y) == [70.0]
    assert by_name["qimera"].error_y.array[0] == pytest.approx(np.std([80, 90], ddof=1))
    assert len(figures.method_picture().data) == 3
    # the gap view: each run's own FP minus its top-1, on a log axis; a student above its teacher at the floor
    df = df.assign(fp_top1=[95.0, 96.0, 69.0])
    fig = figures.bitwidth_figure(df, 95.0, gap=True)
    by_name = {t.name.split(" (")[0]: t for t in fig.data}
    assert list(by_name["qimera"].y) == [10.5] and list(by_name["gdfq"].y) == [figures.GAP_FLOOR]
    assert by_name["gdfq"].customdata[0][1] == -1.0  # the hover still tells the true gap
    assert fig.layout.yaxis.type == "log" and not fig.layout.shapes  # no FP line on a gap axis


def test_budget_rows_add_ptq_from_other_budgets_as_a_labelled_baseline():
    """PTQ (calibration only) joins a budget that has no PTQ rows of its own, named with its own budget;
    fine-tuned methods of other budgets never do, and a budget with its own PTQ rows keeps only those."""
    part = pd.DataFrame({"method": ["qimera+", "gdfq+", "ptq+", "ptq+", "ptq", "gdfq+"],
                         "budget": [1000, 1000, 200, 200, 300, 2000], "top1": [80.0, 78.0, 60.0, 61.0, 55.0, 79.0]})
    rows = logic.budget_rows(part, 1000, baselines=True)
    assert list(rows["method"]) == ["qimera+", "gdfq+", "ptq+ (no fine-tuning, 200 images)",
                                    "ptq+ (no fine-tuning, 200 images)", "ptq (no fine-tuning, 300 images)"]
    assert logic.budget_rows(part, 1000).equals(part[part["budget"] == 1000])  # not asked: this budget only
    assert list(logic.budget_rows(part, 200, baselines=True)["method"]) == ["ptq+", "ptq+", "ptq (no fine-tuning, 300 images)"]
    assert logic.no_fine_tuning("ptq+ (dm=True)") and not logic.no_fine_tuning("qimera+ p=0")
    fig = figures.bitwidth_figure(rows.assign(bits=4), 90.0, dotted={m for m in rows["method"] if logic.from_other_budget(m)})
    assert {t.name.split(" (n =")[0]: t.line.dash for t in fig.data} == {
        "qimera+": "solid", "gdfq+": "solid", "ptq+ (no fine-tuning, 200 images)": "dot",
        "ptq (no fine-tuning, 300 images)": "dot"}


def test_bit_widths_append_shipped_curves(finished_home, monkeypatch, tmp_path):
    """Precomputed rows (assets/build_curves.py) join the runs' rows: data labelled as the runs' are, a row
    of a run that is listed already is not counted twice, and a file without the columns is refused."""
    monkeypatch.setenv("QIMERA_HOME", str(finished_home))
    runs = [by_method()["qimera"]]
    own = logic.bitwidth_table(runs)
    curves = tmp_path / "bit_widths.csv"
    rows = [{**own.iloc[0].to_dict(), "data": "folder:cifar10-dev"},  # the same run: dropped
            {**own.iloc[0].to_dict(), "run": "ptq-w3a3-s0", "method": "ptq+", "bits": 3, "W": 3, "A": 3,
             "data": "folder:cifar10-dev", "top1": 61.5}]
    pd.DataFrame(rows).to_csv(curves, index=False)
    table = logic.bitwidth_table(runs, curves)
    assert list(table["run"]) == [own["run"].iloc[0], "ptq-w3a3-s0"] and list(table["bits"]) == [4, 3]
    assert table["data"].iloc[1] == paths.data_label("folder:cifar10-dev")
    assert logic.bitwidth_table([], curves)["top1"].tolist() == [own["top1"].iloc[0], 61.5]  # from an empty home
    assert logic.bitwidth_table(runs, tmp_path / "none.csv").equals(own)
    pd.DataFrame([{"method": "ptq+", "bits": 3}]).to_csv(curves, index=False)
    with pytest.raises(ValueError, match="lacks the columns"):
        logic.bitwidth_table(runs, curves)


def test_tables_of_runs(finished_home, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(finished_home))
    runs = [by_method()["qimera"], by_method()["gdfq"]]
    t = logic.runs_table(runs)
    assert list(t["method"]) == ["qimera", "gdfq"] and list(t["epochs"]) == ["2/2", "2/2"]
    assert (t["final top-1"] == [r.summary["quant_top1"] for r in runs]).all()
    b = logic.bitwidth_table(runs)
    assert set(b["method"]) == {"qimera", "gdfq"} and list(b["bits"]) == [4, 4]
    assert logic.gdfq_partner(runs[0], runs).id == runs[1].id and logic.gdfq_partner(runs[1], runs) is None
    # a run whose writer is gone shows as interrupted, one being written as running
    runs[0].set_status("running")
    assert logic.runs_table(runs)["status"].iloc[0] == "interrupted"
    with runs[0].lock():  # a writer: in this process (a job of ours), or another one
        assert logic.runs_table(runs, {str(runs[0].path)})["status"].iloc[0] == "running"
        assert logic.runs_table(runs)["status"].iloc[0] == "running elsewhere"
    runs[0].set_status("finished")


def test_mix_samples_reads_generated_images(finished_home, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(finished_home))
    run = by_method()["qimera"]
    teacher = load_teacher(run)
    gen, student = load_generator(run), load_student(run, teacher)
    out = analysis.mix_samples(gen, teacher.model, student, [3, 8], [1, 3], [0, 1, 2])
    assert out["images"].shape == (3, 1, 8, 8)
    assert np.allclose(out["teacher_probs"].sum(1), 1, atol=1e-5)
    assert (out["teacher_pred"] == out["teacher_probs"].argmax(1)).all() and out["student_pred"].shape == (3,)
    again = analysis.mix_samples(gen, teacher.model, student, [3, 8], [0.25, 0.75], [0, 1, 2])
    assert torch.equal(out["images"], again["images"])  # coefficients are normalised; seeds decide
    with pytest.raises(ValueError, match="GDFQ"):
        analysis.mix_samples(load_generator(by_method()["gdfq"]), teacher.model, None, [1, 2], [.5, .5], [0])


def test_small_logic_helpers():
    assert np.allclose(analysis.normalise_coefficients([0, 0]), [0.5, 0.5])
    assert np.allclose(analysis.normalise_coefficients([1, 3]), [0.25, 0.75])
    assert logic.coefficient_formula([1, 1], ["3", "8"]) == r"z = 0.50\,e_{\text{3}} + 0.50\,e_{\text{8}}"
    assert logic.coefficient_formula([1, 1], ["cat", "dog"], mapping=True) == \
        r"z = 0.50\,M(e_{\text{cat}}) + 0.50\,M(e_{\text{dog}})"  # M only when the generator maps
    three = logic.coefficient_formula([1, 1, 2], ["a", "b", "c"])
    assert three.startswith(r"\begin{aligned}") and three.count(r"\\") == 2  # a line per term
    assert list(logic.dominant_class(np.array([[1, 2], [4, 5]]), np.array([[.2, .8], [.6, .4]]))) == [2, 4]
    assert logic.teachers_for("digits") == ["digits-cnn"] and "resnet20" in logic.teachers_for("cifar10")
    names = [s.name for s in logic.SETTINGS]
    assert len(set(names)) == len(names) and {"wbits", "abits", "superpose_p", "superpose_k", "dm", "lr_s"} <= set(names)
    assert all(s.help and s.label for s in logic.SETTINGS)
    with pytest.raises(ConfigError, match="superpose_p"):
        logic.config_from_values(preset("digits"), {"superpose_p": 1.5})


def test_a_picked_point_shows_the_image_behind_it(finished_home, monkeypatch):
    """Feature space: the image of a clicked point is the very image whose features were placed there."""
    import threading
    from qimera_engine import collect_features
    from qimera_engine.ui import common
    monkeypatch.setenv("QIMERA_HOME", str(finished_home))
    qimera, gdfq = by_method()["qimera"], by_method()["gdfq"]
    src = tasks.features_task(str(qimera.path), str(gdfq.path), 50, 3, "pca")(lambda f, m: None, threading.Event())["sources"]
    picks = [("real", 7), ("plain", 2), ("superposed", 5), ("gdfq", 1)]
    grid = common.point_images(qimera, gdfq, src, picks, 3)
    teacher = load_teacher(qimera)
    tile = teacher.image_size * 12  # 8x8 digits shown 12x (figures.MIN_IMAGE_PX)
    assert grid.shape == (tile + 4, 4 * (tile + 2) + 2, 3)
    for j, (source, i) in enumerate(picks):  # each tile, read back as the teacher's input, gives the point's features
        image = grid[2:2 + tile, 2 + j * (tile + 2): 2 + j * (tile + 2) + tile][::12, ::12, :1]
        x = (torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None] / 255 - teacher.mean[0]) / teacher.std[0]
        features, _ = collect_features(teacher.model, x)
        dist = np.linalg.norm(src[source]["features"] - features[0].numpy(), axis=1)
        assert dist.argmin() == i, (source, i, dist.argmin())  # (up to the display's 8-bit rounding)


def test_features_task_projects_every_source(finished_home, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(finished_home))
    qimera, gdfq = by_method()["qimera"], by_method()["gdfq"]
    import threading
    reports = []
    out = tasks.features_task(str(qimera.path), str(gdfq.path), 100, 0, "pca")(
        lambda f, m: reports.append(f), threading.Event())
    src = out["sources"]
    assert list(src) == ["real", "plain", "superposed", "gdfq"]
    assert all(s["xy"].shape == (100, 2) for s in src.values())
    assert src["superposed"]["labels"].shape == (100, 2) and src["real"]["coeffs"].shape == (100, 1)
    # the reference: the same draw's next 100 test images, none of them among the 100 shown
    assert src["real"]["other_features"].shape == (100, src["real"]["features"].shape[1])
    assert not any(np.allclose(src["real"]["other_features"][0], f) for f in src["real"]["features"])
    assert reports == sorted(reports) and len(out["classes"]) == 10
    # UMAP of the same samples (the user switches from PCA): the features are reused, only the projection is new
    calls = []
    real = analysis.synthetic_features
    monkeypatch.setattr(analysis, "synthetic_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    umap = tasks.features_task(str(qimera.path), str(gdfq.path), 100, 0, "umap")(lambda f, m: None, threading.Event())
    assert calls == [] and umap["method"] == "umap"
    assert all(np.array_equal(umap["sources"][k]["features"], src[k]["features"]) for k in src)
    assert not np.allclose(umap["sources"]["real"]["xy"], src["real"]["xy"])
    other = tasks.features_task(str(qimera.path), str(gdfq.path), 100, 1, "pca")(lambda f, m: None, threading.Event())
    assert len(calls) == 3 and not np.array_equal(other["sources"]["plain"]["features"], src["plain"]["features"])


@pytest.fixture
def damaged_home(finished_home, tmp_path, monkeypatch):
    """The finished runs and, beside them, run folders damaged in four ways."""
    import json
    import shutil
    home = tmp_path / "home"
    shutil.copytree(finished_home, home)
    runs = sorted((home / "runs").iterdir())
    damage = {"bad-summary": ("summary.json", "{not json"),
              "unknown-key": ("config.json", json.dumps({**json.loads((runs[0] / "config.json").read_text()),
                                                          "no_such_setting": 1})),
              "status-list": ("status.json", "[1, 2]"),
              "metrics-binary": ("metrics.csv", "\x00\x01garbage"),
              "metrics-text": ("metrics.csv", "epoch,top1\nx,y\n")}
    for name, (file, text) in damage.items():
        shutil.copytree(runs[-1], home / "runs" / name)
        (home / "runs" / name / file).write_text(text)
    monkeypatch.setenv("QIMERA_HOME", str(home))
    fresh_registry()
    return sorted(damage)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_survives_damaged_run_folders(damaged_home, page):
    at = open_page(page)
    assert not at.exception and not at.error
    if page in ("app.py", "pages/1_Teacher.py"):  # pages that list no runs
        return
    (notice,) = [e for e in at.expander if "damaged run folder" in e.label]
    assert notice.label.startswith(f"{len(damaged_home)} damaged")
    text = " ".join(m.value for m in notice.markdown)
    for name in damaged_home:
        assert f"**{name}**" in text
    assert "summary.json is damaged" in text and "unknown setting(s): 'no_such_setting'" in text


def test_runs_command_lists_damaged_folders(damaged_home, capsys):
    from qimera_engine import cli
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out
    for name in damaged_home:
        assert f"{name}" in out and "damaged:" in out
    good = [line for line in out.splitlines() if "damaged:" not in line]
    assert len(good) == len(list_runs()) - len(damaged_home) >= 2 and all(" finished " in g for g in good)
    assert cli.main(["runs", "--json"]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["run"] for r in rows if r["status"] == "damaged") == damaged_home


@pytest.mark.parametrize("page, key", [("pages/2_Quantize.py", "q"), ("pages/5_Bit_widths.py", "w")])
def test_export_and_download_a_run(with_runs, page, key):
    at = open_page(page)
    at.radio(key=f"{key}-export-format").set_value("onnx").run()
    at.button(key=f"{key}-export-go").click().run()
    assert not at.exception and not at.error
    run_id = at.selectbox(key=f"{key}-export-run").value
    (button,) = [b for b in at.get("download_button") if b.proto.label.startswith("Download student.onnx")]
    exported = next(r for r in list_runs() if r.id == run_id).path / "student.onnx"
    assert exported.exists() and f"{exported.stat().st_size / 2**20:.2f} MB" in button.proto.label
    at.radio(key=f"{key}-export-format").set_value("int").run()  # another format: the ONNX file is not offered
    assert not [b for b in at.get("download_button") if b.proto.label.startswith("Download student")]


def test_an_onnx_export_is_measured_against_the_fp_model(with_runs):
    at = open_page("pages/2_Quantize.py")
    at.radio(key="q-export-format").set_value("onnx").run()
    at.button(key="q-export-go").click().run()
    at.button(key="q-export-check").click().run()
    assert not at.exception and not at.error
    labels = {m.label: m for m in at.metric}
    assert {"Size", "Speed (ONNX Runtime, batch of 500)"} <= set(labels)
    top1 = next(m for label, m in labels.items() if label.startswith("Top-1 on "))
    assert top1.value.endswith("%") and "vs FP" in top1.proto.delta
    assert "x FP" in labels["Size"].proto.delta and "x FP" in labels["Speed (ONNX Runtime, batch of 500)"].proto.delta
    # the app's runs use the paper's scheme: the panel says why it does not run on integer kernels
    assert any("Not integer-kernel ready" in c.value and "scheme=deploy" in c.value for c in at.caption)


@pytest.fixture
def mismatched_home(finished_home, tmp_path, monkeypatch):
    """The finished runs and a GDFQ run of another bit width and budget (its config edited)."""
    import json
    import shutil
    home = tmp_path / "home"
    shutil.copytree(finished_home, home)
    gdfq = next(p for p in (home / "runs").iterdir() if json.loads((p / "config.json").read_text())["method"] == "gdfq")
    other = home / "runs" / "zz-gdfq-w8a8-long"
    shutil.copytree(gdfq, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "wbits": 8, "abits": 8, "epochs": 40, "warmup_epochs": 1}))
    monkeypatch.setenv("QIMERA_HOME", str(home))
    fresh_registry()
    return {r.config.method + ("-w8" if r.config.wbits == 8 else ""): r for r in list_runs()}


def test_comparisons_pair_only_like_with_like(mismatched_home):
    runs = list(mismatched_home.values())
    q, same, other = mismatched_home["qimera"], mismatched_home["gdfq"], mismatched_home["gdfq-w8"]
    assert logic.comparable(q.config, same.config) and not logic.comparable(q.config, other.config)
    assert [r.id for r in logic.partner_runs(q, runs)] == [same.id]
    assert {r.id for r in logic.partner_runs(q, runs, same_setting=False)} == {same.id, other.id}
    assert logic.gdfq_partner(q, runs).id == same.id
    at = open_page("pages/3_Boundary_samples.py")
    at.selectbox(key="b_run").select(q.id).run()
    assert at.selectbox(key="b-partner").options == ["no comparison", f"{same.id} ({logic.setting_label(same.config)})"]
    assert not at.warning
    at.checkbox(key="b-partner-wide").check().run()
    at.selectbox(key="b-partner").select(other.id).run()
    assert not at.exception
    assert any("Not a like-for-like comparison" in w.value and "W8A8" in w.value for w in at.warning)
    at.selectbox(key="b-partner").select("none").run()
    assert not any("GDFQ run" in h.value for h in at.subheader)  # no comparison panel


def test_bit_widths_never_pools_budgets(mismatched_home):
    import json
    # a finished W4A4 GDFQ run of a longer budget: listed under its own budget, never averaged with the short one
    other = mismatched_home["gdfq-w8"]
    cfg = json.loads((other.path / "config.json").read_text())
    (other.path / "config.json").write_text(json.dumps({**cfg, "wbits": 4, "abits": 4}))
    summary = json.loads((other.path / "summary.json").read_text())
    (other.path / "summary.json").write_text(json.dumps({**summary, "quant_top1": 12.5}))
    table = logic.bitwidth_table(list_runs())
    assert set(table["budget"]) == {logic.budget(mismatched_home["qimera"].config), logic.budget(other.config)}
    at = open_page("pages/5_Bit_widths.py")
    assert not at.exception
    shown = at.dataframe[0].value
    assert shown["budget"].nunique() == 1 and 12.5 not in list(shown["top1"])  # the default budget: the short runs


def test_runs_overlay_download_and_delete(mismatched_home):
    at = open_page("pages/2_Quantize.py")
    overlay = at.multiselect(key="q-overlay")
    assert len(overlay.value) == 2
    chart = at.get("plotly_chart")
    assert any("Test accuracy per epoch" in c.proto.spec for c in chart)
    downloads = [b.proto.label for b in at.get("download_button")]
    assert sum(label.startswith("Download metrics of") for label in downloads) == 2
    victim = mismatched_home["gdfq-w8"]
    at.selectbox(key="q-delete-run").select(victim.id).run()
    assert at.button(key="q-delete-go").disabled  # not without the confirmation
    at.checkbox(key="q-delete-sure").check().run()
    at.button(key="q-delete-go").click().run()
    assert not at.exception and not victim.path.exists()
    assert victim.id not in set(at.dataframe[0].value["run"])
    # a run being written cannot be deleted
    from qimera_engine.runs import RunLocked, delete_run
    busy = mismatched_home["qimera"]
    with busy.lock():
        with pytest.raises(RunLocked):
            delete_run(busy)
    assert busy.path.exists()


def test_teacher_errors_name_the_pages_controls_and_a_failed_choice_is_not_kept(empty_home):
    msg = ("no weights for teacher 'resnet20' on cifar10 data in the cache: give a checkpoint (--checkpoint PATH), "
           "or train one first (python -m qimera_engine train-teacher --teacher resnet20 --data cifar10)")
    assert "--" not in logic.page_hint(msg) and "**Checkpoint file path**" in logic.page_hint(msg)
    zoo = msg.replace("resnet20'", "resnet18'").replace("PATH), ", "PATH), pretrained=True for zoo weights, ")
    assert "--" not in logic.page_hint(zoo) and "**Checkpoint file path**" in logic.page_hint(zoo)
    cifar = ("CIFAR-10 not found under /x (Dataset not found). Pass download=True (--set download=true) to fetch "
             "it, or point to a folder that has it.")
    assert "Tick **Download if missing** above to fetch it" in logic.page_hint(cifar)
    at = open_page("pages/1_Teacher.py")
    at.selectbox(key="t_data").select("cifar10").run()
    at.button(key="t_go").click().run()
    wait_idle(empty_home)
    at.run()
    assert not at.exception
    (err,) = at.error
    assert "Could not prepare the teacher" in err.value and "**Checkpoint file path**" in err.value
    assert "--checkpoint" not in err.value and "teacher_choice" not in at.session_state
    assert any("Tick **Download if missing**" in w.value for w in at.warning)  # no CIFAR files in the home


def test_quantize_preset_follows_the_chosen_teacher(empty_home):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/2_Quantize.py")
    at.session_state["teacher_choice"] = dict(teacher="resnet20", test_data="cifar10", checkpoint="/x.th",
                                              pretrained=False, download=False)
    at.run()
    assert not at.exception
    assert at.selectbox(key="q_preset").value == "cifar10-resnet20-cpu"
    assert any("Teacher **resnet20** · data **cifar10**" in c.value for c in at.caption)


def test_feature_space_says_when_a_run_shows_the_opposite():
    good = logic.feature_verdict({"real": {"near": .1, "coverage": None}, "plain": {"near": .05, "coverage": .3},
                                  "superposed": {"near": .4, "coverage": .5}, "gdfq": {"near": .1, "coverage": .2}})
    assert len(good) == 2 and all(line.startswith("As expected") for line in good)
    bad = logic.feature_verdict({"plain": {"near": .05, "coverage": .3}, "superposed": {"near": .2, "coverage": .4},
                                 "gdfq": {"near": .3, "coverage": .6}})
    assert bad[0].startswith("As expected")
    assert bad[1].startswith("Not as expected: the GDFQ run's samples") and "(30% vs 20%)" in bad[1]
    assert "cover more of the real features (60% vs 40%)" in bad[2]
    assert logic.feature_verdict({"plain": {"near": .1, "coverage": .1}}) == []  # a GDFQ run alone: nothing to say


def test_ui_and_pages_use_only_the_engines_public_api():
    """qimera_engine/ui and pages/ use the engine's public names only: those in ``qimera_engine.__all__``, and of
    its public ``analysis`` module those in ``analysis.__all__`` (imported or used as ``analysis.NAME``), never its
    other modules; the UI kit's own modules (``qimera_engine.ui``) are the app's. The engine proper never imports
    Streamlit (test_jobs checks that)."""
    import ast
    import qimera_engine
    from qimera_engine import analysis
    files = sorted((ROOT / "qimera_engine" / "ui").glob("*.py")) + sorted((ROOT / "pages").glob("*.py")) + [ROOT / "app.py"]
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative, inside qimera_engine/ui: .. is the engine, . the UI kit
                    mod = "qimera_engine" + (("." + node.module) if node.module else "") if node.level == 2 \
                        else "qimera_engine.ui" + (("." + node.module) if node.module else "")
                else:
                    mod = node.module or ""
                if mod == "qimera_engine":
                    bad += [f"{f.name}: {a.name}" for a in node.names if a.name not in qimera_engine.__all__]
                elif mod == "qimera_engine.analysis":
                    bad += [f"{f.name}: analysis.{a.name}" for a in node.names if a.name not in analysis.__all__]
                elif mod.startswith("qimera_engine") and not mod.startswith("qimera_engine.ui"):
                    bad.append(f"{f.name}: from {mod}")
            elif isinstance(node, ast.Import):
                bad += [f"{f.name}: import {a.name}" for a in node.names
                        if a.name.startswith("qimera_engine.") and not a.name.startswith("qimera_engine.ui")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "analysis":
                if node.attr not in analysis.__all__:
                    bad.append(f"{f.name}: analysis.{node.attr}")
    assert bad == []


def test_home_starts_a_fair_qimera_vs_gdfq_pair(empty_home):
    at = open_page("app.py")
    at.button(key="run-pair").click().run()
    assert not at.exception
    (job,) = empty_home.jobs("sweep")
    configs = [r.config for r in job.runs]
    assert [c["method"] for c in configs] == ["qimera", "gdfq"]
    same = lambda c: (c["wbits"], c["abits"], c["epochs"], c["iters_per_epoch"], c["batch_size"], c["seed"])  # noqa: E731
    assert same(configs[0]) == same(configs[1]) == (4, 4, 12, 40, 64, 0)
    empty_home.cancel(job.id)
    assert empty_home.wait(job.id, 120).status in ("cancelled", "finished")  # stopped, or done before the cancel: never failed


def test_home_shows_the_demo_job_not_a_newer_run(with_runs):
    """Home's demo box follows the demo, however many runs started after it."""
    demo = with_runs.start_run(preset("digits", **TINY), label="demo: digits W4A4 (Qimera)")
    other = with_runs.start_run(preset("digits", **TINY), label="another run")
    for job in (demo, other):
        with_runs.cancel(job)
        with_runs.wait(job, 120)
    at = open_page("app.py")
    assert not at.exception
    bars = [p.proto.text for p in at.get("progress")]
    assert any(t.startswith("demo: digits") for t in bars) and not any("another run" in t for t in bars)


def test_compare_runs_starts_with_runs_on_one_scale():
    """"Compare runs" starts with the newest run and the newest other with its teacher and test data."""
    from types import SimpleNamespace

    def run(rid, teacher, data, bits=4):
        return SimpleNamespace(id=rid, config=SimpleNamespace(teacher=teacher, test_data=data, wbits=bits, abits=bits))
    runs = [run("cifar-new", "resnet20", "cifar10"), run("digits", "digits-cnn", "digits"),
            run("cifar-w8", "resnet20", "cifar10", 8), run("cifar-old", "resnet20", "cifar10")]
    assert logic.overlay_default(runs) == ["cifar-new", "cifar-w8"]
    assert logic.overlay_default(runs[1:3]) == ["digits"]  # nothing on its scale: alone, not beside CIFAR
    assert logic.overlay_default([]) == []


def test_bit_widths_sweep_uses_the_chosen_teacher(empty_home, monkeypatch):
    """A sweep on Bit widths trains the teacher chosen on the Teacher page, as Quantize does."""
    started = []
    monkeypatch.setattr(jobs_module.JobRegistry, "start_sweep",
                        lambda self, base, *args, **kw: started.append(base) or "job")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/5_Bit_widths.py")
    at.session_state["teacher_choice"] = dict(teacher="resnet20", test_data="cifar10", checkpoint="/x.th",
                                              pretrained=False, download=False)
    at.run()
    assert not at.exception and at.selectbox(key="w_preset").value == "cifar10-resnet20-cpu"
    at.button(key="FormSubmitter:sweep-form-Start sweep").click().run()
    assert not at.exception and not at.error
    (base,) = started
    assert (base.teacher, base.test_data, base.checkpoint, base.epochs) == ("resnet20", "cifar10", "/x.th", 4)


def test_teacher_page_offers_the_shipped_resnet20(empty_home, monkeypatch):
    """The ResNet-20 of the shipped runs is a choice on the Teacher page, offline, and becomes Quantize's teacher."""
    assert paths.shipped_teacher() is None  # (the suite hides the showcase: then no such choice)
    assert "shipped" not in open_page("pages/1_Teacher.py").selectbox(key="t_data").options
    monkeypatch.setenv("QIMERA_SHOWCASE", str(ROOT / "assets" / "showcase"))
    at = open_page("pages/1_Teacher.py")
    at.selectbox(key="t_data").select("shipped").run()
    assert not at.exception and not at.radio  # nothing to choose: no weights source
    at.button(key="t_go").click().run()
    wait_idle(empty_home)
    at.run()
    assert not at.exception
    assert at.metric[0].label == "FP top-1" and float(at.metric[0].value.rstrip("%")) > 70
    choice = at.session_state["teacher_choice"]
    assert (choice["teacher"], choice["checkpoint"], choice["test_data"]) == ("resnet20", *paths.shipped_teacher())


def test_the_default_path_seed_gives_a_clean_path():
    """Boundary samples starts its A-to-B path at the first seed whose ends the teacher reads as A and B."""
    preds = {0: [7, 3, 5], 1: [3, 3, 7], 2: [3, 4, 5], 3: [3, 9, 5]}  # seed -> the teacher's top-1 along the path
    calls = []

    def path_of(seed):
        calls.append(seed)
        return {"teacher_pred": np.array(preds.get(seed, [0, 0, 0]))}
    assert logic.first_clean_seed(path_of, 3, 5, 0) == 2 and calls == [0, 1, 2]  # stops at the first clean one
    assert logic.first_clean_seed(path_of, 3, 5, 3) == 3
    assert logic.first_clean_seed(path_of, 1, 2, 0, tries=4) is None  # none: the page says so


def test_runs_of_different_settings_never_share_a_label():
    """Bit widths pools runs by label: a run with the mapping layer and fixed coefficients is not "qimera"."""
    configs = [preset("digits", seed=0), preset("digits", seed=1, wbits=2, abits=2),
               preset("digits", dm=True, coeff_sampler="fixed", fixed_coeffs=[0.5, 0.5]), preset("digits", method="gdfq")]
    assert logic.distinct_labels(configs) == ["qimera", "qimera", "qimera (dm=True, coeff_sampler=fixed, "
                                              "fixed_coeffs=[0.5, 0.5])", "gdfq"]
    fig = figures.bitwidth_figure(pd.DataFrame({"method": ["qimera"] * 3 + ["gdfq"], "bits": [2, 2, 4, 4],
                                                "top1": [50.0, 52.0, 90.0, 80.0]}))
    assert [t.name for t in fig.data] == ["gdfq (n = 1 per point)", "qimera (n = 1-2 per point)"]


def test_the_seeds_sentence_says_when_seeds_give_one_image():
    assert logic.seed_sentence(0.05).startswith("These seeds give nearly the same image (mean distance between two "
                                                "of them 0.05")
    assert logic.seed_sentence(0.13).startswith("The seeds vary the details of one picture: the mean distance between "
                                                "two of them is 0.13")
    assert logic.seed_sentence(0.25).startswith("Each seed gives its own image: the mean distance between two of them "
                                                "is 0.25")
    assert logic.seed_sentence(None) == ""
    # far apart in pixels, close in layout: the details differ, the picture's light and dark parts do not move
    assert logic.seed_sentence(0.25, 0.13).startswith("The seeds vary the details of one picture: the mean distance "
                                                      "between two of them is 0.25 in pixel values")
    assert "but only 0.13 in their layout" in logic.seed_sentence(0.25, 0.13)
    assert logic.seed_sentence(0.05, 0.01).startswith("These seeds give nearly the same image")
    assert logic.seed_sentence(0.25, 0.23).startswith("Each seed gives its own image: the mean distance")
    assert logic.seed_sentence(0.25, 0.23).endswith("; 0.23 in their layout (their means over a 4 × 4 grid of "
                                                    "blocks; real: about 0.3).")


def test_home_shows_the_generator_whose_mixes_are_most_varied():
    from types import SimpleNamespace

    def run(superposes, mix=None):
        return SimpleNamespace(config=SimpleNamespace(superposes=superposes),
                               summary={"diversity": {"mix_coverage": mix}} if mix is not None else {})
    plain, mixed = run(False), run(True)
    assert logic.showcase_pair([plain, mixed]) == (mixed, plain)  # nothing measured: the one trained on mixes
    plain, mixed = run(False, 0.75), run(True, 0.15)
    assert logic.showcase_pair([mixed, plain]) == (plain, mixed)  # the collapsed one is not the showcase
    assert logic.showcase_pair([plain]) == (plain, None)


def test_live_charts_take_new_loss_points_at_most_every_ten_seconds(monkeypatch):
    """While a run trains, every poll would draw its loss chart again (in every browser watching it, on the
    run's CPU): new loss points wait up to LIVE_CHART_SECONDS, a new epoch's accuracy and the run's end do not."""
    from qimera_engine.jobs import Job, RunProgress
    from qimera_engine.ui import common
    clock = [1000.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    run = RunProgress({}, status="running", loss_history=[{"step": 1, "loss_g": 1.0}], fp_top1=90.0)
    job = Job(id="run-x", kind="run", label="x", status="running", runs=[run])
    first = common._job_figures(job)
    run.loss_history.append({"step": 2, "loss_g": 0.9})
    assert common._job_figures(job) is first  # 0 s later: the same charts
    clock[0] += common.LIVE_CHART_SECONDS + 1
    second = common._job_figures(job)
    assert second is not first and len(second[0].data[0].x) == 2
    run.loss_history.append({"step": 3, "loss_g": 0.8})
    run.metrics.append({"epoch": 0, "top1": 80.0, "best_top1": 80.0})
    third = common._job_figures(job)  # a new epoch: at once
    assert third is not second and list(third[1].data[0].y) == [80.0]
    job.status = run.status = "finished"
    assert common._job_figures(job) is not third  # the end: the full record
    assert common._job_figures(job) is common._job_figures(job)


def test_sweep_forms_say_where_the_runs_train(empty_home, monkeypatch, tmp_path):
    """Bit widths and Compare say whether a sweep trains here or on Ray, and a Ray sweep starts from them."""
    at = open_page("pages/5_Bit_widths.py")
    assert any("Runs here, one after another" in c.value for c in at.caption)
    monkeypatch.setenv("QIMERA_RAY_ADDRESS", "local")
    monkeypatch.setenv("QIMERA_RAY_RUNS_DIR", str(tmp_path / "shared-store"))
    reg = fresh_registry()
    assert reg.ray_address == "local" and str(reg.ray_runs_dir) == str(tmp_path / "shared-store")
    started = []
    monkeypatch.setattr(jobs_module.JobRegistry, "_do_ray_sweep",
                        lambda self, job_id, configs, folders, stop: started.append(folders))
    for page, form in (("pages/5_Bit_widths.py", "sweep-form-Start sweep"),
                       ("pages/6_Compare.py", "compare-form-Start the comparison")):
        at = open_page(page)
        assert any("Ray tasks on a local Ray instance" in c.value and "shared-store" in c.value for c in at.caption)
        at.button(key=f"FormSubmitter:{form}").click().run()
        assert not at.exception and not at.error
    wait_idle(reg)
    assert len(started) == 2 and all(Path(f).parent == tmp_path / "shared-store" for f in started[0])
    assert len(set(started[1])) == len(started[1])


def test_a_sweeps_run_list_tells_variants_apart():
    """The sweep panel's run list names each run as the charts do: Qimera with and without superposition differ."""
    from qimera_engine import preset
    from qimera_engine.ui import common
    with_mix, without = (common._method_label(preset("digits", superpose_p=p).to_dict()) for p in (0.4, 0.0))
    assert with_mix != without and without.endswith("p=0")
    assert common._method_label({"method": "gdfq", "no_such_setting": 1}) == "gdfq"  # an older config: its method
