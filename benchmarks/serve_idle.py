"""What an idle connection costs `fmtl serve`: the server's resident memory with N idle connections open.

    .venv/bin/python benchmarks/serve_idle.py                         # the tests' small model, 1,000 and 4,000
    .venv/bin/python benchmarks/serve_idle.py --model export/NAME.onnx --connections 2000 8000 --report

Two kinds of idle connection, each on a fresh server (``python -m fmtl.cli serve MODEL``, with
--limit-concurrency above the largest N so none is closed, and long timeouts so none expires):

- silent: opened, nothing sent (what a port scanner or a pre-connecting client leaves);
- keep-alive: one request answered (GET /v2/health/live), then idle, as an HTTP client's pool keeps it.

For each N the connections are opened, the server's ``fmtl_open_connections`` is awaited, and its
VmRSS read from /proc; the cost per connection is the growth over the server's RSS before, divided
by N. Kernel socket buffers are not in RSS (they are the kernel's, a few KiB per idle socket).
This sets the --limit-concurrency default (docs/serving.md).
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_results
from serve import Server, rss_mb

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an fmtl .onnx file [the tests' small grey model]")
    parser.add_argument("--connections", type=int, nargs="+", default=[1000, 4000], help="idle connections [1000 4000]")
    parser.add_argument("--report", action="store_true", help="write benchmarks/results/serve_idle.md")
    return parser.parse_args()


def small_model(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "runtime"))
    from onnx_fixtures import grey_model

    return grey_model(folder)


def wait_open(server: Server, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics().get("fmtl_open_connections", 0) < count:  # the scrape's own connection counts too
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not accept {count} connections")
        time.sleep(0.1)
    time.sleep(0.5)  # let the loop settle


def open_idle(port: int, count: int, keep_alive: bool) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        if keep_alive:
            connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"live":true}'):
                chunk = connection.recv(4096)
                if not chunk:
                    raise SystemExit("the server closed a keep-alive connection")
                answer += chunk
        connections.append(connection)
    return connections


def measure(model: Path, count: int, keep_alive: bool) -> tuple[float, float]:
    """(server RSS MiB before, after ``count`` idle connections)."""
    options = ["--limit-concurrency", str(count + 100), "--request-timeout", "600", "--keep-alive-timeout", "600"]
    server = Server(model, *options)
    connections: list[socket.socket] = []
    try:
        server.metrics()  # the metrics path warmed up once, as it will be during the measurement
        time.sleep(0.5)
        before = rss_mb(server.pid)
        connections = open_idle(server.port, count, keep_alive)
        wait_open(server, count + 1)
        return before, rss_mb(server.pid)
    finally:
        for connection in connections:
            connection.close()
        server.stop()


def main() -> None:
    args = parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(args.connections) + 200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise SystemExit(f"the open-file limit is {hard} (ulimit -Hn): too few for {max(args.connections)} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))  # the servers inherit it
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or small_model(Path(tmp))
        lines = ["| idle connections | kind | server RSS MiB before → with them | KiB per connection |",
                 "| --- | --- | --- | --- |"]  # fmt: skip
        for count in args.connections:
            for keep_alive in (False, True):
                before, after = measure(model, count, keep_alive)
                per = (after - before) * 1024 / count
                kind = "keep-alive (one request answered)" if keep_alive else "silent (nothing sent)"
                lines.append(f"| {count:,} | {kind} | {before:.0f} → {after:.0f} | {per:.1f} |")
                print(lines[-1], flush=True)
    if args.report:
        shown = args.model or "the tests' small grey model (tests/runtime/onnx_fixtures.py)"
        write_results("serve_idle", "What an idle connection costs fmtl serve", "\n".join(lines),
                      note=f"model: {shown}; each row a fresh server, RSS from /proc (VmRSS)")  # fmt: skip


if __name__ == "__main__":
    main()
