import json

import pytest

from qimera_engine.config import PRESETS, ConfigError, RunConfig, parse_overrides, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_through_json(name):
    cfg = preset(name)
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_paper_values_in_the_cifar_preset():
    c = preset("cifar10-resnet20")
    assert (c.epochs, c.iters_per_epoch, c.batch_size) == (400, 200, 200)
    assert (c.lr_g, c.g_betas, c.lr_s, c.momentum, c.weight_decay) == (1e-3, [0.5, 0.999], 1e-4, 0.9, 1e-4)
    assert (c.milestones, c.lr_gamma, c.warmup_epochs, c.calib_epochs) == ([100, 200, 300], 0.1, 4, 4)
    assert (c.superpose_p, c.superpose_k, c.embed_init, c.dm, c.dm_width) == (0.4, 2, "random", False, 100)
    assert (c.bns_weight, c.kd_tau, c.kd_alpha, c.kd_reduction, c.gen_bn_eps) == (0.1, 20.0, 1.0, "mean", 0.8)
    assert preset("cifar100-resnet20").embed_init == "teacher" and preset("cifar100-resnet20").superpose_k == 10


def test_labels_name_the_recipe_and_a_run_without_superposition():
    assert preset("cifar10-resnet20").label == "qimera" and preset("cifar10-resnet20-cpu").label == "qimera"
    fast = preset("cifar10-resnet20-fast")  # Qimera+: the recipe's switches, no superposed batches
    assert (fast.superpose_p, fast.superpose_k) == (0.0, 2) and fast.label == "qimera+ p=0"
    assert fast.with_overrides(superpose_p=0.4).label == "qimera+"
    assert fast.with_overrides(method="gdfq").label == "gdfq+" and fast.with_overrides(method="ptq").label == "ptq+"
    assert preset("digits", superpose_p=0).label == "qimera p=0"
    assert preset("digits", superpose_k=1).label == "qimera p=0"  # K = 1: the sampler never mixes a batch


@pytest.mark.parametrize("bad,match", [
    (dict(method="zeroq"), "method"),
    (dict(wbits=9), "wbits"),
    (dict(abits=1), "abits"),
    (dict(superpose_p=1.5), "superpose_p"),
    (dict(superpose_k=0), "superpose_k"),
    (dict(coeff_sampler="fixed"), "fixed_coeffs"),
    (dict(coeff_sampler="fixed", fixed_coeffs=[0.5, 0.6]), "sum to 1"),
    (dict(warmup_epochs=20, epochs=10), "warmup_epochs"),
    (dict(batch_size=1), "batch_size"),
    (dict(kd_reduction="sum"), "kd_reduction"),
    (dict(device="tpu"), "device"),
    (dict(superpos_p=0.3), "did you mean 'superpose_p'"),
    (dict(epochs="many"), "epochs"),
])
def test_bad_settings_get_clear_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        preset("digits", **bad)


def test_command_line_overrides_are_typed():
    over = parse_overrides(["superpose_p=0.7", "dm=on", "milestones=3,5", "fixed_coeffs=none", "embed-init=teacher"])
    cfg = preset("digits", **over)
    assert cfg.superpose_p == 0.7 and cfg.dm is True and cfg.milestones == [3, 5]
    assert cfg.fixed_coeffs is None and cfg.embed_init == "teacher"
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])
    with pytest.raises(ConfigError, match="dm"):
        preset("digits", dm="maybe")


def test_resolved_makes_the_method_explicit():
    g = preset("digits", method="gdfq", dm=True, embed_init="teacher").resolved()
    assert (g.gen_input, g.superpose_p, g.dm, g.embed_init, g.embed_dim) == ("gdfq", 0.0, False, "random", 100)
    p = preset("digits", method="ptq").resolved()
    assert p.epochs == p.warmup_epochs == p.calib_epochs == preset("digits").calib_epochs
    assert preset("digits", method="real-data").resolved().warmup_epochs == 0
