"""Shared fixtures. Every test session gets its own $QIMERA_HOME, so nothing touches ~/.qimera."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before any test imports the engine: a fresh home for the whole session (the digits teacher is
# trained once into it); tests that need an empty home set their own with monkeypatch.
os.environ["QIMERA_HOME"] = tempfile.mkdtemp(prefix="qimera-test-home-")

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MODEL = SHARED / "models" / "resnet20-cifar10.th"
SHARED_DATA = SHARED / "data" / "cifar10-dev"

# A short digits schedule: a few seconds on 2 cores.
TINY = dict(epochs=2, iters_per_epoch=6, warmup_epochs=1, calib_epochs=1, batch_size=16, log_every=2)


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
