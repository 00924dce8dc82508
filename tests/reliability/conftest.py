"""The suite's shared run: one uninterrupted reference run, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import RECIPE, run_train


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one is compared with (and a real run folder to damage)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(*RECIPE, "--output", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run
