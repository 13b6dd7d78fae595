"""The Compare page: methods side by side over seeds, with per-seed paired differences."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from qimera_engine import jobs as jobs_module
from qimera_engine import preset
from qimera_engine.ui import figures, logic

ROOT = Path(__file__).resolve().parents[1]


def fake_run(rid, top1, seed, bits=2, **settings):
    cfg = preset("digits", seed=seed, wbits=bits, abits=bits, **settings)
    summary = {"quant_top1": top1, "wbits": bits, "abits": bits, "seed": seed}
    return SimpleNamespace(id=rid, config=cfg, summary=summary, status={"status": "finished"})


def test_parse_variants():
    text = "# mine\nmapping on: method=qimera, dm=true\n\nlate: milestones=3,5, superpose_p=0.2\n"
    assert logic.parse_variants(text) == {"mapping on": {"method": "qimera", "dm": "true"},
                                          "late": {"milestones": "3,5", "superpose_p": "0.2"}}
    for bad, words in [("no colon here", "name: key=value"), ("x: dm", "not key=value"), ("x: colour=red", "unknown"),
                       ("x: seed=3", "chosen for every run"), ("x:", "at least one"),
                       ("GDFQ: method=gdfq", "taken"), ("a: dm=true\na: dm=false", "taken")]:
        with pytest.raises(ValueError, match=words):
            logic.parse_variants(bad)


def test_comparison_pairs_seeds_and_gives_honest_verdicts():
    runs = [fake_run(f"p0-{s}", 90.0 + s, s, superpose_p=0.0) for s in range(3)]
    runs += [fake_run(f"q-{s}", 92.0 + s + 0.1 * s, s, superpose_p=0.4) for s in range(3)]   # +2.0, +2.1, +2.2
    runs += [fake_run(f"g-{s}", 90.0 + s + d, s, method="gdfq") for s, d in zip(range(3), (1.0, -1.0, 0.5))]
    runs += [fake_run("q-w3", 80.0, 0, bits=3, superpose_p=0.4)]  # alone at W3A3: no reference there
    unfinished = fake_run("x", 10.0, 0)
    unfinished.status = {"status": "cancelled"}
    summary, pairs = logic.comparison(runs + [unfinished], "qimera p=0")
    row = {(r["method"], r["W"]): r for r in summary.to_dict("records")}
    assert set(row) == {("qimera p=0", 2), ("qimera", 2), ("gdfq", 2), ("qimera", 3)}
    assert row[("qimera", 2)]["n"] == 3 and row[("qimera", 2)]["top-1 mean"] == pytest.approx(93.1)
    assert row[("qimera", 2)]["difference mean"] == pytest.approx(2.1) and row[("qimera", 2)]["wins"] == 3
    assert row[("qimera", 2)]["verdict"].startswith("better than the reference")
    assert row[("gdfq", 2)]["verdict"].startswith("cannot tell apart (3 seeds")
    assert (row[("gdfq", 2)]["wins"], row[("gdfq", 2)]["losses"]) == (2, 1)
    assert row[("qimera p=0", 2)]["verdict"] == "the reference" and pd.isna(row[("qimera p=0", 2)]["pairs"])
    assert {str(summary[c].dtype) for c in ("n", "pairs", "wins", "losses")} == {"Int64"}  # counts, not 2.0
    shown = logic.comparison_display(summary).set_index(["method", "bits"])
    assert shown.loc[("qimera p=0", "W2A2"), "difference to the reference"] == ""  # blank, never "None" or "nan"
    assert shown.loc[("qimera p=0", "W2A2"), "wins / losses"] == ""
    assert shown.loc[("gdfq", "W2A2"), "wins / losses"] == "2 / 1"
    assert shown.loc[("qimera", "W3A3"), "difference to the reference"] == ""  # no pair at W3A3
    assert row[("qimera", 3)]["verdict"] == "no seed in common with the reference"
    assert sorted(pairs[pairs["method"] == "qimera"]["difference"].round(6)) == [2.0, 2.1, 2.2]
    one = logic.paired_difference(np.array([0.5]))
    assert one["verdict"].startswith("one seed: cannot tell") and one["pairs"] == 1
    fig = figures.paired_figure(pairs, "qimera p=0")
    assert {t.y[0] for t in fig.data} == {"qimera W2A2", "gdfq W2A2"}


def test_settings_that_differ_are_never_averaged_together():
    runs = [fake_run("a", 90.0, 0), fake_run("b", 80.0, 1), fake_run("c", 70.0, 0, dm=True)]
    summary, _ = logic.comparison(runs, "qimera")
    assert sorted(summary["method"]) == ["qimera", "qimera (dm=True)"]
    assert summary.set_index("method").loc["qimera", "n"] == 2


def open_compare(session_state=None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/6_Compare.py")
    for k, v in (session_state or {}).items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def test_the_launcher_starts_the_methods_on_one_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    started = []
    monkeypatch.setattr(jobs_module.JobRegistry, "start_sweep",
                        lambda self, base, bits, methods, seeds, label=None: started.append(
                            (base, bits, methods, list(seeds), label)) or "job")
    at = open_compare()
    assert any("No finished runs yet" in m.value for m in at.info)
    assert at.multiselect(key="c_digits_bits").value == [2]  # digits: W2A2, where the methods differ
    at.text_area(key="c_digits_variants").input("mapping on: method=qimera, dm=true")  # sent with the form
    at.button(key="FormSubmitter:compare-form-Start the comparison").click().run()
    assert not at.exception and not at.error
    (base, bits, methods, seeds, label), = started
    assert bits == [2] and seeds == [0, 1, 2] and label.startswith("comparison: ")
    assert methods == [*logic.COMPARE_METHODS.values(), {"method": "qimera", "dm": "true"}]
    assert (base.epochs, base.iters_per_epoch) == (preset("digits").epochs, preset("digits").iters_per_epoch)
    configs = jobs_module.sweep_configs(base, bits, methods, seeds)
    assert len(set(logic.distinct_labels(configs))) == 5  # p = 0.4, p = 0, GDFQ, PTQ and the variant: never one label
    at.text_area(key="c_digits_variants").input("oops: seed=1")
    at.button(key="FormSubmitter:compare-form-Start the comparison").click().run()
    assert any("chosen for every run" in e.value for e in at.error) and len(started) == 1


def test_the_launcher_uses_the_shipped_resnet20_and_the_shipped_runs_show_paired_differences(tmp_path, monkeypatch):
    """On the Teacher page's shipped ResNet-20: the comparison starts at the fast preset's budget, W4A4, and the
    shipped CIFAR-10 runs (Qimera+ with and without superposition, GDFQ+) already show their paired difference."""
    from qimera_engine.ui import paths
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    monkeypatch.setenv("QIMERA_SHOWCASE", str(ROOT / "assets" / "showcase"))
    checkpoint, data = paths.shipped_teacher()
    started = []
    monkeypatch.setattr(jobs_module.JobRegistry, "start_sweep",
                        lambda self, base, bits, methods, seeds, label=None: started.append((base, bits, methods)) or "j")
    at = open_compare({"teacher_choice": dict(teacher="resnet20", test_data=data, checkpoint=checkpoint,
                                              pretrained=False, download=False)})
    preset_name = at.selectbox(key="c_preset").value
    assert preset_name.startswith("cifar10-resnet20")
    assert at.multiselect(key=f"c_{preset_name}_bits").value == [4]
    at.button(key="FormSubmitter:compare-form-Start the comparison").click().run()
    assert not at.exception and not at.error
    (base, bits, methods), = started
    assert (base.teacher, base.checkpoint, base.test_data, bits) == ("resnet20", checkpoint, data, [4])
    assert [m.get("superpose_p") for m in methods] == [0.4, 0.0, None]
    table = at.table[0].value  # a static table: every cell is read whole
    assert len(table) >= 3 and (table["n"] >= 1).all() and set(table["bits"]) == {"W4A4"}
    assert "one seed: cannot tell (run more seeds)" in set(table["verdict"])  # the shipped runs: one seed each
    assert "qimera+ p=0" in set(table.index)


def test_results_open_on_the_newest_runs_not_the_showcase(tmp_path, monkeypatch):
    """A comparison just run is what Results shows first, though the shipped runs are there too (and sort first),
    and so are more runs of another budget with the same teacher."""
    import os
    from qimera_engine.runs import create_run, write_json
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path))
    monkeypatch.setenv("QIMERA_SHOWCASE", str(ROOT / "assets" / "showcase"))
    at = open_compare({})  # opened before the runs exist: on the showcase's runs
    assert at.selectbox(key="c_group").value[0] == "resnet20"
    made = [("qimera", 5, s) for s in range(3)] + [("qimera", 3, 0), ("gdfq", 3, 0)]  # the last two: the newest
    for when, (method, iters, seed) in enumerate(made):  # a teacher whose name sorts after the showcase's resnet20
        cfg = preset("cifar100-resnet20", method=method, seed=seed, epochs=2, iters_per_epoch=iters, warmup_epochs=1,
                     calib_epochs=1)
        run = create_run(cfg.to_dict(), method, 4, 4)
        write_json(run.path / "summary.json", {"quant_top1": 60.0, "wbits": 4, "abits": 4, "seed": seed,
                                               "teacher": cfg.teacher, "test_data": cfg.test_data})
        run.set_status("finished")
        os.utime(run.path / "config.json", (2e9 + when, 2e9 + when))
    at.run()  # the same page, drawn again once the comparison's runs have finished
    assert not at.exception
    assert at.selectbox(key="c_group").value == ("resnet20_cifar100", "cifar100")
    assert at.selectbox(key="c_budget").value == 2 * 3 * cfg.batch_size
    assert set(at.table[0].value.index) == {"qimera", "gdfq"}
    at.selectbox(key="c_budget").select(2 * 5 * cfg.batch_size).run()  # a choice made since is kept
    assert at.selectbox(key="c_budget").value == 2 * 5 * cfg.batch_size and at.table[0].value["n"].max() == 3
