"""One upstream HTTP/1.1 connection: an asyncio protocol on httptools' response parser (llhttp).

It sends one request at a time and parses the answer into a :class:`Response`: status and lower-cased
headers, then the body (Content-Length, chunked, or up to the connection's end), buffered until read.
Plain calls wait for the whole answer; streams read it chunk by chunk, each read waiting at most
``read_timeout`` for the next bytes (reading pauses while more than ``HIGH_WATER`` bytes wait unread).
Failures are :class:`ClientError` subclasses, mapped into the error tree by ``providers/http.py``.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools

HIGH_WATER = 256 * 1024


class ClientError(Exception):
    """A failure of the upstream client."""


class ConnectFailed(ClientError):
    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {reason}")
        self.host, self.port = host, port


class ConnectTimeout(ClientError):
    """No connection in time: the host did not accept one, or the pool had none free."""


class ReadTimeout(ClientError):
    """The answer (plain calls) or the next bytes (streams) did not come in time."""


class Disconnected(ClientError):
    """The connection ended before the answer did."""


class BadResponse(ClientError):
    """Bytes that are not an HTTP/1.1 answer."""


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(ReadTimeout())


class Response:
    __slots__ = (
        "_chunks",
        "_keep_alive",
        "_size",
        "_until_eof",
        "_waiter",
        "complete",
        "conn",
        "error",
        "got_bytes",
        "headers",
        "read_timeout",
        "status",
    )

    def __init__(self, conn: Connection, read_timeout: float | None) -> None:
        self.conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}
        self.complete = False
        self.error: ClientError | None = None
        self.got_bytes = False
        self.read_timeout = read_timeout
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._until_eof = False
        self._keep_alive = False

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.conn.lost

    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    async def _wait(self, deadline: float | None) -> None:
        loop = self.conn.loop
        fut = self._waiter = loop.create_future()
        handle = loop.call_at(deadline, _expire, fut) if deadline is not None else None
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _next_deadline(self) -> float | None:
        return None if self.read_timeout is None else self.conn.loop.time() + self.read_timeout

    async def wait_headers(self, deadline: float | None) -> None:
        while not self.status:
            if self.error is not None:
                raise self.error
            await self._wait(deadline)

    async def wait_complete(self, deadline: float | None) -> None:
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait(deadline)

    def body(self) -> bytes:
        """The buffered body (all of it once complete)."""
        data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._size = 0
        return data

    async def read(self) -> bytes:
        """The rest of the body, each wait bounded by ``read_timeout``."""
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait(self._next_deadline())
        return self.body()

    async def readany(self) -> bytes:
        """The next bytes of the body; ``b""`` at its end."""
        while not self._chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait(self._next_deadline())
        data = self.body()
        self.conn.resume()
        return data

    # --- fed by the connection ---

    def _wake(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER:
            self.conn.pause()
        self._wake()

    def _done(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: ClientError) -> None:
        if not self.complete and self.error is None:
            self.error = error
            self._wake()


class Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, key: str) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        resp = self.response
        if resp is not None and not resp.complete:
            if resp._until_eof and resp.status:
                resp._done()  # a body delimited by the connection's end
            else:
                resp._fail(Disconnected())

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None or resp.complete:
            self.close()  # bytes nobody asked for: the framing is lost
            return
        resp.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            resp._fail(BadResponse(str(exc)))
            self.close()

    def request(self, data: bytes, read_timeout: float | None) -> Response:
        resp = self.response = Response(self, read_timeout)
        if self.lost or self.transport is None or self.transport.is_closing():
            resp._fail(Disconnected())
        else:
            self.transport.write(data)
        return resp

    def usable(self, idle_after: float) -> bool:
        """Alive, and idle since no earlier than ``idle_after``."""
        return not self.lost and self.idle_since >= idle_after and not self._transport_closing()

    def _transport_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.lost = True

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        resp = self.response
        assert resp is not None
        status = self.parser.get_status_code()
        if status < 200:
            return  # an interim answer (1xx): the real one follows
        resp._keep_alive = self.parser.should_keep_alive()
        headers = resp.headers
        resp._until_eof = "content-length" not in headers and "transfer-encoding" not in headers
        resp.status = status
        resp._wake()

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        resp = self.response
        assert resp is not None
        if not resp.status:
            resp.headers = {}
            return
        resp._done()
