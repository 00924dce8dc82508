"""`fmtl serve` as a process: uvicorn (httptools with a deadline per request, fmtl.runtime.serve.protocol) running
the app, printing its address and readiness, ending with one error line when the model fails to load,
and draining on SIGTERM or Ctrl-C: readiness and new requests get 503, every accepted request is
answered (within --drain-timeout), then it exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable

import uvicorn

from fmtl.runtime.serve.app import create_app
from fmtl.runtime.serve.config import ServeConfig, ServeError, host_name
from fmtl.runtime.serve.metrics import MetricsMiddleware
from fmtl.runtime.serve.protocol import DeadlineHttpToolsProtocol, close_connections, close_listeners, open_connections

DRAIN_GRACE_S = 1.0  # after SIGTERM, how long idle keep-alive connections may stay open at most
SPARE_FILES = 96  # open files kept for other uses than connections (the listener, the model, pipes, the loop)


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
            self.echo(f"fmtl serve: {self.app.model_server.config.model} on http://{host_name(host)}:{port} (loading)")

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
        keep-alive race). So: once the requests that began before the signal are answered, and the
        clients have left (or DRAIN_GRACE_S has passed: probes and late requests get their 503
        meanwhile), stop listening; requests already on accepted connections are still read and
        answered; then exit when those have left too (or after another grace). Requests that
        arrive during the drain are refused at once, so a steady stream of them cannot hold it open."""
        grace = min(DRAIN_GRACE_S, self.drain_timeout)
        pending = self.app.in_flight_before_closing
        if pending and draining > self.drain_timeout:
            self.failure = f"drain timeout: {pending} requests were still in flight after {draining:.0f} s"
            # closing the sockets ends requests still reading a body (as a disconnect) without tracebacks
            close_connections(self)
            self.should_exit = True
        elif pending:
            return
        elif self.listening_closed_at is None:
            if not open_connections(self) or draining >= grace:
                close_listeners(self)  # new connections are refused from here on
                self.listening_closed_at = draining
        elif not open_connections(self) or draining - self.listening_closed_at >= grace:
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
    limit = connection_limit(config.limit_concurrency)
    metrics = app.model_server.metrics
    # httptools with a deadline per request (its 408s counted as the app counts its refusals), the
    # queue-full 503 sent before any ASGI task exists (under overload most requests get it), and idle
    # connections closed to make room at the connection limit
    protocol = DeadlineHttpToolsProtocol.configured(config.request_timeout, metrics.rejected.labels("header_timeout").inc,
                                                    app.shedder.early_response, metrics.connections.set,
                                                    metrics.idle_closed.inc)  # fmt: skip
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=protocol,
        limit_concurrency=limit,  # this many open connections, none idle: 503 at once
        timeout_keep_alive=config.keep_alive_timeout,  # idle keep-alive connections closed after this
        backlog=min(2048, limit * 2),
        proxy_headers=False,  # nothing reads the client's address: one middleware less per request
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


def connection_limit(wanted: int) -> int:
    """--limit-concurrency, within this process's open-file limit: the soft limit is raised towards
    ``wanted`` + SPARE_FILES (up to the hard limit, as nginx's worker_rlimit_nofile does); if even that
    is too few, the connection limit is lowered to fit, with a warning. Past the open-file limit the
    server could not accept connections at all (EMFILE) instead of answering or shedding them."""
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to read
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fitted = max(1, soft - SPARE_FILES)
    print(f"warning: --limit-concurrency {wanted} lowered to {fitted}: the open-file limit is {soft} (ulimit -n)",
          file=sys.stderr)  # fmt: skip
    return fitted
