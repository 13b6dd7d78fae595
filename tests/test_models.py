import pytest
import torch

from qimera_engine.models import (TEACHERS, CheckpointError, build_teacher, classifier_layer, features_and_logits,
                                  load_state_dict_file, save_state_dict)


def test_cifar_resnet20_matches_the_public_checkpoint_layout(shared_resnet20):
    t = build_teacher("resnet20", checkpoint=str(shared_resnet20))
    assert t.num_classes == 10 and t.feature_dim == 64 and t.mean == (0.485, 0.456, 0.406)
    assert sum(p.numel() for p in t.model.parameters()) == pytest.approx(0.27e6, rel=0.02)


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet44", "resnet56", "digits-cnn"])
def test_teachers_build_and_expose_features(name):
    t = build_teacher(name)
    x = torch.randn(2, t.channels, t.image_size, t.image_size)
    f, logits = features_and_logits(t.model, x)
    assert f.shape == (2, t.feature_dim) and logits.shape == (2, t.num_classes)
    torch.testing.assert_close(t.classifier(f), logits)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_teachers_build_without_weights(name):
    t = build_teacher(name, num_classes=10)
    assert classifier_layer(t.model).out_features == 10 and t.image_size == 224
    assert t.feature_dim == {"resnet18": 512, "resnet50": 2048, "mobilenet_v2": 1280}[name]


def test_pytorchcv_teacher_needs_the_optional_package():
    try:
        import pytorchcv  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pytorchcv"):
            build_teacher("resnet20_cifar10")
    else:
        t = build_teacher("resnet20_cifar10")
        assert t.feature_dim == 64 and t.num_classes == 10


def test_unknown_teacher():
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("vgg99")


def test_checkpoint_formats_and_errors(tmp_path):
    t = build_teacher("digits-cnn")
    sd = t.model.state_dict()
    wrapped = tmp_path / "wrapped.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 90.0}, wrapped)
    loaded = load_state_dict_file(wrapped)  # "module." prefixes gone, the values kept
    assert set(loaded) == set(sd) and all(torch.equal(sd[k], v) for k, v in loaded.items())
    st = tmp_path / "w.safetensors"
    save_state_dict(t.model, st)
    x = torch.randn(8, 1, 8, 8)
    for path in (wrapped, st):  # the rebuilt teacher computes what the original does
        t2 = build_teacher("digits-cnn", checkpoint=str(path))
        assert all(torch.equal(sd[k], v) for k, v in t2.model.state_dict().items())
        assert torch.equal(t2.model(x), t.model(x))

    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        build_teacher("digits-cnn", checkpoint=str(garbage))
    with pytest.raises(CheckpointError, match="not found"):
        build_teacher("digits-cnn", checkpoint=str(tmp_path / "missing.th"))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_teacher("resnet20", checkpoint=str(st))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    p = tmp_path / "evil.th"
    torch.save({"state_dict": Evil()}, p)
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        load_state_dict_file(p)


def test_registry_names():
    assert {"digits-cnn", "resnet20", "resnet56", "resnet18", "resnet50", "mobilenet_v2",
            "resnet20_cifar10", "resnet20_cifar100"} <= set(TEACHERS)


def test_checkpoint_decides_the_number_of_classes(tmp_path):
    import torchvision
    p = tmp_path / "r18-2class.pt"
    original = torchvision.models.resnet18(num_classes=2).eval()
    torch.save(original.state_dict(), p)
    t = build_teacher("resnet18", checkpoint=str(p))
    assert t.num_classes == 2 and t.feature_dim == 512
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(t.model(x), original(x))


def test_offline_zoo_download_gets_a_clear_error(monkeypatch):
    import urllib.error
    import qimera_engine.models as models

    def offline(*a, **k):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(models, "_torchvision", offline)
    with pytest.raises(CheckpointError, match="could not download.*offline"):
        build_teacher("resnet18", pretrained=True)
