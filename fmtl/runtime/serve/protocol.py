"""The HTTP connection layer of `fmtl serve`: uvicorn's httptools protocol with a deadline for reading
each request and a limit on its head, and the few uvicorn internals the drain needs, read in one place.

uvicorn times out idle keep-alive connections but not a request that arrives slowly: a client that
sends half its headers, or headers and one byte of its body, then waits, holds a connection for
ever; and uvicorn sets no size limit on headers parsed by httptools. ``DeadlineHttpToolsProtocol``
gives every request ``request_timeout`` seconds from its first byte (or from the connection's
opening) until its headers have arrived: past that it answers 408 and closes. A request line and
headers over ``MAX_HEAD_BYTES`` get 431 and the connection closed. The body's own deadline is the
app's (fmtl.runtime.serve.app.read_body answers 408 as JSON); one more ``request_timeout`` after
that, a body still incomplete has its connection closed, whatever the app does. httptools (llhttp,
in C) rather than h11: parsing is a large share of a small request's cost, so it sets how much
capacity overload keeps.

Connections are capped by uvicorn's ``limit_concurrency``: a request that arrives while that many
are open gets 503. An idle connection (no request on it and no byte of one pending: opened and
silent, or between keep-alive requests) costs little, and may be closed at any time in HTTP/1.1,
so at the cap the one idle the longest is closed to make room for a new connection or request
(as nginx and Envoy shed idle connections first under load). Connections in the middle of a
request, a stalled upload among them, are never shed: they hold their place until their deadline.

uvicorn documents its settings but not these classes and attributes, so pyproject.toml bounds
uvicorn to the versions tested, and each reader below degrades to "nothing known" if they move.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from fmtl.runtime.serve.api import small_enough_to_drop

MAX_HEAD_BYTES = 16 * 1024  # request line and headers at most (h11's default)
DROP_WAIT_S = 0.5  # a small body refused early is read and dropped if it comes within this, else closed


def _closing_response(status: str, error: str) -> bytes:
    body = json.dumps({"error": error}).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body


HEADER_TIMEOUT_RESPONSE = _closing_response("408 Request Timeout",
                                            "the request headers did not arrive in time (--request-timeout)")  # fmt: skip
HEAD_TOO_LARGE_RESPONSE = _closing_response("431 Request Header Fields Too Large",
                                            f"request line and headers over {MAX_HEAD_BYTES // 1024} KiB")  # fmt: skip


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline per request (``request_timeout``), a limit on the
    request line and headers (``MAX_HEAD_BYTES``), and answers given before any ASGI task exists
    (``early_response``: the app's cheapest refusals, sent as bytes). ``configured`` sets them."""

    request_timeout: float = 10.0
    on_header_timeout: Callable[[], object] = staticmethod(lambda: None)  # counts the 408s given here
    early_response: Callable[[dict], bytes | None] = staticmethod(lambda scope: None)
    on_connections: Callable[[int], object] = staticmethod(lambda count: None)  # the open connections, on each change
    on_idle_closed: Callable[[], object] = staticmethod(lambda: None)  # counts the idle connections closed for room
    # the server's idle connections, the longest idle first (one dict per configured class: per server)
    idle: OrderedDict[DeadlineHttpToolsProtocol, None] = OrderedDict()

    @classmethod
    def configured(cls, request_timeout: float, on_header_timeout: Callable[[], object],
                   early_response: Callable[[dict], bytes | None],
                   on_connections: Callable[[int], object] = lambda count: None,
                   on_idle_closed: Callable[[], object] = lambda: None) -> type[DeadlineHttpToolsProtocol]:  # fmt: skip
        """This protocol class with its settings (uvicorn builds one protocol per connection from it).

        Args:
            request_timeout: seconds for a request's headers to arrive (and again for its body).
            on_header_timeout: called for each 408 given here.
            early_response: from a request's scope (no body read yet), a whole HTTP response to send
                instead of running the app, or None. A small body is read and dropped first, so the
                connection stays open; a large one is not read, and the connection closes.
            on_connections: called with the number of open connections whenever it changes.
            on_idle_closed: called for each idle connection closed to make room (at limit_concurrency)."""
        attributes = {"request_timeout": float(request_timeout), "on_header_timeout": staticmethod(on_header_timeout),
                      "early_response": staticmethod(early_response), "on_connections": staticmethod(on_connections),
                      "on_idle_closed": staticmethod(on_idle_closed), "idle": OrderedDict()}  # fmt: skip
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._head_complete = False  # the current request's headers have all arrived
        self._head_bytes = 0  # bytes received since the current request began, while its head is incomplete
        self._early: tuple[RequestResponseCycle, bytes] | None = None  # an answer waiting for its body to pass
        self._in_message = False  # a request's bytes have begun to arrive and not all of them have
        super().connection_made(transport)
        self._arm(self.request_timeout, self._headers_expired)
        self._make_room()
        self._now_idle()
        self.on_connections(len(self.connections))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._head_complete:  # a head still arriving: count its bytes, however slowly they come
            self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._close_with(HEAD_TOO_LARGE_RESPONSE)

    def on_message_begin(self) -> None:  # the request's first byte (parser callback)
        self._in_message = True
        self.idle.pop(self, None)
        super().on_message_begin()
        self._head_complete = False
        if self._head_bytes <= MAX_HEAD_BYTES:  # a head too large ends the connection, pipelined requests too
            self._head_bytes = 0
        if self._deadline is None:
            self._arm(self.request_timeout, self._headers_expired)

    def on_headers_complete(self) -> None:
        self._head_complete = True
        # a head that arrived whole in one read: its parsed size (the connection closes after this read)
        self._head_bytes = max(self._head_bytes, len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers))
        if self._head_bytes <= MAX_HEAD_BYTES:
            self._make_room()  # before uvicorn's limit_concurrency check, which answers 503 at the cap
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_bytes <= MAX_HEAD_BYTES:  # else no request was started for it
            super().on_body(body)

    def on_message_complete(self) -> None:  # the whole request has arrived
        self._disarm()
        self._in_message = False
        if self._head_bytes > MAX_HEAD_BYTES:
            return
        super().on_message_complete()
        if self._early is not None and self._early[0] is self.cycle:
            self._answer_early()
        self._now_idle()  # when it was answered before it had all arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._now_idle()

    def _now_idle(self) -> None:
        """Mark the connection idle (the newest idle one) if no request is on it and no byte of one pending."""
        cycle = self.cycle
        if (self._in_message or (cycle is not None and not cycle.response_complete) or self.pipeline
                or self._early is not None or self.transport.is_closing()):  # fmt: skip
            return
        self.idle[self] = None
        self.idle.move_to_end(self)

    def _make_room(self) -> None:
        """At limit_concurrency, close the connections idle the longest until one more fits (none if none is idle).

        uvicorn answers 503 to a request that arrives while ``limit_concurrency`` connections are open,
        its own included; a closed one leaves that count at once, not when the loop reports it lost."""
        limit = self.limit_concurrency
        while limit is not None and len(self.connections) >= limit and self.idle:
            oldest, _ = self.idle.popitem(last=False)
            self.connections.discard(oldest)
            if not oldest.transport.is_closing():  # else already on its way out (a keep-alive timeout, say)
                oldest.transport.close()
                self.on_idle_closed()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app) -> None:
        """Run the app for this request, unless ``early_response`` answers it (not uvicorn's own 503s)."""
        response = self.early_response(cycle.scope) if app is self.app else None
        if response is None:
            super()._start_asgi_task(cycle, app)
            return
        self._early = (cycle, response)
        if not cycle.more_body:  # all here already (a pipelined request)
            self._answer_early()
        elif _small_body(cycle.scope):  # read and drop it, unless it is slow to come
            self._arm(DROP_WAIT_S, lambda: self._answer_early(close=True))
        else:  # not worth reading: answer now and close
            self._answer_early(close=True)

    def _answer_early(self, close: bool = False) -> None:
        cycle, response = self._early
        self._early = None
        cycle.response_complete = True  # uvicorn's body callbacks now ignore this request
        if close or not cycle.keep_alive:
            self.transport.write(response.replace(b"\r\n", b"\r\nconnection: close\r\n", 1))
            self.transport.close()
        else:
            self.transport.write(response)
            self.on_response_complete()  # keep-alive timer, or the next pipelined request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.idle.pop(self, None)
        super().connection_lost(exc)
        self.on_connections(len(self.connections))

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _close_with(self, response: bytes) -> None:
        self._disarm()
        self.transport.write(response)
        self.transport.close()

    def _headers_expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._head_complete:  # no app is involved yet
            self._close_with(HEADER_TIMEOUT_RESPONSE)
            self.on_header_timeout()
        else:  # the body is late: the app has its own deadline for it; this is a backstop
            self._arm(self.request_timeout, self._body_expired)

    def _body_expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app sees a disconnect


def _small_body(scope: dict) -> bool:
    """The body says its length (none: empty), small enough to read and drop (fmtl.runtime.serve.api)."""
    headers = dict(scope["headers"])
    return b"transfer-encoding" not in headers and small_enough_to_drop(headers.get(b"content-length", b"0"))


def open_connections(server) -> list:
    """The connections a uvicorn.Server has open (its protocols); empty if uvicorn no longer says."""
    state = getattr(server, "server_state", None)
    return list(getattr(state, "connections", ()) or ())


def close_listeners(server) -> None:
    """Stop accepting new connections (accepted ones stay open)."""
    for listener in getattr(server, "servers", ()) or ():
        listener.close()


def close_connections(server) -> None:
    """Close every open connection at once (a request still reading its body sees a disconnect)."""
    for connection in open_connections(server):
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.close()
