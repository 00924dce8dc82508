"""The Starlette app of `fmtl serve`: its routes (/v1/classify, the Open Inference Protocol under /v2,
/metrics, the page at /), request bodies read within their limits, errors as {"error": ...} JSON, and
the cheapest refusal of all (QueueFullShedder) in front of it. The model behind it is a ModelServer
(fmtl.runtime.serve.model_server); running it as a process is fmtl.runtime.serve.process.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import secrets
from collections.abc import AsyncIterator, Callable
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from fmtl import __version__
from fmtl.runtime.results import keep_decoded, make_rows
from fmtl.runtime.serve import kserve_v2
from fmtl.runtime.serve.api import (
    DISCARD_BYTES,
    MULTIPART,
    ApiError,
    image_payloads,
    media_type,
    no_readable_image,
    parse_k,
    parse_min_probability,
    small_enough_to_drop,
)
from fmtl.runtime.serve.config import ServeConfig
from fmtl.runtime.serve.metrics import MetricsMiddleware
from fmtl.runtime.serve.model_server import ModelServer

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
        body = await within(timeout, _read_stream(request, limit_bytes, too_big))
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--request-timeout)",
                       "request_timeout") from None  # fmt: skip
    request.state.body_read = True
    return body


async def within(seconds: float, awaitable):
    """``await awaitable``, or asyncio.TimeoutError after ``seconds``: with asyncio.timeout where there is
    one (Python 3.11+), which unlike wait_for starts no task of its own for every request."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


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
    if not small_enough_to_drop(declared):
        return False
    try:
        await within(0.5, _read_stream(request, DISCARD_BYTES, ApiError(413, "", "")))
    except (asyncio.TimeoutError, ApiError, ClientDisconnect, RuntimeError):  # RuntimeError: already consumed
        return False
    return True


def parse_v2(body: bytes, header_length: str | None, encoding: str | None, input_shape: tuple[int, int, int],
             config: ServeConfig) -> kserve_v2.V2Request:  # fmt: skip
    """An Open Inference Protocol infer request (fmtl.runtime.serve.kserve_v2), its errors as 4xx; runs in the pool."""
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
        good, batch = keep_decoded(decoded)
        probs = await server.infer(batch, admission)
    finally:
        admission.release()
    rows = make_rows(server.classifier, names, decoded, good, probs, k, min_probability)
    return JSONResponse({"model": server.name, "predictions": [row.to_dict() for row in rows]})


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
    as JSON or as binary tensor data (the request says which; fmtl.runtime.serve.kserve_v2)."""
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
    costs event-loop time that the served ones need: this is the cheapest refusal there is in ASGI.
    ``early_response`` is the same refusal as raw bytes, for a connection layer that can answer
    before any ASGI task exists (fmtl.runtime.serve.protocol). Anything it does not decide (another
    route, a Host not plainly allowed) goes to the app."""

    def __init__(self, app: Starlette, server: ModelServer, inference_routes: dict[str, Route], hosts: list[str]):
        self.app, self.server, self.routes = app, server, inference_routes
        self.hosts = None if "*" in hosts else {host.encode() for host in hosts}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = self._full_for(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # the metrics label, as Starlette's router would set it
        body, headers = self._refusal()
        if not await _drop_small_body(scope, receive):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def early_response(self, scope: dict) -> bytes | None:
        """The whole HTTP/1.1 503 for this request if the queue is full (counted in the metrics as the
        app counts it), else None. The caller discards the body, or closes the connection after it."""
        route = self._full_for(scope)
        if route is None:
            return None
        self.server.metrics.requests.labels(route.path, "503").inc()
        body, headers = self._refusal()
        head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        return b"HTTP/1.1 503 Service Unavailable\r\n" + head + b"\r\n" + body

    def _refusal(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The 503's JSON body and headers, counted as a queue_full refusal."""
        server = self.server
        server.metrics.rejected.labels("queue_full").inc()
        waiting = server.batcher.queued_images + server.pending
        body = json.dumps({"error": f"overloaded: queue full ({waiting} images waiting)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", server._retry_after().encode())]  # fmt: skip
        return body, headers

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
            host = dict(scope["headers"]).get(b"host", b"")
            name = host[: host.find(b"]") + 1] if host.startswith(b"[") else host.split(b":")[0]  # [::1]:8000
            if name not in self.hosts:
                return None  # TrustedHostMiddleware answers it
        return route


async def _drop_small_body(scope: dict, receive: Callable) -> bool:
    """Read and drop a body of at most DISCARD_BYTES that says its length (True when done)."""
    if not small_enough_to_drop(dict(scope["headers"]).get(b"content-length", b"")):
        return False
    try:
        return await within(0.5, _body_ends(receive))
    except asyncio.TimeoutError:
        return False


async def _body_ends(receive: Callable) -> bool:
    """Receive the rest of the body; True if it ended (False: the client left)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


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
    wrapped.model_server, wrapped.shedder = server, shedder
    return wrapped
