"""`fmtl serve`: an exported model behind HTTP, torch-free (onnxruntime, Starlette, uvicorn).

    fmtl serve export/NAME.onnx --port 8000
    curl --data-binary @shoe.png -H 'Content-Type: image/png' localhost:8000/v1/classify

Endpoints: ``POST|PUT /v1/classify?k=5`` (one raw image, or several as multipart/form-data),
the Open Inference Protocol (KServe v2) basics under ``/v2``, ``GET /metrics`` (Prometheus)
and ``GET /`` (a page to try an image). Decoding runs in a thread pool with fmtl's own
rules (fmtl.runtime.images), inference in dynamic batches on one worker thread
(fmtl.runtime.serve_batching). Every queue and body is bounded; what does not fit gets a
clear status code (413, 503 + Retry-After) instead of growing memory or latency. Requests
still arriving hold a connection, not queue room: each has --request-timeout to arrive
(fmtl.runtime.serve_http), and connections are capped by --limit-concurrency. Host headers
other than --allowed-hosts get 400. The request handling that does not depend on the HTTP
engine (parameters, multipart, the answer) is in fmtl.runtime.serve_requests.

Lifecycle: the server listens at once (liveness 200), loads the model and runs a warm-up
batch in the background, and only then reports ready. A model that fails to load ends the
process with one error line. On SIGTERM or Ctrl-C it drains: readiness and new requests
get 503, every accepted request is answered (within --drain-timeout), then it exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import html
import ipaddress
import json
import math
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from fmtl import __version__
from fmtl.errors import FmtlError
from fmtl.runtime import kserve_v2
from fmtl.runtime.classifier import Classifier, ModelError
from fmtl.runtime.images import DecodeError, decode_bytes
from fmtl.runtime.serve_batching import Batcher, BatchStats, QueueFull, QueueTimeout
from fmtl.runtime.serve_http import DeadlineH11Protocol, close_connections, close_listeners, open_connections
from fmtl.runtime.serve_metrics import Metrics, MetricsMiddleware
from fmtl.runtime.serve_requests import (
    MULTIPART,
    ApiError,
    classify_answer,
    default_max_pixels,
    image_payloads,
    media_type,
    no_readable_image,
    parse_k,
    parse_min_probability,
)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
DISCARD_BYTES = 65536  # an unread body up to this size is dropped so that a refusal keeps its connection  # the Host names a loopback-only server answers by default


class ServeError(FmtlError):
    """The server cannot start or stopped badly (bad model, bad option): one line, non-zero exit."""


@dataclass
class ServeConfig:
    """Everything `fmtl serve` takes; the defaults are the command's."""

    model: Path  # the fmtl .onnx file
    host: str = "127.0.0.1"  # loopback only unless asked: a model server is not public by default
    port: int = 8000  # 0: any free port (the chosen one is printed)
    max_batch_size: int = 16  # most images per onnxruntime call (benchmarks/serve.py sweep)
    batch_wait_ms: float = 0.0  # wait this long for a fuller batch; 0 adds no latency at low load
    max_queue: int = 128  # images waiting at most (bounds the wait: about max_queue / images per second)
    queue_timeout_ms: float = 5000.0  # a request queued longer gets 503
    max_body_mb: float = 16.0  # request bodies above this get 413 (counted while reading)
    max_images: int = 64  # images in one request at most (413 above)
    drain_timeout: float = 30.0  # seconds to answer accepted requests after SIGTERM
    threads: int | None = None  # onnxruntime intra-op threads [the CPUs this process may use]
    max_pixels: int | None = None  # images with more pixels are refused before decoding [sized to the model]
    request_timeout: float = 10.0  # a whole request (headers and body) must arrive within this many seconds
    limit_concurrency: int = 512  # open connections at most; more get 503 at once (uvicorn's setting)
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this many seconds
    allowed_hosts: tuple[str, ...] | None = None  # Host headers answered ("*": any) [loopback names, or any]

    def check(self) -> None:
        """Raise ServeError for option combinations that cannot work."""
        if self.max_images > self.max_queue:
            raise ServeError(f"--max-images ({self.max_images}) must not exceed --max-queue ({self.max_queue})")
        for name in ("max_batch_size", "max_queue", "max_images"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_body_mb <= 0 or self.queue_timeout_ms <= 0:
            raise ServeError("--max-body-mb and --queue-timeout-ms must be positive")
        if self.request_timeout <= 0 or self.keep_alive_timeout <= 0 or self.limit_concurrency < 1:
            raise ServeError("--request-timeout, --keep-alive-timeout and --limit-concurrency must be positive")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ServeError("--max-pixels must be at least 1")

    def trusted_hosts(self) -> tuple[list[str], str | None]:
        """The Host names to answer, and a warning line when that is any name at all.

        Given names are used as given. Otherwise a server bound to loopback answers only the loopback
        names (a web page on another origin cannot reach it through DNS rebinding); one bound to every
        interface cannot know its public names, so it answers any, with a warning."""
        if self.allowed_hosts:
            return list(self.allowed_hosts), None
        if self.host in ("", "0.0.0.0", "::"):
            return ["*"], (f"warning: bound to {self.host or 'every interface'} and answering any Host header: "
                           "pass --allowed-hosts NAME,... to refuse DNS rebinding")  # fmt: skip
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name
            loopback = self.host == "localhost"
        return [*LOOPBACK_NAMES] if loopback else [self.host, *LOOPBACK_NAMES], None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as taskset/cgroups set it), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class Admission:
    """One request's claim on the queue, from when its body has been read (``hold``) until its images
    are queued (``release``). A request still being read claims nothing: a client that stalls its
    upload holds a connection (bounded by --limit-concurrency and --request-timeout), never the queue."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.arrived = time.perf_counter()  # the queue timeout counts from here (reset by hold)
        self.images = 0  # images claimed while being decoded

    def hold(self, images: int) -> None:
        """The body is read: claim room for its images while they are decoded."""
        self.release()
        self.arrived = time.perf_counter()
        self.images = images
        self.server.pending += images

    def release(self) -> None:
        self.server.pending -= self.images
        self.images = 0


class ModelServer:
    """The model, its batcher and the server's state (loading, ready, draining); one per app."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.name = config.model.stem  # the model's name in URLs (/v2/models/NAME)
        self.metrics = Metrics(config.max_batch_size)
        self.classifier: Classifier | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.warmup_seconds = 0.0
        self._served = (0, 0.0)  # images and model seconds so far, for Retry-After
        self.pending = 0  # images read and being decoded, not yet queued
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(usable_cpus(), thread_name_prefix="fmtl-decode")

    async def load(self) -> None:
        """Load the model and run a warm-up batch off the event loop, start batching, then turn ready.

        A failure is kept in ``load_error`` (the process then exits with it), never raised."""
        loop = asyncio.get_running_loop()
        try:
            self.classifier = await loop.run_in_executor(None, self._open_and_warm_up)
        except ModelError as error:
            self.load_error = str(error)
            return
        except Exception as error:  # onnxruntime can fail the warm-up run itself (e.g. out of memory)
            self.load_error = f"cannot run the model {self.config.model}: {type(error).__name__}: {error}"
            return
        config = self.config
        self.batcher = Batcher(self.classifier.predict_proba, config.max_batch_size, config.batch_wait_ms / 1000,
                               config.max_queue, config.queue_timeout_ms / 1000, self._on_batch)  # fmt: skip
        self.batcher.start()
        self.ready = not self.draining
        self.metrics.ready.set(int(self.ready))

    def _open_and_warm_up(self) -> Classifier:
        classifier = Classifier(self.config.model, threads=self.config.threads or usable_cpus())
        started = time.perf_counter()
        # the largest batch first (allocates its buffers), then one image (the low-load path)
        for size in (self.config.max_batch_size, 1):
            classifier.predict_proba(np.zeros((size, *classifier.input_shape), dtype=np.uint8), size)
        self.warmup_seconds = time.perf_counter() - started
        self.metrics.warmup_seconds.set(self.warmup_seconds)
        return classifier

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.observe_batch(stats)
        self._served = (self._served[0] + stats.size, self._served[1] + stats.compute)

    def start_draining(self) -> None:
        """From now on readiness and new requests get 503; accepted requests are still answered."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.flush()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def check_accepting(self) -> None:
        """Raise 503 unless a new inference request can be taken now."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", "draining")  # the middleware adds Connection: close
        if not self.ready:
            raise ApiError(503, "the model is not loaded yet", "not_ready", {"Retry-After": "1"})

    def admit(self) -> Admission:
        """A claim for one new request, or 503 before its body is read or decoded when the queue,
        counting the images being decoded, is already full: refused this way a request costs
        least, and no backlog of decoding work builds up in front of the queue."""
        waiting = self.batcher.queued_images + self.pending
        if waiting >= self.config.max_queue:
            raise ApiError(503, f"overloaded: queue full ({waiting} images waiting)", "queue_full",
                           {"Retry-After": self._retry_after()})  # fmt: skip
        return Admission(self)

    @property
    def max_pixels(self) -> int:
        """--max-pixels, or the default sized to the model's input."""
        if self.config.max_pixels is not None:
            return self.config.max_pixels
        return default_max_pixels(math.prod(self.classifier.spec.source_size))

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise ApiError(404, f"unknown model {name!r}: this server has {self.name!r}", "unknown_model")

    async def infer(self, images: np.ndarray, admission: Admission) -> np.ndarray:
        """Probabilities [N, classes] for a uint8 batch, through the queue and the batcher."""
        admission.release()  # from here on the batcher's queue counts these images
        if len(images) > self.config.max_images:
            raise ApiError(413, f"{len(images)} images in one request (limit {self.config.max_images})",
                           "too_many_images")  # fmt: skip
        try:
            return await self.batcher.submit(images, admission.arrived)
        except QueueFull as error:
            raise ApiError(503, f"overloaded: {error}", "queue_full", {"Retry-After": self._retry_after()}) from None
        except QueueTimeout as error:
            raise ApiError(503, f"overloaded: {error}", "queue_timeout", {"Retry-After": "1"}) from None
        finally:
            self.metrics.queue_depth.set(self.batcher.queued_images)

    def _retry_after(self) -> str:
        """Seconds until the queue has likely drained: queued images over the recent batch throughput."""
        images, seconds = self._served
        per_second = images / seconds if seconds > 0 else 100.0
        return str(max(1, math.ceil(self.batcher.queued_images / per_second)))

    async def decode(self, payloads: list[bytes]) -> list[np.ndarray | DecodeError]:
        """Decode uploads in the thread pool (never on the event loop); a DecodeError in place of a failure."""
        loop = asyncio.get_running_loop()
        spec, max_pixels = self.classifier.spec, self.max_pixels
        futures = [
            loop.run_in_executor(
                self.decode_pool, _decode_or_error, data, spec.channels, spec.source_size, spec.background, max_pixels
            )  # fmt: skip
            for data in payloads
        ]
        return list(await asyncio.gather(*futures))

    async def off_loop(self, function: Callable, *args):
        """``function(*args)`` in the decoding pool: CPU work (parsing) never runs on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, function, *args)


def _decode_or_error(
    data: bytes, channels: int, size: tuple[int, int], background: int, max_pixels: int
) -> np.ndarray | DecodeError:
    try:
        return decode_bytes(data, channels, size, background, max_pixels=max_pixels)
    except DecodeError as error:
        return error


# --- request bodies --------------------------------------------------------------------------------


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body: 413 as soon as it passes the limit (whatever Content-Length claims), 408 when it
    has not all arrived within --request-timeout (a stalled upload cannot hold its connection for ever)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"request body over the limit of {limit_bytes / 1e6:g} MB", "body_too_large")
    if declared.isdigit() and (len(declared) > 15 or int(declared) > limit_bytes):
        raise too_big
    timeout = _server(request).config.request_timeout
    try:
        body = await asyncio.wait_for(_read_stream(request, limit_bytes, too_big), timeout)
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--request-timeout)",
                       "request_timeout") from None  # fmt: skip
    request.state.body_read = True
    return body


async def _read_stream(request: Request, limit_bytes: int, too_big: ApiError) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _discard_small_body(request: Request) -> bool:
    """Read and drop a small unread body (True when done), so an error answer can keep the connection:
    cheaper for both sides than a new connection per refused request. A large or slow one is not read."""
    declared = request.headers.get("content-length", "")
    if not (declared.isdigit() and len(declared) <= 6 and int(declared) <= DISCARD_BYTES):
        return False
    try:
        await asyncio.wait_for(_read_stream(request, DISCARD_BYTES, ApiError(413, "", "")), 0.5)
    except (asyncio.TimeoutError, ApiError, ClientDisconnect, RuntimeError):  # RuntimeError: already consumed
        return False
    return True


def parse_v2(body: bytes, header_length: str | None, encoding: str | None, input_shape: tuple[int, int, int],
             config: ServeConfig) -> kserve_v2.V2Request:  # fmt: skip
    """An Open Inference Protocol infer request (fmtl.runtime.kserve_v2), its errors as 4xx; runs in the pool."""
    try:
        return kserve_v2.parse_request(body, input_shape, header_length, encoding, int(config.max_body_mb * 1e6),
                                       config.max_images)  # fmt: skip
    except kserve_v2.V2RequestError as error:
        reason = {413: "body_too_large", 415: "unsupported_media_type"}.get(error.status, "bad_request")
        raise ApiError(error.status, str(error), reason) from None


# --- endpoints -------------------------------------------------------------------------------------


def _server(request: Request) -> ModelServer:
    return request.app.state.model_server


async def classify(request: Request) -> Response:
    """POST|PUT /v1/classify?k=5&min_probability=P: top-k labels per image, in the order sent."""
    server = _server(request)
    server.check_accepting()
    k = parse_k(request.query_params.get("k"))
    min_probability = parse_min_probability(request.query_params.get("min_probability"))
    content_type = request.headers.get("content-type", "")
    multipart = media_type(content_type) == MULTIPART  # 415 before anything is read
    admission = server.admit()
    try:
        body = await read_body(request, int(server.config.max_body_mb * 1e6))
        admission.hold(1)
        if multipart:  # parsing 64 parts, or refusing 100,000, is CPU work: off the event loop
            payloads, names = await server.off_loop(image_payloads, body, content_type, server.config.max_images)
            admission.hold(len(payloads))
        else:
            payloads, names = [body], [None]
        decoded = await server.decode(payloads)
        error = no_readable_image(names, decoded)
        if error is not None:
            raise error
        probs = await server.infer(np.stack([item for item in decoded if isinstance(item, np.ndarray)]), admission)
    finally:
        admission.release()
    top_k = server.classifier.top_k
    return JSONResponse(classify_answer(server.name, names, decoded, top_k, probs, k, min_probability))


async def page(request: Request) -> Response:
    """GET /: drop an image, see its labels. The model's name is HTML-escaped, the script sets every
    text with textContent, and a Content-Security-Policy lets only the page's own script run."""
    template = resources.files("fmtl.runtime").joinpath("serve_page.html").read_text(encoding="utf-8")
    nonce = secrets.token_urlsafe(16)
    text = template.replace("{{NONCE}}", nonce).replace("{{MODEL}}", html.escape(_server(request).name))
    policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src blob:; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
    return HTMLResponse(text, headers={"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"})


async def live(request: Request) -> Response:
    """The process is up and answering; says nothing about the model."""
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    server = _server(request)
    return JSONResponse({"ready": server.ready}, status_code=200 if server.ready else 503)


async def model_ready(request: Request) -> Response:
    server = _server(request)
    server.check_name(request.path_params["name"])
    return JSONResponse({"name": server.name, "ready": server.ready}, status_code=200 if server.ready else 503)


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "fmtl", "version": __version__, "extensions": list(kserve_v2.EXTENSIONS)})


async def model_metadata(request: Request) -> Response:
    """GET /v2/models/NAME: inputs, outputs and class names."""
    server = _server(request)
    server.check_name(request.path_params["name"])
    if server.classifier is None:
        raise ApiError(503, "the model is not loaded yet", "not_ready", {"Retry-After": "1"})
    clf = server.classifier
    return JSONResponse({
        "name": server.name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, *clf.input_shape]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, clf.num_classes]}],
        "classes": clf.classes,
        "architecture": clf.architecture,
    })  # fmt: skip


async def model_infer(request: Request) -> Response:
    """POST /v2/models/NAME/infer: a UINT8 [N, C, H, W] tensor in, FP32 probabilities [N, classes] out,
    as JSON or as binary tensor data (the request says which; fmtl.runtime.kserve_v2)."""
    server = _server(request)
    server.check_name(request.path_params["name"])
    server.check_accepting()
    admission = server.admit()
    try:
        body = await read_body(request, int(server.config.max_body_mb * 1e6))
        # parsing JSON numbers takes a while: in the decoding pool, not on the event loop
        headers, loop = request.headers, asyncio.get_running_loop()
        parsed = await loop.run_in_executor(server.decode_pool, parse_v2, body, headers.get(kserve_v2.HEADER_LENGTH),
                                            headers.get("content-encoding"), server.classifier.input_shape,
                                            server.config)  # fmt: skip
        probs = await server.infer(parsed.images, admission)
    finally:
        admission.release()
    content, answer_headers = kserve_v2.encode_response(probs, server.name, parsed)
    return Response(content, headers=answer_headers)


async def metrics(request: Request) -> Response:
    server = _server(request)
    if server.batcher is not None:
        server.metrics.queue_depth.set(server.batcher.queued_images)
    return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def api_error(request: Request, error: Exception) -> Response:
    """ApiError, Starlette's HTTPException (404, 405) and a client gone mid-body: {"error": ...}.

    An answer given before the request's body was read (a refusal) closes the connection unless the
    body is small enough to drop at once: the next request on it could not be read otherwise."""
    if isinstance(error, ClientDisconnect):
        return Response(status_code=400)  # nobody is listening; the status only feeds the metrics
    if isinstance(error, ApiError):
        _server(request).metrics.rejected.labels(error.reason).inc()
        status, message, headers = error.status, error.message, dict(error.headers)
    else:
        status, message, headers = error.status_code, error.detail, dict(error.headers or {})
    unread = request.method in ("POST", "PUT", "PATCH") and not getattr(request.state, "body_read", False)
    if unread and not await _discard_small_body(request):
        headers["Connection"] = "close"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class QueueFullShedder:
    """Pure ASGI: while the queue is full, refuse new inference requests (503, the same JSON as
    ``ModelServer.admit``) from the scope alone, before Starlette builds a Request, routes it and
    runs its exception handling. Under overload most requests are refused, and every one of them
    costs event-loop time that the served ones need: this is the cheapest refusal there is.
    Anything it does not decide (another route, a Host not plainly allowed) goes to the app."""

    def __init__(self, app: Starlette, server: ModelServer, inference_routes: dict[str, Route], hosts: list[str]):
        self.app, self.server, self.routes = app, server, inference_routes
        self.hosts = None if "*" in hosts else {host.encode() for host in hosts}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = self._full_for(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # the metrics label, as Starlette's router would set it
        server = self.server
        server.metrics.rejected.labels("queue_full").inc()
        waiting = server.batcher.queued_images + server.pending
        body = json.dumps({"error": f"overloaded: queue full ({waiting} images waiting)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", server._retry_after().encode())]  # fmt: skip
        if not await _drop_small_body(scope, receive):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _full_for(self, scope: dict) -> Route | None:
        """The inference route this request is for, if the queue is full and the request is plain enough."""
        server = self.server
        if scope["type"] != "http" or not server.ready or server.batcher is None:
            return None
        if server.batcher.queued_images + server.pending < server.config.max_queue:
            return None
        path, method = scope["path"], scope["method"]
        if path == "/v1/classify" and method in ("POST", "PUT"):
            route = self.routes["classify"]
        elif method == "POST" and path.startswith("/v2/models/") and path.endswith("/infer"):
            route = self.routes["infer"]
        else:
            return None
        if self.hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").split(b":")[0]
            if host not in self.hosts:
                return None  # TrustedHostMiddleware answers it
        return route


async def _drop_small_body(scope: dict, receive: Callable) -> bool:
    """Read and drop a body of at most DISCARD_BYTES that says its length (True when done)."""
    declared = dict(scope["headers"]).get(b"content-length", b"")
    if not (declared.isdigit() and len(declared) <= 6 and int(declared) <= DISCARD_BYTES):
        return False
    try:
        async with asyncio.timeout(0.5) if hasattr(asyncio, "timeout") else contextlib.nullcontext():
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return False
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        return False


def create_app(config: ServeConfig, load: bool = True) -> MetricsMiddleware:
    """The ASGI app. With ``load`` its lifespan starts loading the model in the background;
    without, the caller awaits ``app.model_server.load()`` itself (as tests with httpx do)."""
    server = ModelServer(config)

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(server.load()) if load else None
        yield
        if task is not None:
            await task
        await server.close()

    routes = [
        Route("/", page),
        Route("/v1/classify", classify, methods=["POST", "PUT"]),
        Route("/v1/classify/{filename}", classify, methods=["PUT"]),  # `curl -T shoe.png URL/` appends the name
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/infer", model_infer, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    handlers = {ApiError: api_error, HTTPException: api_error, ClientDisconnect: api_error}
    hosts, _ = config.trusted_hosts()  # a Host header not in the list gets 400 (DNS rebinding)
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)]
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware,
                    lifespan=contextlib.asynccontextmanager(lifespan))  # fmt: skip
    app.state.model_server = server
    inference = {"classify": routes[1], "infer": routes[8]}
    shedder = QueueFullShedder(app, server, inference, hosts)
    wrapped = MetricsMiddleware(shedder, server.metrics, closing=lambda: server.draining)
    wrapped.model_server = server
    return wrapped


# --- the process -----------------------------------------------------------------------------------


DRAIN_GRACE_S = 1.0  # after SIGTERM, how long idle keep-alive connections may stay open at most


class _Server(uvicorn.Server):
    """uvicorn, with fmtl's lifecycle: print the address, exit on a failed load, drain on SIGTERM."""

    def __init__(self, config: uvicorn.Config, app: MetricsMiddleware, drain_timeout: float, echo: Callable):
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self.echo = echo
        self.draining_since: float | None = None
        self.failure: str | None = None
        self.said_ready = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listening_closed_at: float | None = None  # seconds into the drain

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            host, port = self.config.host, self.config.port
            with contextlib.suppress(AttributeError, IndexError, TypeError):  # uvicorn's listeners, if it says
                host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.echo(f"fmtl serve: {self.app.model_server.config.model} on http://{host}:{port} (loading)")

    def handle_exit(self, sig, frame) -> None:
        # unlike uvicorn's, this neither stops at once nor re-raises the signal afterwards (so the exit is 0)
        if self.draining_since is not None or self.loop is None:  # a second signal, or not started: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining_since = time.monotonic()
        # a signal handler runs between any two bytecodes: let the event loop itself switch the state
        self.loop.call_soon_threadsafe(self.app.model_server.start_draining)

    async def on_tick(self, counter: int) -> bool:
        server = self.app.model_server
        if server.load_error and not self.should_exit:
            self.failure = server.load_error
            self.should_exit = True
        if server.ready and not self.said_ready:
            self.said_ready = True
            self.echo(f"ready: warm-up took {server.warmup_seconds * 1000:.0f} ms")
        if self.draining_since is not None and not self.should_exit:
            self._drain_step(time.monotonic() - self.draining_since)
        return await super().on_tick(counter)

    def _drain_step(self, draining: float) -> None:
        """One tick of the drain. Every answer now says Connection: close, so clients leave by
        themselves; closing a connection a client is sending on would lose that request (the
        keep-alive race). So: once nothing is in flight and the clients have left (or
        DRAIN_GRACE_S has passed), stop listening first; requests already on accepted connections
        are still read and answered; then exit when those have left too (or after another grace)."""
        grace = min(DRAIN_GRACE_S, self.drain_timeout)
        idle = self.app.in_flight == 0
        if idle and self.listening_closed_at is None and (not open_connections(self) or draining >= grace):
            close_listeners(self)  # new connections are refused from here on
            self.listening_closed_at = draining
        elif idle and self.listening_closed_at is not None:
            if not open_connections(self) or draining - self.listening_closed_at >= grace:
                self.should_exit = True
        elif not idle and draining > self.drain_timeout:
            self.failure = f"drain timeout: {self.app.in_flight} requests were still in flight after {draining:.0f} s"
            # closing the sockets ends requests still reading a body (as a disconnect) without tracebacks
            close_connections(self)
            self.should_exit = True


def serve(config: ServeConfig, echo: Callable[[str], object] = print) -> int:
    """Run the server until SIGTERM/SIGINT has drained it; return the exit code.

    Raises:
        ServeError: bad options, a model that fails to load, or a drain that timed out.
    """
    config.check()
    app = create_app(config)
    _, warning = config.trusted_hosts()
    if warning:
        print(warning, file=sys.stderr)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=DeadlineH11Protocol.with_deadline(config.request_timeout),  # h11, with a deadline per request
        limit_concurrency=config.limit_concurrency,  # more open connections than this: 503 at once
        timeout_keep_alive=config.keep_alive_timeout,  # idle keep-alive connections closed after this
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers: 16 KiB at most (h11's default)
        backlog=min(2048, config.limit_concurrency * 2),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = _Server(uv_config, app, config.drain_timeout, lambda line: echo(line) or sys.stdout.flush())
    server.run()
    if server.failure:
        raise ServeError(server.failure)
    if not server.started:
        raise ServeError(f"could not listen on {config.host}:{config.port} (in use, or not allowed)")
    return 0
