"""Distributed faults and multi-node, for real on one machine: two "machines" on loopback (gloo), a rank
SIGKILLed or hitting a data error (every rank stops within 60 s, non-zero, and the saved state resumes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faults import INJECT, ROOT, SMALL, TRAIN_PY, results, saved_epoch, wait_for

from fmtl.training.checkpoint import load_model
from fmtl.training.data import load_dataset, seeded_subset

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# the frozen-backbone recipe: fast (features cached), and every process must see every image once
LINEAR = ("--strategy", "linear", "--no-augment", "--eval-batch-size", "40")
STOP_WITHIN = 60  # seconds: every rank gone after one dies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_processes(*args: str, faults: tuple[str, ...] = ()) -> list[str]:
    """accelerate launch with launch/cpu-multiprocess.yaml (2 processes, gloo) on a free port."""
    script = [INJECT, *faults, "--"] if faults else [TRAIN_PY]
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/cpu-multiprocess.yaml"),
            "--main_process_port", str(free_port()), *script, *SMALL, *args]  # fmt: skip


def machine(rank: int, port: int, run: Path, epochs: int) -> subprocess.Popen:
    """One of two "machines": launch/multi-node.yaml, one process each, rendezvous on 127.0.0.1."""
    command = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/multi-node.yaml"), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no",
               TRAIN_PY, *SMALL, *LINEAR, "--epochs", str(epochs), "--output", str(run)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run.parent)


def test_two_machines_on_loopback(tmp_path):
    run, port = tmp_path / "run", free_port()
    machines = [machine(rank, port, run, epochs=2) for rank in (0, 1)]
    outputs = [m.communicate(timeout=600) for m in machines]
    for m, (out, err) in zip(machines, outputs, strict=True):
        assert m.returncode == 0, err[-3000:]
        assert "2 process(es)" in out
    val = seeded_subset(load_dataset("fashion-mnist", "val", val_fraction=0.05), 96, seed=0)
    assert len(val) % 40  # a short last batch: padding must not be counted
    assert [int(r["val_images"]) for r in results(run)] == [len(val), len(val)]  # each image once
    assert [int(r["epoch"]) for r in results(run)] == [1, 2]  # one writer: no row twice
    assert not [p.name for p in run.rglob(".*.tmp*")] and not list(run.glob("state.*"))
    # the same accuracy as one process computing it on the same data with the same model
    metrics = json.loads((run / "metrics.json").read_text())
    test = seeded_subset(load_dataset("fashion-mnist", "test"), 96, seed=0)
    model, _, spec = load_model(run)
    import torch

    from fmtl.training.augment import Preprocess

    with torch.no_grad():
        predicted = model(Preprocess(spec)(test.images)).argmax(1).numpy()
    assert metrics["num_images"] == len(test)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(predicted == test.labels.numpy())), abs=1e-9)


def rank_pid(run: Path, rank: int) -> int | None:
    """The pid of the training process with RANK=rank whose command line names ``run``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in cmdline and b"launch" not in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_stops_every_rank_and_the_state_resumes(tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen(two_processes(*LINEAR, "--epochs", "3", "--output", str(run)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: saved_epoch(run) >= 1 or launcher.poll() is not None, 300, "epoch 1's state")
        pid = rank_pid(run, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        launcher.communicate(timeout=STOP_WITHIN)
        stopped = time.monotonic() - killed
    finally:
        launcher.kill()
    print(f"every rank stopped {stopped:.1f} s after rank 1 was SIGKILLed")
    assert launcher.returncode != 0 and stopped < STOP_WITHIN
    assert rank_pid(run, 0) is None  # no orphan left behind
    resumed = subprocess.run(two_processes("--resume", str(run)), capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(r["epoch"]) for r in results(run)] == [1, 2, 3]


def test_a_data_error_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    run = tmp_path / "run"
    # after epoch 1's save: a DataError at rank 1's first batch of epoch 2 (rank 0 carries on into a collective)
    launcher = subprocess.Popen(two_processes(*LINEAR, "--epochs", "2", "--output", str(run),
                                              faults=("data-error@epoch#2:rank=1",)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: saved_epoch(run) >= 1 or launcher.poll() is not None, 300, "epoch 1's state")
        stderr = launcher.communicate(timeout=STOP_WITHIN)[1]
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("fmtl: error: ")]
    assert len(lines) == 1 and "cannot decode image" in lines[0] and "rank 1" in lines[0], stderr[-3000:]
    assert saved_epoch(run) == 1
    resumed = subprocess.run(two_processes("--resume", str(run)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(r["epoch"]) for r in results(run)] == [1, 2]
