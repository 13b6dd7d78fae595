"""GPU checks: skipped on machines without CUDA (CI has none); run them where a GPU is present."""
import pytest
import torch

from conftest import TINY
from qimera_engine import generate_images, load_generator, open_run, preset, run_to_end
from qimera_engine.quant import fake_quantize_weight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_fake_quant_matches_between_cpu_and_gpu():
    w = torch.randn(32, 16, 3, 3)
    torch.testing.assert_close(fake_quantize_weight(w.cuda(), 4).cpu(), fake_quantize_weight(w, 4), atol=1e-6, rtol=0)


@cuda
@pytest.mark.parametrize("amp", [False, True])
def test_digits_run_on_the_gpu(digits_teacher, tmp_path, amp):
    s = run_to_end(preset("digits", **TINY, device="cuda", amp=amp), out=tmp_path / "g")
    assert s["quant_top1"] > 50
    gen = load_generator(open_run(tmp_path / "g"), device="cuda")
    x = generate_images(gen, [[1, 2]], [[0.5, 0.5]], [0])
    assert x.is_cuda and torch.isfinite(x).all()
    # the same generator on the CPU draws the same image (cuDNN's TF32 convolutions round at about 1e-3)
    on_cpu = generate_images(load_generator(open_run(tmp_path / "g"), device="cpu"), [[1, 2]], [[0.5, 0.5]], [0])
    torch.testing.assert_close(x.cpu(), on_cpu, atol=1e-2, rtol=0)


@cuda
def test_resume_on_the_gpu(digits_teacher, tmp_path):
    import threading
    from qimera_engine import EpochEnd, run
    cfg = preset("digits", **{**TINY, "epochs": 3}, device="cuda")
    stop = threading.Event()
    for ev in run(cfg, out=tmp_path / "cut", stop=stop):
        if isinstance(ev, EpochEnd):
            stop.set()
    resumed = run_to_end(None, resume=tmp_path / "cut")
    assert resumed["epochs_done"] == 3


@cuda
def test_cifar_teacher_trains_on_the_gpu(tmp_path, monkeypatch):
    from conftest import fake_cifar10
    from qimera_engine import train_and_cache
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    fake_cifar10(tmp_path / "data", monkeypatch, per_batch=64)
    t = train_and_cache("resnet20", f"cifar10:{tmp_path / 'data'}", epochs=2, device="cuda")
    from qimera_engine import get_teacher
    from qimera_engine.models import state_dict_sha256
    assert t.info["data"] == "cifar10" and t.info["epochs"] == 2
    cached = get_teacher("resnet20", f"cifar10:{tmp_path / 'data'}")  # found in the cache, the same weights
    assert cached.info["weights"] == t.info["weights"] and state_dict_sha256(cached.model) == t.info["sha256"]
