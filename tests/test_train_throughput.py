"""benchmarks/train_throughput.py --device: the GPU benchmark, run tiny on the CPU, and the table it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"
CEILING = "plain PyTorch loop (ceiling)"
# one thread: on a shared 2-core machine two spinning OpenMP threads per process ran a step 100 times slower
TINY = ("--device", "cpu", "--image-size", "32", "--images", "16", "--precisions", "fp32", "--threads", "1")


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)  # fmt: skip


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of the markdown table, header and rule left out."""
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


@pytest.mark.slow
def test_a_cpu_run_writes_rates_and_ratios_computed_from_them(tmp_path):
    result = run(*TINY, "--batch-sizes", "4,8", "--report", "--results-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "train_throughput_cpu.md").read_text()
    assert "\n- machine: " in text and "\n- date: " in text
    assert "- command: `python benchmarks/train_throughput.py --device cpu --image-size 32" in text
    rows = table_rows(text)
    assert [(row[0], row[3]) for row in rows] == [(CEILING, "4"), ("fmtl", "4"), (CEILING, "8"), ("fmtl", "8")]
    assert table_rows(result.stdout) == rows  # what it printed is what it wrote
    ceiling = {row[3]: float(row[4]) for row in rows if row[0] == CEILING}
    for name, precision, compiled, batch, rate, step_ms, memory, versus, wall in rows:
        rate, step_ms, versus = float(rate), float(step_ms), float(versus)
        assert float(wall) + 0.5 >= 2 * 16 / rate  # the row's wall time holds its warm-up and its timed epoch
        assert (precision, compiled, memory) == ("fp32", "no", "n/a")  # no GPU: no GPU memory to report
        assert rate > 0 and int(batch) * 1000 / step_ms == pytest.approx(rate, rel=0.02)
        # the ratio comes from the unrounded rates: allow the table's rounding of both to 0.1 image/s
        slack = 0.006 + versus * (0.05 / rate + 0.05 / ceiling[batch])
        assert versus == pytest.approx(rate / ceiling[batch], abs=slack)
        assert name != CEILING or versus == 1.0


@pytest.mark.slow
def test_compiled_rows_go_through_accelerates_dynamo_plugin(tmp_path):
    # the eager backend traces with dynamo (graph breaks and all) without inductor's minutes of code generation
    result = run(*TINY, "--images", "8", "--batch-sizes", "4", "--compile-precisions", "fp32", "--compile-backend",
                 "eager", "--report", "--results-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = table_rows((tmp_path / "train_throughput_cpu.md").read_text())
    assert [(row[0], row[2]) for row in rows] == [(CEILING, "no"), ("fmtl", "no"), ("fmtl", "yes")]
    assert all(float(row[4]) > 0 for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line_and_non_zero():
    result = run("--device", "cuda", timeout=120)
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.strip().splitlines() == [
        "train_throughput.py: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False)"
    ]


def test_an_unknown_precision_is_a_usage_error():
    result = run("--device", "cpu", "--precisions", "fp32,fp64", timeout=120)
    assert result.returncode == 2 and "unknown precision 'fp64'" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_max_seconds_stops_starting_rows_and_the_report_says_which(tmp_path):
    result = run(*TINY, "--batch-sizes", "4,8", "--max-seconds", "0.001", "--report", "--results-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "train_throughput_cpu.md").read_text()
    assert [row[0] for row in table_rows(text)] == [CEILING]  # the first row always runs
    assert text.rstrip().endswith(
        "Not measured (--max-seconds 0.001 had passed): fmtl fp32 b4, plain PyTorch loop (ceiling) fp32 b8, fmtl fp32 b8."
    )
