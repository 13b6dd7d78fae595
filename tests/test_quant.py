import pytest
import torch
import torch.nn as nn
import torchvision

from qimera_engine.models import CifarResNet, DigitsCNN
from qimera_engine.quant import (ActQuantizer, QuantAct, QuantConv2d, QuantLinear, count_quantized,
                                 fake_quantize, fake_quantize_weight, quantize_model, set_calibration, weight_layers)
from qimera_engine.quant.functional import affine_qparams, per_channel_range


@pytest.mark.parametrize("build", [lambda: DigitsCNN(), lambda: CifarResNet(20),
                                   lambda: torchvision.models.resnet18(num_classes=10)])
def test_student_with_quantization_off_equals_teacher_exactly(build):
    torch.manual_seed(0)
    teacher = build().eval()
    student = quantize_model(teacher, 32, 32)
    size = 8 if isinstance(teacher, DigitsCNN) else 32
    x = torch.randn(4, 1 if size == 8 else 3, size, size)
    assert torch.equal(student(x), teacher(x))
    assert set(student.state_dict()) >= set(teacher.state_dict())


def _torch_qparams(lo, hi, bits):
    """Scale and integer zero point of torch's affine convention: 2^b - 1 steps span [lo, hi], and
    lo lands on the lowest code -2^(b-1)."""
    scale = (hi - lo) / (2**bits - 1)
    return scale, (-(2 ** (bits - 1)) - torch.round(lo / scale)).int()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_fake_quant_equals_torch_per_channel(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3)
    ours = fake_quantize_weight(w, bits)
    lo, hi = per_channel_range(w)
    scale, zp = _torch_qparams(lo, hi, bits)  # computed here, not by the module under test
    ref = torch.fake_quantize_per_channel_affine(w, scale.flatten(), zp.flatten(), 0,
                                                 -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert not torch.equal(ours, w)  # it did quantize, within half a step of each channel's grid
    assert ((ours - w).abs().reshape(16, -1) <= scale.reshape(16, 1) / 2 + 1e-6).all()
    for c in range(16):
        assert ours[c].unique().numel() <= 2 ** bits
        steps = (ours[c] / scale.flatten()[c]).flatten()
        torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)  # on the grid (zero point aside)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_fake_quant_equals_torch_per_tensor(bits):
    x = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(bits)) * 3, torch.linspace(-3, 5, 2000)])
    lo, hi = torch.tensor(-2.5), torch.tensor(4.0)
    scale, zp = _torch_qparams(lo, hi, bits)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    torch.testing.assert_close(fake_quantize(x, lo, hi, bits), ref, atol=1e-6, rtol=0)
    assert fake_quantize(x, lo, hi, bits).unique().numel() == 2**bits  # x covers the range and beyond
    torch.testing.assert_close(torch.stack(affine_qparams(lo, hi, bits)), torch.stack([scale, zp.float()]))


def test_method_formula_and_range_endpoints():
    # METHOD.md's own form: s = (2^b - 1) / (hi - lo). (Exact ties of s*x may round either way in
    # the two forms, so the points are random, not on a grid.)
    x = torch.cat([torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 4 - 1, torch.tensor([-1.0, 3.0])])
    lo, hi, b = torch.tensor(-1.0), torch.tensor(3.0), 4
    s = (2**b - 1) / (hi - lo)
    q = torch.clamp(torch.round(s * x) - torch.round(s * lo) - 2 ** (b - 1), -(2 ** (b - 1)), 2 ** (b - 1) - 1)
    expected = (q + torch.round(s * lo) + 2 ** (b - 1)) / s
    torch.testing.assert_close(fake_quantize(x, lo, hi, b), expected, atol=1e-5, rtol=0)
    assert fake_quantize(x, lo, hi, b).unique().numel() == 2**b


def test_straight_through_gradient():
    w = torch.randn(4, 3, requires_grad=True)
    fake_quantize_weight(w, 3).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_ema_calibration_is_bias_corrected_and_freezes():
    q = ActQuantizer(4, beta=0.9)
    q.calibrating = True
    x = torch.tensor([0.0, 2.0])
    for _ in range(10):
        q(x)
    lo, hi = q.range()
    assert float(lo) == pytest.approx(0.0) and float(hi) == pytest.approx(2.0, rel=1e-5)  # not inflated
    q.calibrating = False
    q(torch.tensor([0.0, 100.0]))
    assert float(q.range()[1]) == pytest.approx(2.0, rel=1e-5)


def test_reused_relu_gets_one_quantizer_per_call_site():
    model = torchvision.models.resnet18(num_classes=10).eval()
    student = quantize_model(model, 4, 4)
    block = student.layer1[0]
    assert isinstance(block.relu, QuantAct) and len(block.relu.quantizers) == 2
    assert len(student.relu.quantizers) == 1  # the stem's ReLU is called once
    set_calibration(student, True)
    student(torch.randn(2, 3, 64, 64))
    student(torch.randn(2, 3, 64, 64))  # counters reset between forwards
    assert all(int(q.steps) == 2 for q in block.relu.quantizers)
    r1, r2 = (q.range()[1] for q in block.relu.quantizers)
    assert not torch.equal(r1, r2)  # two sites, two different ranges


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_models_convert(name):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    student = quantize_model(model, 4, 4)
    counts = count_quantized(student)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert counts["weight_layers"] == n_layers
    assert counts["activation_sites"] > 0
    if name == "mobilenet_v2":
        assert any(isinstance(m, QuantAct) and isinstance(m.act, nn.ReLU6) for m in student.modules())
    set_calibration(student, True)
    out = student(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_keep_first_last_8bit():
    student = quantize_model(CifarResNet(20), 3, 3, keep_first_last_8bit=True)
    layers = [m for m in student.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert layers[0].wbits == 8 and layers[-1].wbits == 8 and layers[1].wbits == 3


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bad_bit_widths_are_refused(bits):
    with pytest.raises(ValueError, match="bit width"):
        quantize_model(DigitsCNN(), bits, 4)


def _assert_equal_but_ties(ours, ref, scale):
    """Equal, except that torch's kernels may round an exact tie (x / scale = k + 1/2) the other way:
    one step off, at a handful of values (a wrong rounding or scale is off at most values)."""
    off = (ours - ref).abs()
    assert (off <= scale * 1.001).all()
    assert float((off > 1e-6).float().mean()) < 1e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_every_layer_of_a_student_equals_torch_kernels(bits):
    # Each weight and each activation site of a calibrated ResNet-20 student against torch's own
    # fake-quantize kernels on the same input: a wrong rounding or a scale off by one step fails here.
    # (Compared site by site: end to end, a code flipped at an exact tie grows through 19 layers.)
    torch.manual_seed(0)
    teacher = CifarResNet(20).eval()
    x = torch.randn(8, 3, 32, 32)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    # beta = 0: the calibrated range is exactly the batch's min/max (with beta > 0 the bias correction
    # moves it by an ulp)
    student = quantize_model(teacher, bits, bits, beta=0.0)
    layers = list(weight_layers(student))
    assert len(layers) == 20  # 19 convolutions and the final linear layer
    for m in layers:
        flat = m.weight.detach().reshape(m.weight.shape[0], -1)
        scale, zp = _torch_qparams(flat.amin(1), flat.amax(1), bits)
        ref = torch.fake_quantize_per_channel_affine(m.weight.detach(), scale, zp, 0, qmin, qmax)
        _assert_equal_but_ties(m.quantized_weight().detach(), ref, scale.reshape(-1, *[1] * (ref.dim() - 1)))
    set_calibration(student, True)
    student(x)
    set_calibration(student, False)
    checked = []

    def check(site, args, out):
        act = site.act(args[0])
        lo, hi = site.quantizers[0].range()
        assert float(lo) == float(act.amin()) and float(hi) == float(act.amax())
        scale, zp = _torch_qparams(act.amin(), act.amax(), bits)
        ref = torch.fake_quantize_per_tensor_affine(act, float(scale), int(zp), qmin, qmax)
        _assert_equal_but_ties(out, ref, scale)
        checked.append(site)
    sites = [m for m in student.modules() if isinstance(m, QuantAct)]
    for m in sites:
        m.register_forward_hook(check)
    with torch.no_grad():
        out = student(x)
    assert len(checked) == len(sites) == 19
    assert (out - teacher(x)).abs().max() > 1e-3  # it did quantize


def test_converting_from_many_threads_leaves_torch_intact():
    """Conversions running at once never patch torch globally: forwards elsewhere keep working."""
    import threading
    models = [torchvision.models.resnet18(num_classes=10).eval() for _ in range(2)] + [CifarResNet(20).eval()
                                                                                      for _ in range(4)]
    errors, students = [], [None] * len(models)

    def convert(i):
        try:
            start.wait()
            students[i] = quantize_model(models[i], 4, 4)
        except Exception as e:  # recorded, asserted below
            errors.append(e)

    def forwards():  # plain forward passes while the conversions run
        try:
            start.wait()
            plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
            for _ in range(50):
                plain(torch.zeros(1, 3, 8, 8))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=convert, args=(i,)) for i in range(len(models))]
    threads.append(threading.Thread(target=forwards))
    start = threading.Barrier(len(threads))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl  # nothing left patched
    out = nn.Sequential(nn.Linear(3, 2), nn.ReLU())(torch.zeros(1, 3))
    assert out.shape == (1, 2)
    for student in students:
        resnet18 = hasattr(student, "fc")
        assert len((student.layer1[0].relu if resnet18 else student.layer1[0].relu1).quantizers) == (2 if resnet18 else 1)
        set_calibration(student, True)
        size = 64 if resnet18 else 32
        assert student(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_call_sites_are_counted_on_the_given_input():
    model = torchvision.models.resnet18(num_classes=10)
    student = quantize_model(model, 4, 4, example_input=torch.zeros(1, 3, 32, 32))
    assert len(student.layer1[0].relu.quantizers) == 2
    assert model.training and student.training  # modes are kept
    with pytest.raises(ValueError, match="example input does not run"):
        quantize_model(model, 4, 4, example_input=torch.zeros(1, 5, 32, 32))
