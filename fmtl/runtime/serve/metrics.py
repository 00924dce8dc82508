"""Prometheus metrics for `fmtl serve` (prefix ``fmtl_``), and the ASGI middleware that counts requests.

Each app gets its own registry, so several servers (or tests) in one process never share counts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from fmtl.runtime.serve.batching import BatchStats

# Seconds: from well under a millisecond (a tiny model at low load) to the longest sane queue timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    """Every fmtl_ metric of one server, in its own registry."""

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fmtl_requests", "HTTP requests answered, by route and status code.",
                                ["route", "code"], registry=r)  # fmt: skip
        self.rejected = Counter("fmtl_rejected_requests", "Requests refused, by reason.", ["reason"], registry=r)
        self.images = Counter("fmtl_images", "Images classified.", registry=r)
        self.batches = Counter("fmtl_batches", "Batches run by the inference worker.", registry=r)
        self.batch_size = Histogram("fmtl_batch_size", "Images per batch.", buckets=_size_buckets(max_batch_size),
                                    registry=r)  # fmt: skip
        self.request_seconds = Histogram("fmtl_request_duration_seconds", "Time from request to response, by route.",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_seconds = Histogram("fmtl_queue_wait_seconds", "Time a request waited for its batch to start.",
                                       buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.inference_seconds = Histogram("fmtl_inference_duration_seconds", "Model time per batch.",
                                           buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("fmtl_queue_depth", "Images waiting in the queue.", registry=r)
        self.in_flight = Gauge("fmtl_in_flight_requests", "Requests being handled now.", registry=r)
        self.connections = Gauge("fmtl_open_connections", "HTTP connections open now.", registry=r)
        self.idle_closed = Counter("fmtl_idle_connections_closed", "Idle connections closed to make room for new "
                                   "ones at --limit-concurrency.", registry=r)  # fmt: skip
        self.ready = Gauge("fmtl_ready", "1 when the model is loaded and warmed up and the server is not draining.",
                           registry=r)  # fmt: skip
        self.warmup_seconds = Gauge("fmtl_warmup_seconds", "Time the warm-up batch took (0 until it ran).", registry=r)
        ProcessCollector(namespace="fmtl", registry=r)  # fmtl_process_resident_memory_bytes, CPU seconds, ...

    def observe_batch(self, stats: BatchStats) -> None:
        """Record one batch of the inference worker."""
        self.batches.inc()
        self.images.inc(stats.size)
        self.batch_size.observe(stats.size)
        self.inference_seconds.observe(stats.compute)
        for wait in stats.queue_waits:
            self.queue_seconds.observe(wait)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


def _size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to max_batch_size (and it itself), so every batch size has a close bucket."""
    buckets = {1}
    size = 2
    while size < max_batch_size:
        buckets.add(size)
        size *= 2
    buckets.add(max_batch_size)
    return tuple(float(b) for b in sorted(buckets))


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by route template and status, times it,
    and keeps the in-flight gauge. While ``closing()`` is true (draining) every response says
    ``Connection: close``, so clients stop reusing a connection the server is about to close (the
    keep-alive race that loses requests). The drain waits on ``in_flight_before_closing``: requests
    that began before it, the ones with work to finish (later ones are refused at once)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, closing: Callable[[], bool] = lambda: False):
        self.app = app
        self.metrics = metrics
        self.closing = closing
        self.in_flight = 0
        self.in_flight_before_closing = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering
        started = time.perf_counter()

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.closing():
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        before_closing = not self.closing()
        self.in_flight += 1
        self.in_flight_before_closing += before_closing
        self.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.in_flight -= 1
            self.in_flight_before_closing -= before_closing
            self.metrics.in_flight.set(self.in_flight)
            route = getattr(scope.get("route"), "path", "other")  # the template, so labels stay few
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
