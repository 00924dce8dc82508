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
