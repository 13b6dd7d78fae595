"""Block-wise reconstruction of the weight rounding (``recon_iters``): the units, the written-back
weights, and that it brings the student's outputs closer to the teacher's."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torchvision

from qimera_engine import load_student, preset, run
from qimera_engine.config import ConfigError
from qimera_engine.events import Log
from qimera_engine.export import export_int, load_int
from qimera_engine.models import CifarResNet, DigitsCNN
from qimera_engine.quant import (
    enable_weight_clip,
    quantize_model,
    reconstruct,
    refine_images,
    set_calibration,
    weight_layers,
)
from qimera_engine.quant.functional import affine_qparams, weight_range
from qimera_engine.quant.reconstruct import _Rounding, units
from qimera_engine.runs import open_run


def _calibrated(teacher, x, wbits=4, abits=4, clip=True):
    student = quantize_model(teacher, wbits, abits).eval()
    if clip:
        enable_weight_clip(student, fit=True)
    set_calibration(student, True)
    with torch.no_grad():
        student(x)
    set_calibration(student, False)
    return student


def test_units_are_residual_blocks_and_lone_layers_in_forward_order():
    student = quantize_model(CifarResNet(20).eval(), 4, 4)
    assert units(student) == ["conv1"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)] + ["linear"]
    digits = quantize_model(DigitsCNN().eval(), 4, 4)  # no blocks: every weight layer on its own
    assert units(digits) == ["features.0", "features.3", "features.7", "linear"]
    r18 = quantize_model(torchvision.models.resnet18(num_classes=10).eval(), 4, 4, example_input=torch.zeros(1, 3, 32, 32))
    assert units(r18)[:3] == ["conv1", "layer1.0", "layer1.1"] and "layer2.0" in units(r18)  # downsample inside


@pytest.mark.parametrize("clip", [False, True])
def test_rounding_written_back_unlearned_is_the_nearest_rounding(clip):
    """Before any step the hard rounding is round-to-nearest; written back as grid values, the ordinary
    quantizer gives the same codes (each channel's range, hence scale and zero point, is unchanged)."""
    torch.manual_seed(0)
    student = _calibrated(CifarResNet(20).eval(), torch.randn(8, 3, 32, 32), clip=clip)
    for layer in weight_layers(student):
        before = layer.quantized_weight().detach().clone()
        lo, hi = weight_range(layer.weight.detach(), layer.clip)
        flipped = _Rounding(layer).write_back()
        assert flipped == 0
        assert torch.equal(weight_range(layer.weight.detach(), layer.clip)[0], lo)
        assert torch.equal(weight_range(layer.weight.detach(), layer.clip)[1], hi)
        torch.testing.assert_close(layer.quantized_weight(), before, atol=1e-6, rtol=0)


def test_reconstruction_moves_each_weight_by_at_most_one_step_and_fits_the_teacher_better():
    torch.manual_seed(0)
    teacher = CifarResNet(20).eval()
    x = torch.randn(128, 3, 32, 32)
    student = _calibrated(teacher, x, wbits=3, abits=4)
    before = {n: m.quantized_weight().detach().clone() for n, m in student.named_modules() if hasattr(m, "wbits")}
    with torch.no_grad():
        err_before = (student(x) - teacher(x)).pow(2).mean()
    flips = reconstruct(student, teacher, x, 40, batch_size=32, seed=0)
    with torch.no_grad():
        err_after = (student(x) - teacher(x)).pow(2).mean()
    assert err_after < 0.9 * err_before
    assert sum(flips.values()) > 0 and set(flips) == set(units(student))
    for name, m in student.named_modules():
        if name in before:
            lo, hi = weight_range(m.weight.detach(), m.clip)
            scale, _ = affine_qparams(lo, hi, m.wbits)
            step = (m.quantized_weight().detach() - before[name]).abs() / scale
            assert float(step.max()) < 1 + 1e-3  # one grid step at most: a rounding, not a new weight
    assert all(p.requires_grad for p in student.parameters())  # given back as found


def test_reconstruction_is_reproducible_and_leaves_unquantized_layers_alone():
    torch.manual_seed(0)
    teacher = DigitsCNN().eval()
    x = torch.randn(64, 1, 8, 8)
    a, b = _calibrated(teacher, x), _calibrated(teacher, x)
    reconstruct(a, teacher, x, 20, drop=0.5, seed=3)  # with QDrop's random inputs too
    reconstruct(b, teacher, x, 20, drop=0.5, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = _calibrated(teacher, x)
    reconstruct(c, teacher, x, 20, drop=0.5, seed=4)
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    fp = _calibrated(teacher, x, wbits=32, clip=False)
    assert reconstruct(fp, teacher, x, 5) == {}


def test_a_higher_rounding_rate_moves_more_roundings_and_the_run_passes_it_on(tmp_path, digits_teacher):
    """``lr`` is the Adam rate of AdaRound's V: in the same number of steps a higher one takes more
    weights off the nearest rounding; a run hands ``recon_lr`` to it (the default, 1e-3, is the rate
    every run used before the switch existed)."""
    torch.manual_seed(0)
    teacher = CifarResNet(20).eval()
    x = torch.randn(128, 3, 32, 32)
    slow, fast = _calibrated(teacher, x), _calibrated(teacher, x)
    n_slow = sum(reconstruct(slow, teacher, x, 20, seed=0, lr=1e-3).values())
    n_fast = sum(reconstruct(fast, teacher, x, 20, seed=0, lr=3e-2).values())
    assert n_fast > n_slow
    short = dict(epochs=1, iters_per_epoch=4, warmup_epochs=0, calib_epochs=1, batch_size=16, milestones=[],
                 log_every=4, seed=0, recon_iters=10, recon_images=32, recon_at="end", diversity_images=0)
    flips = {}
    for name, extra in (("default", {}), ("explicit", {"recon_lr": 1e-3}), ("fast", {"recon_lr": 0.1})):
        logs = [e.text for e in run(preset("digits", **short, **extra), out=tmp_path / name)
                if isinstance(e, Log) and "reconstructed" in e.text]
        flips[name] = int(re.search(r"(\d+) weights now round", logs[0]).group(1))
    assert flips["default"] == flips["explicit"] and flips["fast"] != flips["default"]


def test_refined_images_meet_the_teachers_statistics_closer_and_keep_their_class():
    """``refine_images``: Adam on the pixels, batch by batch, lowers each batch's BN-statistics loss; the
    teacher still gives each image the class it gave at the start; the input, the teacher's weights and
    its mode are untouched; the result is reproducible; no steps returns the input itself."""
    from qimera_engine.losses import bn_statistics_loss
    torch.manual_seed(0)
    teacher = DigitsCNN(width=16)
    with torch.no_grad():  # running statistics the random images do not meet
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(64, 1, 8, 8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x0 = x.clone()
    assert refine_images(teacher, x, 0) is x
    y = refine_images(teacher, x, 15, lr=0.2, batch_size=32)
    assert torch.equal(x, x0) and y.shape == x.shape and not torch.equal(y, x)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    teacher.eval()
    with torch.no_grad():
        for rows in (slice(0, 32), slice(32, 64)):
            assert bn_statistics_loss(teacher, y[rows])[1] < 0.8 * bn_statistics_loss(teacher, x[rows])[1]
        assert (teacher(y).argmax(1) == teacher(x).argmax(1)).float().mean() >= 0.9
    assert torch.equal(refine_images(teacher, x, 15, lr=0.2, batch_size=32), y)


def test_a_run_refines_its_reconstruction_images_only_when_asked(tmp_path, digits_teacher):
    """``recon_refine`` > 0 hands the reconstruction other images (other roundings); 0, the default,
    gives what the run gave before the switch existed."""
    short = dict(epochs=1, iters_per_epoch=4, warmup_epochs=0, calib_epochs=1, batch_size=16, milestones=[],
                 log_every=4, seed=0, recon_iters=10, recon_images=32, recon_at="end", diversity_images=0)
    students = {}
    for name, extra in (("default", {}), ("off", {"recon_refine": 0}), ("on", {"recon_refine": 5})):
        list(run(preset("digits", **short, **extra), out=tmp_path / name))
        students[name] = load_student(tmp_path / name).state_dict()
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(students["default"], students["off"]) and not same(students["default"], students["on"])


def test_reconstruction_learns_the_activation_ranges_only_when_asked():
    """``act_lr`` > 0 moves the ranges inside the units (and fits the teacher at least as well as the
    roundings alone); the ranges are buffers again afterwards, so saving and export see a plain student."""
    from qimera_engine.quant import act_quantizers
    torch.manual_seed(0)
    teacher = CifarResNet(20).eval()
    x = torch.randn(128, 3, 32, 32)
    fixed, learned = _calibrated(teacher, x, abits=3), _calibrated(teacher, x, abits=3)
    keys = set(fixed.state_dict())
    ranges = [float(q.ema_hi) for q in act_quantizers(fixed)]
    reconstruct(fixed, teacher, x, 40, seed=0)
    reconstruct(learned, teacher, x, 40, act_lr=1e-2, seed=0)
    assert [float(q.ema_hi) for q in act_quantizers(fixed)] == ranges
    moved = [float(q.ema_hi) != r for q, r in zip(act_quantizers(learned), ranges)]
    assert sum(moved) >= len(units(learned)) - 2  # each block's own quantizers (not the stem's, outside them)
    assert all(not isinstance(q.ema_hi, torch.nn.Parameter) for q in act_quantizers(learned))
    assert set(learned.state_dict()) == keys and all(p.requires_grad for p in learned.parameters())
    with torch.no_grad():
        err_fixed, err_learned = ((m(x) - teacher(x)).pow(2).mean() for m in (fixed, learned))
    assert err_learned < 1.02 * err_fixed


@pytest.mark.parametrize("field,value,message", [
    ("recon_act_lr", -0.1, "recon_act_lr must be"), ("recon_iters", -1, "recon_iters must be"), ("recon_images", 0, "recon_images must be"),
    ("recon_drop", 1.5, "recon_drop must be"), ("recon_drop", math.nan, "recon_drop must be"),
    ("recon_at", "start", "recon_at must be one of"), ("recon_refine", -1, "recon_refine must be"),
    ("recon_refine_lr", 0, "recon_refine_lr must be")])
def test_bad_reconstruction_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        preset("digits", **{field: value})


def test_reconstruction_with_a_weight_average_is_refused():
    with pytest.raises(ConfigError, match="recon_iters and student_ema cannot be combined"):
        preset("digits", recon_iters=10, student_ema=0.99)


@pytest.mark.slow  # four short digits runs
@pytest.mark.parametrize("when", ["calib", "end"])
def test_reconstruction_in_a_digits_run(when, tmp_path, digits_teacher):
    """recon_iters in a short run: the roundings are learned after calibration (then fine-tuned from) or
    after the last epoch, on that epoch's images; the student is a plain student (saved, loaded and
    evaluated as any other) and the epochs before it are those of the run without it."""
    short = dict(epochs=3, iters_per_epoch=6, warmup_epochs=1, calib_epochs=1, batch_size=16, milestones=[2],
                 log_every=3, seed=0)
    rows = {}
    for name, iters in (("off", 0), ("on", 30)):
        events = list(run(preset("digits", **short, recon_iters=iters, recon_images=64, recon_at=when),
                          out=tmp_path / name))
        rows[name] = open_run(tmp_path / name).metrics
    changed = 0 if when == "calib" else 2  # the first epoch whose evaluation sees reconstructed roundings
    for r_on, r_off in zip(rows["on"][:changed], rows["off"][:changed]):
        assert r_on["top1"] == r_off["top1"] and r_on["loss_s"] == r_off["loss_s"]
    assert all(math.isfinite(r["loss_s"]) for r in rows["on"]) and rows["on"][-1]["top1"] > 80
    logs = [e.text for e in events if isinstance(e, Log) and "reconstructed" in e.text]
    assert len(logs) == 1 and "round the other way" in logs[0]
    flips = int(re.search(r"(\d+) weights now round the other way", logs[0]).group(1))
    assert flips > 0
    student = load_student(tmp_path / "on")
    if when == "end":  # the same training as the run without it, then roundings moved by one step each
        plain = {n: m for n, m in load_student(tmp_path / "off").named_modules() if hasattr(m, "wbits")}
        moved = channels = 0
        for name, m in student.named_modules():
            if name in plain:
                lo, hi = weight_range(m.weight.detach(), m.clip)
                scale, _ = affine_qparams(lo, hi, m.wbits)
                step = ((m.quantized_weight() - plain[name].quantized_weight()).abs() / scale).detach()
                assert float(step.max()) < 1 + 1e-3
                moved += int((step > 0.5).sum())
                channels += m.weight.shape[0]
        # every counted flip moved its weight by one step, except at each channel's minimum and maximum
        # weight, which write_back keeps where they are (they set the range)
        assert flips - 2 * channels <= moved <= flips and moved > 0
    x = torch.randn(16, 1, 8, 8)
    rebuilt = load_int(export_int(tmp_path / "on", tmp_path / "s.safetensors"))
    assert torch.equal(rebuilt(x), student(x))  # the integer export carries the learned roundings
