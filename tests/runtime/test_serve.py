"""`fmtl serve`: the ASGI app through httpx, and the real server (uvicorn on a free loopback port) in a process.

Torch-free: runs in the runtime-only install too (models from onnx_fixtures)."""

from __future__ import annotations

import asyncio
import io
import json
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx_fixtures import grey_model, rgb_model
from PIL import Image

from fmtl.runtime.classifier import Classifier
from fmtl.runtime.serve import ServeConfig, create_app


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def grey_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct 28x28 grey images (different brightness, so the test model's classes differ)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) // (1 + i % 4) for i in range(count)]


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG header claiming 400 megapixels, with no pixel data: refused before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def run_app(config: ServeConfig, scenario, load: bool = True):
    """Build the app, load its model (unless ``load`` is False), run ``scenario(client, server)``, close."""

    async def main():
        app = create_app(config, load=False)
        server = app.model_server
        if load:
            await server.load()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:
                return await scenario(client, server)
        finally:
            await server.close()

    return asyncio.run(main())


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (labels in any order)."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels}")


@pytest.fixture()
def grey(tmp_path) -> Path:
    return grey_model(tmp_path)


# --- the app in-process ----------------------------------------------------------------------------


def test_live_at_once_ready_only_after_load_and_warm_up(grey):
    async def scenario(client, server):
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 503
        early = await client.post("/v1/classify", content=png(grey_images(1)[0]), headers={"Content-Type": "image/png"})
        assert early.status_code == 503 and "not loaded" in early.json()["error"]
        assert metric((await client.get("/metrics")).text, "fmtl_warmup_seconds") == 0
        await server.load()
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        assert (await client.get("/v2/models/grey/ready")).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "fmtl_warmup_seconds") > 0 and metric(text, "fmtl_ready") == 1
        assert metric(text, "fmtl_images_total") == 0  # the warm-up is not counted as traffic

    run_app(ServeConfig(grey), scenario, load=False)


def test_classify_raw_put_and_multipart_with_a_broken_part(grey):
    images = grey_images(3)
    expected = Classifier(grey).predict_proba(np.stack([im[None] for im in images]))
    broken = png(images[1])[:60]  # a truncated PNG

    async def scenario(client, server):
        raw = await client.post("/v1/classify?k=2", content=png(images[0]), headers={"Content-Type": "image/png"})
        assert raw.status_code == 200
        body = raw.json()
        assert body["model"] == "grey" and len(body["predictions"]) == 1
        top = body["predictions"][0]["top_k"]
        assert [p["index"] for p in top] == list(np.argsort(-expected[0])[:2])
        assert top[0]["probability"] == pytest.approx(expected[0].max(), abs=1e-6)
        assert top[0]["label"] == ("dark", "medium", "bright")[top[0]["index"]]
        put = await client.put("/v1/classify", content=png(images[0]))  # `curl -T`: no Content-Type
        # the raw body has no name: its row's path is null (fmtl.runtime.results.Row, infer's JSON shape)
        assert put.json()["predictions"] == [{"path": None, "top_k": top + put.json()["predictions"][0]["top_k"][2:],
                                              "error": None}]  # fmt: skip
        assert len((await client.put("/v1/classify/shoe.png", content=png(images[0]))).json()["predictions"]) == 1
        assert (
            len((await client.post("/v1/classify?k=99", content=png(images[0]))).json()["predictions"][0]["top_k"]) == 3
        )
        files = [("a", ("a.png", png(images[0]))), ("b", ("b.png", broken)), ("c", ("c.png", png(images[2])))]
        multi = (await client.post("/v1/classify?k=1", files=files)).json()["predictions"]
        assert [entry["path"] for entry in multi] == ["a.png", "b.png", "c.png"]
        assert "truncated" in multi[1]["error"] and multi[1]["top_k"] == [] and multi[0]["error"] is None
        assert [multi[0]["top_k"][0]["index"], multi[2]["top_k"][0]["index"]] == [
            expected[0].argmax(),
            expected[2].argmax(),
        ]
        assert multi[2]["top_k"][0]["probability"] == pytest.approx(expected[2].max(), abs=1e-6)
        assert (await client.post("/v1/classify?k=0", content=png(images[0]))).status_code == 400
        none = await client.post("/v1/classify", files=[("a", ("a.png", broken)), ("b", ("b.txt", b"text"))])
        assert none.status_code == 400 and none.json()["error"].startswith("no readable image (a.png: truncated")

    run_app(ServeConfig(grey), scenario)


def test_v2_metadata_infer_and_unknown_model(tmp_path):
    model = rgb_model(tmp_path)
    batch = np.random.default_rng(1).integers(0, 256, (2, 3, 20, 30), dtype=np.uint8)
    expected = Classifier(model).predict_proba(batch)

    async def scenario(client, server):
        meta = (await client.get("/v2/models/rgb")).json()
        assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, 20, 30]}]
        assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["classes"] == ["red", "green", "blue", "grey"]
        tensor = {"name": "images", "datatype": "UINT8", "shape": [2, 3, 20, 30], "data": batch.ravel().tolist()}
        answer = await client.post("/v2/models/rgb/infer", json={"id": "r1", "inputs": [tensor]})
        assert answer.status_code == 200
        out = answer.json()
        assert out["id"] == "r1" and out["outputs"][0]["shape"] == [2, 4]
        np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(2, 4), expected, atol=1e-6)
        nested = dict(tensor, data=batch.tolist())  # nested lists are accepted too
        assert (await client.post("/v2/models/rgb/infer", json={"inputs": [nested]})).status_code == 200
        for bad in (dict(tensor, shape=[2, 3, 30, 20]), dict(tensor, datatype="FP32"),
                    dict(tensor, data=[300] * batch.size), dict(tensor, data=[0.5] * batch.size),
                    dict(tensor, data=[1, 2, 3])):  # fmt: skip
            rejected = await client.post("/v2/models/rgb/infer", json={"inputs": [bad]})
            assert rejected.status_code == 400 and rejected.json()["error"]
        bad_json = await client.post(
            "/v2/models/rgb/infer", content=b'{"inputs": [', headers={"Content-Type": "application/json"}
        )
        assert bad_json.status_code == 400 and "bad JSON" in bad_json.json()["error"]
        assert (await client.get("/v2/models/nope")).status_code == 404
        assert (await client.post("/v2/models/nope/infer", json={"inputs": [tensor]})).status_code == 404
        assert (await client.get("/v2")).json()["name"] == "fmtl"

    run_app(ServeConfig(model), scenario)


def test_bad_inputs_get_400_413_415(grey):
    image = png(grey_images(1)[0])

    async def chunks(total: int):
        for _ in range(total // 65536):
            yield b"\0" * 65536

    async def scenario(client, server):
        async def status(content, content_type="image/png", path="/v1/classify"):
            answer = await client.post(path, content=content, headers={"Content-Type": content_type})
            return answer.status_code, answer.json().get("error", "")

        assert await status(b"hello, not an image") == (
            400,
            "not a readable image: not an image (cannot identify)",
        )
        assert (await status(image[: len(image) // 2]))[0] == 400
        code, error = await status(bomb_png())
        assert code == 400 and "too large" in error
        assert (await status(b"")) == (400, "not a readable image: empty file")
        assert (await status(image, "text/plain"))[0] == 415
        assert (await status(image, "application/x-www-form-urlencoded"))[0] == 415  # curl -d without -H
        assert (await status(chunks(2_000_000)))[0] == 413  # streamed, no Content-Length: counted while reading
        assert (await status(b"\0" * 1_100_000))[0] == 413
        files = [("f", (f"{i}.png", image)) for i in range(3)]
        assert (await client.post("/v1/classify", files=files)).status_code == 413  # --max-images 2
        tensor = {"datatype": "UINT8", "shape": [3, 1, 28, 28], "data": [0] * (3 * 784)}
        assert (await client.post("/v2/models/grey/infer", json={"inputs": [tensor]})).status_code == 413
        text = (await client.get("/metrics")).text
        assert metric(text, "fmtl_rejected_requests_total", reason="body_too_large") == 2
        assert metric(text, "fmtl_rejected_requests_total", reason="too_many_images") == 2
        assert metric(text, "fmtl_requests_total", route="/v1/classify", code="415") == 2

    run_app(ServeConfig(grey, max_body_mb=1.0, max_images=2), scenario)


def test_queue_full_gets_503_with_retry_after(grey):
    """A 1 s batch wait keeps the first request queued; a second that would overfill the queue is refused."""
    files = lambda n: [("f", (f"{i}.png", png(im))) for i, im in enumerate(grey_images(n))]  # noqa: E731

    async def scenario(client, server):
        first = asyncio.create_task(client.post("/v1/classify", files=files(3)))
        while server.batcher.queued_images < 3:
            await asyncio.sleep(0.01)
        second = await client.post("/v1/classify", files=files(2))
        assert second.status_code == 503 and int(second.headers["Retry-After"]) >= 1
        assert "queue full" in second.json()["error"]
        third = asyncio.create_task(client.post("/v1/classify", content=png(grey_images(1)[0])))  # 3 + 1 fit
        while server.batcher.queued_images < 4:
            await asyncio.sleep(0.01)
        garbage = await client.post("/v1/classify", content=b"not even an image")
        assert garbage.status_code == 503  # refused before its body is read or decoded
        assert (await first).status_code == 200 and (await third).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "fmtl_rejected_requests_total", reason="queue_full") == 2

    run_app(ServeConfig(grey, max_queue=4, max_images=4, batch_wait_ms=1000, max_batch_size=64), scenario)


def test_queue_timeout_gets_503(grey):
    async def scenario(client, server):
        started = time.perf_counter()
        answer = await client.post("/v1/classify", content=png(grey_images(1)[0]))
        assert answer.status_code == 503 and "in the queue" in answer.json()["error"]
        assert time.perf_counter() - started < 1.0  # refused at the timeout, not after the 3 s batch wait
        assert server.batcher.queued_images == 0

    run_app(ServeConfig(grey, queue_timeout_ms=100, batch_wait_ms=3000, max_batch_size=64), scenario)


@pytest.mark.parametrize(("max_batch_size", "batch_wait_ms"), [(1, 0), (64, 300)])
def test_dynamic_batching_keeps_each_answer_with_its_request(grey, max_batch_size, batch_wait_ms):
    images = grey_images(12, seed=3)
    expected = Classifier(grey).predict_proba(np.stack([im[None] for im in images]))

    async def scenario(client, server):
        answers = await asyncio.gather(*(client.post("/v1/classify?k=3", content=png(im)) for im in images))
        for answer, row in zip(answers, expected, strict=True):
            top = answer.json()["predictions"][0]["top_k"]
            assert [p["index"] for p in top] == list(np.argsort(-row)[:3])
            assert top[0]["probability"] == pytest.approx(row.max(), abs=1e-6)
        text = (await client.get("/metrics")).text
        batches = metric(text, "fmtl_batches_total")
        assert metric(text, "fmtl_images_total") == 12 and metric(text, "fmtl_batch_size_sum") == 12
        assert batches == 12 if max_batch_size == 1 else batches < 12  # the batch wait groups requests
        assert metric(text, "fmtl_queue_wait_seconds_count") == 12
        assert metric(text, "fmtl_inference_duration_seconds_count") == batches
        assert metric(text, "fmtl_request_duration_seconds_count", route="/v1/classify") == 12
        for name in ("fmtl_queue_depth", "fmtl_in_flight_requests", "fmtl_process_resident_memory_bytes"):
            assert metric(text, name) >= 0

    run_app(ServeConfig(grey, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms), scenario)


def test_page(grey):
    async def scenario(client, server):
        answer = await client.get("/")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        assert '<h1 id="model">grey</h1>' in answer.text and "v1/classify" in answer.text
        assert "script-src 'nonce-" in answer.headers["content-security-policy"]
        assert "innerHTML" not in answer.text  # every text is set with textContent

    run_app(ServeConfig(grey), scenario)


def test_page_escapes_a_hostile_model_name(tmp_path):
    hostile = "<img src=x onerror=alert(1)>"
    model = grey_model(tmp_path).rename(tmp_path / f"{hostile}.onnx")

    async def scenario(client, server):
        text = (await client.get("/")).text
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text

    run_app(ServeConfig(model), scenario)


# --- the real server -------------------------------------------------------------------------------


class ServerProcess:
    """`python -m fmtl.cli serve ... --port 0` in a process; its stdout read line by line in a thread."""

    def __init__(self, args: list[str], cwd: Path):
        command = [sys.executable, "-m", "fmtl.cli", "serve", *args, "--port", "0"]
        self.process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                match = re.search(pattern, self.lines.get(timeout=0.1))
            except queue.Empty:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"server exited {self.process.returncode}: {self.process.stderr.read()}"
                    ) from None
                continue
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s")

    def start(self) -> ServerProcess:
        self.url = self.wait_for(r"on (http://127\.0\.0\.1:\d+)").group(1)
        self.wait_for(r"^ready")
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.mark.slow
def test_server_answers_as_fmtl_infer_does(tmp_path):
    """The default model (newest in export/), raw POST and curl-style PUT agree with `fmtl infer --format json`."""
    grey_model(tmp_path / "export")
    paths = []
    for i, image in enumerate(grey_images(4, seed=5)):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(png(image))
    server = ServerProcess([], tmp_path).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            served = [
                client.post("/v1/classify?k=3", content=p.read_bytes(), headers={"Content-Type": "image/png"}).json()
                for p in paths
            ]
            assert client.put("/v1/classify?k=3", content=paths[0].read_bytes()).json() == served[0]
            streamed = client.post("/v1/classify", content=iter([b"\0" * 65536] * 300))  # chunked, 19.7 MB
            assert streamed.status_code == 413
    finally:
        server.stop()
    infer = subprocess.run([sys.executable, "-m", "fmtl.cli", "infer", *map(str, paths), "-k", "3", "--format", "json",
                            "--quiet"], cwd=tmp_path, capture_output=True, text=True, check=True)  # fmt: skip
    rows = json.loads(infer.stdout)["predictions"]
    for answer, row in zip(served, rows, strict=True):
        assert answer["predictions"][0].keys() == row.keys()  # one JSON shape (fmtl.runtime.results.Row.to_dict)
        got = answer["predictions"][0]["top_k"]
        assert [p["label"] for p in got] == [p["label"] for p in row["top_k"]]
        assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in row["top_k"]], abs=2e-6)


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(tmp_path):
    """Requests whose bodies are still arriving when SIGTERM comes are answered; new ones get 503."""
    server = ServerProcess([str(grey_model(tmp_path)), "--batch-wait-ms", "2000", "--max-batch-size", "64"], tmp_path)
    server.start()
    host, port = server.url.removeprefix("http://").split(":")
    bodies = [png(image) for image in grey_images(3)]
    uploads = []
    try:
        for body in bodies:  # the headers and half of each body now, the rest after the signal
            upload = socket.create_connection((host, int(port)), timeout=30)
            head = f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            upload.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
            uploads.append(upload)
        deadline = time.monotonic() + 10
        while metric(httpx.get(f"{server.url}/metrics").text, "fmtl_in_flight_requests") < 4:  # 3 + this scrape
            assert time.monotonic() < deadline, "the uploads never started"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 503:
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            time.sleep(0.01)
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        late = httpx.post(f"{server.url}/v1/classify", content=bodies[0], headers={"Content-Type": "image/png"})
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        assert late.headers["connection"] == "close"  # clients stop reusing connections that are about to close
        assert server.process.poll() is None  # still draining: the uploads are not finished
        for upload, body in zip(uploads, bodies, strict=True):
            upload.sendall(body[len(body) // 2 :])
        answers = [upload.makefile("rb").read().decode("latin-1") for upload in uploads]  # until the server closes
        assert server.process.wait(10) == 0
    finally:
        server.stop()
        for upload in uploads:
            upload.close()
    for answer in answers:
        assert answer.startswith("HTTP/1.1 200") and '"top_k"' in answer, answer


def slow_requests_until_refused(
    host: str, port: int, body: bytes, answers: list[tuple[float, str]], stop: float
) -> None:
    """Upload ``body`` in two halves 0.25 s apart, again and again, until the server refuses to connect;
    each answer's status line (or the error, the refusal last) goes into ``answers`` with the time its
    request began."""
    head = f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {len(body)}"
    while time.monotonic() < stop:
        began = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=10) as upload:
                upload.sendall(f"{head}\r\n\r\n".encode() + body[: len(body) // 2])
                time.sleep(0.25)
                upload.sendall(body[len(body) // 2 :])
                answers.append((began, upload.makefile("rb").readline().decode("latin-1").strip()))
        except ConnectionRefusedError:
            answers.append((began, "ConnectionRefusedError"))
            return
        except OSError as error:  # reset while waiting in the kernel's accept queue when listening stops
            answers.append((began, type(error).__name__))


@pytest.mark.slow
def test_a_stream_of_requests_after_sigterm_does_not_hold_the_drain_open(tmp_path):
    """Requests that arrive during the drain are refused, not waited for: however many keep coming,
    the server stops listening and exits 0 soon after the requests it had before the signal.

    The stream is running (every client has had an answer) before the signal, and the requests judged
    are those begun once the server reports the drain (readiness 503): no race with its start-up or
    with the signal's delivery."""
    server = ServerProcess([str(grey_model(tmp_path)), "--drain-timeout", "30"], tmp_path).start()
    host, port = server.url.removeprefix("http://").split(":")
    body = png(grey_images(1)[0])
    answers: list[tuple[float, str]] = []
    try:
        clients = []
        for _ in range(4):  # staggered, so one of them is always mid-upload
            args = (host, int(port), body, answers, time.monotonic() + 60)
            clients.append(threading.Thread(target=slow_requests_until_refused, args=args, daemon=True))
            clients[-1].start()
            time.sleep(0.07)
        deadline = time.monotonic() + 30
        while len(answers) < 4:
            assert time.monotonic() < deadline, f"the stream did not start: {answers}"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 503:
            assert time.monotonic() < signalled + 5, "still ready after SIGTERM"
            time.sleep(0.01)
        draining = time.monotonic()
        assert server.process.wait(8) == 0
        exited = time.monotonic() - signalled
        for client in clients:
            client.join(15)
    finally:
        server.stop()
    assert exited < 5, f"the drain took {exited:.1f} s"
    before = [status for began, status in answers if began < signalled]
    during = [status for began, status in answers if began > draining]
    assert before and all(status.startswith("HTTP/1.1 200") for status in before[:4]), before
    assert during.count("ConnectionRefusedError") == 4, answers  # each client's last try: listening had stopped
    refused = ("ConnectionResetError", "ConnectionRefusedError")
    assert all(s.startswith("HTTP/1.1 503") or s in refused for s in during), during


@pytest.mark.slow
def test_a_model_that_fails_to_load_exits_with_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    for args in ([str(bad), "--port", "0"], ["--port", "0"]):  # a broken file; no export/ folder at all
        done = subprocess.run([sys.executable, "-m", "fmtl.cli", "serve", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0].lower() and "ready" not in done.stdout, done.stderr


@pytest.mark.slow
def test_drain_timeout_ends_a_stuck_drain_with_one_line(tmp_path):
    """A request that never finishes its body cannot hold the server past --drain-timeout."""
    server = ServerProcess([str(grey_model(tmp_path)), "--drain-timeout", "1"], tmp_path).start()
    host, port = server.url.removeprefix("http://").split(":")
    stuck = socket.create_connection((host, int(port)), timeout=30)
    try:
        stuck.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
        )
        deadline = time.monotonic() + 10
        while metric(httpx.get(f"{server.url}/metrics").text, "fmtl_in_flight_requests") < 2:
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) != 0
        assert 0.9 < time.monotonic() - started < 10
        errors = server.process.stderr.read().strip().splitlines()
        assert len(errors) == 1 and "drain timeout: 1 requests were still in flight" in errors[0], errors
    finally:
        stuck.close()
        server.stop()


def test_onnxruntime_threads_follow_the_cpu_affinity_and_parallel_batches(tmp_path):
    """Pinned to one CPU (taskset, cgroup CPU sets), the session gets one intra-op thread, not one per host core,
    and one lane (no second session). --parallel-batches N: N lanes on a second session of one thread."""
    model = grey_model(tmp_path)
    code = (
        "import asyncio, os, sys\n"
        "from pathlib import Path\n"
        "from fmtl.runtime.serve import ServeConfig, create_app\n"
        "def sessions(**options):\n"
        "    server = create_app(ServeConfig(Path(sys.argv[1]), **options), load=False).model_server\n"
        "    asyncio.run(server.load())\n"
        "    threads = lambda c: c.session.get_session_options().intra_op_num_threads if c else None\n"
        "    return threads(server.classifier), server.batcher.lanes, threads(server.backlog_classifier)\n"
        "print(sessions(threads=2, parallel_batches=3), sessions(threads=2, parallel_batches=1))\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "print(sessions(), sessions(threads=3))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["(2, 3, 1) (2, 1, None)", "(1, 1, None) (3, 1, None)"]


@pytest.mark.slow
def test_a_server_on_ipv6_loopback_prints_a_usable_url_and_answers_it(tmp_path):
    """--host ::1: the printed address is http://[::1]:PORT, and requests addressed to it (Host: [::1]:PORT) are
    answered, not refused as a foreign host."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = ServerProcess([str(grey_model(tmp_path)), "--host", "::1"], tmp_path)
    try:
        url = server.wait_for(r"on (http://\S+) ").group(1)
        server.wait_for(r"^ready")
        assert re.fullmatch(r"http://\[::1\]:\d+", url), url
        answer = httpx.post(f"{url}/v1/classify", content=png(grey_images(1)[0]), headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["top_k"], answer.text
    finally:
        server.stop()


def test_impossible_options_are_one_line_errors(tmp_path):
    model = grey_model(tmp_path)
    done = subprocess.run([sys.executable, "-m", "fmtl.cli", "serve", str(model), "--max-images", "10",
                           "--max-queue", "5"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "--max-queue" in done.stderr
    done = subprocess.run([sys.executable, "-m", "fmtl.cli", "serve", str(model), "--engine", "ray",
                           "--parallel-batches", "2"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "add replicas" in done.stderr
