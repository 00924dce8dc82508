"""Helpers for the fault-injection suite: small real runs, a small real full disk, one-line errors."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = str(ROOT / "fmtl" / "train.py")
# Lite0 at 32 px on a few hundred Fashion-MNIST images: seconds per epoch, every code path of a real run.
SMALL = ["--image-size", "32", "--max-train-samples", "256", "--val-fraction", "0.05", "--max-val-samples", "96",
         "--max-test-samples", "96", "--batch-size", "64", "--eval-batch-size", "96", "--quiet"]  # fmt: skip
# fine-tuning with augmentation and an MLP head (dropout): every random generator matters
RECIPE = ["--strategy", "hybrid", "--head-epochs", "1", "--epochs", "3", "--head", "mlp"]


def train_command(*args: str) -> list[str]:
    """``python fmtl/train.py SMALL... args`` as a real process."""
    return [sys.executable, TRAIN_PY, *SMALL, *args]


def run_train(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*args), capture_output=True, text=True, timeout=timeout, **kwargs)


@contextlib.contextmanager
def small_disk(parent: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted under ``parent`` (we are root in CI); skips the test where mounting is refused."""
    mount_point = parent / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the injected-ENOSPC tests cover this")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file until only about ``leave`` bytes are free."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def one_error_line(stderr: str) -> str:
    """The single ``fmtl: error:`` line of a failed command (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("fmtl: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


INJECT = str(Path(__file__).with_name("inject.py"))


def inject_command(*faults: str, args: tuple[str, ...] = ()) -> list[str]:
    """The training command with faults injected (see inject.py)."""
    return [sys.executable, INJECT, *faults, "--", *SMALL, *args]


def saved_epoch(run: Path) -> int:
    """The epoch of the run's saved training state (0: none yet, or caught mid-rename)."""
    try:
        return json.loads((run / "state" / "trainer.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(condition, timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def results(run: Path) -> list[dict]:
    """results.csv without the timing columns (which no two runs share)."""
    with open(run / "results.csv") as handle:
        return [
            {k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in csv.DictReader(handle)
        ]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical: every results.csv value, the final weights (the last state's model) and the best model."""
    import torch
    from safetensors.torch import load_file

    assert results(run) == results(reference)
    for name in ("state/model.safetensors", "model.safetensors"):
        ours, theirs = load_file(str(run / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys(), name
        different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
