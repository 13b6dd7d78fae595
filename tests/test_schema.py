"""One declaration per setting: it drives validation, the command line's help and the app's widgets.

Bad values are refused (never rounded or coerced) with one clear line, before any run folder exists:
every numeric field's lower and upper end is tried on the command line (``cli.main``, as
``python -m qimera_engine`` runs it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from qimera_engine import cli
from qimera_engine.config import (FIELDS, SECTIONS, ZOO_TEACHERS, ConfigError, RunConfig, parse_overrides, preset,
                                  read_value)
from qimera_engine.ui import logic

NUMBERS = (int, float)


def numeric(spec) -> bool:
    return (spec.item or spec.type) in NUMBERS and not spec.choices


# --------------------------------------------------------------------------- the declaration


def test_every_field_is_declared_with_help_and_a_finite_range():
    assert list(FIELDS) == [f.name for f in dataclasses.fields(RunConfig)]
    for name, spec in FIELDS.items():
        assert spec.help.strip(), name
        assert spec.type in (int, float, bool, str, list), name
        if numeric(spec):  # a finite upper end on every number: nothing overflows inside torch
            lo, hi = spec.bounds()
            assert math.isfinite(lo) and math.isfinite(hi) and lo < hi, name
        if spec.section:
            assert spec.section in SECTIONS and spec.label, name


def test_the_apps_widgets_are_the_declarations():
    by_name = {s.name: s for s in logic.SETTINGS}
    assert set(by_name) == {n for n, s in FIELDS.items() if s.section}
    assert len(by_name) == len(logic.SETTINGS)
    for name, s in by_name.items():
        spec = FIELDS[name]
        assert (s.label, s.help, s.section, s.options) == (spec.label, spec.help, spec.section, tuple(spec.choices))
        if s.kind in ("int", "float", "floatlog"):
            lo, hi = spec.bounds()
            if s.kind == "int":  # a browser's number field holds integers up to 2**53 - 1 exactly
                lo, hi = max(lo, -(2**53 - 1)), min(hi, 2**53 - 1)
            assert (s.lo, s.hi) == (lo, hi), name
            assert isinstance(s.lo, int) == isinstance(s.hi, int) == (s.kind == "int"), name
        else:
            assert (s.lo, s.hi) == (None, None) and s.kind == ("select" if spec.choices else "bool"), name
    assert by_name["seed"].hi == 2**53 - 1 and by_name["epochs"].hi == 100000 and by_name["lr_s"].hi == 10
    assert by_name["wbits"].options == (2, 3, 4, 5, 6, 7, 8, 32) and by_name["lr_g"].kind == "floatlog"
    assert list(logic.settings_by_section()) == list(SECTIONS)


def test_validation_is_generated_from_the_declaration(monkeypatch):
    assert preset("digits", epochs=50).epochs == 50
    monkeypatch.setitem(FIELDS, "epochs", dataclasses.replace(FIELDS["epochs"], range="[1, 40]"))
    with pytest.raises(ConfigError, match=r"epochs must be an integer >= 1 and <= 40 \(.*\), got 50"):
        preset("digits", epochs=50)
    monkeypatch.setitem(FIELDS, "method", dataclasses.replace(FIELDS["method"], choices=("gdfq",)))
    with pytest.raises(ConfigError, match=r"method must be one of \('gdfq',\), got 'qimera'"):
        preset("digits", epochs=20)


def test_a_wrong_type_given_directly_is_refused():
    for bad, words in [(dict(epochs=True), "epochs must be an integer"), (dict(epochs=2.0), "epochs must be"),
                       (dict(dm=1), "dm must be true or false, got 1"), (dict(lr_s="0.1"), "lr_s must be"),
                       (dict(milestones=(3, 5)), "milestones must be"), (dict(method=3), "method must be one of"),
                       (dict(teacher=None), "teacher cannot be empty")]:
        with pytest.raises(ConfigError, match=words):
            RunConfig(**bad)
    assert RunConfig(lr_s=1).lr_s == 1  # an int is a number


# --------------------------------------------------------------------------- refused, not rounded


@pytest.mark.parametrize("name,value,expected", [
    ("epochs", 2.0, 2), ("epochs", "2", 2), ("epochs", "2.0", 2), ("epochs", "1e3", 1000),
    ("dm", 1, True), ("dm", 0, False), ("dm", "off", False), ("dm", True, True),
    ("lr_s", 1, 1.0), ("lr_s", "1e-3", 1e-3), ("milestones", "3,5", [3, 5]), ("milestones", "[3, 5.0]", [3, 5]),
    ("milestones", "", []), ("fixed_coeffs", "0.25, 0.75", [0.25, 0.75]), ("fixed_coeffs", "none", None),
    ("g_betas", [0.5, 0.9], [0.5, 0.9]), ("num_threads", None, None), ("checkpoint", "", None)])
def test_values_are_read_exactly(name, value, expected):
    got = read_value(name, value)
    assert got == expected and type(got) is type(expected)
    if isinstance(got, list):
        assert all(type(x) is type(y) for x, y in zip(got, expected))


@pytest.mark.parametrize("name,value,words", [
    ("milestones", [2.5], "milestones: cannot read [2.5] as a list of int"),
    ("milestones", "2.5", "milestones: cannot read '2.5' as a list of int"),
    ("milestones", "[2.5]", "milestones: cannot read [2.5] as a list of int"),
    ("milestones", [True], "cannot read [True] as a list of int"),
    ("milestones", 3, "milestones: cannot read 3 as a list of int"),
    ("epochs", 2.5, "epochs: cannot read 2.5 as int"), ("epochs", "2.5", "epochs: cannot read '2.5' as int"),
    ("epochs", True, "epochs: cannot read True as int"), ("epochs", 1e20, "epochs: cannot read 1e+20 as int"),
    ("dm", 2, "dm: cannot read 2 as bool"), ("dm", 1.0, "dm: cannot read 1.0 as bool"),
    ("dm", "2", "dm: cannot read '2' as bool"), ("lr_s", True, "lr_s: cannot read True as float"),
    ("lr_s", 10**400, "lr_s: cannot read"), ("method", 3, "method: cannot read 3 as str"),
    ("g_betas", "[0.5", "g_betas: cannot read"), ("g_betas", '{"a": 1}', "g_betas: cannot read")])
def test_values_are_refused_not_coerced(name, value, words):
    with pytest.raises(ConfigError) as e:
        read_value(name, value)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_config_holds_exactly_what_was_given():
    given = {"milestones": [3, 5], "lr_s": 0.001, "epochs": 6, "dm": True, "fixed_coeffs": None}
    cfg = RunConfig.from_dict({**preset("digits").to_dict(), **given})
    assert {k: cfg.to_dict()[k] for k in given} == given
    assert json.loads(cfg.to_json())["milestones"] == [3, 5]
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="a config is a mapping of settings, got list"):
        RunConfig.from_dict([1, 2])


def test_a_set_key_may_appear_once():
    with pytest.raises(ConfigError, match=r"--set epochs is given twice \('2' and '3'\)"):
        parse_overrides(["epochs=2", "epochs=3"])
    with pytest.raises(ConfigError, match="--set iters_per_epoch is given twice"):
        parse_overrides(["iters-per-epoch=2", "iters_per_epoch=2"])
    assert parse_overrides(["epochs=2", "iters-per-epoch=3"]) == {"epochs": "2", "iters_per_epoch": "3"}


def test_pretrained_needs_a_teacher_with_zoo_weights(monkeypatch):
    with pytest.raises(ConfigError, match="pretrained=true, but teacher 'digits-cnn' has no zoo weights"):
        preset("digits", pretrained=True)
    with pytest.raises(ConfigError, match="teacher 'resnet20' has no zoo weights"):
        preset("cifar10-resnet20", pretrained=True)
    assert preset("imagenet-resnet18").pretrained and preset("cifar10-resnet20", teacher="resnet20_cifar10",
                                                             pretrained=True).pretrained
    # ZOO_TEACHERS is exactly the teachers whose builder asks the zoo for weights
    import torch.nn as nn

    from qimera_engine import models
    asked = set()

    def fake(name, *args, pretrained=False):
        if pretrained:
            asked.add(name)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    monkeypatch.setattr(models, "_torchvision", lambda name, c, pretrained=False: fake(name, pretrained=pretrained))
    monkeypatch.setattr(models, "_pytorchcv", lambda name, pretrained=False: fake(name, pretrained=pretrained))
    for name in models.TEACHERS:
        models.build_teacher(name, pretrained=True)
    assert asked == set(ZOO_TEACHERS)


# --------------------------------------------------------------------------- the command line's help


def test_the_settings_command_lists_every_field(capsys):
    assert cli.main(["settings", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(FIELDS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["epochs"]["accepts"] == "an integer >= 1 and <= 100000" and by_name["epochs"]["default"] == "400"
    assert by_name["momentum"]["accepts"] == "in [0, 1)" and by_name["milestones"]["default"] == "100,200,300"
    assert "a guard far above any real use" in by_name["lr_s"]["help"]
    assert by_name["wbits"]["app"] == "Method > Weight bits (W)" and by_name["checkpoint"]["type"] == "str | none"
    assert cli.main(["settings"]) == 0
    text = capsys.readouterr().out
    assert "epochs  (int; an integer >= 1 and <= 100000; default 400)" in text
    assert all(f"\n{name}  (" in text for name in FIELDS)
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    assert "qimera_engine settings lists them all" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- every bound, on the command line

# field: (a value below its lower end, one above its upper end, the message's words); an open end is
# tried at the end itself.
BOUNDS = {
    "seed": ("-1", str(2**63), "seed must be in [0, 2**63)"),
    "embed_dim": ("0", "65537", "embed_dim must be an integer >= 1 and <= 65536"),
    "noise_scale": ("-0.5", "1001", "noise_scale must be >= 0 and <= 1000"),
    "ms_weight": ("-0.5", "1e7", "ms_weight must be >= 0 and <= 1e6"),
    "bns_slack": ("-0.1", "100.5", "bns_slack must be >= 0 and <= 100"),
    "ce_g_margin": ("-0.1", "101", "ce_g_margin must be >= 0 and <= 100"),
    "bns_superposed": ("-0.1", "1.1", "bns_superposed must be in [0, 1]"),
    "ce_g_margin_superposed": ("-0.1", "101", "ce_g_margin_superposed must be >= 0 and <= 100"),
    "gen_epochs": ("-1", "100001", "gen_epochs must be an integer >= 0 and <= 100000"),
    "gen_average": ("-1", "100001", "gen_average must be an integer >= 0 and <= 100000"),
    "diversity_images": ("-1", "1000001", "diversity_images must be an integer >= 0 and <= 10**6"),
    "dm_width": ("0", "65537", "dm_width must be an integer >= 1 and <= 65536"),
    "superpose_p": ("-0.1", "1.01", "superpose_p must be in [0, 1]"),
    "superpose_ramp": ("-1", "100001", "superpose_ramp must be an integer >= 0 and <= 100000"),
    "superpose_start": ("-1", "100001", "superpose_start must be an integer >= 0 and <= 100000"),
    "superpose_k": ("0", "100001", "superpose_k must be an integer >= 1 and <= 100000"),
    "dirichlet_alpha": ("0", "1e7", "dirichlet_alpha must be > 0 and <= 1e6"),
    "fixed_coeffs": ("-0.5,1.5", "1.5,-0.5", "fixed_coeffs must be values in [0, 1]"),
    "gen_width": ("3", "65537", "gen_width must be an integer >= 4 and <= 65536"),
    "gen_bn_eps": ("0", "1001", "gen_bn_eps must be >= 1e-8 and <= 1000"),
    "bns_weight": ("-1", "1e7", "bns_weight must be >= 0 and <= 1e6"),
    "kd_alpha": ("-1", "inf", "kd_alpha must be >= 0 and <= 1e6"),
    "kd_tau": ("0.001", "1001", "kd_tau must be >= 0.01 and <= 1000"),
    "ce_weight": ("-0.1", "2e6", "ce_weight must be >= 0 and <= 1e6"),
    "epochs": ("0", "100001", "epochs must be an integer >= 1 and <= 100000"),
    "iters_per_epoch": ("0", "1000001", "iters_per_epoch must be an integer >= 1 and <= 10**6"),
    "batch_size": ("1", "65537", "batch_size must be an integer >= 2 and <= 65536"),
    "lr_g": ("0", "11", "lr_g must be > 0 and <= 10"),
    "g_betas": ("-0.1,0.9", "0.5,1", "g_betas must be two values in [0, 1)"),
    "lr_s": ("-1e-4", "1e30", "lr_s must be >= 0 and <= 10"),
    "momentum": ("-0.1", "1", "momentum must be in [0, 1)"),
    "weight_decay": ("-1e-4", "1", "weight_decay must be in [0, 1)"),
    "milestones": ("0,5", "5,100001", "milestones must be epochs >= 1 and <= 100000"),
    "lr_gamma": ("0", "11", "lr_gamma must be > 0 and <= 10"),
    "warmup_epochs": ("-1", "100001", "warmup_epochs must be an integer >= 0 and <= 100000"),
    "calib_epochs": ("-1", "100001", "calib_epochs must be an integer >= 0 and <= 100000"),
    "ema_beta": ("0", "1", "ema_beta must be in (0, 1)"),
    "eval_batch_size": ("0", "65537", "eval_batch_size must be an integer >= 1 and <= 65536"),
    "eval_images": ("-1", "100000001", "eval_images must be an integer >= 0 and <= 10**8"),
    "lowpass_d0": ("-1", "1000.5", "lowpass_d0 must be >= 0 and <= 1000"),
    "student_steps": ("0", "1001", "student_steps must be an integer >= 1 and <= 1000"),
    "act_lr": ("0", "10.5", "act_lr must be > 0 and <= 10"),
    "student_ema": ("-0.1", "1", "student_ema must be in [0, 1)"),
    "recon_iters": ("-1", "1000001", "recon_iters must be an integer >= 0 and <= 10**6"),
    "recon_images": ("0", "1000001", "recon_images must be an integer >= 1 and <= 10**6"),
    "recon_drop": ("-0.1", "1.5", "recon_drop must be in [0, 1]"),
    "recon_act_lr": ("-0.1", "1.5", "recon_act_lr must be in [0, 1]"),
    "recon_lr": ("0", "10.5", "recon_lr must be > 0 and <= 10"),
    "recon_refine": ("-1", "10001", "recon_refine must be an integer >= 0 and <= 10**4"),
    "recon_refine_lr": ("0", "10.5", "recon_refine_lr must be > 0 and <= 10"),
    "num_threads": ("0", "4097", "num_threads must be an integer >= 1 and <= 4096"),
    "log_every": ("0", "1000001", "log_every must be an integer >= 1 and <= 10**6"),
}

# (id, --set values, the message's words): values of the wrong kind, and rules between fields
OTHER_CASES = [
    ("milestones-float", ["milestones=2.5"], "milestones: cannot read '2.5' as a list of int"),
    ("milestones-json-float", ["milestones=[100, 2.5]"], "milestones: cannot read [100, 2.5] as a list of int"),
    ("epochs-float", ["epochs=2.5"], "epochs: cannot read '2.5' as int"),
    ("epochs-bool", ["epochs=true"], "epochs: cannot read 'true' as int"),
    ("epochs-huge-float", ["epochs=1e300"], "epochs: cannot read '1e300' as int"),
    ("seed-float", ["seed=1.5"], "seed: cannot read '1.5' as int"),
    ("dm-2", ["dm=2"], "dm: cannot read '2' as bool"),
    ("amp-maybe", ["amp=maybe"], "amp: cannot read 'maybe' as bool"),
    ("g-betas-text", ["g_betas=a,b"], "g_betas: cannot read 'a,b' as a list of float"),
    ("g-betas-three", ["g_betas=0.5,0.9,0.99"], "g_betas must be two values in [0, 1)"),
    ("momentum-100", ["momentum=100"], "momentum must be in [0, 1), got 100.0"),
    ("lr-g-nan", ["lr_g=nan"], "lr_g must be > 0 and <= 10"),
    ("lr-s-inf", ["lr_s=inf"], "lr_s must be >= 0 and <= 10"),
    ("kd-tau-overflow", ["kd_tau=1e-40"], "kd_tau must be >= 0.01 and <= 1000"),
    ("lowpass-tiny", ["lowpass_d0=0.001"], "lowpass_d0 must be 0 (no filter) or >= 0.01"),
    ("wbits-float", ["wbits=4.5"], "wbits: cannot read '4.5' as int"),
    ("device-cuda-x", ["device=cuda:x"], "device must be auto, cpu or cuda (or cuda:N), got 'cuda:x'"),
    ("pretrained-digits", ["pretrained=true"], "pretrained=true, but teacher 'digits-cnn' has no zoo weights"),
    ("ms-odd-batch", ["ms_weight=1", "batch_size=15"], "ms_weight > 0 pairs the samples of each batch"),
    ("ms-space", ["ms_space=latent"], "ms_space must be"),
    ("ms-pairs", ["ms_pairs=all"], "ms_pairs must be one of ('paired', 'class')"),
    ("set-twice", ["epochs=2", "epochs=3"], "--set epochs is given twice ('2' and '3')"),
    ("set-twice-dashed", ["iters-per-epoch=2", "iters_per_epoch=3"], "--set iters_per_epoch is given twice"),
]

CASES = ([(f"{name}-below", [f"{name}={below}"], words) for name, (below, _, words) in BOUNDS.items()]
         + [(f"{name}-above", [f"{name}={above}"], words) for name, (_, above, words) in BOUNDS.items()]
         + OTHER_CASES)


def test_every_numeric_bound_is_tried():
    assert set(BOUNDS) == {n for n, s in FIELDS.items() if numeric(s)}
    for name, (below, above, _) in BOUNDS.items():
        spec = FIELDS[name]
        lo, hi = spec.bounds()
        below, above = [float(x) for x in below.split(",")], [float(x) for x in above.split(",")]
        assert min(below) < lo or (min(below) == lo and spec.range.startswith("(")), name
        assert max(above) > hi or (max(above) == hi and spec.range.endswith(")")), name
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def snapshot(root: Path) -> dict:
    return {str(Path(d) / n): (Path(d) / n).stat().st_size for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_value_on_the_command_line(case, capsys):
    _, sets, words = case
    runs = Path(os.environ["QIMERA_HOME"]) / "runs"
    before = snapshot(runs)
    code = cli.main(["quantize", "--quiet", *[f"--set={s}" for s in sets]])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, out.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], out.err
    assert out.out == "" and snapshot(runs) == before
    if case[0].endswith("-above") and ">=" in words:  # a guard's message says why it is there
        assert "a guard far above any real use" in lines[0]


def test_the_closed_ends_are_accepted():
    cfg = preset("digits", seed=2**63 - 1, superpose_p=1.0, momentum=0.0, lr_s=10.0, kd_tau=0.01, epochs=100000,
                 warmup_epochs=100000, calib_epochs=100000, batch_size=65536, gen_width=4, lowpass_d0=0.01,
                 recon_drop=1.0, milestones=[1, 100000], g_betas=[0.0, 0.5], fixed_coeffs=[0.0, 1.0])
    assert (cfg.seed, cfg.epochs, cfg.batch_size, cfg.milestones) == (2**63 - 1, 100000, 65536, [1, 100000])
