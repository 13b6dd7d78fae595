"""Real data: only ever for evaluation, real features, teacher training and the real-data baseline.

Specs: ``digits`` (embedded, offline); ``cifar10[:ROOT]`` / ``cifar100[:ROOT]`` through torchvision
(ROOT defaults to $QIMERA_HOME/data; downloaded only on request); ``folder:PATH`` (or a bare
directory path) in ImageFolder layout; ``imagenet:PATH`` an ImageNet validation folder.
A colon always introduces an argument: ``digits:x`` and an empty one (``cifar10:``, ``folder:``) are
refused rather than ignored (write ``cifar10`` for the default root).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .runs import atomic_path, qimera_home, user_path


class DataError(ValueError):
    """A data set that cannot be found, read, or does not fit the teacher."""


@dataclass(frozen=True)
class InputSpec:
    """How a teacher wants its images: size, channels and normalisation."""
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, teacher) -> "InputSpec":
        return cls(teacher.image_size, teacher.channels, tuple(teacher.mean), tuple(teacher.std))


class ImageData:
    """Labelled images in a teacher's input space, held in memory as uint8 (small sets) or read lazily."""

    def __init__(self, name: str, spec: InputSpec, classes: list[str], images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, dataset=None):
        self.name, self.spec, self.classes = name, spec, list(classes)
        self.images, self.labels, self.dataset = images, labels, dataset  # images: (N, C, H, W) uint8

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.dataset)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalise(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.float().div_(255.0)
        s = self.spec
        if x.shape[1] != s.channels:
            x = x.mean(dim=1, keepdim=True) if s.channels == 1 else x.expand(-1, s.channels, -1, -1)
        if x.shape[-1] != s.image_size or x.shape[-2] != s.image_size:
            x = F.interpolate(x, size=(s.image_size, s.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        mean = torch.tensor(s.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(s.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def batches(self, batch_size: int, device="cpu"):
        """(x, y) in order, normalised for the teacher."""
        if self.images is not None:
            for i in range(0, len(self), batch_size):
                yield (self.normalise(self.images[i:i + batch_size]).to(device),
                       self.labels[i:i + batch_size].to(device))
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, num_workers=min(4, os.cpu_count() or 1))
        try:
            for x, y in loader:
                yield self.normalise(x).to(device), y.to(device)
        except DataError as e:  # from a worker: its message carries the worker's traceback; keep the reason
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at ``idx`` as stored (uint8, (N, C, H, W)) and their labels."""
        if self.images is not None:
            return self.images[idx], self.labels[idx]
        items = [self.dataset[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def _draw(self, n: int, seed: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]

    def subset(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n images drawn without replacement (a fixed draw per seed), normalised; (x, y)."""
        images, labels = self.take(self._draw(n, seed))
        return self.normalise(images), labels

    def sample(self, n: int, seed: int = 0) -> "ImageData":
        """A smaller set of n of these images (the same fixed draw as ``subset``), held in memory."""
        images, labels = self.take(self._draw(n, seed))
        return ImageData(f"{self.name} ({len(labels)} of {len(self)})", self.spec, self.classes, images, labels)

    def raw(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n uint8 images as stored (for showing them), with labels."""
        return self.take(self._draw(n, seed))


def parse_spec(spec: str) -> tuple[str, str | None]:
    spec = (spec or "").strip()
    if not spec:
        raise DataError("empty data spec; use digits, cifar10[:ROOT], cifar100[:ROOT], folder:PATH or imagenet:PATH")
    kind, sep, arg = spec.partition(":")
    if kind in ("digits", "cifar10", "cifar100", "folder", "imagefolder", "imagenet") and (sep or kind != "folder"):
        # an argument that would be ignored is a mistake the user should hear about
        if kind == "digits" and sep:
            raise DataError(f"digits takes no argument (got {spec!r}): it is embedded; write digits")
        if sep and not arg.strip():
            hint = f"write {kind} for $QIMERA_HOME/data" if kind.startswith("cifar") else f"{kind}:PATH"
            raise DataError(f"nothing after the colon in {spec!r}: give a path ({hint})")
        return ("folder" if kind == "imagefolder" else kind), (arg or None)
    if user_path(spec).is_dir():
        return "folder", spec
    raise DataError(f"unknown data spec {spec!r}: use digits, cifar10[:ROOT], cifar100[:ROOT], "
                    f"folder:PATH, imagenet:PATH, or an existing image folder")


def data_stamp(spec: str) -> str:
    """A cheap fingerprint of a data set's files for in-memory caches: it changes when a class folder
    or image is added, removed or renamed, and when CIFAR's files change (``load_data`` reads the
    files themselves; its decode cache is keyed by every file, see ``_cached_folder``)."""
    try:
        kind, arg = parse_spec(spec)
    except DataError:
        return "invalid"
    if kind == "digits":
        return "digits"
    root = user_path(arg) if arg else qimera_home() / "data"
    parts = []
    try:
        for p in sorted([root, *(c for c in root.iterdir() if c.is_dir())]):
            st = p.stat()
            parts.append(f"{p.name}|{st.st_mtime_ns}")
            if kind in ("cifar10", "cifar100") and p != root:
                parts += [f"{f.name}|{s.st_size}|{s.st_mtime_ns}" for f in sorted(p.iterdir()) for s in [f.stat()]]
    except OSError:
        return "unreadable"
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_data(spec: str, input_spec: InputSpec, split: str = "test", download: bool = False,
              num_classes: int | None = None) -> ImageData:
    """Load a data set for a teacher's input convention. ``split`` is train or test.

    ``num_classes`` (the teacher's): a data set with another number of classes is refused, an image
    folder before any image is decoded or cached."""
    kind, arg = parse_spec(spec)
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    if kind == "digits":
        data = _digits(input_spec, split)
    elif kind in ("cifar10", "cifar100"):
        data = _cifar(kind, arg, input_spec, split, download)
    elif arg is None:
        raise DataError(f"{kind} needs a path: {kind}:PATH")
    else:
        data = _folder(kind, arg, input_spec, num_classes)
    _check_classes(len(data.classes), num_classes)
    return data


def _check_classes(found: int, num_classes: int | None) -> None:
    if num_classes is not None and found != num_classes:
        raise DataError(f"the data has {found} classes but the teacher {num_classes}")

# --------------------------------------------------------------------------- digits


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 8x8 digits, fixed split: 1,347 train / 450 test (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.images, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return (xtr, ytr) if split == "train" else (xte, yte)


def _digits(spec: InputSpec, split: str) -> ImageData:
    x, y = digits_arrays(split)
    images = torch.from_numpy(np.round(x * 255.0 / 16.0).astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    return ImageData(f"digits-{split}", spec, [str(i) for i in range(10)], images, torch.from_numpy(y).long())

# --------------------------------------------------------------------------- CIFAR


def _cifar(kind: str, root: str | None, spec: InputSpec, split: str, download: bool) -> ImageData:
    import torchvision
    root_path = user_path(root) if root else qimera_home() / "data"
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    name = "CIFAR-10" if kind == "cifar10" else "CIFAR-100"
    try:
        ds = cls(str(root_path), train=(split == "train"), download=download)
    except RuntimeError as e:
        raise DataError(f"{name} not found under {root_path} ({e}). Pass download=True "
                        f"(--set download=true) to fetch it, or point to a folder that has it.") from None
    except OSError as e:  # URLError and socket errors are OSErrors
        raise DataError(f"could not download {name} to {root_path}: {e}. Are you offline? "
                        f"Copy the data set there by hand, or use an image folder (folder:PATH).") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageData(f"{kind}-{split}", spec, list(ds.classes), images, torch.tensor(ds.targets).long())

# --------------------------------------------------------------------------- image folders


def _regular_image(path: str) -> bool:
    """An image file by its extension, and a regular file: a FIFO, socket or device node named
    x.png is skipped by its inode type, without opening it (opening a FIFO waits for a writer)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    try:
        return path.lower().endswith(IMG_EXTENSIONS) and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a dangling link, or a file that vanished
        return False


def _folder(kind: str, path: str, spec: InputSpec, num_classes: int | None = None) -> ImageData:
    import torchvision
    from torchvision import transforms as T
    root = user_path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    big = spec.image_size > 64
    # uint8 either way, like the images held in memory: ImageData.normalise does the rest
    tf = (T.Compose([T.Resize(int(spec.image_size * 256 / 224)), T.CenterCrop(spec.image_size), T.PILToTensor()])
          if big else T.Compose([T.Resize((spec.image_size, spec.image_size)), T.PILToTensor()]))
    try:
        ds = torchvision.datasets.ImageFolder(str(root), transform=tf, loader=read_image,
                                              is_valid_file=_regular_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root} is not an image folder (expected ROOT/<class>/<image>): {e}") from None
    _check_classes(len(ds.classes), num_classes)  # before decoding or caching anything
    if big:
        return ImageData(f"{kind}:{root.name}", spec, ds.classes, dataset=ds)
    images, labels = _cached_folder(root, ds, spec.image_size)
    return ImageData(f"{kind}:{root.name}", spec, ds.classes, images, labels)


MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused (a decompression bomb is tiny on disk)


def read_image(path: str):
    """An image file as 8-bit RGB, decoded in its own mode, or a DataError that names the file.

    16-bit greyscale (I;16, I;16B, and I with values in 0..65535) is scaled to 0..255, not clipped;
    float images (F) are read as intensities in [0, 1]; palette images take their colours; CMYK is
    converted to RGB; 1-bit images become 0 and 255. Images with transparency (LA, RGBA, PA, or a
    palette with a transparent colour) are composited over black: a transparent pixel counts as black.
    Other modes, and 32-bit or float values outside those ranges, are refused."""
    import warnings

    from PIL import Image
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open below
            raise DataError(f"cannot read image {path}: not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"cannot read image {path}: {im.width}x{im.height} pixels is more than this "
                                    f"tool reads ({MAX_IMAGE_PIXELS} pixels)")
                return _to_rgb8(im, path)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"cannot read image {path}: it is too large (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        why = "not an image file, or a damaged one" if isinstance(e, Image.UnidentifiedImageError) else str(e)[:160]
        raise DataError(f"cannot read image {path}: {why}") from None


_ALPHA = ("LA", "RGBA", "PA", "RGBa", "La")
_HIGH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _to_rgb8(im, path: str):
    """``im`` as 8-bit RGB by the rules of ``read_image``."""
    from PIL import Image
    mode = im.mode
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "RGBX"):
        return im.convert("RGB")
    if mode in _HIGH:  # a wider range than 8 bits: scale it, as convert() would clip it
        a = np.asarray(im).astype(np.float64)
        top = _HIGH[mode]
        if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > top:
            raise DataError(f"cannot read image {path}: mode {mode} with values outside 0..{top:g} "
                            f"(from {a.min():g} to {a.max():g})")
        return Image.fromarray(np.rint(a * (255.0 / top)).astype(np.uint8), "L").convert("RGB")
    if mode == "P" or mode in _ALPHA:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)  # a palette without transparency: alpha 255
        rgb = np.rint(rgba[..., :3] * (rgba[..., 3:] / 255.0)).astype(np.uint8)  # over black
        return Image.fromarray(rgb, "RGB")
    raise DataError(f"cannot read image {path}: image mode {mode} is not supported (use RGB, greyscale, "
                    f"16-bit greyscale, palette, CMYK or with alpha)")


def _cached_folder(root: Path, ds, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a small-image folder once and keep the uint8 tensor in $QIMERA_HOME/cache.

    The cache is keyed by the folder's content as the file system describes it: every file's path
    relative to the root, its class, size and modification time, so renaming, moving, adding or
    editing a file makes a new cache."""
    h = hashlib.sha256(f"{root.resolve()}|{size}|".encode())
    for p, target in ds.samples:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}|{target}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = qimera_home() / "cache" / f"folder-{h.hexdigest()[:24]}.pt"
    if cache.exists():
        try:
            d = torch.load(cache, weights_only=True)
            return d["images"], d["labels"]
        except Exception:
            pass  # a damaged cache is rebuilt
    images = torch.stack([ds[i][0] for i in range(len(ds))])  # ImageFolder's loader gives RGB
    labels = torch.tensor(ds.targets).long()
    buf = io.BytesIO()  # serialised in memory, so a full disk shows as an OSError of the write below
    torch.save({"images": images, "labels": labels}, buf)
    try:
        with atomic_path(cache) as tmp:
            tmp.write_bytes(buf.getbuffer())
    except OSError:
        pass  # a cache that cannot be written (full disk, read-only home): the data is decoded all the same
    return images, labels
