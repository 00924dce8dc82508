"""Shared fixtures: real Fashion-MNIST, small. Torch-free, so tests/runtime runs in the runtime-only install."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    try:
        from fmtl.training.data import find_fashion_mnist
    except ModuleNotFoundError:  # the runtime-only install: no training side, no dataset needed
        return
    if find_fashion_mnist() is None:
        raise pytest.UsageError("Fashion-MNIST is missing: run `make test` (it installs dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own fmtl cache folder (decoded-image caches must not leak between tests)."""
    monkeypatch.setenv("FMTL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def splits():
    """Real Fashion-MNIST test images as a 256-image train split and a 64-image val (and test) split, for
    Trainer tests; torch is imported here, so the runtime-only install never loads it."""
    from fmtl.training.data import load_dataset, seeded_subset
    from fmtl.training.prepare import Splits

    test = load_dataset("fashion-mnist", "test")
    train, val = seeded_subset(test, 256, seed=1), seeded_subset(test, 64, seed=2)
    return Splits(train, val, val, "val")
