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

# --------------------------------------------------------------------------- integrity of what is read


def _palette(transparent: bool):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    if transparent:
        im.info["transparency"] = 1
    return im


# each mode with a known pixel, and what it must read as (8-bit RGB)
MODES = [
    ("I;16", lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), "png", (128, 128, 128)),
    ("I;16B", lambda: Image.frombytes("I;16B", (4, 4), np.full((4, 4), 514, ">u2").tobytes()), "tiff", (2, 2, 2)),
    ("I", lambda: Image.fromarray(np.full((4, 4), 2570, np.int32)), "tiff", (10, 10, 10)),
    ("F", lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), "tiff", (128, 128, 128)),
    ("P", lambda: _palette(False), "png", (200, 100, 50)),
    ("P", lambda: _palette(True), "png", (0, 0, 0)),  # its only colour is transparent: black
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "tiff", (255, 0, 0)),
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (200, 100, 50, 128)), "png", (100, 50, 25)),  # over black
    ("LA", lambda: Image.new("LA", (4, 4), (200, 128)), "png", (100, 100, 100)),
    ("1", lambda: Image.new("1", (4, 4), 1), "png", (255, 255, 255)),
    ("L", lambda: Image.new("L", (4, 4), 77), "png", (77, 77, 77)),
]


@pytest.mark.parametrize("mode,make,fmt,rgb", MODES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MODES)])
def test_images_are_decoded_in_their_own_mode(tmp_path, mode, make, fmt, rgb):
    from qimera_engine.data import read_image
    path = tmp_path / f"x.{fmt}"
    make().save(path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really is in that mode
    assert read_image(str(path)).mode == "RGB"
    assert tuple(np.asarray(read_image(str(path)))[0, 0]) == rgb
    (tmp_path / "set" / "c").mkdir(parents=True)
    path.rename(tmp_path / "set" / "c" / path.name)  # the loader gives the same pixel
    d = load_data(f"folder:{tmp_path / 'set'}", InputSpec(4, 3, CIFAR_MEAN, CIFAR_STD))
    assert d.images[0, :, 0, 0].tolist() == list(rgb)


def test_pa_and_out_of_range_images_are_handled_or_refused(tmp_path):
    from qimera_engine.data import _to_rgb8
    pa = _palette(False).convert("PA")
    pa.putalpha(Image.new("L", (4, 4), 51))
    assert tuple(np.asarray(_to_rgb8(pa, "x"))[0, 0]) == (40, 20, 10)  # (200, 100, 50) at alpha 0.2
    for im, want in ((Image.fromarray(np.full((4, 4), 70000, np.int32)), "mode I with values outside 0..65535"),
                     (Image.fromarray(np.full((4, 4), 2.0, np.float32)), "mode F with values outside 0..1"),
                     (Image.fromarray(np.full((4, 4), np.nan, np.float32)), "mode F"),
                     (Image.new("HSV", (4, 4)), "image mode HSV is not supported")):
        with pytest.raises(DataError, match=f"cannot read image x: {want}"):
            _to_rgb8(im, "x")


def test_special_files_in_an_image_folder_are_skipped_without_opening(tmp_path):
    import os
    import socket
    import threading
    root = _image_folder(tmp_path / "imgs", per_class=2)
    os.mkfifo(root / "cat" / "fifo.png")  # opening it would wait for a writer forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "dog" / "socket.png"))
    result = {}

    def load():
        try:
            result["data"] = load_data(f"folder:{root}", CIFAR)
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e
    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout=60)
    sock.close()
    assert not t.is_alive(), "the loader hangs on a FIFO"
    assert "error" not in result, result.get("error")
    assert len(result["data"]) == 4  # the two regular images of each class
    from qimera_engine.data import read_image
    with pytest.raises(DataError, match="fifo.png: not a regular file"):
        read_image(str(root / "cat" / "fifo.png"))


@pytest.mark.parametrize("spec,message", [("digits:foo", "digits takes no argument"), ("digits:", "digits takes no"),
                                          ("cifar10:", "nothing after the colon"),
                                          ("cifar100:  ", "nothing after the colon"),
                                          ("folder:", "nothing after the colon"), ("imagenet:", "imagenet:PATH")])
def test_specs_with_arguments_they_would_ignore_are_refused(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)
    with pytest.raises(DataError, match=message):
        load_data(spec, DIGITS)


def test_a_folder_with_other_classes_is_refused_before_decoding_or_caching(tmp_path, monkeypatch):
    import qimera_engine.data as data
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    root = _image_folder(tmp_path / "imgs")

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")
    monkeypatch.setattr(data, "read_image", no_decoding)
    with pytest.raises(DataError, match="the data has 2 classes but the teacher 10"):
        load_data(f"folder:{root}", CIFAR, num_classes=10)
    with pytest.raises(DataError, match="the data has 10 classes but the teacher 3"):
        load_data("digits", DIGITS, num_classes=3)
    assert not (tmp_path / "home" / "cache").exists()


def test_a_full_disk_while_caching_still_loads_the_data(tmp_path, monkeypatch):
    import contextlib
    import errno
    import pathlib

    import qimera_engine.data as data
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))
    root = _image_folder(tmp_path / "imgs")
    expected = load_data(f"folder:{root}", CIFAR, num_classes=2).images  # and cached
    cache = tmp_path / "home" / "cache"
    for f in cache.iterdir():
        f.unlink()

    @contextlib.contextmanager
    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield  # pragma: no cover
    monkeypatch.setattr(data, "atomic_path", no_space)
    assert torch.equal(load_data(f"folder:{root}", CIFAR).images, expected)
    monkeypatch.undo()
    monkeypatch.setenv("QIMERA_HOME", str(tmp_path / "home"))

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_bytes", full)  # the write itself fails, half-way or not
    assert torch.equal(load_data(f"folder:{root}", CIFAR).images, expected)
    assert list(cache.iterdir()) == []  # no cache, and no temporary file
