"""The KServe v2 (Open Inference Protocol) side of `fmtl serve`: NVIDIA's tritonclient against the real server,
in JSON and in binary tensor mode, and property tests of the request parser (fmtl.runtime.serve.kserve_v2).

Torch-free: runs in the runtime-only install too (models from onnx_fixtures)."""

from __future__ import annotations

import gzip
import io
import json
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_fixtures import rgb_model
from PIL import Image
from tritonclient.utils import InferenceServerException

from fmtl.runtime.classifier import Classifier
from fmtl.runtime.images import decode_bytes
from fmtl.runtime.serve.kserve_v2 import HEADER_LENGTH, V2Request, V2RequestError, encode_response, parse_request

INPUT_SHAPE = (3, 20, 30)  # rgb_model: 3 channels, 20 high, 30 wide
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the real server, driven by tritonclient -------------------------------------------------------


class Server:
    """`python -m fmtl.cli serve MODEL --port 0` in a process, until it says ready; its stdout read in a thread."""

    def __init__(self, model: Path, *args: str):
        command = [sys.executable, "-m", "fmtl.cli", "serve", str(model), "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()
        self.url = self._wait_for(r"on http://(127\.0\.0\.1:\d+)").group(1)
        self._wait_for(r"^ready")

    def _wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                match = re.search(pattern, self.lines.get(timeout=0.1))
            except queue.Empty:
                assert self.process.poll() is None, f"server exited: {self.process.stderr.read()}"
                continue
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s")

    def stop(self) -> str:
        """Stop it (SIGTERM, which drains) and return what it wrote to stderr."""
        self.process.terminate()
        _, stderr = self.process.communicate(timeout=30)
        return stderr


def png_files(folder: Path, count: int) -> list[Path]:
    """RGB PNG files at the model's size: smooth gradients with noise, each with its own colour cast."""
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:20, 0:30]
    paths = []
    for i in range(count):
        base = np.stack([rows * 12, cols * 8, (rows + cols) * 5], axis=-1) * (1 + i % 3) / 3
        noise = rng.integers(-30, 30, base.shape)
        paths.append(folder / f"image{i}.png")
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def decoded_batch(paths: list[Path]) -> np.ndarray:
    """What a client sends: each PNG decoded to uint8 [C, H, W] (fmtl's own decoder, as `fmtl infer` uses)."""
    return np.stack([decode_bytes(path.read_bytes(), 3, (20, 30)) for path in paths])


def infer_probabilities(paths: list[Path], model: Path) -> np.ndarray:
    """`fmtl infer --format json -k 4`: every class's probability per image, in class order."""
    done = subprocess.run([sys.executable, "-m", "fmtl.cli", "infer", *map(str, paths), "--model", str(model),
                           "-k", "4", "--format", "json", "--quiet"], capture_output=True, text=True, check=True)  # fmt: skip
    probs = np.zeros((len(paths), 4))
    for row, entry in enumerate(json.loads(done.stdout)["predictions"]):
        for prediction in entry["top_k"]:
            probs[row, prediction["index"]] = prediction["probability"]
    return probs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real `fmtl serve` of the rgb test model, five PNG files, and the answers `fmtl infer` gives for them."""
    folder = tmp_path_factory.mktemp("kserve")
    model = rgb_model(folder)
    paths = png_files(folder, 5)
    expected = infer_probabilities(paths, model)
    server = Server(model, "--max-body-mb", "1")
    yield server, model, paths, expected
    stderr = server.stop()
    assert server.process.returncode == 0 and "Traceback" not in stderr, stderr


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_gets_fmtl_infers_answers(served, binary):
    """tritonclient with its defaults (binary tensors both ways) and in pure JSON: the answers of `fmtl infer`."""
    server, model, paths, expected = served
    batch = decoded_batch(paths)
    client = tritonclient_http.InferenceServerClient(server.url)
    try:
        assert client.is_server_live() and client.is_model_ready(model.stem)
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        assert client.get_model_metadata(model.stem)["inputs"][0]["shape"] == [-1, *INPUT_SHAPE]
        images = tritonclient_http.InferInput("images", list(batch.shape), "UINT8")
        if binary:
            images.set_data_from_numpy(batch)  # the default: binary_data=True; no outputs asked: binary answers
            result = client.infer(model.stem, [images], request_id="req-7")
        else:
            images.set_data_from_numpy(batch, binary_data=False)
            wanted = [tritonclient_http.InferRequestedOutput("probs", binary_data=False)]
            result = client.infer(model.stem, [images], outputs=wanted, request_id="req-7")
        response = result.get_response()
        assert response["id"] == "req-7" and response["outputs"][0]["shape"] == [5, 4]
        assert ("parameters" in response["outputs"][0]) == binary  # binary_data_size only on a binary answer
        probs = result.as_numpy("probs")
        assert probs.dtype == np.float32 and probs.shape == (5, 4)
        np.testing.assert_allclose(probs, expected, atol=2e-6)  # `fmtl infer` rounds to 6 decimals
        np.testing.assert_allclose(probs, Classifier(model).predict_proba(batch), atol=1e-6)
        apart = np.abs(probs[:, None] - probs[None]).max(axis=2) + np.eye(len(probs))
        assert apart.min() > 1e-3  # every two images get different answers, so a mix-up would show
        gzipped = client.infer(model.stem, [images], request_compression_algorithm="gzip")
        np.testing.assert_array_equal(gzipped.as_numpy("probs"), probs)
    finally:
        client.close()


@pytest.mark.slow
def test_tritonclient_sees_a_clear_error(served):
    server, model, _, _ = served
    client = tritonclient_http.InferenceServerClient(server.url)
    try:
        wrong = tritonclient_http.InferInput("images", [1, 3, 30, 20], "UINT8")  # height and width swapped
        wrong.set_data_from_numpy(np.zeros((1, 3, 30, 20), np.uint8))
        with pytest.raises(InferenceServerException, match=r"input shape must be \[N, 3, 20, 30\]") as caught:
            client.infer(model.stem, [wrong])
        assert caught.value.status() == "400"
    finally:
        client.close()


def _deep(depth: int) -> bytes:
    return b'{"inputs":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.slow
def test_hostile_v2_bodies_get_a_4xx_with_one_line(served):
    """Deep nesting, binary data without its header, huge numbers, a compression bomb: each a JSON 4xx, never a 500."""
    server, model, paths, _ = served
    batch = decoded_batch(paths[:1])
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                                     "parameters": {"binary_data_size": batch.size}}]}).encode()  # fmt: skip
    json_tensor = {"name": "images", "datatype": "UINT8", "shape": list(batch.shape), "data": batch.ravel().tolist()}
    lone_surrogate_id = json.dumps({"id": "\ud800", "inputs": [json_tensor]}).encode()  # fine for JSON, not for UTF-8
    cases = [  # (body, headers, status, words in the error)
        (_deep(100_000), {}, 400, "nested too deeply"),
        (header + batch.tobytes(), {}, 400, HEADER_LENGTH),  # what tritonclient sends, without the header
        (header + batch.tobytes(), {HEADER_LENGTH: b"\xb2"}, 400, "positive whole number"),  # a superscript 2 (latin-1)
        (header + batch.tobytes(), {HEADER_LENGTH: str(len(header) + 3)}, 400, "bad JSON"),
        (header + batch.tobytes(), {HEADER_LENGTH: "9" * 5000}, 400, "positive whole number"),
        (header + batch.tobytes()[:-1], {HEADER_LENGTH: str(len(header))}, 400, "binary_data_size says"),
        (b'{"inputs": [' + b"7" * 5000 + b"]}", {}, 400, "digits"),
        (b'{"inputs": [{"datatype": "UINT8", "shape": [1e400, 3, 20, 30], "data": []}]}', {}, 400, "input shape"),
        (gzip.compress(b" " * 5_000_000), {"Content-Encoding": "gzip"}, 413, "expands past"),
        (b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        (lone_surrogate_id, {}, 400, "Unicode"),
    ]
    with httpx.Client(base_url=f"http://{server.url}", timeout=30) as client:
        for body, headers, status, words in cases:
            answer = client.post(f"/v2/models/{model.stem}/infer", content=body, headers=headers)
            assert answer.status_code == status, (body[:80], answer.text)
            error = answer.json()["error"]
            assert words in error and "\n" not in error, error
        assert client.get("/v2/health/live").status_code == 200


# --- the parser, fuzzed --------------------------------------------------------------------------


def _outcome(body: bytes, header_length: str | None = None, encoding: str | None = None) -> V2Request | None:
    """parse_request's result, or None for a V2RequestError; anything else raised fails the test."""
    try:
        parsed = parse_request(body, INPUT_SHAPE, header_length, encoding, max_bytes=1_000_000, max_images=3)
    except V2RequestError as error:
        assert str(error) and "\n" not in str(error) and error.status in (400, 413, 415)
        return None
    assert parsed.images.dtype == np.uint8 and parsed.images.shape[1:] == INPUT_SHAPE and len(parsed.images) >= 1
    return parsed


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
# documents shaped like infer requests, with every field free to be anything
tensor_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["images", "probs", ""]) | json_values,
        "datatype": st.sampled_from(["UINT8", "FP32", "BYTES"]) | json_values,
        "shape": st.lists(st.sampled_from([0, 1, 2, 3, 20, 30, -1, 2**64, True]), max_size=5) | json_values,
        "data": st.lists(st.integers(-2, 300), max_size=40) | json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": json_values | st.integers(-1, 4000)})
        | json_values,
    },
)
requests = st.fixed_dictionaries(
    {"inputs": st.lists(tensor_fields, max_size=2) | json_values},
    optional={
        "id": json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": json_values}) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["probs", "x"]) | json_values}, optional={"parameters": json_values}
            ),
            max_size=2,
        )
        | json_values,
    },
)


@FUZZ
@given(document=json_values | requests)
def test_any_json_document_parses_or_is_a_v2_request_error(document):
    _outcome(json.dumps(document).encode())


@FUZZ
@given(depth=st.integers(1, 200_000), opener=st.sampled_from([b"[", b'{"a":', b'{"inputs":[']))
def test_deep_nesting_is_a_v2_request_error(depth, opener):
    assert _outcome(opener * depth) is None  # unterminated, or nested past the parser's limit: never RecursionError


@FUZZ
@given(
    document=requests,
    binary=st.binary(max_size=2000),
    header_length=st.none() | st.integers(-5, 3000).map(str) | st.text(max_size=6) | st.just("9" * 5000),
    encoding=st.none() | st.sampled_from(["gzip", "deflate", "identity", "br", ""]),
)
def test_any_binary_body_and_header_parses_or_is_a_v2_request_error(document, binary, header_length, encoding):
    _outcome(json.dumps(document).encode() + binary, header_length, encoding)


@FUZZ
@given(body=st.binary(max_size=3000), header_length=st.none() | st.integers(0, 3000).map(str))
def test_random_bytes_parse_or_are_a_v2_request_error(body, header_length):
    _outcome(body, header_length)


@FUZZ
@given(
    images=st.integers(1, 3).flatmap(lambda n: st.binary(min_size=n * 1800, max_size=n * 1800)),
    binary_in=st.booleans(),
    binary_out=st.sampled_from([None, False, True]),
    compressed=st.booleans(),
    request_id=st.text(max_size=8),
)
def test_well_formed_requests_round_trip(images, binary_in, binary_out, compressed, request_id):
    """A batch sent either way parses back exactly; the answer reads back through tritonclient's own parser."""
    batch = np.frombuffer(images, np.uint8).reshape(-1, *INPUT_SHAPE)
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(batch.shape)}
    document = {"id": request_id, "inputs": [tensor]}
    if binary_out is not None:
        document["outputs"] = [{"name": "probs", "parameters": {"binary_data": binary_out}}]
    if binary_in:
        tensor["parameters"] = {"binary_data_size": batch.size}
        header = json.dumps(document).encode()
        body, header_length = header + batch.tobytes(), str(len(header))
    else:
        tensor["data"] = batch.tolist()
        body, header_length = json.dumps(document).encode(), None
    parsed = _outcome(gzip.compress(body) if compressed else body, header_length, "gzip" if compressed else None)
    np.testing.assert_array_equal(parsed.images, batch)
    assert parsed.id == request_id and parsed.binary_output == bool(binary_out)

    probs = np.random.default_rng(len(batch)).dirichlet(np.ones(4), len(batch)).astype(np.float32)
    content, headers = encode_response(probs, "rgb", parsed)
    assert headers["Content-Type"] == ("application/octet-stream" if binary_out else "application/json")
    result = tritonclient_http.InferResult.from_response_body(content, header_length=headers.get(HEADER_LENGTH))
    np.testing.assert_array_equal(result.as_numpy("probs"), probs)
    assert json.loads(content[: int(headers.get(HEADER_LENGTH, len(content)))])["id"] == request_id


def test_binary_without_the_header_says_what_is_missing():
    """tritonclient's default request sent without Inference-Header-Content-Length: the error names the header."""
    batch = np.full((1, *INPUT_SHAPE), 0x87, np.uint8)  # not UTF-8
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                                     "parameters": {"binary_data_size": batch.size}}]}).encode()  # fmt: skip
    for pixels in (batch, batch // 2):  # binary bytes that are not UTF-8, and bytes that are (ASCII)
        with pytest.raises(V2RequestError, match=f"binary tensor data needs the {HEADER_LENGTH} header"):
            parse_request(header + pixels.tobytes(), INPUT_SHAPE)
    with pytest.raises(V2RequestError, match=f"no {HEADER_LENGTH} header"):
        parse_request(header, INPUT_SHAPE)


def test_json_longer_than_max_images_could_need_is_refused_unparsed():
    """Parsing JSON holds the GIL, so JSON too long for --max-images images is a 413 before it is parsed."""
    batch = np.full((8, *INPUT_SHAPE), 255, np.uint8)
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(batch.shape), "data": batch.tolist()}
    pretty = json.dumps({"inputs": [tensor]}, indent=4).encode()  # each number on a line of its own
    assert len(pretty) > 2 * (batch.size * 8 + 65_536)  # twice the limit, but mostly whitespace
    assert parse_request(pretty, INPUT_SHAPE, max_images=8).images.shape == batch.shape
    long = json.dumps({"inputs": [tensor], "parameters": {"note": "x" * 200_000}}).encode()  # dense, and too long
    with pytest.raises(V2RequestError, match=r"more than 8 images of \[3, 20, 30\] need .* binary data") as caught:
        parse_request(long, INPUT_SHAPE, max_images=8)
    assert caught.value.status == 413


def test_an_id_no_client_could_read_back_is_refused():
    """JSON's escapes can carry a lone surrogate; echoed back, tritonclient's parser would fail on the answer."""
    tensor = {"name": "images", "datatype": "UINT8", "shape": [1, *INPUT_SHAPE], "data": [0] * 1800}
    with pytest.raises(V2RequestError, match="id must be Unicode text"):
        parse_request(json.dumps({"id": "a\ud800", "inputs": [tensor]}).encode(), INPUT_SHAPE)


def test_png_bytes_are_not_a_tensor():
    """A PNG posted to the v2 endpoint (a /v1/classify body sent to the wrong place) is a clear 400."""
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buffer, format="PNG")
    with pytest.raises(V2RequestError, match="bad JSON"):
        parse_request(buffer.getvalue(), INPUT_SHAPE)
