"""`fmtl serve`: an exported model behind HTTP, torch-free (onnxruntime, Starlette, uvicorn).

    fmtl serve export/NAME.onnx --port 8000
    curl --data-binary @shoe.png -H 'Content-Type: image/png' localhost:8000/v1/classify

Endpoints: ``POST|PUT /v1/classify?k=5`` (one raw image, or several as multipart/form-data),
the Open Inference Protocol (KServe v2) basics under ``/v2``, ``GET /metrics`` (Prometheus)
and ``GET /`` (a page to try an image). Decoding runs in a thread pool with fmtl's own
rules (fmtl.runtime.images), inference in dynamic batches on one worker thread
(fmtl.runtime.serve_batching). Every queue and body is bounded; what does not fit gets a
clear status code (413, 503 + Retry-After) instead of growing memory or latency.

Lifecycle: the server listens at once (liveness 200), loads the model and runs a warm-up
batch in the background, and only then reports ready. A model that fails to load ends the
process with one error line. On SIGTERM or Ctrl-C it drains: readiness and new requests
get 503, every accepted request is answered (within --drain-timeout), then it exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from fmtl import __version__
from fmtl.errors import FmtlError
from fmtl.runtime import kserve_v2
from fmtl.runtime.classifier import Classifier, ModelError
from fmtl.runtime.images import DecodeError, decode_bytes
from fmtl.runtime.serve_batching import Batcher, BatchStats, QueueFull, QueueTimeout
from fmtl.runtime.serve_metrics import Metrics, MetricsMiddleware

RAW_TYPES = ("application/octet-stream", "")  # plus image/*; no Content-Type at all is what `curl -T` sends
MULTIPART = "multipart/form-data"


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

    def check(self) -> None:
        """Raise ServeError for option combinations that cannot work."""
        if self.max_images > self.max_queue:
            raise ServeError(f"--max-images ({self.max_images}) must not exceed --max-queue ({self.max_queue})")
        for name in ("max_batch_size", "max_queue", "max_images"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_body_mb <= 0 or self.queue_timeout_ms <= 0:
            raise ServeError("--max-body-mb and --queue-timeout-ms must be positive")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as taskset/cgroups set it), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class ApiError(Exception):
    """An answer other than 200: status, one-line message, extra headers; ``reason`` labels the metric."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers or {}


class Admission:
    """One request's place from its arrival until its images reach the queue."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.arrived = time.perf_counter()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.server.admitting -= 1


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
        self.admitting = 0  # requests admitted and being read or decoded, not yet queued
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
        """A place for one new request, or 503 before anything is read or decoded when the queue,
        counting the requests still being read and decoded, is full: under overload refusing
        costs least this way, and no backlog builds up in front of the queue either."""
        waiting = self.batcher.queued_images + self.admitting
        if waiting >= self.config.max_queue:
            raise ApiError(503, f"overloaded: queue full ({waiting} requests or images waiting)", "queue_full",
                           {"Retry-After": self._retry_after()})  # fmt: skip
        self.admitting += 1
        return Admission(self)

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
        spec = self.classifier.spec
        futures = [
            loop.run_in_executor(
                self.decode_pool, _decode_or_error, data, spec.channels, spec.source_size, spec.background
            )  # fmt: skip
            for data in payloads
        ]
        return list(await asyncio.gather(*futures))


def _decode_or_error(data: bytes, channels: int, size: tuple[int, int], background: int) -> np.ndarray | DecodeError:
    try:
        return decode_bytes(data, channels, size, background)
    except DecodeError as error:
        return error


# --- request bodies --------------------------------------------------------------------------------


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes the limit (whatever Content-Length claims)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"request body over the limit of {limit_bytes / 1e6:g} MB", "body_too_large")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_big
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def image_payloads(request: Request, config: ServeConfig) -> tuple[list[bytes], list[str | None]]:
    """The encoded images of a classify request and their names (multipart file names, else None)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (media_type.startswith("image/") or media_type in RAW_TYPES or media_type == MULTIPART):
        raise ApiError(415, f"unsupported content type {media_type!r}: send the image as image/* or "
                       "application/octet-stream, or several as multipart/form-data", "unsupported_media_type")  # fmt: skip
    body = await read_body(request, int(config.max_body_mb * 1e6))
    if media_type != MULTIPART:
        return [body], [None]
    files = await _multipart_files(request, body)
    if len(files) > config.max_images:
        raise ApiError(413, f"{len(files)} images in one request (limit {config.max_images})", "too_many_images")
    if not files:
        raise ApiError(400, "no file in the multipart body (send each image as a file part)", "bad_request")
    return [data for _, data in files], [name for name, _ in files]


async def _multipart_files(request: Request, body: bytes) -> list[tuple[str | None, bytes]]:
    """(file name, bytes) of every file part of an already-read multipart body, in order."""

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=math.inf, max_fields=1000).parse()
    except MultiPartException as error:
        raise ApiError(400, f"bad multipart body: {error.message}", "bad_request") from None
    try:
        return [(item.filename, await item.read()) for _, item in form.multi_items() if isinstance(item, UploadFile)]
    finally:
        await form.close()


def parse_v2(body: bytes, header_length: str | None, encoding: str | None,
             input_shape: tuple[int, int, int], limit_bytes: int) -> kserve_v2.V2Request:  # fmt: skip
    """An Open Inference Protocol infer request (fmtl.runtime.kserve_v2), its errors as 4xx; runs in the pool."""
    try:
        return kserve_v2.parse_request(body, input_shape, header_length, encoding, limit_bytes)
    except kserve_v2.V2RequestError as error:
        reason = {413: "body_too_large", 415: "unsupported_media_type"}.get(error.status, "bad_request")
        raise ApiError(error.status, str(error), reason) from None


# --- endpoints -------------------------------------------------------------------------------------


def _server(request: Request) -> ModelServer:
    return request.app.state.model_server


def _parse_k(request: Request) -> int:
    text = request.query_params.get("k", "5")
    if not text.isdigit() or int(text) < 1:
        raise ApiError(400, f"k must be a whole number of at least 1, got {text!r}", "bad_request")
    return int(text)


async def classify(request: Request) -> Response:
    """POST|PUT /v1/classify?k=5: top-k labels per image, in the order sent."""
    server = _server(request)
    server.check_accepting()
    k = _parse_k(request)
    admission = server.admit()
    try:
        payloads, names = await image_payloads(request, server.config)
        decoded = await server.decode(payloads)
        good = [i for i, item in enumerate(decoded) if not isinstance(item, DecodeError)]
        if not good and len(decoded) == 1:
            raise ApiError(400, f"not a readable image: {decoded[0]}", "bad_image")
        if not good:
            reasons = "; ".join(f"{name}: {item}" for name, item in zip(names, decoded, strict=True))
            raise ApiError(400, f"no readable image ({reasons})", "bad_image")
        probs = await server.infer(np.stack([decoded[i] for i in good]), admission)
    finally:
        admission.release()
    tops = dict(zip(good, server.classifier.top_k(probs, k), strict=True))
    predictions = []
    for i, (name, item) in enumerate(zip(names, decoded, strict=True)):
        entry = {"file": name} if name is not None else {}
        if i in tops:
            entry["top_k"] = [{"label": p.label, "index": p.index, "probability": round(p.probability, 6)}
                              for p in tops[i]]  # fmt: skip
        else:
            entry["error"] = str(item)
        predictions.append(entry)
    return JSONResponse({"model": server.name, "predictions": predictions})


async def page(request: Request) -> Response:
    """GET /: drop an image, see its labels."""
    html = resources.files("fmtl.runtime").joinpath("serve_page.html").read_text(encoding="utf-8")
    return HTMLResponse(html.replace("{{MODEL}}", _server(request).name))


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
        limit = int(server.config.max_body_mb * 1e6)
        body = await read_body(request, limit)
        # parsing megabytes of JSON numbers takes a while: in the decoding pool, not on the event loop
        headers, loop = request.headers, asyncio.get_running_loop()
        parsed = await loop.run_in_executor(server.decode_pool, parse_v2, body, headers.get(kserve_v2.HEADER_LENGTH),
                                            headers.get("content-encoding"), server.classifier.input_shape, limit)  # fmt: skip
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
    """ApiError, Starlette's HTTPException (404, 405) and a client gone mid-body: {"error": ...}."""
    if isinstance(error, ApiError):
        _server(request).metrics.rejected.labels(error.reason).inc()
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)
    if isinstance(error, ClientDisconnect):
        return Response(status_code=400)  # nobody is listening; the status only feeds the metrics
    return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)


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
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=contextlib.asynccontextmanager(lifespan))
    app.state.model_server = server
    wrapped = MetricsMiddleware(app, server.metrics, closing=lambda: server.draining)
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
        if idle and self.listening_closed_at is None and (not self.server_state.connections or draining >= grace):
            for listener in self.servers:
                listener.close()  # new connections are refused from here on
            self.listening_closed_at = draining
        elif idle and self.listening_closed_at is not None:
            if not self.server_state.connections or draining - self.listening_closed_at >= grace:
                self.should_exit = True
        elif not idle and draining > self.drain_timeout:
            self.failure = f"drain timeout: {self.app.in_flight} requests were still in flight after {draining:.0f} s"
            # closing the sockets ends requests still reading a body (as a disconnect) without tracebacks
            for connection in list(self.server_state.connections):
                connection.transport.close()
            self.should_exit = True


def serve(config: ServeConfig, echo: Callable[[str], object] = print) -> int:
    """Run the server until SIGTERM/SIGINT has drained it; return the exit code.

    Raises:
        ServeError: bad options, a model that fails to load, or a drain that timed out.
    """
    config.check()
    app = create_app(config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                               lifespan="on", timeout_graceful_shutdown=5)  # fmt: skip
    server = _Server(uv_config, app, config.drain_timeout, lambda line: echo(line) or sys.stdout.flush())
    server.run()
    if server.failure:
        raise ServeError(server.failure)
    if not server.started:
        raise ServeError(f"could not listen on {config.host}:{config.port} (in use, or not allowed)")
    return 0
