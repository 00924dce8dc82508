"""The runtime-only install (`pip install .`): training commands say in one line what to install."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None, reason="checks the runtime-only install, which has no torch"
)


@pytest.mark.parametrize(
    "args",
    [["train", "--epochs", "1"], ["export", "--onnx", "runs/x"], ["models"], ["samples", "out"]],
    ids=["train", "export", "models", "samples"],
)
def test_training_commands_name_the_training_install(args, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fmtl.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, no traceback
    assert "pip install 'fmtl[train]'" in result.stderr
    assert re.search(r"needs (torch|\S+), which is not installed|\((\S+) is missing\)", result.stderr)
