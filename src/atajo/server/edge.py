"""The inbound HTTP/1.1 server: an asyncio protocol on httptools (llhttp), one instance per connection.

It knows HTTP framing and nothing of Atajo's routes: each request is handed to ``dispatch`` as a
:class:`Request` (headers parsed, body still arriving), which answers with a :class:`Response` or a
:class:`Stream` it wrote through :meth:`Request.stream`. What it guards against:

- keep-alive and pipelining: requests on one connection are answered one at a time, in order; reading pauses
  while a complete request waits its turn, so a client cannot queue unbounded work;
- bodies (Content-Length or chunked) are buffered only up to a limit, checked from the header and while
  reading (413); the handler runs as soon as the headers are in, so it can refuse (401, 413) before any body
  byte is buffered. ``Expect: 100-continue`` is answered when the handler first asks for the body. A response
  sent before its request's body was all read closes the connection (its framing is unknown);
- a header block larger than ``max_header_bytes`` (431), malformed HTTP (400), both answered and closed, never
  with a trace; slow header or body senders (a read timeout) and idle keep-alive connections are closed;
- writes past the transport's high-water mark wait for it to drain (streams); a client that leaves is seen as
  ``ConnectionResetError`` on the next stream write and as :class:`ClientClosed` from ``body()``;
- graceful shutdown: stop accepting, close idle connections, let in-flight requests finish up to a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

import httptools

from atajo.errors import ClientClosed, InvalidRequest, PayloadTooLarge

log = logging.getLogger("atajo.server")

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LINGER_S = 2.0
"""How long an answered connection keeps discarding the unread rest of a request body before it closes."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    """Request line plus headers."""
    header_timeout_s: float = 10.0
    """From a request's first byte to the end of its headers (slowloris)."""
    body_timeout_s: float = 30.0
    """Longest wait for the next body byte while a request's body is being read."""
    keep_alive_s: float = 75.0
    """An idle keep-alive connection is closed after this long (aiohttp's default, which this edge replaced:
    longer than clients' own idle timeouts, so a client never reuses a connection we are closing)."""
    body_limits: tuple[tuple[str, int], ...] = ()
    """(path, limit) pairs: requests to that path may send bodies up to that limit (file uploads) rather than
    ``max_body_bytes``."""


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Stream:
    """A chunked response being written; returned by the handler once it called :meth:`end`."""

    __slots__ = ("_chunked", "_conn", "_head_only", "ended", "headers", "status")

    def __init__(self, conn: Connection, status: int, headers: dict[str, str], head_only: bool, chunked: bool) -> None:
        self._conn = conn
        self._head_only = head_only
        self._chunked = chunked  # HTTP/1.0 clients get the bytes as they are, the end marked by closing
        self.status = status
        self.headers = headers
        self.ended = False

    async def write(self, data: bytes) -> None:
        """Send one chunk now (SSE events are flushed one by one); waits while the client reads slowly."""
        if self._conn.lost or self._conn.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if data and not self._head_only:
            self._conn.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
            await self._conn.drain()

    async def end(self) -> None:
        if self._conn.lost:
            raise ConnectionResetError("the client closed the connection")
        if not self._head_only and self._chunked:
            self._conn.transport.write(b"0\r\n\r\n")
        self.ended = True


Reply = Response | Stream
Dispatch = Callable[["Request"], Awaitable[Reply]]


class Request:
    """One request: method, path (percent-decoded), query, headers (lower-case names), ``await body()``."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_continue",
        "_error",
        "_size",
        "_waiter",
        "complete",
        "content_length",
        "headers",
        "keep_alive",
        "max_body_bytes",
        "method",
        "path",
        "query",
        "started",
        "stream_started",
        "too_large",
        "version",
    )

    def __init__(self, conn: Connection, method: str, path: str, query: str, headers: dict[str, str]) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.version = "1.1"
        self.keep_alive = True
        self.content_length: int | None = None
        self.max_body_bytes = conn.limits.max_body_bytes
        self.complete = False
        self.too_large = False
        self.stream_started = False
        self.started = time.perf_counter()
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._continue = headers.get("expect", "").lower() == "100-continue"
        self._error: Exception | None = None

    async def body(self) -> bytes:
        limit = self.max_body_bytes
        if self.too_large or (self.content_length is not None and self.content_length > limit):
            self.too_large = True
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        if self._continue and not self.complete:
            self._continue = False
            self._conn.write(_CONTINUE)
        while not self.complete and self._error is None and not self.too_large:
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None and not self.complete:
            raise self._error
        if self.too_large:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    def stream(self, status: int, headers: dict[str, str]) -> Stream:
        """Send the head of a chunked response; write the body through the returned :class:`Stream`."""
        self.stream_started = True
        self._conn.write(self._conn.head(self, status, headers, None))
        return Stream(self._conn, status, headers, self.method == "HEAD", self.version != "1.0")

    def _feed(self, data: bytes) -> None:
        if self.too_large:
            return
        self._size += len(data)
        if self._size > self.max_body_bytes:
            self.too_large = True
            self._chunks.clear()
            self._wake()
        else:
            self._chunks.append(data)

    def _finish(self, error: Exception | None = None) -> None:
        if error is None:
            self.complete = True
        elif self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Connection(asyncio.Protocol):
    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.parser = httptools.HttpRequestParser(self)
        self.lost = False
        self.closing = False  # answer what was received with `connection: close`, then close
        self.lingering = False  # answered and half-closed, discarding the rest of a body
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._reading: Request | None = None  # the request the parser is filling (its headers are in)
        self._in_message = False  # between a request's first byte and its end
        self._in_headers = False
        self._queue: deque[Request] = deque()  # headers complete, waiting for their turn
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # reading: the header or body timeout
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # when the connection last became idle; None while busy
        self._timer_mark = 0
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reject = 400  # the status of a parse failure: 431 when we raised it for size
        self._failed_status = 0  # set when the stream can no longer be parsed: answer it after the queue

    # --- transport events ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        self._cancel_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        gone = ClientClosed("the client closed the connection")
        if self._reading is not None:
            self._reading._finish(gone)
        for request in self._queue:
            request._finish(gone)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("the client closed the connection"))
            self._drain_waiter.exception()  # retrieved here too, so an unawaited one never warns

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client closed the connection")
        if self._write_paused:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        self._idle_since = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # no protocol switch offered: what was parsed is answered, then we close
            self._pause_reading()
        except httptools.HttpParserError:
            self._fail(self._reject)
            return
        if self._in_message and self._timer is None:
            self._arm_read()

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    # --- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._in_message = True
        self._in_headers = True
        self._reading = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self._reject = 431
            raise ValueError("header block too large")  # the parser turns it into an HttpParserError

    def on_headers_complete(self) -> None:
        self._in_headers = False
        url = httptools.parse_url(self._url)
        path = url.path.decode("latin-1")
        if "%" in path:
            path = unquote(path, encoding="latin-1")
        query = url.query.decode("latin-1") if url.query else ""
        request = Request(self, self.parser.get_method().decode("ascii"), path, query, self._headers)
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        for limited, limit in self.limits.body_limits:
            if path == limited:
                request.max_body_bytes = limit
        length = self._headers.get("content-length")
        if length is not None:
            request.content_length = int(length)  # llhttp accepts only digits here
        self._reading = request
        self._cancel_timer()  # the header timeout ends; the body timeout starts with the next read
        if self._task is None and not self._queue:
            self._task = self.loop.create_task(self._serve(request))
        else:
            self._queue.append(request)

    def on_body(self, body: bytes) -> None:
        if self._reading is not None:
            self._reading._feed(body)

    def on_message_complete(self) -> None:
        request, self._reading = self._reading, None
        self._in_message = False
        self._cancel_timer()
        if request is None:
            return
        request._finish()
        if self._queue:
            self._pause_reading()  # a whole request waits its turn: read no further until it runs

    # --- answering --------------------------------------------------------------------------------

    async def _serve(self, request: Request) -> None:
        """Answer ``request``, then every request queued behind it, in order."""
        try:
            while True:
                await self._answer(request)
                if self.lost or self.lingering or self.transport.is_closing():
                    return
                await self.drain()  # a client that does not read its answers is sent no more, nor read from
                if not self._queue:
                    break
                request = self._queue.popleft()
                self._resume_reading()
        except ConnectionResetError:  # from drain: the client left
            return
        finally:
            self._task = None
        if self._failed_status:
            self._send_error(self._failed_status)
        elif self.closing and not self._in_message:
            self.transport.close()
        else:
            self._resume_reading()
            if not self._in_message:
                self._arm_idle()

    async def _answer(self, request: Request) -> None:
        status, length = 500, 0
        try:
            reply = await self.server.dispatch(request)
            status = reply.status
            if isinstance(reply, Stream):
                if not reply.ended:
                    self.transport.close()  # the body was cut short: only closing tells the client
                    return
            else:
                length = len(reply.body)
                head = self.head(request, reply.status, reply.headers, length)
                self.write(head if request.method == "HEAD" else head + reply.body)
        except Exception:  # the dispatcher answers its own errors; this is a bug there or a bad header value
            log.exception("unanswerable request %s %s", request.method, request.path)
            if request.stream_started:
                self.transport.close()
                return
            status = 500
            self.write(self.head(request, 500, {"content-type": "text/plain"}, 21) + b"Internal Server Error")
        finally:
            access = self.server.access_log
            if access is not None:
                ms = (time.perf_counter() - request.started) * 1000
                peer = self.transport.get_extra_info("peername")
                client = peer[0] if isinstance(peer, tuple) else "-"
                access.info('%s "%s %s HTTP/%s" %d %d %.1fms', client, request.method, request.path,
                            request.version, status, length, ms)  # fmt: skip
        if self.lost:
            return
        if not request.complete:
            self._linger()
        elif not self._keep_alive(request):
            self.transport.close()

    def _linger(self) -> None:
        """Answered before its body was all read: closing now, with unread bytes, would send a reset that can
        destroy the answer before the client reads it. Half-close instead, discard what still comes, close
        when the client does or after a short while."""
        self.lingering = True
        self._cancel_timer()
        if self._reading is not None:
            self._reading._finish(ClientClosed("the request was answered before its body was read"))
        self._resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _keep_alive(self, request: Request) -> bool:
        return request.keep_alive and request.complete and not self.closing

    def head(self, request: Request, status: int, headers: dict[str, str], length: int | None) -> bytes:
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a response header holds a line break")
        if length is not None:
            framing = b"content-length: %d\r\n" % length
        elif request.version != "1.0":
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b""
            request.keep_alive = False  # HTTP/1.0 has no chunked encoding: the end of the stream is the close
        if not self._keep_alive(request) or (length is None and not request.complete):
            framing += b"connection: close\r\n"
            request.keep_alive = False
        elif request.version == "1.0":
            framing += b"connection: keep-alive\r\n"
        status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        return b"%b%bdate: %b\r\n%b\r\n" % (status_line, lines.encode(), self.server.date(), framing)

    def _send_error(self, status: int) -> None:
        """Answer a request that could not be parsed, then close: its framing, and all after it, is lost."""
        if not self.lost and not self.transport.is_closing():
            body = HTTPStatus(status).phrase.encode()
            self.transport.write(
                b"%bcontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\ndate: %b\r\n\r\n%b"
                % (_STATUS_LINES[status], len(body), self.server.date(), body)
            )
            self.transport.close()

    def _fail(self, status: int) -> None:
        self._pause_reading()
        if self._reading is not None:
            self._reading._finish(InvalidRequest("The request body could not be parsed."))
        self._reading = None
        self._in_message = False
        if self._task is None:
            self._send_error(status)
        else:
            self._failed_status = status  # answered once the requests before it are

    # --- timers and flow control ------------------------------------------------------------------

    def _arm_idle(self) -> None:
        """One long-lived timer checks idleness, rather than a timer set and cancelled per request."""
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.limits.keep_alive_s, self._idle_timeout)

    def _arm_read(self) -> None:
        if self._in_headers:
            self._timer = self.loop.call_later(self.limits.header_timeout_s, self._read_timeout)
        else:
            assert self._reading is not None
            self._timer_mark = self._reading._size
            self._timer = self.loop.call_later(self.limits.body_timeout_s, self._read_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if self.lost:
            return
        since = self._idle_since
        if since is None or self._task is not None or self._in_message:
            left = self.limits.keep_alive_s  # busy: look again a whole period later
        else:
            left = since + self.limits.keep_alive_s - self.loop.time()
            if left <= 0:
                self.transport.close()
                return
        self._idle_timer = self.loop.call_later(left, self._idle_timeout)

    def _read_timeout(self) -> None:
        self._timer = None
        request = self._reading
        if request is not None and not self._in_headers and request._size != self._timer_mark:
            self._arm_read()  # the body is still coming, however slowly
            return
        log.debug("closing a connection: a request took too long to arrive")
        if self._task is None and request is None:
            self._send_error(408)
        else:
            if request is not None:
                request._finish(ClientClosed("the request body took too long to arrive"))
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self._read_paused and not self.lost:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and not self.lost and not self._failed_status:
            self._read_paused = False
            self.transport.resume_reading()

    # --- shutdown ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close now if idle, else after the request being answered."""
        self.closing = True
        if self._task is None and not self._in_message:
            self.transport.close()

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.transport.abort()


class EdgeServer:
    """The listening socket and its connections."""

    def __init__(self, dispatch: Dispatch, limits: Limits, access_log: logging.Logger | None = None) -> None:
        self.dispatch = dispatch
        self.limits = limits
        self.access_log = access_log
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self._date = b""
        self._date_at = 0

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = formatdate(now, usegmt=True).encode()
        return self._date

    async def listen(
        self,
        *,
        sock: socket.socket | None = None,
        host: str | None = None,
        port: int | None = None,
        backlog: int = 1024,
    ) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=backlog)
        else:
            assert port is not None
            self._server = await loop.create_server(lambda: Connection(self), host, port, backlog=backlog)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, close idle connections, give in-flight requests ``timeout_s`` to finish, then cut."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:  # noqa: ASYNC110  # a poll bounded by the deadline
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let aborted handlers see their cancellation
