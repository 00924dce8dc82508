"""`fmtl serve --engine ray` (fmtl.runtime.serve.ray_engine): one real server process for the whole module.

The process (`fmtl serve --engine ray`) starts its own local Ray cluster (loopback only) with one
Ray Serve application of two replicas, as a user's command would; the tests talk HTTP to Ray Serve's
proxy on a free loopback port, find the replicas' processes under it, kill one, and finally SIGTERM
the server. Answers are
compared byte for byte with `fmtl serve`'s own app (in process, through httpx) on real PNGs.

Without ray (the runtime-only venv) only the "missing extra" test runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx_fixtures import grey_model
from PIL import Image
from without_ray import fmtl_without_ray

from fmtl.runtime.serve import ServeConfig, create_app

FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
REPLICA_TITLE = "ray::ServeReplica:fmtl:model"  # the process title Ray gives the deployment's replicas
SERVER_OPTIONS = ["--engine", "ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--max-batch-size", "4",
                  "--batch-wait-ms", "150", "--max-queue", "16", "--max-images", "16"]  # fmt: skip
CONFIG = {"max_batch_size": 4, "max_queue": 16, "max_images": 16}  # as SERVER_OPTIONS, for fmtl serve's own app


# --- without the extra ----------------------------------------------------------------------------


def test_engine_ray_without_the_extra_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    model = grey_model(tmp_path)
    argv = ["serve", str(model), "--engine", "ray", "--port", "0"]
    result = fmtl_without_ray(argv)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'pip install "fmtl[ray]"' in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--replicas", "2"], "--replicas needs --engine ray"),
        (["--autoscale", "1:2", "--engine", "local"], "--autoscale needs --engine ray"),
    ],
)
def test_ray_options_need_engine_ray(tmp_path: Path, extra: list[str], message: str) -> None:
    from click.testing import CliRunner

    from fmtl.cli import main

    result = CliRunner().invoke(main, ["serve", str(grey_model(tmp_path)), *extra])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.ray
def test_a_model_that_cannot_load_is_one_error_before_any_cluster_starts(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from fmtl.runtime.serve import ServeError
    from fmtl.runtime.serve.ray_engine import RayServeOptions, serve_ray

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ServeError) as caught:
        serve_ray(ServeConfig(bad, port=free_port()), RayServeOptions(replicas=2))
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
    assert not ray.is_initialized()


@pytest.mark.ray
@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"replicas": 2, "autoscale": "1:4"}, "not both"),
        ({"autoscale": "4:1"}, "MIN:MAX"),
        ({"autoscale": "x"}, "MIN:MAX"),
    ],
)
def test_cluster_options_are_checked(given: dict, message: str) -> None:
    pytest.importorskip("ray.serve")
    from fmtl.runtime.serve import ServeError
    from fmtl.runtime.serve.ray_engine import RayServeOptions

    with pytest.raises(ServeError, match=message):
        RayServeOptions.from_cli(**given).check()


@pytest.mark.ray
def test_autoscale_and_resources_become_ray_serve_settings() -> None:
    pytest.importorskip("ray.serve")
    from fmtl.runtime.serve.ray_engine import RayServeOptions, deployment_options

    options = RayServeOptions.from_cli(autoscale="0:4", cpus_per_replica=2, gpus_per_replica=0.5)
    settings = deployment_options(ServeConfig(Path("m.onnx"), max_batch_size=8, max_queue=100), options)
    assert settings["num_replicas"] == "auto"
    assert settings["autoscaling_config"]["min_replicas"] == 0 and settings["autoscaling_config"]["max_replicas"] == 4
    assert settings["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert settings["max_queued_requests"] == 100 and settings["max_ongoing_requests"] >= 8


# --- images and fmtl serve's own answers ----------------------------------------------------------


def fashion_pngs(count: int) -> list[bytes]:
    """``count`` Fashion-MNIST test images as PNG bytes, or seeded stand-ins where the dataset is not installed."""
    if FASHION_MNIST_TEST.is_file():
        with gzip.open(FASHION_MNIST_TEST) as handle:
            pixels = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    pngs = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def requests_to_compare(model_name: str, pngs: list[bytes]) -> list[dict]:
    """The requests both engines must answer identically: raw, multipart with a broken part, v2 JSON and binary."""
    tensor = np.stack([np.asarray(Image.open(io.BytesIO(data))) for data in pngs[:3]])[:, None]
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(tensor.shape),
                                     "parameters": {"binary_data_size": tensor.size}}],
                         "outputs": [{"name": "probs", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    files = [("f", ("a.png", pngs[0], "image/png")), ("f", ("broken.png", pngs[1][:40], "image/png")),
             ("f", ("c.png", pngs[2], "image/png"))]  # fmt: skip
    infer = f"/v2/models/{model_name}/infer"
    return [
        {"method": "POST", "url": "/v1/classify?k=3", "content": pngs[3], "headers": {"content-type": "image/png"}},
        {"method": "POST", "url": "/v1/classify", "files": files},
        {"method": "POST", "url": "/v1/classify?k=0", "content": pngs[3]},
        {
            "method": "POST",
            "url": infer,
            "json": {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "UINT8",
                        "shape": list(tensor.shape),
                        "data": tensor.ravel().tolist(),
                    }
                ]
            },
        },  # fmt: skip
        {
            "method": "POST",
            "url": infer,
            "content": header + tensor.tobytes(),
            "headers": {"Inference-Header-Content-Length": str(len(header))},
        },
        {"method": "GET", "url": f"/v2/models/{model_name}"},
    ]


def fmtl_serve_answers(model: Path, requests: list[dict]) -> list[tuple[int, bytes]]:
    """(status, body) of `fmtl serve`'s own app for each request, one at a time (each its own batch)."""

    async def main():
        app = create_app(ServeConfig(model, **CONFIG), load=False)
        await app.model_server.load()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                return [((r := await client.request(**request)).status_code, r.content) for request in requests]
        finally:
            await app.model_server.close()

    return asyncio.run(main())


# --- the server process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (Ray's raylet and its workers are children of the driver)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def replica_pids(root: int) -> set[int]:
    pids = set()
    for pid in descendants(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(REPLICA_TITLE.encode()):
                pids.add(pid)
        except OSError:
            pass
    return pids


class Server:
    """The `serve_ray` process: its output lines (read on a thread) and its address."""

    def __init__(self, model: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "fmtl.cli", "serve", str(model), "--port", str(self.port), *SERVER_OPTIONS]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready_at: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("ready:") and self.ready_at is None:
                self.ready_at = time.monotonic()
            self.lines.append(line.rstrip())

    def output(self) -> str:
        return "\n".join(self.lines)[-4000:]


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def replicas_seen(client: httpx.Client, tries: int = 30) -> dict[str, dict[str, float]]:
    """Per replica process (its start time tells them apart), the fmtl_ready and fmtl_warmup_seconds it reports."""
    seen = {}
    for _ in range(tries):
        text = client.get("/metrics").text
        values = dict(
            re.findall(r"^(fmtl_process_start_time_seconds|fmtl_ready|fmtl_warmup_seconds) (\S+)$", text, re.M)
        )
        seen[values["fmtl_process_start_time_seconds"]] = {k: float(v) for k, v in values.items()}
    return seen


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The server, once it printed "ready"; ``early`` holds the /metrics answers it gave before."""
    pytest.importorskip("ray.serve")
    model = grey_model(tmp_path_factory.mktemp("model"))
    server = Server(model)
    server.model = model
    early = []  # (status, body) of /metrics before "ready"; a refused connection counts as none
    try:
        deadline = time.monotonic() + 180
        while server.ready_at is None and server.process.poll() is None and time.monotonic() < deadline:
            try:
                response = httpx.get(f"{server.url}/metrics", timeout=5)
                early.append((response.status_code, response.text))
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert server.ready_at is not None, server.output()
        server.early = early
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=60)


# --- the tests (in file order: the last one stops the server) ---------------------------------------


@pytest.mark.ray
def test_no_replica_answers_before_its_warm_up_and_ready_means_both_are_warm(server: Server) -> None:
    # while the application came up, the proxy answered "no such route" or a replica that had warmed up
    for status, text in server.early:
        if status == 200:
            assert metric(text, "fmtl_ready") == 1 and metric(text, "fmtl_warmup_seconds") > 0
        else:
            assert status in (404, 503), (status, text)
    assert len(replica_pids(server.process.pid)) == 2
    with httpx.Client(base_url=server.url, timeout=30) as client:
        seen = replicas_seen(client)
    assert len(seen) == 2, seen  # Ray Serve's proxy spreads requests over both replicas, both warm
    for values in seen.values():
        assert values["fmtl_ready"] == 1 and values["fmtl_warmup_seconds"] > 0


@pytest.mark.ray
def test_metrics_has_fmtl_s_and_ray_serves_own(server: Server) -> None:
    deadline = time.monotonic() + 60  # Ray's agent exports what the replicas recorded every few seconds
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while "ray_serve_" not in (text := client.get("/metrics").text) and time.monotonic() < deadline:
            time.sleep(1)
    assert re.search(r'^ray_serve_\w+\{.*deployment="model"', text, re.M), text[-2000:]
    assert metric(text, "fmtl_ready") == 1


def listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses of the TCP sockets in LISTEN state that any of ``pids`` holds."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # gone, or not ours to read
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found


@pytest.mark.ray
def test_the_local_cluster_and_the_proxy_listen_on_loopback_only(server: Server) -> None:
    addresses = listening_addresses([server.process.pid, *descendants(server.process.pid)])
    # 127.0.0.1, ::ffff:127.0.0.1 and ::1 as /proc/net writes them (every interface: 00000000 or all zeros)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert addresses and addresses <= loopback, addresses


@pytest.mark.ray
def test_answers_are_fmtl_serves_byte_for_byte(server: Server) -> None:
    requests = requests_to_compare(server.model.stem, fashion_pngs(4))
    expected = fmtl_serve_answers(server.model, requests)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for request, (status, body) in zip(requests, expected, strict=True):
            response = client.request(**request)
            assert (response.status_code, response.content) == (status, body), request["url"]
    broken = json.loads(expected[1][1])["predictions"][1]
    assert broken["path"] == "broken.png" and broken["error"] and broken["top_k"] == []
    assert expected[0][0] == 200 and expected[2][0] == 400 and expected[4][0] == 200


@pytest.mark.ray
def test_overload_is_refused_with_503_and_everything_else_is_answered(server: Server) -> None:
    files = [("f", (f"{i}.png", data, "image/png")) for i, data in enumerate(fashion_pngs(16))]

    def one(_: int) -> int:
        return httpx.post(f"{server.url}/v1/classify", files=files, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(one, range(256)))
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0


@pytest.mark.ray
def test_a_killed_replica_is_replaced_while_requests_are_answered(server: Server) -> None:
    before = replica_pids(server.process.pid)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    statuses, deadline = [], time.monotonic() + 120
    png = fashion_pngs(1)[0]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while time.monotonic() < deadline:
            statuses.append(client.post("/v1/classify", content=png).status_code)
            now = replica_pids(server.process.pid)
            if len(now) == 2 and victim not in now and len(statuses) >= 20:
                break
            time.sleep(0.05)
        after = replica_pids(server.process.pid)
        assert len(after) == 2 and victim not in after, (before, after)  # Ray Serve started a new replica
        assert [client.post("/v1/classify", content=png).status_code for _ in range(10)] == [200] * 10
    # the other replica answered meanwhile: at most the requests routed to the victim as it died failed
    assert statuses.count(200) >= len(statuses) - 3, statuses


@pytest.mark.ray
def test_sigterm_drains_every_accepted_request_then_exits_0(server: Server) -> None:
    png = fashion_pngs(1)[0]
    started = threading.Barrier(7)

    def one(_: int) -> int:  # one image: its batch waits --batch-wait-ms for more, so it is in flight at SIGTERM
        with httpx.Client(base_url=server.url, timeout=60) as client:
            started.wait()
            return client.post("/v1/classify", content=png).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(one, i) for i in range(6)]
        started.wait()
        time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        statuses = [answer.result() for answer in answers]
    assert statuses == [200] * 6
    assert server.process.wait(timeout=120) == 0, server.output()
    assert "draining" in server.lines
    assert not replica_pids(server.process.pid)
