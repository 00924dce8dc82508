"""`fmtl serve --engine ray` (Ray Serve, 1 and 2 replicas) against `fmtl serve`, one run, same images and load.

    .venv/bin/python benchmarks/serve_ray.py --quick --report   # head-only model, 2 s levels: about 5 minutes
    .venv/bin/python benchmarks/serve_ray.py --model export/NAME.onnx

For each engine: start-up time (process start to "ready": for Ray, a local cluster, Serve's
controller and proxy, and every replica loaded and warmed up), then closed-loop levels at the
concurrency sweep of benchmarks/serve.py (each client sends its next request when the previous
one is answered): images/s, p50/p99 latency, status codes, and the resident memory of the whole
process tree (Ray's GCS, raylet, controller, proxy and replicas included). Every server listens
on 127.0.0.1 only; each level is bounded in time; every server is stopped with SIGTERM.

On one small machine Ray Serve is not expected to win: its HTTP proxy, the replicas and the
client share the same cores, and each request crosses two more processes. What it buys is
replicas on other machines; this benchmark measures what that costs where there are none.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import write_results
from serve import (
    CONCURRENCY,
    PYTHON,
    Level,
    Server,
    closed_loop,
    fashion_mnist_pngs,
    machine,
    model_file,
    rss_mb,
    run_client,
)

RAY_SERVER = """
import sys
from pathlib import Path
from fmtl.runtime.serve import ServeConfig
from fmtl.runtime.serve.ray_engine import RayServeOptions, serve_ray

model, port, replicas = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
options = RayServeOptions(replicas=replicas, cpus_per_replica=1)
sys.exit(serve_ray(ServeConfig(model, port=port), options, echo=lambda line: print(line, flush=True)))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an fmtl .onnx file [train and export a tiny Lite0]")
    parser.add_argument("--quick", action="store_true", help="head-only model, 2 s levels, concurrency 1, 16, 64")
    parser.add_argument("--seconds", type=float, help="seconds per load level [5, quick 2]")
    parser.add_argument("--images", type=int, default=256, help="distinct test images sent")
    parser.add_argument("--report", action="store_true", help="write benchmarks/results/serve_ray.md")
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.concurrency = (1, 16, 64) if args.quick else CONCURRENCY
    return args


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and every process under it (Ray's processes are the driver's descendants)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    total = 0.0
    for pid in tree:
        try:
            total += rss_mb(pid)
        except (OSError, AttributeError):  # gone meanwhile, or a kernel thread without VmRSS
            pass
    return total


class RayServer:
    """`serve_ray` in its own process (a local cluster of its own), until stop()."""

    def __init__(self, model: Path, replicas: int):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [PYTHON, "-c", RAY_SERVER, str(model), str(self.port), str(replicas)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = ""
        for line in self.process.stdout:
            if line.startswith("ready"):
                break
        else:
            raise SystemExit(f"the Ray Serve server did not start: {line}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def run_engine(name: str, start, bodies: list[bytes], args) -> list[str]:
    """Start a server, run the concurrency sweep against it, stop it; the table rows."""
    started = time.perf_counter()
    server = start()
    startup = time.perf_counter() - started
    idle_rss = tree_rss_mb(server.pid)
    rows = []
    try:
        for concurrency in args.concurrency:
            level: Level = run_client(closed_loop([server.port], bodies, concurrency, args.seconds))
            codes = ", ".join(f"{code}: {count}" for code, count in sorted(level.codes.items(), key=str))
            rows.append(f"| {name} | {startup:.1f} | {concurrency} | {level.achieved:.0f} | {level.ms(50):.1f} | "
                        f"{level.ms(99):.1f} | {codes} | {idle_rss:.0f} / {tree_rss_mb(server.pid):.0f} |")  # fmt: skip
            print(rows[-1], flush=True)
    finally:
        code = server.stop()
    if code != 0:
        print(f"warning: {name} exited {code} after SIGTERM")
    return rows


HEADER = (
    "| engine | start-up s | concurrency | images/s | p50 ms | p99 ms | codes | RSS MB idle / loaded (process tree) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    print(f"machine: {machine()}; load average at start {load_at_start:.2f}")
    with tempfile.TemporaryDirectory(prefix="fmtl-serve-ray-bench-") as folder, model_file(args, Path(folder)) as model:
        bodies = [path.read_bytes() for path in fashion_mnist_pngs(args.images, Path(folder))]
        print(f"{len(bodies)} Fashion-MNIST test images as PNG, {np.mean([len(b) for b in bodies]):.0f} bytes each\n")
        print(HEADER)
        rows = run_engine("fmtl serve", lambda: Server(model), bodies, args)
        # one onnxruntime thread, as each Ray replica of 1 CPU has: separates the engine from the threading
        rows += run_engine("fmtl serve --threads 1", lambda: Server(model, "--threads", "1"), bodies, args)
        for replicas in (1, 2):
            rows += run_engine(f"ray, {replicas} replica{'s' * (replicas > 1)}",
                               lambda replicas=replicas: RayServer(model, replicas), bodies, args)  # fmt: skip
        load = os.getloadavg()[0]
        print(f"\nload average at the end {load:.2f}")
    if args.report:
        import ray

        note = (f"Model: {model.name if args.model else 'a tiny EfficientNet-Lite0 (head only in --quick)'}; "
                f"{len(bodies)} PNG images, one per request, closed loop, {args.seconds:g} s per level, "
                f"loopback only, the client in the same machine. Ray Serve: a local cluster per run, replicas "
                f"of 1 CPU (one onnxruntime thread each), max_batch_size 16. Load average at the start "
                f"{load_at_start:.2f}, at the end {load:.2f}: other processes shared the cores. The "
                "`fmtl serve --threads 1` rows have the threads of one Ray replica.")  # fmt: skip
        write_results("serve_ray", "fmtl serve against Ray Serve (1 and 2 replicas), one machine",
                      f"{HEADER}\n" + "\n".join(rows), versions=f"ray {ray.__version__}", note=note)  # fmt: skip


if __name__ == "__main__":
    main()
