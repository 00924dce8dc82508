"""Shared fixtures: real Fashion-MNIST, small."""

from __future__ import annotations

import pytest

from fmtl.data import find_fashion_mnist


def pytest_configure(config):
    if find_fashion_mnist() is None:
        raise pytest.UsageError("Fashion-MNIST is missing: run `make test` (it installs dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own fmtl cache folder (decoded-image caches must not leak between tests)."""
    monkeypatch.setenv("FMTL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
