"""Shared fixtures. Every test session gets its own $QIMERA_HOME, so nothing touches ~/.qimera."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

# Before any test imports the engine: a fresh home for the whole session (the digits teacher is
# trained once into it); tests that need an empty home set their own with monkeypatch.
os.environ["QIMERA_HOME"] = tempfile.mkdtemp(prefix="qimera-test-home-")
# The pages show the shipped CIFAR-10 showcase beside the user's runs; tests see it only where they ask
# for it (tests/test_showcase.py), so "nothing run yet" means nothing at all.
SHOWCASE = Path(__file__).resolve().parents[1] / "assets" / "showcase"
os.environ["QIMERA_SHOWCASE"] = str(Path(os.environ["QIMERA_HOME"]) / "no-showcase")

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MODEL = SHARED / "models" / "resnet20-cifar10.th"
SHARED_DATA = SHARED / "data" / "cifar10-dev"

# A short digits schedule: a few seconds on 2 cores.
TINY = dict(epochs=2, iters_per_epoch=6, warmup_epochs=1, calib_epochs=1, batch_size=16, log_every=2)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (servers in tests listen there only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_sessionfinish(session, exitstatus):
    import shutil
    shutil.rmtree(os.environ["QIMERA_HOME"], ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s; runs in CI all the same")
    config.addinivalue_line("markers", "browser: drives the app in chromium (Playwright); see tests/test_browser.py")


@pytest.fixture(scope="session")
def digits_teacher():
    from qimera_engine import get_teacher
    return get_teacher("digits-cnn", "digits")


@pytest.fixture(scope="session")
def shared_resnet20():
    if not SHARED_MODEL.exists():
        pytest.skip(f"shared ResNet-20 checkpoint not found at {SHARED_MODEL}")
    return SHARED_MODEL


@pytest.fixture(scope="session")
def shared_cifar_dev():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared CIFAR-10 dev split not found at {SHARED_DATA}")
    return SHARED_DATA


def fake_cifar10(root: Path, monkeypatch, per_batch: int = 4) -> Path:
    """Small stand-ins for CIFAR-10's python files under ``root``, in torchvision's format.

    torchvision checks the md5 sums of the real files, so the checks are patched for the test.
    """
    import pickle

    import numpy as np
    import torchvision
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                         "labels": [i % 10 for i in range(per_batch)]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    return root
