"""`fmtl infer` against `fmtl infer --engine ray` on one machine: images/s, start-up time, peak memory.

    .venv/bin/python benchmarks/ray_infer.py                          # trains and exports a tiny Lite0 first
    .venv/bin/python benchmarks/ray_infer.py --model export/NAME.onnx # an existing fmtl model instead
    .venv/bin/python benchmarks/ray_infer.py --images 500 --rounds 1  # smoke run

1. The model: ``--model``, or a real small one: EfficientNet-Lite0 with its ImageNet weights,
   64 px, head only, 1 epoch on 3,000 Fashion-MNIST images, then ``fmtl export --onnx``.
2. The images: ``--images`` Fashion-MNIST test images written as PNG files (28x28 grey).
3. Contenders, each the real command in its own process, run in turns for ``--rounds`` rounds:
   - ``local``: ``fmtl infer DIR --format jsonl -o FILE`` (one process: decoding threads and
     onnxruntime share the cores);
   - ``ray``: ``fmtl infer DIR --engine ray --out DIR`` with its defaults: it starts a local
     cluster (loopback only), one Classifier actor with one CPU, the other CPU for reading;
   - ``ray, running cluster``: the same with ``--address`` to a cluster started beforehand by
     ``ray start --head`` (what a shared cluster looks like: no cluster start-up in the job).
   Each runs on 1 image (its start-up time: launch, model load, cluster and actor start) and
   on all of them. images/s is all images over the whole run; "steady" is (N - 1) images over
   the time beyond the one-image run.
4. Peak memory: the highest sum of PSS (proportional set size: shared pages split between the
   processes sharing them, so Ray's object store counts once) over the command's process tree,
   sampled every 0.2 s; for the running cluster, over its processes plus the command's.
5. Answers: the Ray rows must give the local rows' top-1 for every image (printed).

Every line says how much CPU other processes used meanwhile (this machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FMTL = [sys.executable, "-m", "fmtl.cli"]
RAY = str(Path(sys.executable).with_name("ray"))
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
# `ray start` and the jobs joining it: loopback only, as fmtl's own local cluster; Ray's token
# authentication on, as a cluster started by ray.init has it (~/.ray/auth_token)
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an fmtl .onnx file [train and export a tiny Lite0]")
    parser.add_argument("--images", type=int, default=5000, help="PNG files to classify [5000]")
    parser.add_argument("--rounds", type=int, default=2, help="turns of local / ray [2]")
    return parser.parse_args()


@dataclass
class Measure:
    seconds: float
    peak_mib: float
    others_cpus: float  # CPUs other processes used on average meanwhile


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def pss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total / 2**20


def busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def measure(command: list[str], extra: list[psutil.Process] | None = None, env: dict | None = None) -> Measure:
    """Run ``command``; its wall time, peak PSS of its tree (plus ``extra``), and others' CPU meanwhile."""

    def cpu_seconds(process: psutil.Process) -> float:
        return sum(process.cpu_times()[:2])

    baseline = {p.pid: cpu_seconds(p) for root in extra or [] for p in tree(root)}  # a running cluster's past
    busy_before = busy_cpu_seconds()
    start = time.perf_counter()
    process = psutil.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    peak, own_cpu, stop = [0.0], {}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            processes = tree(process) + [p for root in extra or [] for p in tree(root)]  # the raylet's workers too
            peak[0] = max(peak[0], pss_mib(processes))
            for p in processes:
                try:
                    own_cpu[p.pid] = cpu_seconds(p) - baseline.get(p.pid, 0.0)
                except psutil.Error:
                    pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        said = [line for line in stderr.decode().splitlines() if line.strip() and not line.startswith("/")]
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n" + "\n".join(said[-30:]))
    others = max(0.0, (busy_cpu_seconds() - busy_before - sum(own_cpu.values())) / seconds)
    return Measure(seconds, peak[0], others)


def write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    with gzip.open(FASHION_MNIST_TEST) as handle:
        pixels = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    for i in range(count):
        Image.fromarray(pixels[i % len(pixels)]).save(folder / f"{i:05d}.png")


def tiny_model(work: Path) -> Path:
    run = work / "run"
    subprocess.run(
        [*FMTL, "train", "--model", "efficientnet_lite0", "--strategy", "linear", "--epochs", "1",
         "--image-size", "64", "--max-train-samples", "3000", "--max-eval-samples", "1000", "--no-augment",
         "--no-save-state", "--quiet", "--output", str(run)],
        cwd=REPO, check=True,
    )  # fmt: skip
    subprocess.run([*FMTL, "export", "--onnx", str(run), "-o", str(work / "model.onnx")], cwd=REPO, check=True)
    return work / "model.onnx"


def local_command(model: Path, folder: Path, out: Path) -> list[str]:
    return [*FMTL, "infer", str(folder), "-m", str(model), "--format", "jsonl", "-o", str(out), "--quiet", "-k", "1"]


def ray_command(model: Path, folder: Path, out: Path, address: str | None = None) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)  # no resume between measurements
    join = ["--address", address] if address else []
    return [*FMTL, "infer", str(folder), "-m", str(model), "--engine", "ray", "--out", str(out), "--quiet", "-k", "1",
            *join]  # fmt: skip


def start_cluster(work: Path) -> tuple[str, list[psutil.Process]]:
    """``ray start --head`` on loopback, on a free port, in a temp dir of its own; its address and
    its processes (found by that temp dir in their command line, so only this cluster is stopped)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp_dir = str(work / "cluster")  # not work / "ray": that is an --out folder, emptied before each run
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", str(os.cpu_count()),
                    "--include-dashboard=false", "--temp-dir", temp_dir],
                   check=True, capture_output=True, env={**os.environ, **CLUSTER_ENV})  # fmt: skip
    processes = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in process.info["cmdline"] or []):
            processes.append(process)
    return f"127.0.0.1:{port}", processes


def stop_cluster(processes: list[psutil.Process]) -> None:
    """Terminate this cluster's processes and the workers they started, by pid."""
    everything = {p.pid: p for root in processes for p in tree(root)}
    for process in everything.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(everything.values()), timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def agreement(local_out: Path, ray_out: Path) -> tuple[int, int]:
    """(images with the same top-1, images) between the local jsonl and the Ray part files."""
    sys.path.insert(0, str(REPO))
    from fmtl.runtime.ray_infer import read_results

    local = {}
    for line in local_out.read_text().splitlines():
        row = json.loads(line)
        local[os.path.abspath(row["path"])] = row["top_k"][0]["label"]
    table = read_results(ray_out)
    ours = dict(zip(table["path"].to_pylist(), (labels[0] for labels in table["labels"].to_pylist()), strict=True))
    return sum(ours.get(path) == label for path, label in local.items()), len(local)


def report(name: str, one: Measure, full: Measure, count: int) -> None:
    beyond = full.seconds - one.seconds  # can be <= 0 when other jobs slowed the one-image run
    steady = f"{(count - 1) / beyond:7.1f}" if beyond > 0 else "    n/a"
    print(
        f"{name:<22} {count / full.seconds:8.1f} img/s  steady {steady} img/s  start-up {one.seconds:5.1f} s  "
        f"total {full.seconds:6.1f} s  peak {max(one.peak_mib, full.peak_mib):6.0f} MiB  "
        f"(others used {one.others_cpus:.1f} / {full.others_cpus:.1f} CPUs)",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.images} PNG files", flush=True)
    with tempfile.TemporaryDirectory(prefix="fmtl-ray-bench-") as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else tiny_model(work)
        folder, single = work / "images", work / "one"
        write_images(folder, args.images)
        write_images(single, 1)
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}", flush=True)
            one = measure(local_command(model, single, work / "one.jsonl"))
            full = measure(local_command(model, folder, work / "local.jsonl"))
            report("local fmtl infer", one, full, args.images)
            one = measure(ray_command(model, single, work / "ray-one"))
            full = measure(ray_command(model, folder, work / "ray"))
            report("ray, local cluster", one, full, args.images)
        same, total = agreement(work / "local.jsonl", work / "ray")
        print(f"top-1 of the Ray rows equal to fmtl infer's: {same} / {total}", flush=True)
        address, cluster = start_cluster(work)
        try:
            one = measure(ray_command(model, single, work / "ray-one", address), cluster, CLUSTER_ENV)
            full = measure(ray_command(model, folder, work / "ray", address), cluster, CLUSTER_ENV)
            report("ray, running cluster", one, full, args.images)
        finally:
            stop_cluster(cluster)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
