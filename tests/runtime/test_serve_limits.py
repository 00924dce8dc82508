"""`fmtl serve` against impolite clients: stalled uploads, too many connections, hostile parameters,
bodies and Host headers. Real servers on free loopback ports and real sockets where the behaviour
lives in the connection layer; the ASGI app through httpx where it lives in the request handling."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from onnx_fixtures import grey_model
from test_serve import ServerProcess, bomb_png, grey_images, metric, png, run_app

from fmtl.runtime.classifier import Classifier
from fmtl.runtime.serve import ServeConfig


@pytest.fixture()
def grey(tmp_path):
    return grey_model(tmp_path)


def address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def stalled_upload(host: str, port: int, length: int = 1_000_000) -> socket.socket:
    """A connection that sends the headers of a ``length``-byte upload and one byte of it, then waits."""
    upload = socket.create_connection((host, port), timeout=30)
    upload.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                   f"Content-Length: {length}\r\n\r\nx".encode())  # fmt: skip
    return upload


def wait_in_flight(server: ServerProcess, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(httpx.get(f"{server.url}/metrics").text, "fmtl_in_flight_requests") < count + 1:  # + the scrape
        assert time.monotonic() < deadline, f"fewer than {count} requests in flight"
        time.sleep(0.05)


def read_all(connection: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    connection.settimeout(timeout)
    chunks = []
    try:
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


# --- slow and stalled clients (the real server) ------------------------------------------------------


@pytest.mark.slow
def test_200_stalled_uploads_do_not_lock_out_a_normal_client(grey, tmp_path):
    """200 connections send headers and 1 byte of a 1 MB body and wait (more than --max-queue 128):
    they hold connections, not queue room, so a normal client is still served."""
    server = ServerProcess([str(grey)], tmp_path).start()
    uploads = []
    try:
        uploads = [stalled_upload(*address(server)) for _ in range(200)]
        wait_in_flight(server, 200)
        body = png(grey_images(1)[0])
        with httpx.Client(base_url=server.url, timeout=30) as client:
            codes = [client.post("/v1/classify", content=body, headers={"Content-Type": "image/png"}).status_code
                     for _ in range(100)]  # fmt: skip
        assert codes.count(200) >= 99, codes
        assert metric(httpx.get(f"{server.url}/metrics").text, "fmtl_in_flight_requests") >= 200  # still stalled
    finally:
        for upload in uploads:
            upload.close()
        server.stop()


@pytest.fixture()
def open_files():
    """At least 4,096 open files for this process and the servers it starts (the soft limit, up to the hard one)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if wanted < 2200:
        pytest.skip(f"the open-file limit is {hard} (ulimit -Hn): too few for 1,000 idle connections and their server")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_1000_idle_connections_do_not_lock_out_a_normal_client(grey, tmp_path, open_files):
    """1,000 connections that open and send nothing, twice --limit-concurrency: the server closes the ones
    idle the longest to make room, so a normal client beside them is served, on one keep-alive connection
    and on a new connection per request. A stalled upload opened before them all is not idle: it is
    never closed, and its request is answered when its body comes."""
    server = ServerProcess([str(grey), "--limit-concurrency", "512", "--request-timeout", "60"], tmp_path).start()
    host, port = address(server)
    body = png(grey_images(1)[0])
    head = f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {len(body)}"
    upload = socket.create_connection((host, port), timeout=30)
    idle: list[socket.socket] = []
    try:
        upload.sendall(f"{head}\r\n\r\n".encode() + body[:10])
        wait_in_flight(server, 1)
        for _ in range(1000):
            idle.append(socket.create_connection((host, port), timeout=30))
        deadline = time.monotonic() + 20  # until the server has accepted them all (and closed the oldest)
        while (scrape := httpx.get(f"{server.url}/metrics")).status_code == 200:  # a 503: at the cap, none closed
            if metric(scrape.text, "fmtl_idle_connections_closed_total") >= 1000 - 512:
                break
            assert time.monotonic() < deadline, "the server did not accept the idle connections"
            time.sleep(0.05)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            kept = [client.post("/v1/classify", content=body, headers={"Content-Type": "image/png"}).status_code
                    for _ in range(5)]  # fmt: skip
        fresh = [httpx.post(f"{server.url}/v1/classify", content=body, headers={"Content-Type": "image/png"},
                            timeout=30).status_code for _ in range(5)]  # fmt: skip
        assert kept == [200] * 5 and fresh == [200] * 5, (kept, fresh)
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "fmtl_open_connections") <= 512 and metric(text, "fmtl_in_flight_requests") >= 2
        upload.sendall(body[10:])
        answer_head, answer = Responses(upload).next()
        assert answer_head.startswith(b"HTTP/1.1 200") and b'"top_k"' in answer, answer_head
    finally:
        for connection in [upload, *idle]:
            connection.close()
        server.stop()


@pytest.mark.slow
def test_at_the_limit_the_keep_alive_connection_idle_the_longest_is_closed_for_a_newcomer(grey, tmp_path):
    """--limit-concurrency 4, three keep-alive connections idle after one request each: a new client's
    connection is the fourth, so the one idle the longest (the first) is closed, the others are kept."""
    server = ServerProcess([str(grey), "--limit-concurrency", "4"], tmp_path).start()
    kept = []
    try:
        for _ in range(3):
            kept.append(socket.create_connection(address(server), timeout=10))
            kept[-1].sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert Responses(kept[-1]).next()[0].startswith(b"HTTP/1.1 200")
        body = png(grey_images(1)[0])
        answer = httpx.post(f"{server.url}/v1/classify", content=body, headers={"Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        assert read_all(kept[0], timeout=5) == b""  # closed by the server, without an answer
        for connection in kept[1:]:  # still open: each answers a second request
            connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert Responses(connection).next()[0].startswith(b"HTTP/1.1 200")
    finally:
        for connection in kept:
            connection.close()
        server.stop()


def test_the_connection_limit_fits_the_open_file_limit():
    """The soft open-file limit is raised for --limit-concurrency; where the hard limit is too low, the
    connection limit is lowered to fit, with a warning (past it the server could not accept at all)."""
    code = (
        "import resource\n"
        "from fmtl.runtime.serve.process import SPARE_FILES, connection_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 400))\n"
        "print(connection_limit(100), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(connection_limit(4000), 400 - SPARE_FILES, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = done.stdout.split("\n")[:2]
    assert first == "100 200"  # enough already: unchanged
    fitted, expected, soft = second.split()
    assert fitted == expected and soft == "400", done.stdout
    assert (
        done.stderr.strip()
        == f"warning: --limit-concurrency 4000 lowered to {fitted}: the open-file limit is 400 (ulimit -n)"
    )


@pytest.mark.slow
def test_a_request_that_does_not_arrive_in_time_gets_408_and_is_closed(grey, tmp_path):
    server = ServerProcess([str(grey), "--request-timeout", "1"], tmp_path).start()
    host, port = address(server)
    try:
        half_headers = socket.create_connection((host, port), timeout=30)
        half_headers.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        body_stalled = stalled_upload(host, port, 1000)
        silent = socket.create_connection((host, port), timeout=30)  # connects and sends nothing
        started = time.monotonic()
        answers = [read_all(connection, 10) for connection in (half_headers, body_stalled, silent)]
        assert time.monotonic() - started < 8  # closed by the server, not by the read timeout
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"connection: close" in answer.lower() and b"--request-timeout" in answer
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric(metrics, "fmtl_rejected_requests_total", reason="request_timeout") == 1  # the body, late
        assert metric(metrics, "fmtl_rejected_requests_total", reason="header_timeout") == 2  # headers, or nothing
        assert httpx.post(f"{server.url}/v1/classify", content=png(grey_images(1)[0])).status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_headers_over_16_kib_get_431_and_are_closed_whether_sent_at_once_or_slowly(grey, tmp_path):
    """One header of 20 KiB, sent whole or a KiB at a time: 431 and closed, nothing buffered past the limit."""
    server = ServerProcess([str(grey)], tmp_path).start()
    host, port = address(server)
    head = b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000
    try:
        for piece in (len(head), 1024):
            connection = socket.create_connection((host, port), timeout=30)
            for start in range(0, len(head), piece):
                try:
                    connection.sendall(head[start : start + piece])
                except OSError:  # refused and closed before the last piece: what the test wants
                    break
                time.sleep(0.01 if piece < len(head) else 0)
            answer = read_all(connection, 10)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
            assert b"connection: close" in answer.lower() and b"16 KiB" in answer
        whole = socket.create_connection((host, port), timeout=30)  # complete, and in one read
        whole.sendall(head + b"\r\nContent-Length: 0\r\n\r\n")
        answer = read_all(whole, 10)
        assert answer.startswith(b"HTTP/1.1 431 ") and b"connection: close" in answer.lower(), answer[:80]
        just_under = {"X-Big": "a" * 15_000, "Content-Type": "image/png"}
        assert (
            httpx.post(f"{server.url}/v1/classify", content=png(grey_images(1)[0]), headers=just_under).status_code
            == 200
        )
    finally:
        server.stop()


def request_bytes(body: bytes, length: int | None = None, host: str = "127.0.0.1") -> bytes:
    length = len(body) if length is None else length
    head = f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n"
    return head.encode() + body


class Responses:
    """The responses on one keep-alive connection, one at a time (one recv may bring several)."""

    def __init__(self, connection: socket.socket):
        self.connection, self.buffer = connection, b""

    def next(self) -> tuple[bytes, bytes]:
        """The next response's head and body (by its Content-Length)."""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += receive(self.connection)
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(rest) < length:
            rest += receive(self.connection)
        self.buffer = rest[length:]
        return head, rest[:length]


def receive(connection: socket.socket) -> bytes:
    chunk = connection.recv(65536)
    assert chunk, "the server closed the connection"
    return chunk


@pytest.mark.slow
def test_while_the_queue_is_full_the_connection_layer_refuses_keeping_or_closing_the_connection(grey, tmp_path):
    """The queue-full 503 comes from the connection layer (no ASGI task): a small body is read and
    dropped and the connection serves the next request; a large, slow or pipelined one is handled too."""
    server = ServerProcess([str(grey), "--max-queue", "1", "--max-images", "1", "--batch-wait-ms", "3000",
                            "--max-batch-size", "64", "--keep-alive-timeout", "60"], tmp_path).start()  # fmt: skip
    host, port = address(server)
    image = png(grey_images(1)[0])
    try:
        parked = socket.create_connection((host, port), timeout=30)
        parked.sendall(request_bytes(image))  # waits 3 s in the queue for a fuller batch
        wait_in_flight(server, 1)
        small, large, slow = (socket.create_connection((host, port), timeout=30) for _ in range(3))
        small.sendall(request_bytes(image) * 2)  # two pipelined requests
        small_responses = Responses(small)
        for _ in range(2):
            head, body = small_responses.next()
            assert head.startswith(b"HTTP/1.1 503 ") and b"queue full" in body and b"retry-after" in head.lower()
            assert b"connection: close" not in head.lower()
        large.sendall(request_bytes(b"x", length=1_000_000))
        assert b"connection: close" in read_all(large, 10).lower()  # answered at once, the upload not read
        slow.sendall(request_bytes(b"x", length=1000))  # 1 byte of 1000, then nothing
        started = time.monotonic()
        assert read_all(slow, 10).startswith(b"HTTP/1.1 503 ") and time.monotonic() - started < 5
        head, _ = Responses(parked).next()
        assert head.startswith(b"HTTP/1.1 200 ")
        small.sendall(request_bytes(image))  # the queue has room again: the kept connection is served
        assert small_responses.next()[0].startswith(b"HTTP/1.1 200 ")
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric(metrics, "fmtl_requests_total", route="/v1/classify", code="503") == 4
        assert metric(metrics, "fmtl_rejected_requests_total", reason="queue_full") == 4
    finally:
        server.stop()


@pytest.mark.slow
def test_limit_concurrency_refuses_the_excess_at_once(grey, tmp_path):
    """uvicorn counts open connections, the new one included: 7 stalled uploads + 1 reach the limit of 8.

    The uploads open one at a time: a burst accepted together would see each other and all be refused."""
    server = ServerProcess([str(grey), "--limit-concurrency", "8"], tmp_path).start()
    body = png(grey_images(1)[0])
    uploads = []
    try:
        for held in range(1, 7):  # each scrape is a connection too: 6 uploads + 1 scrape stay under 8
            uploads.append(stalled_upload(*address(server)))
            wait_in_flight(server, held)
        uploads.append(stalled_upload(*address(server)))
        time.sleep(0.5)
        refused = httpx.post(f"{server.url}/v1/classify", content=body, timeout=5)
        assert refused.status_code == 503
        for upload in uploads:
            upload.close()
        deadline = time.monotonic() + 10
        while httpx.post(f"{server.url}/v1/classify", content=body, timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "still refused after the stalled uploads left"
            time.sleep(0.1)
    finally:
        for upload in uploads:
            upload.close()
        server.stop()


@pytest.mark.slow
def test_100000_multipart_parts_are_refused_without_stalling_the_server(grey, tmp_path):
    server = ServerProcess([str(grey)], tmp_path).start()
    part = b"--b\r\nContent-Disposition: form-data; name=f; filename=a.png\r\n\r\n\r\n"
    body = part * 100_000 + b"--b--\r\n"
    answers: list[httpx.Response] = []

    def send() -> None:
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
        answers.append(httpx.post(f"{server.url}/v1/classify", content=body, headers=headers, timeout=60))

    try:
        sender = threading.Thread(target=send)
        sender.start()
        lives = []
        while sender.is_alive():
            lives.append(httpx.get(f"{server.url}/v2/health/live", timeout=2).status_code)
            time.sleep(0.01)
        sender.join()
        assert lives.count(200) == len(lives)
        assert answers[0].status_code == 413 and "more than 64 images" in answers[0].json()["error"]
    finally:
        server.stop()


# --- hostile parameters, bodies and hosts (the app) ---------------------------------------------------


def test_any_k_and_min_probability_is_an_answer_or_a_400(grey):
    image = png(grey_images(1)[0])

    async def scenario(client, server):
        for k in ("%C2%B2", "9" * 5000, "-1", "0", "1.5", "", "%00", "1000001", "%EF%BC%93"):
            answer = await client.post(f"/v1/classify?k={k}", content=image)
            assert answer.status_code == 400 and "k must be" in answer.json()["error"], k
        for p in ("nan", "inf", "-0.1", "1.5", "", "%C2%BD", "1e-3", "."):
            answer = await client.post(f"/v1/classify?min_probability={p}", content=image)
            assert answer.status_code == 400 and "min_probability must be" in answer.json()["error"], p
        assert (await client.post("/v1/classify?k=1000000&min_probability=1", content=image)).status_code == 200

    run_app(ServeConfig(grey), scenario)


def test_min_probability_marks_exactly_the_predictions_below_it(grey):
    images = grey_images(8, seed=7)
    top1 = np.sort(Classifier(grey).predict_proba(np.stack([im[None] for im in images])).max(axis=1))
    files = [("f", (f"{i}.png", png(image))) for i, image in enumerate(images)]

    async def scenario(client, server):
        plain = (await client.post("/v1/classify?k=2", files=files)).json()["predictions"]
        assert all("unsure" not in entry for entry in plain)
        for threshold in [(a + b) / 2 for a, b in zip(top1, top1[1:], strict=False)]:
            answer = await client.post(f"/v1/classify?k=2&min_probability={threshold:.9f}", files=files)
            entries = answer.json()["predictions"]
            unsure = [entry["unsure"] for entry in entries]
            assert unsure == [entry["top_k"][0]["probability"] < threshold for entry in entries]
            assert sum(unsure) == int(np.sum(top1 < threshold)) and all(len(e["top_k"]) == 2 for e in entries)

    run_app(ServeConfig(grey), scenario)


def test_pixel_limit_defaults_to_the_models_size_and_follows_max_pixels(grey):
    async def scenario(client, server):
        assert server.max_pixels == 16_000_000  # a 28x28 model: the 16 MP floor
        big = await client.post("/v1/classify", content=bomb_png(5000, 5000))  # 25 MP, no pixel data
        assert big.status_code == 400 and "limit 16000000" in big.json()["error"]

    run_app(ServeConfig(grey), scenario)

    async def small_limit(client, server):
        small = await client.post("/v1/classify", content=png(np.zeros((40, 40), np.uint8)))
        assert small.status_code == 400 and "limit 1000" in small.json()["error"]
        assert (await client.post("/v1/classify", content=png(np.zeros((28, 28), np.uint8)))).status_code == 200

    run_app(ServeConfig(grey, max_pixels=1000), small_limit)


def test_bad_multipart_bodies_are_400_or_413(grey):
    async def scenario(client, server):
        async def post(body: bytes, content_type: str):
            answer = await client.post("/v1/classify", content=body, headers={"Content-Type": content_type})
            return answer.status_code, answer.json()["error"]

        assert (await post(b"anything", "multipart/form-data"))[0] == 400  # no boundary
        assert (await post(b"--b\r\nnot a header line\r\n\r\n", "multipart/form-data; boundary=b"))[0] == 400
        fields = b"".join(b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\nv\r\n" for _ in range(100))
        assert (await post(fields + b"--b--\r\n", "multipart/form-data; boundary=b"))[0] == 413
        code, error = await post(b"--b--\r\n", "multipart/form-data; boundary=b")
        assert code == 400 and "no file" in error

    run_app(ServeConfig(grey), scenario)


def test_hosts_other_than_the_allowed_ones_get_400(grey):
    image = png(grey_images(1)[0])

    async def scenario(client, server):
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            answer = await client.get("/v2/models/grey", headers={"Host": host})
            assert answer.status_code == 400, host
        for host in ("127.0.0.1:8000", "localhost", "localhost:1234", "[::1]", "[::1]:8000"):
            assert (await client.post("/v1/classify", content=image, headers={"Host": host})).status_code == 200

    run_app(ServeConfig(grey), scenario)
    assert ServeConfig(grey, host="::1").trusted_hosts()[0] == ["127.0.0.1", "localhost", "[::1]"]
    assert ServeConfig(grey, host="2001:db8::1").trusted_hosts()[0][0] == "[2001:db8::1]"  # as Host headers carry it
    assert ServeConfig(grey, allowed_hosts=("::1", "*.example.com")).trusted_hosts()[0] == ["[::1]", "*.example.com"]
    assert ServeConfig(grey, host="0.0.0.0").trusted_hosts()[0] == ["*"]
    assert "warning" in ServeConfig(grey, host="0.0.0.0").trusted_hosts()[1]
    assert ServeConfig(grey, host="0.0.0.0", allowed_hosts=("models.example",)).trusted_hosts() == (
        ["models.example"], None)  # fmt: skip

    async def named(client, server):
        assert (await client.get("/v2/health/live", headers={"Host": "models.example"})).status_code == 200
        assert (await client.get("/v2/health/live", headers={"Host": "localhost"})).status_code == 400

    run_app(ServeConfig(grey, allowed_hosts=("models.example",)), named)


def test_a_refusal_before_the_body_is_read_keeps_or_closes_the_connection(grey):
    """A small unread body is dropped so the connection can be reused; a large one closes it."""

    async def scenario(client, server):
        small = await client.post("/v1/classify?k=x", content=b"\0" * 1000)
        large = await client.post("/v1/classify?k=x", content=b"\0" * 1_000_000)
        assert small.status_code == large.status_code == 400
        assert "connection" not in small.headers and large.headers["connection"] == "close"

    run_app(ServeConfig(grey), scenario)


def test_the_drain_reads_of_uvicorn_internals_degrade_to_nothing():
    """If a uvicorn release moves the attributes the drain reads, it sees no connections instead of crashing."""
    from fmtl.runtime.serve.protocol import close_connections, close_listeners, open_connections

    class Moved:
        server_state = None

    for server in (object(), Moved()):
        assert open_connections(server) == []
        close_listeners(server)
        close_connections(server)


def test_while_the_queue_is_full_new_requests_are_refused_before_the_app_and_hosts_still_checked(grey):
    import asyncio

    async def scenario(client, server):
        parked = asyncio.create_task(client.post("/v1/classify", content=png(grey_images(1)[0])))
        while server.batcher.queued_images < 1:
            await asyncio.sleep(0.01)
        for path in ("/v1/classify", "/v2/models/grey/infer"):
            refused = await client.post(path, content=b"not even read")
            assert refused.status_code == 503 and "queue full" in refused.json()["error"], path
            assert int(refused.headers["retry-after"]) >= 1
        assert (await client.post("/v1/classify", content=b"x", headers={"Host": "evil.example"})).status_code == 400
        assert (await client.get("/v2/health/live")).status_code == 200  # other routes are not shed
        assert (await parked).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "fmtl_requests_total", route="/v1/classify", code="503") == 1
        assert metric(text, "fmtl_requests_total", route="/v2/models/{name}/infer", code="503") == 1
        assert metric(text, "fmtl_rejected_requests_total", reason="queue_full") == 2

    config = ServeConfig(grey, max_queue=1, max_images=1, batch_wait_ms=1000, max_batch_size=64)
    run_app(config, scenario)
