"""benchmarks/gpu_check.sh on a machine without a GPU: one line and a non-zero exit; and its multi-process and
onnxruntime steps rehearsed on the CPU (launch/cpu-multiprocess.yaml, the CPU provider), so the script itself is
checked before a GPU is spent on it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def gpu_check(*args: str, timeout: float = 60, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **({"PATH": path} if path else {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)  # fmt: skip


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_it_stops_at_once_with_one_line():
    result = gpu_check()
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.splitlines() == [
        "gpu_check: no GPU here (nvidia-smi finds none): run it on a machine with an NVIDIA GPU"
    ]


def test_an_unknown_step_is_named():
    result = gpu_check("--rehearse", "throughput", "speed")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("gpu_check: unknown step 'speed'")


@pytest.mark.slow
def test_the_multiprocess_and_ort_steps_rehearsed_on_the_cpu():
    result = gpu_check("--rehearse", "multiprocess", "ort", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    work = Path(re.search(r"work folder (\S+)", result.stdout).group(1))
    try:
        report = (work / "results" / "gpu_check_multiprocess.md").read_text()
        assert "launch/cpu-multiprocess.yaml --num_processes 2" in report
        line = report.strip().splitlines()[-1]
        # 997 val and test images in batches of 97: Accelerate pads the last batch; the padding is not counted
        assert "val images counted [997, 997] of 997 each epoch, test 997 of 997" in line
        accuracy, alone = (float(x) for x in re.findall(r"(?:accuracy|saved model) (\d\.\d+)", line))
        assert accuracy > 0.5 and accuracy == pytest.approx(alone, abs=1 / 997)  # a model that tells images apart
        assert "ok   multiprocess: 2 processes" in result.stdout
        # the ort step's plumbing (export of that run, both sessions, fmtl infer) with the CPU provider on both sides
        ort = (work / "results" / "gpu_check_ort.md").read_text().strip().splitlines()[-1]
        assert "CPUExecutionProvider against CPUExecutionProvider on 512 test images: top-1 agreement 1.0000" in ort
        assert "ok   fmtl infer on CPUExecutionProvider: 256 rows" in result.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
