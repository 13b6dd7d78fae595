"""The shipped CIFAR-10 showcase: read-only runs whose paths are relative to their folder, shown by
every page from an empty $QIMERA_HOME, offline."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import SHOWCASE
from qimera_engine.ui import logic, paths
from qimera_engine import RunLocked, ShippedRun, delete_run, load_student, load_teacher, open_run, preset, run_to_end
from qimera_engine.config import RunConfig

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
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        original = load_student(src)(x)
    shutil.rmtree(src)
    (dest / "shipped.json").write_text("{}")
    run = open_run(dest)  # the marker makes it a ShippedRun
    assert isinstance(run, ShippedRun) and run.read_only and run.config.checkpoint == str((tmp_path / "show" / "teacher.safetensors").resolve())
    student = load_student(run, load_teacher(run))
    with torch.no_grad():
        assert torch.equal(student(x), original)  # the moved run's student is the one it trained
    with pytest.raises(RunLocked, match="ships with the app"):
        delete_run(run)
    with pytest.raises(RunLocked, match="cannot be resumed"):
        run_to_end(None, resume=dest)
    from qimera_engine import ExportError, export
    with pytest.raises(ExportError, match="read-only: give a file"):
        export(run, "onnx")
    from qimera_engine.export import load_int
    rebuilt = load_int(export(run, "int", tmp_path / "x.safetensors"))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original)
    assert dest.exists() and not (dest / "run.lock").exists()  # nothing written


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    if page != "app.py":
        at.switch_page(page)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


@pytest.fixture
def showcase(tmp_path, monkeypatch):
    """An empty $QIMERA_HOME and the shipped showcase (part of the repository)."""
    assert (SHOWCASE / "runs").is_dir(), f"the shipped showcase is missing: {SHOWCASE} (assets/build_showcase.py)"
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QIMERA_SHOWCASE", str(SHOWCASE))
    from test_app_pages import fresh_registry
    yield fresh_registry()


def test_the_showcase_is_small_and_complete():
    files = [p for p in SHOWCASE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    assert (SHOWCASE / "teacher" / "LICENSE-resnet20.txt").read_text().startswith("The ResNet-20 weights")
    runs = {p.name: p for p in (SHOWCASE / "runs").iterdir()}
    configs = {name: json.loads((p / "config.json").read_text()) for name, p in runs.items()}
    # Qimera+ as its preset has it (no superposed batches), the same recipe with them, GDFQ+
    assert {name: (c["method"], c["superpose_p"]) for name, c in configs.items()} == {
        "cifar10-resnet20-qimera-w4a4": ("qimera", 0.0), "cifar10-resnet20-qimera-superposed-w4a4": ("qimera", 0.4),
        "cifar10-resnet20-gdfq-w4a4": ("gdfq", 0.0)}  # (a run's config is saved resolved: GDFQ never superposes)
    budgets = {(c["epochs"], c["iters_per_epoch"], c["batch_size"], c["wbits"], c["abits"]) for c in configs.values()}
    assert len(budgets) == 1  # the same budget and bit widths: a fair comparison
    preset_switches = {k: v for k, v in preset("cifar10-resnet20-fast").to_dict().items()
                       if k not in ("checkpoint", "test_data")}
    # read as the engine reads it: a field added after the run was made has its default, the old behaviour
    shipped = RunConfig.from_dict(configs["cifar10-resnet20-qimera-w4a4"]).to_dict()
    assert {k: shipped[k] for k in preset_switches} == preset_switches
    for p in runs.values():
        assert not (p / "state.pt").exists() and not (p / "run.lock").exists()
        assert json.loads((p / "status.json").read_text())["status"] == "finished"
        for f in p.glob("*.json"):  # nothing of the machine it was built on: relative paths only
            text = f.read_text()
            assert '"/' not in text and ":/" not in text, (f.name, text[:300])


def test_the_shipped_curves_are_of_the_shipped_teacher_and_named_data(monkeypatch):
    """assets/build_curves.py's rows: the showcase's teacher and test split, W = A, nothing of a machine."""
    monkeypatch.syspath_prepend(str(ROOT / "assets"))
    import build_curves
    curves = SHOWCASE / "bit_widths.csv"
    if not curves.is_file():
        pytest.skip("no precomputed curves shipped yet (assets/build_curves.py)")
    table = logic.shipped_curves(curves)
    shipped = json.loads((SHOWCASE / "runs" / "cifar10-resnet20-qimera-w4a4" / "summary.json").read_text())
    assert set(table["teacher"]) == {"resnet20"} and set(table["data"]) == {shipped["test_data"]}
    assert (table["W"] == table["A"]).all() and (table["bits"] == table["W"]).all() and table["W"].between(2, 8).all()
    assert set(table["fp_top1"].round(2)) == {round(shipped["fp_top1"], 2)}  # the same teacher on the same images
    assert not table["run"].duplicated().any() and table["top1"].between(0, 100).all()
    assert build_curves.merge(table, table.iloc[:1]).equals(build_curves.merge(table, table.iloc[:0]))


def test_build_curves_names_data_and_replaces_rows_of_the_same_run(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "assets"))
    import build_curves
    assert build_curves.named("folder:/somewhere/cifar10-dev") == "folder:cifar10-dev"
    assert build_curves.named("cifar10") == "cifar10"
    cols = logic.BITWIDTH_COLUMNS
    old = pd.DataFrame([dict.fromkeys(cols, 1) | {"run": "a", "method": "ptq+", "top1": 10.0},
                        dict.fromkeys(cols, 1) | {"run": "b", "method": "ptq+", "top1": 20.0}])
    new = pd.DataFrame([dict.fromkeys(cols, 1) | {"run": "b", "method": "ptq+", "top1": 30.0}])
    merged = build_curves.merge(old, new)
    assert list(merged["run"]) == ["a", "b"] and list(merged["top1"]) == [10.0, 30.0] and list(merged.columns) == cols
    # --drop: a replaced recipe's rows go (and a run id with no row is refused rather than passed over)
    assert list(build_curves.merge(old, new.iloc[:0], drop=["a"])["run"]) == ["b"]
    again = build_curves.merge(old, new, drop=["a", "b"])  # b's old row goes, its new row comes in
    assert list(again["run"]) == ["b"] and list(again["top1"]) == [30.0]
    with pytest.raises(SystemExit, match="no rows to drop for run.s. zz"):
        build_curves.merge(old, new, drop=["zz"])
    # the command line: --drop alone rewrites the file without those rows (comma-separated or repeated)
    out = tmp_path / "curves.csv"
    shutil.copy(SHOWCASE / "bit_widths.csv", out)
    before = logic.shipped_curves(out)
    gone = list(before["run"][:3])
    build_curves.main(["--drop", ",".join(gone[:2]), "--drop", gone[2], "--out", str(out)])
    after = logic.shipped_curves(out)
    assert len(after) == len(before) - 3 and not after["run"].isin(gone).any()
    with pytest.raises(SystemExit):  # nothing to add or drop
        build_curves.main(["--out", str(out)])
    # a shipped run (here a copy of one, as a table's skipped cell) is listed by Bit widths already: no row
    assert build_curves.rows_of([SHOWCASE / "runs" / "cifar10-resnet20-qimera-w4a4"], "any").empty


def test_home_shows_cifar10_at_once(showcase):
    at = open_page("app.py")
    assert any(h.value == "CIFAR-10, ready to look at" for h in at.header)
    assert len(at.get("image")) == 2 and not at.exception  # the generated images, and real ones of their classes
    assert any("shipped" in c.value.lower() for c in at.caption)
    assert at.get("image")[1].proto.imgs[0].caption.startswith("Real CIFAR-10 test images: four cats, four dogs")
    # the samples come from the generator whose superposed samples cover most (the preset's, trained on plain
    # batches: its runs' diversity figures say so); the run trained on superposed batches is named beside it
    assert "trained on plain batches only" in at.get("image")[0].proto.imgs[0].caption
    # the eight seeds are different pictures, not the details of one (their 4 x 4 block means at least
    # logic.SAME_LAYOUT_SPREAD apart): what the preset's layout mode seeking is for
    assert "Each seed gives its own image" in at.get("image")[0].proto.imgs[0].caption
    superposed = json.loads((SHOWCASE / "runs" / "cifar10-resnet20-qimera-superposed-w4a4" / "summary.json").read_text())
    assert any(f"**with** superposed batches (p = 0.4) scores {superposed['quant_top1']:.2f}%" in m.value for m in at.markdown)
    assert any("of the real test images (coverage" in m.value for m in at.markdown)  # the diversity line, real vs real beside it
    curves = logic.shipped_curves(SHOWCASE / "bit_widths.csv")
    if (curves["bits"] == 4).sum() >= 2:  # and the seeds at W4A4 of the shipped runs and the precomputed curves
        line = next(m.value for m in at.markdown if m.value.startswith("Over several seeds at W4A4"))
        table = logic.bitwidth_table(paths.shipped_runs(), SHOWCASE / "bit_widths.csv")
        shipped = logic.budget(open_run(SHOWCASE / "runs" / "cifar10-resnet20-qimera-w4a4").config)
        def seeds(rows):  # Qimera+ at W4A4 and the shipped runs' budget (rows of other budgets are never pooled)
            return len(rows[(rows["method"] == "qimera+ p=0") & (rows["bits"] == 4) & (rows["budget"] == shipped)])
        n = seeds(table)  # the shipped run counts as a seed
        assert n == 1 + seeds(curves) and f"(n = {n})" in line


def test_the_curves_line_gives_each_method_its_seeds():
    cols = logic.BITWIDTH_COLUMNS
    rows = pd.DataFrame([dict.fromkeys(cols, 0) | {"method": m, "bits": b, "teacher": "t", "top1": v}
                         for m, b, v in [("a", 4, 70.0), ("a", 4, 72.0), ("b", 4, 75.0), ("a", 2, 10.0), ("b", 2, 11.0)]])
    rows.loc[len(rows)] = dict.fromkeys(cols, 0) | {"method": "a", "bits": 4, "teacher": "t", "top1": 99.0, "budget": 5}
    rows.loc[len(rows)] = dict.fromkeys(cols, 0) | {"method": "ptq+", "bits": 4, "teacher": "t", "top1": 60.0, "budget": 7}
    rows.loc[len(rows)] = dict.fromkeys(cols, 0) | {"method": "ptq+", "bits": 4, "teacher": "t", "top1": 62.0, "budget": 8}
    assert logic.curves_line(rows, 4, "t", 0).endswith("a **71.00** ± 1.41 (n = 2), ptq+ **61.00** ± 1.41 (n = 2). "
                                                       "Bit widths shows every bit width.")  # PTQ of any budget
    rows = rows[:-1]
    assert logic.curves_line(rows, 4, "t", 0) == (  # not the other budget's run of "a"
        "Over several seeds at W4A4 (the shipped and precomputed runs: same teacher and test images; ± is the std "
        "over seeds): a **71.00** ± 1.41 (n = 2). Bit widths shows every bit width.")  # b and ptq+: one seed
    assert logic.curves_line(rows, 2, "t", 0) is None and logic.curves_line(rows, 4, "other", 0) is None


def test_boundary_samples_shows_the_shipped_pair(showcase):
    at = open_page("pages/3_Boundary_samples.py")
    assert "qimera-superposed" in at.selectbox(key="b_run").value  # a generator trained on mixes
    assert "cifar10-resnet20-gdfq-w4a4" in at.selectbox(key="b-partner").value  # the comparable GDFQ run
    assert len(at.get("image")) == 1  # the grid (the path images are inside the two path charts)
    assert sum("data:image\\u002fpng;base64" in c.proto.spec for c in at.get("plotly_chart")) == 2
    assert not at.warning
    assert "(Qimera: superposed embeddings)" in [h.value for h in at.subheader][0]
    at.selectbox(key="b_run").set_value("cifar10-resnet20-qimera-w4a4").run()  # the preset's run: no mixes in training
    assert not at.exception and "plain batches only" in at.subheader[0].value


def test_feature_space_and_bit_widths_show_the_showcase(showcase):
    at = open_page("pages/4_Feature_space.py")
    deadline = time.time() + 120
    while not at.get("plotly_chart") and time.time() < deadline:
        time.sleep(0.5)
        at.run()
    assert at.get("plotly_chart"), "no projection"
    at = open_page("pages/5_Bit_widths.py")
    curves = logic.shipped_curves(SHOWCASE / "bit_widths.csv")
    if len(curves):  # the precomputed curves: Bit widths opens on the budget with the most fine-tuned rows
        table = at.dataframe[0].value
        own = table[~table["method"].map(logic.from_other_budget)]
        assert own["budget"].nunique() == 1 and table["bits"].nunique() >= 3
        assert any("precomputed" in c.value for c in at.caption)
        shown = open_run(SHOWCASE / "runs" / "cifar10-resnet20-qimera-w4a4")
        if not curves["method"].map(logic.no_fine_tuning).all():  # fine-tuned curves: it opens on the budget
            rows = logic.bitwidth_table(paths.shipped_runs(), SHOWCASE / "bit_widths.csv")  # with the most of them
            tuned = rows.loc[~rows["method"].map(logic.no_fine_tuning), "budget"].value_counts()
            assert set(own["budget"]) == {tuned.idxmax()}
        at.selectbox(key="w_budget").set_value(logic.budget(shown.config)).run()
    table = at.dataframe[0].value
    own = table[~table["method"].map(logic.from_other_budget)]
    assert {"qimera+ p=0", "qimera+", "gdfq+"} <= set(table["method"]) and own["budget"].nunique() == 1
    assert set(table.loc[table["run"].str.startswith("cifar10-resnet20-"), "W"]) == {4}
    if (curves["method"] == "ptq+").any():  # PTQ, calibrated only, stands beside the fine-tuned runs' budget
        assert "ptq+ (no fine-tuning, 12,800 images)" in set(table["method"])
        assert any("baseline without fine-tuning" in c.value for c in at.caption)


def test_shipped_runs_are_read_only_in_the_app(showcase, tmp_path):
    at = open_page("pages/2_Quantize.py")
    table = at.dataframe[0].value
    assert set(table["status"]) == {"shipped"}
    assert not [e for e in at.expander if e.label == "Delete a run"]  # nothing of the user's to delete
    at.radio(key="q-export-format").set_value("int").run()
    at.button(key="q-export-go").click().run()
    assert not at.exception and not at.error
    exported = list((tmp_path / "home" / "exports").rglob("student-int.safetensors"))
    assert len(exported) == 1
    at.button(key="q-export-go").click().run()  # again: the app's own export file is replaced
    assert not at.exception and not at.error
    assert list((tmp_path / "home" / "exports").rglob("student-int.safetensors")) == exported
    assert not list(SHOWCASE.rglob("student-int.safetensors")) and not list(SHOWCASE.rglob("run.lock"))


def test_the_guided_tour_walks_the_shipped_run_in_seven_steps(showcase):
    from qimera_engine.ui.logic import TOUR_STEPS
    at = open_page("pages/7_Guided_tour.py")
    assert at.button(key="tour_back").disabled
    seen = []
    for i, name in enumerate(TOUR_STEPS):
        assert at.header[0].value == f"{i + 1}. {name}" and not at.exception and not at.error
        seen.append((len(at.get("image")), len(at.get("plotly_chart"))))
        if i < len(TOUR_STEPS) - 1:
            at.button(key="tour_next").click().run()
    assert at.button(key="tour_next").disabled
    # images on the first four screens (real, generated, both side by side, the mixes), the path and the
    # student's curve as charts, the numbers as a table
    assert [s[0] > 0 for s in seen[:4]] == [True] * 4 and seen[4][1] == 1 and seen[5][1] == 1
    table = at.dataframe[0].value
    assert set(table["method"]) == {"qimera+ p=0", "qimera+", "gdfq+"}
    assert "one seed: cannot tell (run more seeds)" in set(table["verdict"])
    if (logic.shipped_curves(SHOWCASE / "bit_widths.csv")["bits"] == 4).any():  # and the several-seed figures
        assert any("Over several seeds at W4A4" in m.value and "qimera+ p=0 **" in m.value for m in at.markdown)
    at.button(key="tour_back").click().run()
    assert at.header[0].value == f"6. {TOUR_STEPS[5]}"


def test_build_showcase_replaces_one_run_and_keeps_the_rest(tmp_path, monkeypatch):
    """assets/build_showcase.py with one run named: that run is copied in again (paths made relative, the
    shipped provenance written), the teacher, the sample and the other runs stay byte for byte; a showcase of
    another teacher, or --data without all three runs, is refused before anything is removed, and a run of the
    wrong kind is refused with the shipped one kept as it was."""
    monkeypatch.syspath_prepend(str(ROOT / "assets"))
    import build_showcase
    out = tmp_path / "showcase"
    shutil.copytree(SHOWCASE, out, ignore=shutil.ignore_patterns("cifar10-sample"))
    monkeypatch.setattr(build_showcase, "OUT", out)
    src = tmp_path / "src" / "a-new-run"
    shutil.copytree(SHOWCASE / "runs" / "cifar10-resnet20-qimera-w4a4", src)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    teacher = str(SHOWCASE / "teacher" / "resnet20-cifar10.safetensors")
    monkeypatch.setattr(sys, "argv", ["build_showcase.py", "--qimera", str(src), "--checkpoint", teacher])
    build_showcase.main()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    changed = {str(k) for k in after if after[k] != before[k]}
    assert changed == {"runs/cifar10-resnet20-qimera-w4a4/shipped.json"}  # same files, new provenance
    assert json.loads(after[Path("runs/cifar10-resnet20-qimera-w4a4/shipped.json")])["from"] == "a-new-run"
    monkeypatch.setattr(sys, "argv", ["build_showcase.py", "--qimera", str(src), "--checkpoint", teacher,
                                      "--data", str(tmp_path)])
    with pytest.raises(SystemExit):
        build_showcase.main()
    superposed = str(SHOWCASE / "runs" / "cifar10-resnet20-qimera-superposed-w4a4")  # the wrong kind of run
    monkeypatch.setattr(sys, "argv", ["build_showcase.py", "--qimera", superposed, "--checkpoint", teacher])
    with pytest.raises(SystemExit, match="needs a run without them"):
        build_showcase.main()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == after  # nothing lost
    monkeypatch.setattr(build_showcase, "OUT", tmp_path / "empty")
    monkeypatch.setattr(sys, "argv", ["build_showcase.py", "--qimera", str(src), "--checkpoint", teacher])
    with pytest.raises(SystemExit, match="no showcase of this teacher"):
        build_showcase.main()
    assert (out / "runs" / "cifar10-resnet20-qimera-w4a4" / "config.json").is_file()
