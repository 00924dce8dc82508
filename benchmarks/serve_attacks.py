"""`fmtl serve` under attack: what each impolite client costs the server and a normal client, one run.

    .venv/bin/python benchmarks/serve_attacks.py --quick                    # trains a tiny Lite0 first
    .venv/bin/python benchmarks/serve_attacks.py --model export/NAME.onnx --report

For each attack, a fresh server (``python -m fmtl.cli serve MODEL``, default options, loopback only)
is attacked while a normal client (one connection, one request after another, real Fashion-MNIST
PNGs) measures its success rate and p50/p99 latency; beside it, the same client on an idle server.
The server's peak RSS (VmHWM) is read from /proc. Attacks:

- 200 stalled uploads: connections that send the headers of a 1 MB upload and one byte, then wait.
- a float TIFF: 8000 x 8000 32-bit floats (a few hundred KB deflated), sent again and again.
- 100,000 multipart parts: a body of 100,000 empty file parts, sent again and again.
- bad k: ``?k=%C2%B2`` and a 5,000-digit k.
- hostile Host: ``Host: evil.example`` (DNS rebinding).
- 2x overload: open-loop arrivals at twice the capacity measured just before (closed loop, 16 or 64 clients),
  for twice as long as the other attacks: a full queue takes seconds to drain, and goodput is counted
  until the last answer.

Then what shedding costs: the server's CPU per request refused because the queue is full (503) against
per request served, sequential requests on one connection. Targets (printed as met or not): under 200 stalled uploads the normal client gets >= 99 % 200s and a
p99 within 2x of idle; at 2x overload the goodput is >= 80 % of capacity; the float TIFF costs at most
256 MiB of RSS and 1 s, or is refused with 413/400. Every attack is bounded in count and time; the
client shares the machine's cores with the server, as any loopback test does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from serve import (
    TICKS,
    Connection,
    Server,
    closed_loop,
    fashion_mnist_pngs,
    machine,
    model_file,
    open_loop,
    process_ticks,
    run_client,
)

RESULTS = Path(__file__).resolve().parent / "results" / "serve_attacks.md"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "serving.md"  # its attack section is this table
STALLED = 200  # stalled uploads held open
MIB = 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an fmtl .onnx file [train and export a tiny Lite0]")
    parser.add_argument("--quick", action="store_true", help="shorter attacks (3 s each) and a head-only model")
    parser.add_argument("--seconds", type=float, help="seconds per attack [8, quick 3]")
    parser.add_argument("--report", action="store_true", help=f"write the table to {RESULTS.relative_to(Path.cwd())}")
    args = parser.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 8.0)
    return args


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


@dataclass
class Probe:
    """A normal client's experience: status codes and latencies of sequential requests."""

    codes: list[int | str]
    latencies: list[float]  # seconds, of 200 answers

    @property
    def success(self) -> float:
        return self.codes.count(200) / max(1, len(self.codes))

    def ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


async def normal_client(port: int, bodies: list[bytes], seconds: float) -> Probe:
    """One connection, one request after another, for ``seconds``."""
    probe, connection = Probe([], []), Connection(port)
    deadline, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            status, _ = await asyncio.wait_for(connection.request("POST", "/v1/classify", bodies[i % len(bodies)]), 30)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as error:
            probe.codes.append(type(error).__name__)
            connection.close()
            continue
        probe.codes.append(status)
        if status == 200:
            probe.latencies.append(time.perf_counter() - started)
        i += 1
    connection.close()
    return probe


async def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int | str, float]:
    """One request on its own connection, written as given; (status or error name, seconds)."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        return type(error).__name__, 0.0
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        line = await asyncio.wait_for(reader.readline(), timeout)
        return (int(line[9:12]) if line[9:12].isdigit() else "no answer"), time.perf_counter() - started
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as error:
        return type(error).__name__, time.perf_counter() - started
    finally:
        writer.close()


def post_head(path: str, body: bytes, content_type: str, host: str = "127.0.0.1") -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")  # fmt: skip


# --- the attacks: each returns (what the attacker got, extra figures) and runs for ``seconds`` -----------


async def stalled_uploads(port: int, seconds: float, ready: asyncio.Event) -> tuple[str, dict]:
    """Open them all, let the server take them in, then hold them for ``seconds`` (the client's window)."""
    connections = []
    for _ in range(STALLED):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post_head("/v1/classify", b"x" * 1_000_000, "image/png").encode() + b"\r\nx")
        await writer.drain()
        connections.append(writer)
    await asyncio.sleep(0.5)
    ready.set()
    await asyncio.sleep(seconds)
    for writer in connections:
        writer.close()
    return f"{STALLED} held open", {}


async def repeated(port: int, seconds: float, ready: asyncio.Event, head: str, body: bytes = b"") -> tuple[str, dict]:
    """The same request, one after another, for ``seconds``: status counts and the slowest answer."""
    ready.set()
    deadline, codes, times = time.perf_counter() + seconds, {}, []
    while time.perf_counter() < deadline:
        code, took = await raw_request(port, head, body)
        codes[code] = codes.get(code, 0) + 1
        times.append(took)
    summary = ", ".join(f"{count}x {code}" for code, count in sorted(codes.items(), key=str))
    return summary, {"codes": codes, "max_s": max(times, default=0.0)}


def float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8000, 8000), np.float32)).save(buffer, format="TIFF", compression="tiff_adobe_deflate")
    return buffer.getvalue()


def multipart_parts(count: int = 100_000) -> bytes:
    return b"--b\r\nContent-Disposition: form-data; name=f; filename=a.png\r\n\r\n\r\n" * count + b"--b--\r\n"


async def bad_k(port: int, seconds: float, ready: asyncio.Event, body: bytes) -> tuple[str, dict]:
    ready.set()
    deadline, codes = time.perf_counter() + seconds, {}
    while time.perf_counter() < deadline:
        for k in ("%C2%B2", "9" * 5000):
            code, _ = await raw_request(port, post_head(f"/v1/classify?k={k}", body, "image/png"), body)
            codes[code] = codes.get(code, 0) + 1
    return ", ".join(f"{count}x {code}" for code, count in sorted(codes.items(), key=str)), {"codes": codes}


async def overload(
    port: int, bodies: list[bytes], seconds: float, ready: asyncio.Event, capacity: float
) -> tuple[str, dict]:
    ready.set()
    level = await open_loop(port, bodies, 2 * capacity, seconds)
    goodput = level.codes[200] / level.seconds
    codes = ", ".join(f"{count}x {code}" for code, count in sorted(level.codes.items(), key=str))
    return f"{2 * capacity:.0f}/s offered: {codes}", {"goodput": goodput}


# --- running and reporting ---------------------------------------------------------------------------


@dataclass
class Row:
    attack: str
    attacker: str
    rss_start: float
    rss_peak: float
    probe: Probe
    extra: dict


async def attacked(port: int, bodies: list[bytes], seconds: float, make_attack) -> tuple[Probe, tuple[str, dict]]:
    """The normal client during the attack: from a moment after the attack is under way (for stalled
    uploads: once all are open) until a moment before it ends."""
    ready = asyncio.Event()

    async def client_later() -> Probe:
        await ready.wait()
        await asyncio.sleep(0.25)
        return await normal_client(port, bodies, seconds - 0.5)

    probe, outcome = await asyncio.gather(client_later(), make_attack(port, ready))
    return probe, outcome


def run_attack(model: Path, name: str, make_attack, bodies: list[bytes], seconds: float) -> Row:
    server = Server(model)
    try:
        rss_start = peak_rss_mib(server.pid)
        probe, (attacker, extra) = run_client(attacked(server.port, bodies, seconds, make_attack))
        return Row(name, attacker, rss_start, peak_rss_mib(server.pid), probe, extra)
    finally:
        server.stop()


def capacity_of(model: Path, bodies: list[bytes], seconds: float) -> tuple[float, Row]:
    """Images/s at closed loop, the better of 16 and 64 clients (as benchmarks/serve.py takes it: 64 fills
    the queue enough for batches side by side), and the idle row (the normal client alone)."""
    server = Server(model)
    try:
        rss_start = peak_rss_mib(server.pid)
        idle = run_client(normal_client(server.port, bodies, seconds))
        capacity = max(run_client(closed_loop([server.port], bodies, c, seconds)).achieved for c in (16, 64))
        return capacity, Row("none (idle server)", "-", rss_start, peak_rss_mib(server.pid), idle, {})
    finally:
        server.stop()


async def sequential(port: int, body: bytes, count: int) -> dict:
    connection, codes = Connection(port), {}
    for _ in range(count):
        status, _ = await connection.request("POST", "/v1/classify", body)
        codes[status] = codes.get(status, 0) + 1
    connection.close()
    return codes


def server_cpu_ms(model: Path, body: bytes, count: int, options: tuple[str, ...], hold: bool) -> float:
    """Server CPU milliseconds per request over ``count`` sequential requests on one connection; with
    ``hold``, one request parked in a batch wait first fills the one-image queue, so every one is refused."""
    server = Server(model, *options)
    loop = asyncio.new_event_loop()
    try:
        if hold:
            _, writer = loop.run_until_complete(asyncio.open_connection("127.0.0.1", server.port))
            writer.write(post_head("/v1/classify", body, "image/png").encode() + b"\r\n" + body)
            loop.run_until_complete(writer.drain())
            time.sleep(0.5)
        before = process_ticks(server.pid)
        codes = run_client(sequential(server.port, body, count))
        expected = 503 if hold else 200
        if codes.get(expected) != count:
            raise SystemExit(f"shedding cost: expected {count}x {expected}, got {codes}")
        return (process_ticks(server.pid) - before) / TICKS / count * 1000
    finally:
        server.stop(5)
        loop.close()


def shedding_cost(model: Path, body: bytes, count: int) -> tuple[float, float]:
    """Server CPU per refused (queue full, 503) and per served request, milliseconds."""
    parked = ("--max-queue", "1", "--max-images", "1", "--max-batch-size", "64", "--batch-wait-ms", "600000",
              "--queue-timeout-ms", "600000")  # fmt: skip
    return server_cpu_ms(model, body, count, parked, hold=True), server_cpu_ms(model, body, count // 2, (), False)


def targets(rows: dict[str, Row], capacity: float, shed: tuple[float, float]) -> list[str]:
    idle, stalled = rows["idle"].probe, rows["stalled"].probe
    tiff = rows["tiff"]
    refused = set(tiff.extra["codes"]) <= {400, 413}
    tiff_ok = refused or (tiff.rss_peak - tiff.rss_start <= 256 and tiff.extra["max_s"] <= 1.0)
    goodput = rows["overload"].extra["goodput"]
    return [
        f"{'met' if stalled.success >= 0.99 and stalled.ms(99) <= 2 * idle.ms(99) else 'NOT met'}: "
        f"200 stalled uploads: normal client {stalled.success:.1%} success (>= 99 %), p99 {stalled.ms(99):.1f} ms "
        f"= {stalled.ms(99) / idle.ms(99):.2f}x idle (<= 2x)",
        f"shedding: a refused request (queue full) costs the server {shed[0]:.2f} ms of CPU, a served one "
        f"{shed[1]:.2f} ms ({shed[1] / shed[0]:.0f}x)",
        f"{'met' if goodput >= 0.8 * capacity else 'NOT met'}: 2x overload: goodput {goodput:.0f} images/s = "
        f"{goodput / capacity:.0%} of capacity {capacity:.0f} (>= 80 %)",
        f"{'met' if tiff_ok else 'NOT met'}: float TIFF 8000x8000: "
        + (f"refused ({tiff.attacker})" if refused else "")
        + f"; peak RSS +{tiff.rss_peak - tiff.rss_start:.0f} MiB (<= 256), slowest answer {tiff.extra['max_s']:.2f} s",
    ]


def table(rows: dict[str, Row]) -> str:
    idle = rows["idle"].probe
    lines = ["| attack | what the attacker got | server peak RSS MiB (start → end) | normal client: 200s | "
             "p50 ms | p99 ms | p99 / idle p99 |", "|" + " --- |" * 7]  # fmt: skip
    for row in rows.values():
        p = row.probe
        lines.append(f"| {row.attack} | {row.attacker} | {row.rss_start:.0f} → {row.rss_peak:.0f} | "
                     f"{p.codes.count(200)}/{len(p.codes)} ({p.success:.1%}) | {p.ms(50):.1f} | {p.ms(99):.1f} | "
                     f"{p.ms(99) / idle.ms(99):.2f} |")  # fmt: skip
    return "\n".join(lines)


def write_report(text: str, model: str) -> None:
    script = Path(sys.argv[0]).resolve()
    with_root = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
    command = shlex.join([".venv/bin/python", str(with_root), *sys.argv[1:]])
    header = [
        "# fmtl serve under attack",
        "",
        f"- machine: {machine()}, {platform.system()} {platform.machine()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} (UTC)",
        f"- command: `{command}`",
        f"- model: {model}",
        f"- load average at the start: {os.getloadavg()[0]:.2f} (the client shares the cores with the server)",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    partial = RESULTS.with_suffix(".md.partial")
    partial.write_text("\n".join(header) + "\n" + text + "\n", encoding="utf-8")
    partial.replace(RESULTS)
    print(f"\nwrote {RESULTS}")
    include_in_docs("\n".join(header[2:]) + "\n" + text)


def include_in_docs(block: str) -> None:
    """Copy the results (without their title) between the markers of docs/serving.md, if it has them."""
    begin, end = "<!-- serve_attacks:begin -->", "<!-- serve_attacks:end -->"
    if not DOCS.is_file() or begin not in (text := DOCS.read_text(encoding="utf-8")) or end not in text:
        return
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    partial = DOCS.with_suffix(".md.partial")
    partial.write_text(f"{before}{begin}\n{block.strip()}\n{end}{after}", encoding="utf-8")
    partial.replace(DOCS)
    print(f"updated {DOCS}")


def describe(model: Path, args: argparse.Namespace) -> str:
    from fmtl.runtime.classifier import Classifier

    clf = Classifier(model)
    made = "given with --model" if args.model else "a tiny Lite0 trained and exported by the benchmark"
    return f"{clf.architecture}, input {list(clf.input_shape)}, {clf.num_classes} classes ({made})"


def main() -> None:
    args = parse_args()
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="fmtl-attacks-") as folder, model_file(args, Path(folder)) as model:
        bodies = [p.read_bytes() for p in fashion_mnist_pngs(64, Path(folder))]
        s = args.seconds
        capacity, idle = capacity_of(model, bodies, s)
        print(f"capacity (closed loop, the better of 16 and 64 clients): {capacity:.0f} images/s")
        tiff, parts = float_tiff(), multipart_parts()
        attacks = {
            "stalled": ("200 stalled uploads", lambda port, ready: stalled_uploads(port, s, ready)),
            "tiff": (f"float TIFF 8000x8000 ({len(tiff) // 1024} KB)",
                     lambda port, ready: repeated(port, s, ready, post_head("/v1/classify", tiff, "image/tiff"), tiff)),
            "parts": ("100,000 multipart parts", lambda port, ready: repeated(port, s, ready, post_head(
                "/v1/classify", parts, "multipart/form-data; boundary=b"), parts)),
            "k": ("bad k (k=²; 5,000 digits)", lambda port, ready: bad_k(port, s, ready, bodies[0])),
            "host": ("Host: evil.example", lambda port, ready: repeated(port, s, ready, post_head(
                "/v1/classify", bodies[0], "image/png", host="evil.example"), bodies[0])),
            "overload": ("2x open-loop overload", lambda port, ready: overload(port, bodies, 2 * s, ready, capacity)),
        }  # fmt: skip
        rows = {"idle": idle}
        for key, (name, attack) in attacks.items():
            rows[key] = run_attack(model, name, attack, bodies, 2 * s if key == "overload" else s)
            print(f"{name}: {rows[key].attacker}; normal client {rows[key].probe.success:.1%}", flush=True)
        shed = shedding_cost(model, bodies[0], 400 if args.quick else 2000)
        text = table(rows) + "\n\n" + "\n".join(f"- {line}" for line in targets(rows, capacity, shed)) + "\n"
        print("\n" + text)
        if args.report:
            write_report(text, describe(model, args))


if __name__ == "__main__":
    main()
