"""`fmtl serve` under load: dynamic batching against no batching and the in-process ceiling, one run.

    .venv/bin/python benchmarks/serve.py                      # trains a tiny Lite0: about 10 minutes, half training
    .venv/bin/python benchmarks/serve.py --quick              # head-only model, shorter levels: about 3.5 minutes
    .venv/bin/python benchmarks/serve.py --model export/NAME.onnx
    .venv/bin/python benchmarks/serve.py --quick --report     # also writes benchmarks/results/serve-quick.md

1. The model: ``--model``, or the default recipe's architecture (EfficientNet-Lite0, default
   --image-size) trained for a moment (``fmtl train --max-train-samples 2000 --epochs 2
   --head-epochs 1``) and exported with ``fmtl export --onnx``: speed does not depend on accuracy.
2. Real Fashion-MNIST test images encoded as PNG. The ceiling: ``Classifier.predict`` in this
   process on the same PNG files (decoding included) at batch 1..64: the batch-size sweep that
   sets ``--max-batch-size``'s default, and the batch-1 latency the concurrency-1 target uses.
3. The server (``python -m fmtl.cli serve``, its own process) with dynamic batching, and with
   ``--max-batch-size 1``: closed-loop sweeps (concurrency 1, 4, 16, 64: each client sends its
   next request when the previous one is answered) and, for the batching server, an open-loop
   sweep (fixed arrival rates; latency counted from the intended send time, so a stalled
   server cannot hide it). Per level: offered and achieved images/s, p50/p95/p99/max latency,
   status codes, mean batch size, queue wait and model time per request (from /metrics), RSS.
4. Overload at about 2x capacity (open loop): the excess gets 503, accepted requests keep a
   bounded p99, RSS stays flat, and goodput stays >= 80 % of capacity (beside the same overload
   with ``--parallel-batches 1``). SIGTERM under load: every request read gets an answer.
5. Where the time goes: the server's CPU per request split into model and the rest (HTTP,
   decoding, JSON), a profile of the event-loop thread, and two server processes with one
   onnxruntime thread each behind the same client (what a second worker process adds).

The client is a minimal asyncio HTTP/1.1 client (keep-alive, one connection per concurrent
request; on uvloop, as the server) in this process: it shares the 2 cores with the server, as any
loopback test does, and its CPU use is printed. Traffic goes only to 127.0.0.1, each level is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile  # noqa: F401  (the profile run uses it through `python -m cProfile`)
import io
import os
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fmtl.runtime.classifier import Classifier
from fmtl.runtime.serve.config import usable_cpus

PYTHON = sys.executable
CONCURRENCY = (1, 4, 16, 64)
BATCH_SWEEP = (1, 2, 4, 8, 16, 32, 64)
TICKS = os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an fmtl .onnx file [train and export a tiny Lite0]")
    parser.add_argument("--quick", action="store_true", help="head-only model, shorter levels (about 3.5 minutes)")
    parser.add_argument("--seconds", type=float, help="seconds per load level [5, quick 2]")
    parser.add_argument("--images", type=int, default=512, help="distinct test images sent")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the target check [5, quick 3]")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile and two-process runs")
    parser.add_argument("--report", action="store_true", help="also write benchmarks/results/serve[-quick].md")
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (3 if args.quick else 5)
    return args


# --- machine and processes -------------------------------------------------------------------------


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    import onnxruntime

    return (
        f"{model}, {usable_cpus()} usable CPUs, onnxruntime {onnxruntime.__version__}, Python {sys.version.split()[0]}"
    )


def busy_ticks() -> int:
    """CPU ticks spent by everything on the machine (user + nice + system + irq + softirq + steal)."""
    fields = open("/proc/stat").readline().split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))


def process_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_mb(pid: int) -> float:
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


@dataclass
class CpuWatch:
    """CPU seconds of the server, this client and everything else, over one measurement."""

    server_pids: list[int]
    start: tuple[int, int, int] = (0, 0, 0)

    def sample(self) -> tuple[int, int, int]:
        return busy_ticks(), sum(process_ticks(p) for p in self.server_pids), process_ticks(os.getpid())

    def __enter__(self) -> CpuWatch:
        self.start, self.started = self.sample(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end = self.sample()
        total, server, client = (b - a for a, b in zip(self.start, end, strict=True))
        self.server, self.client = server / TICKS, client / TICKS
        self.others = max(0, total - server - client) / TICKS
        self.wall = time.perf_counter() - self.started

    @property
    def others_share(self) -> float:
        """CPUs (of the machine's) that other processes kept busy on average meanwhile."""
        return self.others / self.wall


class Server:
    """`python -m fmtl.cli serve MODEL --port 0 ...` in its own process, until stop()."""

    def __init__(self, model: Path, *options: str, prefix: tuple[str, ...] = ()):
        command = [PYTHON, *prefix, "-m", "fmtl.cli", "serve", str(model), "--port", "0", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = ""
        for line in self.process.stdout:
            if match := re.search(r"http://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
            if line.startswith("ready"):
                break
        else:
            raise SystemExit(f"the server did not start: {line}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples (and labelled ones as name{labels}) of GET /metrics."""
        status, body = run_client(one_request(self.port, "GET", "/metrics"))
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def run_client(coroutine):
    """``asyncio.run`` on uvloop where it is installed (fmtl's runtime install has it): the client shares
    the cores with the server, and on asyncio's own loop it costs up to twice the CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# --- a minimal HTTP/1.1 client ---------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; request() returns (status, body).

    With ``retry_stale``, a request on a reused socket that the server had already closed (its
    keep-alive timeout, 5 s in uvicorn) is sent again on a new socket, as HTTP clients do."""

    def __init__(self, port: int, retry_stale: bool = True):
        self.port = port
        self.retry_stale = retry_stale
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.answered = 0  # answers on the current socket

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "image/png"):
        reused = self.writer is not None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.answered = 0
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(f"{head}Content-Type: {content_type}\r\n\r\n".encode() + body)
        try:
            header = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError) as error:
            stale = reused and not getattr(error, "partial", b"")
            self.close()
            if stale and self.retry_stale:
                return await self.request(method, path, body, content_type)
            raise
        status = int(header[9:12])
        length = int(re.search(rb"(?i)content-length: *(\d+)", header).group(1))
        answer = await self.reader.readexactly(length)
        self.answered += 1
        if re.search(rb"(?i)connection: *close", header):
            self.close()
        return status, answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def one_request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    connection = Connection(port)
    try:
        return await connection.request(method, path, body)
    finally:
        connection.close()


@dataclass
class Level:
    """What one load level measured."""

    name: str
    seconds: float  # from the first request sent to the last answer
    rate: float | None = None  # open loop: the intended requests per second
    latencies: list[float] = field(default_factory=list)  # of answered requests, seconds
    codes: Counter = field(default_factory=Counter)  # status code (or an error name) -> count
    accepted_latencies: list[float] = field(default_factory=list)  # of 200 answers only

    def add(self, latency: float, code: int | str) -> None:
        self.codes[code] += 1
        if isinstance(code, int):
            self.latencies.append(latency)
        if code == 200:
            self.accepted_latencies.append(latency)

    @property
    def offered(self) -> float:
        return self.rate or sum(self.codes.values()) / self.seconds

    @property
    def achieved(self) -> float:
        return self.codes[200] / self.seconds

    def ms(self, q: float, accepted: bool = False) -> float:
        values = self.accepted_latencies if accepted else self.latencies
        return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def closed_loop(ports: list[int], bodies: list[bytes], concurrency: int, seconds: float) -> Level:
    """``concurrency`` clients, each sending its next request as soon as the previous one is answered."""
    level = Level(f"closed c={concurrency}", seconds)
    deadline = time.perf_counter() + seconds

    async def client(number: int) -> None:
        connection = Connection(ports[number % len(ports)])
        i = number
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                status, _ = await connection.request("POST", "/v1/classify", bodies[i % len(bodies)])
            except (OSError, asyncio.IncompleteReadError) as error:
                level.add(0, type(error).__name__)
                connection.close()
                continue
            level.add(time.perf_counter() - started, status)
            i += concurrency
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    level.seconds = time.perf_counter() - started
    return level


async def open_loop(port: int, bodies: list[bytes], rate: float, seconds: float, max_connections: int = 512) -> Level:
    """Requests at fixed intended times (``rate`` per second); latency from the intended time, so a
    stall delays every request behind it in the figures too (no coordinated omission). One task per
    request, started at its time: a late loop starts every request due at once."""
    level = Level(f"open {rate:.0f}/s", seconds, rate)
    idle: list[Connection] = []
    opened = 0
    start = time.perf_counter() + 0.05

    async def one(i: int, intended: float) -> None:
        nonlocal opened
        while not idle and opened >= max_connections:
            await asyncio.sleep(0.001)
        if idle:
            connection = idle.pop()
        else:
            connection, opened = Connection(port), opened + 1
        try:
            status, _ = await connection.request("POST", "/v1/classify", bodies[i % len(bodies)])
        except (OSError, asyncio.IncompleteReadError) as error:
            level.add(0, type(error).__name__)
            connection.close()
            opened -= 1
            return
        level.add(time.perf_counter() - intended, status)
        idle.append(connection)

    running: set[asyncio.Task] = set()
    for i in range(int(rate * seconds)):
        intended = start + i / rate
        if (delay := intended - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, intended))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    level.seconds = time.perf_counter() - start  # answers to the last requests come after the sending window
    for connection in idle:
        connection.close()
    return level


# --- in-process ceiling ----------------------------------------------------------------------------


def fashion_mnist_pngs(count: int, folder: Path) -> list[Path]:
    """The first ``count`` Fashion-MNIST test images as PNG files."""
    from fmtl.training.data import find_fashion_mnist, read_idx

    root = find_fashion_mnist()
    if root is None:
        raise SystemExit("Fashion-MNIST not found: run `make data`")
    source = next(p for p in (root / "t10k-images-idx3-ubyte.gz", root / "t10k-images-idx3-ubyte") if p.is_file())
    images = read_idx(source, 2051)[:count]
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"test{i:05d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def ceiling(model: Path, paths: list[Path], seconds: float) -> dict[int, float]:
    """Classifier.predict on the PNG files (decoding included) per batch size: images/s."""
    clf = Classifier(model, threads=usable_cpus())
    rates = {}
    for batch in BATCH_SWEEP:
        clf.predict(paths[:batch], batch_size=batch)  # warm-up
        rates[batch] = in_process_rate(clf, paths, batch, seconds / 2)
    return rates


# --- measurements ----------------------------------------------------------------------------------


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def server_split(before: dict, after: dict) -> str:
    """Mean batch size, queue wait and model time per request, from two /metrics scrapes."""
    batches = delta(after, before, "fmtl_batch_size_count")
    requests = delta(after, before, "fmtl_queue_wait_seconds_count")
    if not batches or not requests:
        return "-", "-", "-"
    size = delta(after, before, "fmtl_batch_size_sum") / batches
    wait = delta(after, before, "fmtl_queue_wait_seconds_sum") / requests * 1000
    compute = delta(after, before, "fmtl_inference_duration_seconds_sum") / batches * 1000
    return f"{size:.1f}", f"{wait:.2f}", f"{compute:.2f}"


HEADER = ("| level | offered img/s | achieved img/s | p50 ms | p95 ms | p99 ms | max ms | codes | batch | "
          "queue wait ms | model ms/batch | server CPU ms/req | client CPU ms/req | RSS MB start→end | others' CPU |")  # fmt: skip


def row(level: Level, split: tuple[str, str, str], rss: tuple[float, float], cpu: CpuWatch) -> str:
    total = requests = max(1, sum(level.codes.values()))
    codes = ", ".join(f"{code}: {count / total:.0%}" for code, count in sorted(level.codes.items(), key=str))
    return (f"| {level.name} | {level.offered:.0f} | {level.achieved:.0f} | {level.ms(50):.1f} | {level.ms(95):.1f} | "
            f"{level.ms(99):.1f} | {level.ms(100):.1f} | {codes} | {split[0]} | {split[1]} | {split[2]} | "
            f"{cpu.server / requests * 1000:.2f} | {cpu.client / requests * 1000:.2f} | "
            f"{rss[0]:.0f}→{rss[1]:.0f} | {cpu.others_share:.2f} |")  # fmt: skip


def measure(server: Server, coroutine, name: str | None = None) -> tuple[Level, str]:
    before, rss_start = server.metrics(), rss_mb(server.pid)
    with CpuWatch([server.pid]) as cpu:
        level = run_client(coroutine)
    level.name = name or level.name
    after = server.metrics()
    line = row(level, server_split(before, after), (rss_start, rss_mb(server.pid)), cpu)
    print(line, flush=True)
    return level, line


def sweep(model: Path, options: tuple[str, ...], bodies: list[bytes], args) -> dict[int, Level]:
    server = Server(model, *options)
    try:
        levels = {}
        for concurrency in CONCURRENCY:
            levels[concurrency], _ = measure(server, closed_loop([server.port], bodies, concurrency, args.seconds))
        return levels
    finally:
        server.stop()


def target_check(model: Path, paths: list[Path], bodies: list[bytes], args) -> None:
    """The issue's targets, contenders taking turns ``args.rounds`` times so that other jobs on the
    machine hit them alike: the ceiling at batch 16 and 1, both servers at concurrency 16 and 1."""
    clf = Classifier(model, threads=usable_cpus())
    servers = {"batched": Server(model), "mbs1": Server(model, "--max-batch-size", "1")}
    print()
    rounds = []
    try:
        for _ in range(args.rounds):
            with CpuWatch([s.pid for s in servers.values()]) as cpu:
                started = time.perf_counter()
                got = {"ceiling16": in_process_rate(clf, paths, 16, args.seconds),
                       "ceiling1_ms": in_process_call_ms(clf, paths, args.seconds)}  # fmt: skip
                for name, server in servers.items():
                    got[name] = run_client(closed_loop([server.port], bodies, 16, args.seconds)).achieved
                got["c1_p50_ms"] = run_client(closed_loop([servers["batched"].port], bodies, 1, args.seconds)).ms(50)
            got["others"] = cpu.others / (time.perf_counter() - started)
            rounds.append(got)
            print("round: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    limit = 1.5 * median["ceiling1_ms"] + 2
    print(f"\ntargets (median of {len(rounds)} interleaved rounds; others' CPU {median['others']:.2f}):")
    print(
        f"- concurrency 16: {median['batched']:.0f} images/s batched, {median['mbs1']:.0f} with --max-batch-size 1: "
        f"{median['batched'] / median['mbs1']:.2f}x (target 1.3x); in-process ceiling at batch 16 "
        f"{median['ceiling16']:.0f} images/s: {median['batched'] / median['ceiling16']:.2f} of it (target 0.5)"
    )
    print(
        f"- concurrency 1: p50 {median['c1_p50_ms']:.2f} ms; one in-process batch-1 call {median['ceiling1_ms']:.2f} "
        f"ms, so the limit is 1.5 x that + 2 ms = {limit:.2f} ms: {'met' if median['c1_p50_ms'] <= limit else 'not met'}"
    )
    per_round = [(r["batched"] / r["mbs1"], r["batched"] / r["ceiling16"]) for r in rounds]
    print("  per round (batched / mbs1, batched / ceiling): " + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in per_round))


def in_process_rate(clf: Classifier, paths: list[Path], batch: int, seconds: float) -> float:
    """Images/s of Classifier.predict on the PNG files, ``batch`` at a time, decoding included."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        clf.predict([paths[(done + j) % len(paths)] for j in range(batch)], batch_size=batch)
        done += batch
    return done / (time.perf_counter() - started)


def in_process_call_ms(clf: Classifier, paths: list[Path], seconds: float) -> float:
    """Median milliseconds of one Classifier.predict call on one PNG file."""
    times, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        call = time.perf_counter()
        clf.predict([paths[len(times) % len(paths)]], batch_size=1)
        times.append(time.perf_counter() - call)
    return statistics.median(times) * 1000


def open_sweep(model: Path, bodies: list[bytes], capacity: float, args) -> None:
    """Fixed arrival rates at a quarter, half, three quarters of capacity, then about 2x (overload),
    and the same overload with ``--parallel-batches 1`` (one batch at a time, whatever the backlog)."""
    server = Server(model)
    try:
        for share in (0.25, 0.5, 0.75):
            measure(server, open_loop(server.port, bodies, share * capacity, args.seconds))
        rss = [rss_mb(server.pid)]
        overloads = []
        for _ in range(2):  # two periods: RSS may settle in the first, must stay flat in the second
            overloads.append(measure(server, open_loop(server.port, bodies, 2 * capacity, 2 * args.seconds))[0])
            rss.append(rss_mb(server.pid))
    finally:
        server.stop()
    one_lane = Server(model, "--parallel-batches", "1")
    try:
        singles = [measure(one_lane, open_loop(one_lane.port, bodies, 2 * capacity, 2 * args.seconds),
                           f"open {2 * capacity:.0f}/s, --parallel-batches 1")[0] for _ in range(2)]  # fmt: skip
    finally:
        one_lane.stop()
    print()
    for level in overloads:
        print(f"overload at 2x capacity ({2 * capacity:.0f} requests/s offered): {level.codes[503]} of "
              f"{sum(level.codes.values())} got 503; accepted p99 {level.ms(99, accepted=True):.0f} ms, max "
              f"{level.ms(100, accepted=True):.0f} ms")  # fmt: skip
    print(f"RSS before, after the first and after the second overload period: {' → '.join(f'{r:.0f}' for r in rss)} MB")
    goodput = min(level.achieved for level in overloads)
    print(f"- overload at 2x capacity: goodput (200s a second) at least {goodput:.0f} images/s = "
          f"{goodput / capacity:.2f} of capacity (target 0.8): {'met' if goodput >= 0.8 * capacity else 'not met'}; "
          f"with --parallel-batches 1 at least {min(level.achieved for level in singles) / capacity:.2f}")  # fmt: skip


def sigterm_under_load(model: Path, bodies: list[bytes], seconds: float) -> None:
    """16 clients; SIGTERM after ``seconds``; each client stops when the server refuses connections."""
    server = Server(model)
    results: Counter = Counter()
    signalled = 0.0

    async def client(number: int) -> None:
        connection = Connection(server.port, retry_stale=False)  # count every unanswered request
        i = number
        while True:
            try:
                status, _ = await connection.request("POST", "/v1/classify", bodies[i % len(bodies)])
            except ConnectionRefusedError:
                return  # the server has gone: nothing was sent
            except (OSError, asyncio.IncompleteReadError) as error:
                # A new socket reset while the server closes its listening socket was still in the
                # kernel's accept queue: the server never read it. One that was already answered on
                # would be a request the server read and dropped.
                fresh = connection.answered == 0
                results[f"{'never accepted' if fresh else 'LOST'} ({type(error).__name__})"] += 1
                connection.close()
                continue
            results[f"{status} {'after' if signalled else 'before'} SIGTERM"] += 1
            i += 16

    async def main() -> None:
        nonlocal signalled
        tasks = [asyncio.create_task(client(n)) for n in range(16)]
        await asyncio.sleep(seconds)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    run_client(main())
    code = server.process.wait(30)
    drained = time.perf_counter() - signalled
    lost = sum(count for outcome, count in results.items() if outcome.startswith("LOST"))
    print(f"\nSIGTERM under load (16 clients): {dict(sorted(results.items()))}; exit code {code}, "
          f"{drained:.2f} s from the signal until every client saw the server gone")  # fmt: skip
    print(f"- SIGTERM under load: {lost} requests read and not answered, exit code {code} (target 0 and 0): "
          f"{'met' if lost == 0 and code == 0 else 'not met'}")  # fmt: skip


def where_time_goes(model: Path, bodies: list[bytes], args, levels: dict[int, Level], tmp: Path) -> None:
    """CPU per request at concurrency 16, a profile of the event-loop thread, and two processes."""
    profile = tmp / "serve.prof"
    server = Server(model, prefix=("-m", "cProfile", "-o", str(profile)))
    try:
        measure(server, closed_loop([server.port], bodies, 16, args.seconds), "closed c=16 under cProfile")
    finally:
        server.stop()
    stats = pstats.Stats(str(profile))
    shares: Counter = Counter()
    for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():
        shares[package_of(filename, function)] += tottime
    waiting, startup = shares.pop("waiting (epoll, locks)", 0.0), shares.pop("start-up (imports)", 0.0)
    busy = sum(shares.values())
    print(f"\nprofile of the server's event-loop thread at concurrency 16 (cProfile; the inference and decoding "
          f"threads are not in it): {busy:.1f} s busy, {waiting:.1f} s waiting, {startup:.1f} s start-up; "
          f"own time by package, share of the busy time:")  # fmt: skip
    for name, seconds in shares.most_common(12):
        print(f"  {name:<48} {seconds / busy:6.1%}")
    two = [Server(model, "--threads", "1") for _ in range(2)]
    try:
        with CpuWatch([s.pid for s in two]) as cpu:
            level = run_client(closed_loop([s.port for s in two], bodies, 16, args.seconds))
    finally:
        for s in two:
            s.stop()
    one = levels[16]
    print(f"\ntwo server processes, 1 onnxruntime thread each, 8 clients on each (concurrency 16): "
          f"{level.achieved:.0f} images/s, p50 {level.ms(50):.1f} ms, p99 {level.ms(99):.1f} ms, against "
          f"{one.achieved:.0f} images/s for one process ({level.achieved / one.achieved:.2f}x); "
          f"others' CPU {cpu.others_share:.2f}")  # fmt: skip


def package_of(filename: str, function: str) -> str:
    """A readable group for a profiled function: waiting, start-up, the package, or the builtin."""
    if filename == "~":
        if re.search(r"poll|select|acquire|sleep", function):
            return "waiting (epoll, locks)"
        if re.search(r"marshal|_imp\b|_imp\.|exec|compile|__build_class__", function):
            return "start-up (imports)"
        if match := re.search(r"<method '(\w+)' of '([\w.]+)' objects>", function):
            return f"builtin {match.group(2)}.{match.group(1)}"
        return "builtin " + function.strip("<>").removeprefix("built-in method ")
    if "importlib" in filename:
        return "start-up (imports)"
    if match := re.search(r"site-packages/([^/]+)", filename):
        return match.group(1).removesuffix(".py")
    if "fmtl/" in filename:
        return "fmtl (" + filename.rsplit("/", 1)[-1] + ")"
    if match := re.search(r"python3\.\d+/([^/]+)", filename):
        return "stdlib " + match.group(1).removesuffix(".py")
    return filename


def fmtl(*command: str) -> None:
    """Run an fmtl command quietly; on failure, show its last lines and stop."""
    done = subprocess.run([PYTHON, "-m", "fmtl.cli", *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fmtl {command[0]} failed:\n" + "\n".join(done.stderr.strip().splitlines()[-5:]))


@contextmanager
def model_file(args, tmp: Path) -> Iterator[Path]:
    """--model, or a tiny EfficientNet-Lite0 (the default recipe's architecture and image size) trained and exported here."""
    if args.model:
        yield args.model
        return
    run = tmp / "serve-bench"
    started = time.perf_counter()
    # quick: the head only, on 500 images; else the default hybrid recipe on 2,000 images, 2 epochs
    recipe = ["--strategy", "linear", "--epochs", "1", "--max-train-samples", "500"] if args.quick else [
        "--epochs", "2", "--head-epochs", "1", "--max-train-samples", "2000"]  # fmt: skip
    fmtl("train", *recipe, "--max-eval-samples", "200", "--output", str(run))
    fmtl("export", "--onnx", str(run), "-o", str(tmp / "lite0.onnx"), "--parity-images", "64")
    print(f"model: trained and exported a tiny Lite0 in {time.perf_counter() - started:.0f} s")
    yield tmp / "lite0.onnx"


class Tee(io.TextIOBase):
    """Write to the real stdout and keep a copy (what --report writes to the results file)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def main() -> None:
    args = parse_args()
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        run(args)
    if args.report:
        from results_file import write_results

        name = "serve-quick" if args.quick else "serve"
        write_results(name, "fmtl serve under load", tee.copy.getvalue(), note=NOTE)


NOTE = ("The client runs in the same process as the benchmark and shares the machine's cores with the server, "
        "as any loopback test does; its CPU per request is in the tables. Every level is bounded in time.")  # fmt: skip


def run(args) -> None:
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="fmtl-serve-bench-") as folder, model_file(args, Path(folder)) as model:
        tmp = Path(folder)
        clf = Classifier(model)
        print(f"model: {model} ({clf.architecture}, input {list(clf.input_shape)}, {clf.num_classes} classes)")
        paths = fashion_mnist_pngs(args.images, tmp)
        bodies = [p.read_bytes() for p in paths]
        print(f"{len(bodies)} Fashion-MNIST test images as PNG, {np.mean([len(b) for b in bodies]):.0f} bytes each\n")

        rates = ceiling(model, paths, args.seconds)
        print("in-process ceiling, Classifier.predict on the PNG files (decoding included):")
        print("| batch | " + " | ".join(map(str, BATCH_SWEEP)) + " |\n|" + " --- |" * (len(BATCH_SWEEP) + 1))
        print("| images/s | " + " | ".join(f"{rates[b]:.0f}" for b in BATCH_SWEEP) + " |")
        print()

        print(HEADER)
        print("|" + " --- |" * (HEADER.count("|") - 1))
        print("| **dynamic batching (defaults)** |" + " |" * (HEADER.count("|") - 2))
        batched = sweep(model, (), bodies, args)
        print("| **--max-batch-size 1** |" + " |" * (HEADER.count("|") - 2))
        sweep(model, ("--max-batch-size", "1"), bodies, args)

        target_check(model, paths, bodies, args)

        capacity = max(level.achieved for level in batched.values())
        print()
        print(HEADER)
        print("|" + " --- |" * (HEADER.count("|") - 1))
        print(f"| **open loop, dynamic batching (capacity {capacity:.0f} img/s)** |" + " |" * (HEADER.count("|") - 2))
        open_sweep(model, bodies, capacity, args)
        sigterm_under_load(model, bodies, args.seconds)
        if not args.no_profile and not args.quick:
            where_time_goes(model, bodies, args, batched, tmp)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
