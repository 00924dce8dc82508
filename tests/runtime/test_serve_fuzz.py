"""Property tests of `fmtl serve`'s request parsing (Hypothesis, derandomized, small): whatever the raw
body, the multipart body, the content type or the query string, the outcome is an answer or a 4xx
with a one-line JSON error; never a 500, never another exception."""

from __future__ import annotations

import asyncio
import threading
import urllib.parse

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_fixtures import grey_model
from test_serve import grey_images, png

from fmtl.runtime.serve import ServeConfig, create_app
from fmtl.runtime.serve.api import ApiError, multipart_files, parse_k, parse_min_probability

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
PNG = png(grey_images(1)[0])


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with a few bytes changed, cut short, or with bytes inserted: near-valid input."""
    flips = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=4)
    return st.one_of(
        flips.map(lambda changes: _apply(data, changes)),
        st.integers(0, len(data)).map(lambda cut: data[:cut]),
        st.tuples(st.integers(0, len(data)), st.binary(max_size=64)).map(lambda c: data[: c[0]] + c[1] + data[c[0] :]),
    )


def _apply(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for index, value in changes:
        out[index] = value
    return bytes(out)


def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: str = "fuzz") -> bytes:
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode("utf-8", "replace")
                      + data + b"\r\n")  # fmt: skip
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


texts = st.text(max_size=30) | st.from_regex(r"[0-9]{1,12}", fullmatch=True) | st.sampled_from(["0.5", "5", "²"])


@FUZZ
@given(texts)
def test_k_is_a_number_in_range_or_a_400(text):
    try:
        assert 1 <= parse_k(text) <= 1_000_000
    except ApiError as error:
        assert error.status == 400 and "\n" not in error.message


@FUZZ
@given(texts)
def test_min_probability_is_in_0_1_or_a_400(text):
    try:
        assert 0.0 <= parse_min_probability(text) <= 1.0
    except ApiError as error:
        assert error.status == 400


parts = st.lists(st.tuples(st.text(max_size=8), st.none() | st.text(max_size=8), st.binary(max_size=32)), max_size=6)


@FUZZ
@given(parts.flatmap(lambda p: mutated(multipart_body(p)) if p else st.just(multipart_body(p))),
       st.sampled_from(["multipart/form-data; boundary=fuzz", "multipart/form-data", "multipart/form-data; boundary=",
                        'multipart/form-data; boundary="fuzz"; charset=nope']), st.integers(1, 4))  # fmt: skip
def test_multipart_gives_files_or_a_4xx(body, content_type, max_files):
    try:
        files = multipart_files(body, content_type, max_files)
    except ApiError as error:
        assert error.status in (400, 413) and "\n" not in error.message
    else:
        assert len(files) <= max_files and all(isinstance(n, str) and isinstance(d, bytes) for n, d in files)


class LiveApp:
    """The app with the test model loaded, on an event loop in a thread, for many requests."""

    def __init__(self, config: ServeConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = create_app(config, load=False)
        self.call(self.app.model_server.load())
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30)

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def close(self) -> None:
        self.call(self.client.aclose())
        self.call(self.app.model_server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live_app(tmp_path_factory):
    app = LiveApp(ServeConfig(grey_model(tmp_path_factory.mktemp("model")), max_images=4, max_body_mb=0.1))
    yield app
    app.close()


def assert_answer_or_4xx(answer: httpx.Response) -> None:
    assert answer.status_code == 200 or 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    body = answer.json()
    if answer.status_code == 200:
        assert all(bool(entry["top_k"]) != (entry["error"] is not None) for entry in body["predictions"])
    else:
        assert isinstance(body["error"], str) and "\n" not in body["error"]


@FUZZ
@given(body=mutated(PNG) | st.binary(max_size=200),
       content_type=st.sampled_from(["image/png", "", "application/octet-stream", "text/plain", "image/\u00e9"]),
       query=st.dictionaries(st.sampled_from(["k", "min_probability", "x"]), texts, max_size=2))  # fmt: skip
def test_raw_bodies_and_queries_get_an_answer_or_a_4xx(live_app, body, content_type, query):
    headers = {"Content-Type": content_type.encode("utf-8")}  # raw bytes, as a client may send
    url = "/v1/classify?" + urllib.parse.urlencode(query)
    assert_answer_or_4xx(live_app.call(live_app.client.post(url, content=body, headers=headers)))


@FUZZ
@given(parts.map(lambda p: [*p, ("f", "image.png", PNG)]).flatmap(lambda p: mutated(multipart_body(p))))
def test_multipart_requests_get_an_answer_or_a_4xx(live_app, body):
    headers = {"Content-Type": "multipart/form-data; boundary=fuzz"}
    assert_answer_or_4xx(live_app.call(live_app.client.post("/v1/classify", content=body, headers=headers)))


def test_the_fuzzed_app_still_answers_a_plain_request(live_app):
    answer = live_app.call(live_app.client.post("/v1/classify", content=png(np.zeros((28, 28), np.uint8))))
    assert answer.status_code == 200
