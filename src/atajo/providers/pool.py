"""The pooled, keep-alive HTTP/1.1 client every HTTP provider shares, on the gateway's own event loop.

Connections (``providers/connection.py``) are kept per upstream ``host:port``: at most
``max_connections_per_host`` in use (or opening) per host and ``max_connections`` in all; a request that
finds none free waits for one. Idle ones are reused newest first and closed after ``keepalive_s``. The pool
counts connections opened and requests sent per host, so metrics show how well it is reused (opened ≪ sent).

A pooled connection the server closed between two requests (the keep-alive race) fails the request before
any byte of the answer came back: that request is sent once more, on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from atajo.core.deployments import Deployment
from atajo.providers.connection import ConnectFailed, Connection, ConnectTimeout, Disconnected, Response
from atajo.settings import PoolSettings


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``total`` bounds a plain call; ``connect`` bounds a stream's wait for a connection (a free one included);
    ``sock_connect`` bounds opening one (TCP and TLS); ``sock_read`` a stream's wait for its next bytes."""

    total: float | None
    connect: float | None
    sock_connect: float | None
    sock_read: float | None


@dataclass(frozen=True, slots=True)
class Target:
    key: str
    host: str
    port: int
    tls: bool
    head: bytes
    """``POST <path> HTTP/1.1`` and the fixed headers."""


@dataclass(frozen=True, slots=True)
class _Session:
    loop: asyncio.AbstractEventLoop
    ssl: ssl.SSLContext


def _header_block(headers: Mapping[str, str], length: int) -> bytes:
    block = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if block.count("\n") != len(headers) or block.count("\r") != len(headers):
        raise ValueError("a header name or value holds a line break")
    return f"{block}content-length: {length}\r\n\r\n".encode()


class HttpPool:
    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.opened: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self._host_keys: dict[str, str] = {}
        self._session: _Session | None = None
        self._timeouts: dict[tuple[str, bool], Timeouts] = {}
        self._targets: dict[str, Target] = {}
        self._idle: dict[str, list[Connection]] = {}
        self._busy: Counter[str] = Counter()
        self._in_use = 0
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._conns: weakref.WeakSet[Connection] = weakref.WeakSet()

    def count_sent(self, base_url: str) -> None:
        """Count a request under the same ``host:port`` key that connections opened are counted under."""
        key = self._host_keys.get(base_url)
        if key is None:
            key = self._host_keys[base_url] = self.target(base_url).key
        self.sent[key] += 1

    async def start(self) -> None:
        if self._session is not None:
            return
        loop = asyncio.get_running_loop()
        self._session = _Session(loop, ssl.create_default_context())
        self._sweeper = loop.call_later(self._sweep_every(), self._sweep)

    async def close(self) -> None:
        if self._session is None:
            return
        self._session = None
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._conns):  # idle and in use, as aiohttp's session closed them
            conn.close()
        self._idle.clear()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ConnectTimeout())
        self._waiters.clear()

    @property
    def session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("HttpPool.start() was not awaited")
        return self._session

    def timeout(self, deployment: Deployment, streaming: bool) -> Timeouts:
        """Whole-request timeout for plain calls; for streams, the longest wait for the next bytes.

        ``connect_timeout_s`` bounds opening a TCP (and TLS) connection only: a request queued behind slow
        completions at ``max_connections_per_host`` is not failing to connect. That wait is bounded by
        ``timeout_s``, like the rest of the call.
        """
        key = (deployment.id, streaming)
        timeout = self._timeouts.get(key)
        if timeout is None:
            t, c = deployment.timeout_s, deployment.connect_timeout_s
            timeout = Timeouts(None, t, c, t) if streaming else Timeouts(t, None, c, None)
            self._timeouts[key] = timeout
        return timeout

    def connections(self) -> tuple[int, int]:
        """(idle, in use) connections right now."""
        idle = sum(1 for conns in self._idle.values() for conn in conns if not conn.lost)
        return idle, self._in_use

    def target(self, url: str, method: str = "POST") -> Target:
        cache_key = url if method == "POST" else f"{method} {url}"
        target = self._targets.get(cache_key)
        if target is None:
            parts = urlsplit(url)
            tls = parts.scheme == "https"
            host = parts.hostname or ""
            port = parts.port or (443 if tls else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host_header = host if parts.port is None else f"{host}:{port}"
            if ":" in host:
                host_header = f"[{host}]" if parts.port is None else f"[{host}]:{port}"
            head = f"{method} {path} HTTP/1.1\r\nhost: {host_header}\r\nconnection: keep-alive\r\nuser-agent: atajo\r\n"
            target = self._targets[cache_key] = Target(f"{host}:{port}", host, port, tls, head.encode())
        return target

    async def request(
        self, url: str, payload: bytes, headers: Mapping[str, str], t: Timeouts, method: str = "POST"
    ) -> Response:
        """POST (or ``method``); a plain call (``t.total``) returns the whole answer with its connection back in
        the pool, a stream returns once the headers are in, holding its connection until :meth:`release`."""
        session = self.session
        loop = session.loop
        target = (self._targets.get(url) if method == "POST" else None) or self.target(url, method)
        data = target.head + _header_block(headers, len(payload)) + payload
        deadline = None if t.total is None else loop.time() + t.total
        wait_deadline = deadline if t.connect is None else loop.time() + t.connect
        conn = await self._acquire(target, wait_deadline, t.sock_connect, fresh=False)
        retried = False
        while True:
            resp = conn.request(data, t.sock_read)
            try:
                if deadline is None:
                    await resp.wait_headers(resp._next_deadline())
                else:
                    await resp.wait_complete(deadline)
            except Disconnected:
                self.release(resp)
                if retried or not conn.reused or resp.got_bytes:
                    raise
                retried = True  # the keep-alive race: the server closed it as we sent; once more on a new one
                self.sent[target.key] += 1
                wait_deadline = deadline if t.connect is None else loop.time() + t.connect
                conn = await self._acquire(target, wait_deadline, t.sock_connect, fresh=True)
                continue
            except BaseException:
                self.release(resp)
                raise
            if deadline is not None:
                self.release(resp)
            return resp

    def release(self, resp: Response) -> None:
        """Give a response's connection back: to the idle list if its answer was all read and it may be kept."""
        conn = resp.conn
        if conn.response is not resp:
            return  # already released
        conn.response = None
        key = conn.key
        self._busy[key] -= 1
        self._in_use -= 1
        if resp.reusable and self._session is not None:
            conn.idle_since = self._session.loop.time()
            conn.reused = True
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()
        if self._waiters:
            self._wake(key)

    # --- the pool ---

    async def _acquire(
        self, target: Target, wait_deadline: float | None, connect_s: float | None, fresh: bool
    ) -> Connection:
        key = target.key
        settings = self.settings
        while True:
            if not fresh:
                idle = self._idle.get(key)
                if idle:
                    stale_before = self.session.loop.time() - settings.keepalive_s
                    while idle:
                        conn = idle.pop()
                        if conn.usable(stale_before):
                            self._busy[key] += 1
                            self._in_use += 1
                            return conn
                        conn.close()
            if self._busy[key] < settings.max_connections_per_host and self._in_use < settings.max_connections:
                break
            await self._wait_for_slot(key, wait_deadline)
        self._busy[key] += 1
        self._in_use += 1
        try:
            conn = await self._connect(target, connect_s)
        except BaseException:
            self._busy[key] -= 1
            self._in_use -= 1
            if self._waiters:
                self._wake(key)
            raise
        self.opened[key] += 1
        self._conns.add(conn)
        return conn

    async def _connect(self, target: Target, connect_s: float | None) -> Connection:
        session = self.session
        loop = session.loop
        key = target.key
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, key),
                    target.host,
                    target.port,
                    ssl=session.ssl if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout() from None
        except OSError as exc:
            raise ConnectFailed(target.host, target.port, type(exc).__name__) from None
        return conn

    async def _wait_for_slot(self, key: str, deadline: float | None) -> None:
        loop = self.session.loop
        fut: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters.setdefault(key, deque())
        waiters.append(fut)
        handle = loop.call_at(deadline, _no_slot, fut) if deadline is not None else None
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._wake(key)  # woken, then cancelled: pass the turn on
            raise
        finally:
            if handle is not None:
                handle.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(fut)
            if not waiters and self._waiters.get(key) is waiters:
                del self._waiters[key]

    def _wake(self, key: str) -> None:
        """Wake one waiter: for this host first, else (the total cap freed a place) for any host."""
        waiters = self._waiters.get(key)
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
                    return
        for others in self._waiters.values():
            for fut in others:
                if not fut.done():
                    fut.set_result(None)
                    return

    def _sweep_every(self) -> float:
        return max(min(self.settings.keepalive_s / 2, 5.0), 0.05)

    def _sweep(self) -> None:
        """Close idle connections past ``keepalive_s`` (reuse checks it too; this frees them meanwhile)."""
        if self._session is None:
            return
        stale_before = self._session.loop.time() - self.settings.keepalive_s
        for key, conns in list(self._idle.items()):
            keep = [c for c in conns if c.usable(stale_before)]
            for conn in conns:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self._sweeper = self._session.loop.call_later(self._sweep_every(), self._sweep)


def _no_slot(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(ConnectTimeout())
