"""The HTTP connection layer of `fmtl serve`: uvicorn's h11 protocol with a deadline for reading each
request, and the few uvicorn internals the drain needs, read in one place.

uvicorn times out idle keep-alive connections but not a request that arrives slowly: a client that
sends half its headers, or headers and one byte of its body, then waits, holds a connection for
ever. ``DeadlineH11Protocol`` gives every request ``request_timeout`` seconds from its first byte
(or from the connection's opening) until its headers have arrived: past that it answers 408 and
closes. The body's own deadline is the app's (fmtl.runtime.serve.read_body answers 408 as JSON);
one more ``request_timeout`` after that, a body still incomplete has its connection closed, whatever
the app does. uvicorn's own ``limit_concurrency`` caps the connections these can hold.

uvicorn documents its settings but not these classes and attributes, so pyproject.toml bounds
uvicorn to the versions tested, and each reader below degrades to "nothing known" if they move.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_BODY = json.dumps({"error": "the request headers did not arrive in time (--request-timeout)"}).encode()
HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(HEADER_TIMEOUT_BODY)}\r\n\r\n".encode()
    + HEADER_TIMEOUT_BODY
)


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline per request (``request_timeout``, set by ``with_deadline``)."""

    request_timeout: float = 10.0
    on_header_timeout: Callable[[], object] = staticmethod(lambda: None)  # counts the 408s given here

    @classmethod
    def with_deadline(cls, seconds: float, on_header_timeout: Callable[[], object]) -> type[DeadlineH11Protocol]:
        """This protocol class with its deadline set, calling ``on_header_timeout`` for each 408 it gives
        (uvicorn builds one protocol per connection from it)."""
        attributes = {"request_timeout": float(seconds), "on_header_timeout": staticmethod(on_header_timeout)}
        return type(cls.__name__, (cls,), attributes)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(self.request_timeout, self._headers_expired)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # the first bytes of the next request
            self._arm(self.request_timeout, self._headers_expired)
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the whole request has arrived
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # headers still incomplete: no app is involved yet
            self.transport.write(HEADER_TIMEOUT_RESPONSE)
            self.transport.close()
            self.on_header_timeout()
        elif self.conn.their_state is h11.SEND_BODY:  # the app has its own deadline for the body; a backstop
            self._arm(self.request_timeout, self._body_expired)

    def _body_expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()  # the app sees a disconnect


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
