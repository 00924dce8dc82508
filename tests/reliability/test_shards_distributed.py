"""Training from packed shards, for real: two processes and two "machines" on loopback reading a local folder
that stands in for a bucket (``local:DIR``), each rank reading only its part (shown by the sample ids it read);
a run SIGKILLed mid-epoch and resumed from shards is bit-for-bit the uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from faults import ROOT, TRAIN_PY, assert_same_run, wait_for
from test_distributed import free_port
from test_store_faults import saved_position

pytest.importorskip("litdata")
from fmtl.training.data import load_dataset, seeded_subset, sources  # noqa: E402
from fmtl.training.data.pack import pack  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(sources, "shards"), reason="the shards hooks (sources, Trainer) are not in"),
]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
RUN = ["--image-size", "32", "--batch-size", "32", "--eval-batch-size", "48", "--quiet"]
# a head epoch on the images (no cached features): its batches' pixels are read through the sampler
ONE_EPOCH = ["--strategy", "linear", "--epochs", "1", "--no-head-cache"]
HYBRID = ["--strategy", "hybrid", "--head-epochs", "1", "--epochs", "2"]  # fine-tuning in epoch 2


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> Path:
    """256 train, 96 val and 96 test Fashion-MNIST images packed 32 to a chunk (8 train chunks)."""
    out = tmp_path_factory.mktemp("bucket") / "fm"
    train = seeded_subset(load_dataset("fashion-mnist", "train", val_fraction=0.05), 256, seed=0)
    val = seeded_subset(load_dataset("fashion-mnist", "val", val_fraction=0.05), 96, seed=0)
    test = seeded_subset(load_dataset("fashion-mnist", "test"), 96, seed=0)
    pack({"train": train, "val": val, "test": test}, out, chunk_bytes=784 * 32, quiet=True)
    return out


def env(cache: Path, trace: Path, **extra) -> dict:
    trace.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "FMTL_CACHE_DIR": str(cache), "FMTL_SHARD_TRACE": str(trace), "PYTHONPATH": str(ROOT),
            **extra}  # fmt: skip


def reads(trace: Path) -> dict[tuple[str, str], list[int]]:
    """(rank, split) -> every id read in training batches (32 ids a line; the features pass reads 48 at a time)."""
    out = defaultdict(list)
    for path in trace.glob("reads-*.txt"):
        for line in path.read_text().splitlines():
            rank, split, *ids = line.split()
            if len(ids) == 32:
                out[rank, split] += map(int, ids)
    return out


def check_parts(read: dict, ranks: int, n: int = 256) -> None:
    """Each training image read by exactly one rank, each rank from its own run of chunks (32 images each)."""
    seen = [set(read[str(r), "train"]) for r in range(ranks)]
    assert set().union(*seen) == set(range(n)) and sum(map(len, seen)) == n
    chunks = [{i // 32 for i in s} for s in seen]
    assert len(set.intersection(*chunks)) <= ranks - 1


def test_two_processes_from_a_bucket_each_read_their_part(bucket, tmp_path):
    run, trace = tmp_path / "run", tmp_path / "trace"
    command = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/cpu-multiprocess.yaml"),
               "--main_process_port", str(free_port()), TRAIN_PY, "--data", f"local:{bucket}", *RUN,
               *ONE_EPOCH, "--workers", "1", "--output", str(run)]  # fmt: skip
    result = subprocess.run(command, env=env(tmp_path / "cache", trace), capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    check_parts(reads(trace), 2)


def test_two_machines_on_loopback_each_stream_their_part_within_the_cache(bucket, tmp_path):
    port, run = free_port(), tmp_path / "run"
    chunk = (bucket / "train" / "chunk-000000.bin").stat().st_size
    machines = []
    for rank in (0, 1):  # each "machine" its own cache, kept under 3 chunks
        command = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/multi-node.yaml"), "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", TRAIN_PY, "--data", f"local:{bucket}",
                   *RUN, *ONE_EPOCH, "--workers", "0", "--output", str(run)]  # fmt: skip
        cache_mb = str(3 * chunk / (1 << 20))
        machine_env = env(tmp_path / f"cache{rank}", tmp_path / f"trace{rank}", FMTL_SHARD_CACHE_MB=cache_mb)
        machines.append(subprocess.Popen(command, env=machine_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, cwd=tmp_path))  # fmt: skip
    for machine in machines:
        _, err = machine.communicate(timeout=600)
        assert machine.returncode == 0, err[-3000:]
    read = reads(tmp_path / "trace0")
    read.update(reads(tmp_path / "trace1"))
    check_parts(read, 2)
    for rank in (0, 1):
        cached = sum(p.stat().st_size for p in (tmp_path / f"cache{rank}" / "shards").rglob("*.bin"))
        assert cached <= 3 * chunk


def test_a_run_from_shards_killed_mid_epoch_resumes_bit_for_bit(bucket, tmp_path):
    options = [*RUN, *HYBRID, "--workers", "2", "--save-every-steps", "2", "--data", f"local:{bucket}"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    environment = env(tmp_path / "cache", tmp_path / "trace")
    done = subprocess.run([sys.executable, TRAIN_PY, *options, "--output", str(reference)], env=environment,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    process = subprocess.Popen([sys.executable, TRAIN_PY, *options, "--output", str(run)], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:  # caught inside the fine-tuning epoch, after a mid-epoch save
        wait_for(lambda: (saved_position(run) or {}).get("epoch") == 2 or process.poll() is not None, 600, "a save")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    position = saved_position(run)
    assert position and position["epoch"] == 2 and position["step"] >= 2, position
    resumed = subprocess.run([sys.executable, TRAIN_PY, "--resume", str(run), "--quiet"], env=environment,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {position['step']} of epoch 2" in resumed.stdout + resumed.stderr
    assert_same_run(run, reference)
