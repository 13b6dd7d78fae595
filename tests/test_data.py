import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import fake_cifar10
from qimera_engine.data import DataError, InputSpec, load_data, parse_spec
from qimera_engine.models import CIFAR_MEAN, CIFAR_STD, DIGITS_MEAN, DIGITS_STD

DIGITS = InputSpec(8, 1, DIGITS_MEAN, DIGITS_STD)
CIFAR = InputSpec(32, 3, CIFAR_MEAN, CIFAR_STD)


def test_digits_split_is_fixed_and_normalised():
    tr, te = load_data("digits", DIGITS, "train"), load_data("digits", DIGITS, "test")
    assert (len(tr), len(te)) == (1347, 450) and te.num_classes == 10
    x, y = next(te.batches(450))
    assert x.shape == (450, 1, 8, 8) and abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
    assert torch.equal(y, load_data("digits", DIGITS, "test").labels)


@pytest.mark.parametrize("spec,kind", [("digits", "digits"), ("cifar10", "cifar10"), ("cifar100:/x", "cifar100"),
                                       ("folder:/x", "folder"), ("imagefolder:/x", "folder"), ("imagenet:/v", "imagenet")])
def test_specs(spec, kind):
    assert parse_spec(spec)[0] == kind


def test_bad_specs():
    with pytest.raises(DataError, match="unknown data spec"):
        parse_spec("mnist")
    with pytest.raises(DataError, match="not found"):
        load_data("folder:/no/such/folder", CIFAR)
    with pytest.raises(DataError, match="needs a path"):
        load_data("imagenet", CIFAR)


def _image_folder(root, classes=("cat", "dog"), per_class=3, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_is_resized_and_cached(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    d = load_data(f"folder:{root}", CIFAR)
    assert d.classes == ["cat", "dog"] and len(d) == 6 and d.images.shape == (6, 3, 32, 32)
    again = load_data(str(root), CIFAR)  # a bare path works too, and comes from the cache
    assert torch.equal(again.images, d.images)
    grey = load_data(f"folder:{root}", DIGITS)
    assert next(grey.batches(6))[0].shape == (6, 1, 8, 8)


def test_image_folder_at_224_is_lazy(tmp_path):
    root = _image_folder(tmp_path / "val", size=40)
    d = load_data(f"imagenet:{root}", InputSpec(224, 3, CIFAR_MEAN, CIFAR_STD))
    assert d.images is None
    x, y = next(d.batches(4))
    assert x.shape == (4, 3, 224, 224)


def test_lazy_and_in_memory_folders_normalise_alike(tmp_path):
    # one white image: every pixel normalises to (1 - mean) / std, whichever path reads it
    (tmp_path / "white" / "c").mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(tmp_path / "white" / "c" / "0.png")
    expected = (1 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    for size in (32, 224):  # 32: decoded into memory; 224: read lazily
        d = load_data(f"folder:{tmp_path / 'white'}", InputSpec(size, 3, CIFAR_MEAN, CIFAR_STD))
        x, _ = next(d.batches(1))
        torch.testing.assert_close(x[0].mean((1, 2)), expected, atol=1e-4, rtol=0)
        assert d.raw(1)[0].dtype == torch.uint8 and int(d.raw(1)[0].min()) == 255


def test_cifar_through_torchvision_from_local_files(tmp_path, monkeypatch):
    fake_cifar10(tmp_path, monkeypatch)
    test = load_data(f"cifar10:{tmp_path}", CIFAR, "test")
    train = load_data(f"cifar10:{tmp_path}", CIFAR, "train")
    assert (len(test), len(train)) == (4, 20) and test.images.shape == (4, 3, 32, 32)
    assert test.classes[0] == "airplane" and test.labels.tolist() == [0, 1, 2, 3]


def test_cifar_missing_and_offline_download_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found under .*download=true"):
        load_data(f"cifar10:{tmp_path}", CIFAR)

    def offline(self):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DataError, match="could not download CIFAR-10.*offline"):
        load_data(f"cifar10:{tmp_path}", CIFAR, download=True)


def test_shared_cifar_dev_split(shared_cifar_dev):
    d = load_data(f"folder:{shared_cifar_dev}", InputSpec(32, 3, CIFAR_MEAN, CIFAR_STD))
    assert len(d) == 5000 and d.classes[0] == "airplane" and d.classes[9] == "truck"
    assert torch.bincount(d.labels).tolist() == [500] * 10


def test_cifar_teacher_training_needs_a_gpu(tmp_path, monkeypatch):
    from qimera_engine import train_and_cache
    fake_cifar10(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="needs a GPU"):
        train_and_cache("resnet20", f"cifar10:{tmp_path}", device="cpu")


def test_folder_cache_follows_the_files(tmp_path, monkeypatch):
    """The decoded-folder cache is keyed by the files: swapping two classes with mv is seen."""
    import numpy as np
    from PIL import Image

    from qimera_engine.data import InputSpec, load_data
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    root = tmp_path / "imgs"
    for cls, value in (("a", 0), ("b", 255)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(root / cls / f"{i}.png")
    spec = InputSpec(8, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def white_labels():
        d = load_data(f"folder:{root}", spec)
        return sorted(int(y) for x, y in zip(d.images, d.labels) if int(x.float().mean()) == 255)
    assert white_labels() == [1, 1, 1]  # class b (index 1) is white
    (root / "a").rename(root / "tmp")
    (root / "b").rename(root / "a")
    (root / "tmp").rename(root / "b")
    assert white_labels() == [0, 0, 0]  # now class a is white
    assert len(list((tmp_path / "home" / "cache").iterdir())) == 2


def test_data_stamp_changes_with_the_files(tmp_path):
    from qimera_engine.data import data_stamp
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"x")
    first = data_stamp(f"folder:{tmp_path}")
    assert data_stamp(f"folder:{tmp_path}") == first
    (tmp_path / "a" / "1.png").rename(tmp_path / "a" / "2.png")
    assert data_stamp(f"folder:{tmp_path}") != first
    assert data_stamp("digits") == "digits" and data_stamp(f"folder:{tmp_path / 'none'}") == "unreadable"
