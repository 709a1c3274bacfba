"""The upstream HTTP/1.1 client (providers/connection.py, pool.py) against raw local servers that answer
byte for byte: framing, keep-alive reuse and its race, limits, timeouts, streams and their failures."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from atajo.core.deployments import Deployment
from atajo.errors import UpstreamConnectError, UpstreamStreamBroken, UpstreamTimeout, UpstreamUnavailable
from atajo.providers.http import post, post_json, sse_events
from atajo.providers.pool import HttpPool
from atajo.settings import DeploymentSettings, PoolSettings
from tests.upstreams.live import free_port

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b'{"ok": true}'


def answer(body: bytes = OK, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b" % (
        len(body),
        extra,
        body,
    )


class RawServer:
    """A TCP server on its own loop and thread; ``handler`` serves each connection. Counts connections,
    requests (their heads) and the peak of connections open at once."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self.heads: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.port = 0
        self.release = threading.Event()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        self.heads.append(head)
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()

    def __enter__(self) -> RawServer:
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self._server = asyncio.run_coroutine_threadsafe(start, self.loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()

        async def stop() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def keep_answering(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await server.read_request(reader) is not None:
        writer.write(answer())


def dep(url: str, **extra: Any) -> Deployment:
    settings = DeploymentSettings.model_validate({"provider": "openai", "base_url": url, "api_key": "k", **extra})
    return Deployment.from_settings("m", 0, settings, PoolSettings())


@pytest.fixture
async def pool() -> AsyncIterator[HttpPool]:
    pool = HttpPool(PoolSettings())
    await pool.start()
    yield pool
    await pool.close()


async def call(pool: HttpPool, d: Deployment) -> Any:
    return await post_json(pool, d, d.base_url + "/x", b"{}", {"content-type": "application/json"})


async def test_keep_alive_reuse_and_request_headers(pool: HttpPool) -> None:
    with RawServer(keep_answering) as server:
        for _ in range(30):
            assert await call(pool, dep(server.url)) == {"ok": True}
    key = f"127.0.0.1:{server.port}"
    assert server.connections == 1 and pool.opened[key] == 1 and pool.sent[key] == 30
    assert pool.connections() == (1, 0)
    head = server.heads[0].lower()
    assert head.startswith(b"post /x http/1.1\r\n")
    for line in (f"host: 127.0.0.1:{server.port}".encode(), b"content-length: 2", b"connection: keep-alive"):
        assert line in head


async def test_per_host_cap() -> None:
    async def slow(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(answer())

    pool = HttpPool(PoolSettings(max_connections_per_host=2))
    await pool.start()
    try:
        with RawServer(slow) as server:
            results = await asyncio.gather(*(call(pool, dep(server.url)) for _ in range(8)))
    finally:
        await pool.close()
    assert len(results) == 8 and server.peak == 2 and sum(pool.opened.values()) == 2


async def test_total_cap_across_hosts() -> None:
    async def slow(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(answer())

    pool = HttpPool(PoolSettings(max_connections=1))
    await pool.start()
    try:
        with RawServer(slow) as a, RawServer(slow) as b:
            calls = [call(pool, dep(s.url)) for s in (a, b, a, b)]
            assert len(await asyncio.gather(*calls)) == 4
            assert a.peak + b.peak <= 2 and pool.connections()[1] == 0
    finally:
        await pool.close()


async def test_stale_pooled_connection_is_retried_once_on_a_new_one(pool: HttpPool) -> None:
    async def one_then_close(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer())
        await writer.drain()
        await server.read_request(reader)  # the next one on this connection: closed unanswered

    with RawServer(one_then_close) as server:
        d = dep(server.url)
        assert await call(pool, d) == {"ok": True}
        assert await call(pool, d) == {"ok": True}  # its pooled connection dropped it: sent again, transparently
    key = f"127.0.0.1:{server.port}"
    assert len(server.heads) == 3 and pool.opened[key] == 2 and pool.sent[key] == 3


async def test_a_fresh_connection_dropped_before_the_answer_is_not_retried(pool: HttpPool) -> None:
    async def drop(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    with RawServer(drop) as server, pytest.raises(UpstreamUnavailable, match="dropped") as info:
        await call(pool, dep(server.url))
    assert info.value.retryable and len(server.heads) == 1


async def test_connect_refused(pool: HttpPool) -> None:
    port = free_port()
    with pytest.raises(UpstreamConnectError, match=f"127.0.0.1:{port}") as info:
        await call(pool, dep(f"http://127.0.0.1:{port}"))
    assert info.value.retryable and pool.opened == {} and pool.connections() == (0, 0)


async def test_whole_call_timeout_and_the_connection_is_not_reused(pool: HttpPool) -> None:
    async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(0.2)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")  # never finishes
        await asyncio.sleep(5)

    with RawServer(silent) as server:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"0\.3 s"):
            await call(pool, dep(server.url, timeout_s=0.3))
        assert 0.25 < time.monotonic() - started < 1.0  # the whole call, not per read
    assert pool.connections() == (0, 0)


@pytest.mark.parametrize(
    "framing",
    [
        b'transfer-encoding: chunked\r\n\r\n5\r\n{"ok"\r\n7\r\n: true}\r\n0\r\n\r\n',
        b"content-length: 12\r\n\r\n" + OK,
    ],
    ids=["chunked", "content-length"],
)
async def test_chunked_and_content_length_bodies(pool: HttpPool, framing: bytes) -> None:
    async def serve(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Custom-Header: v\r\n" + framing)

    with RawServer(serve) as server:
        d = dep(server.url)
        for _ in range(3):
            assert await call(pool, d) == {"ok": True}
        async with post(pool, d, d.base_url + "/x", b"{}", {}, streaming=True) as resp:
            assert resp.headers["x-custom-header"] == "v"  # names lower-cased
    assert server.connections == 1


async def test_body_until_the_connection_ends_is_read_and_not_reused(pool: HttpPool) -> None:
    async def close_delimited(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + OK)

    with RawServer(close_delimited) as server:
        d = dep(server.url)
        assert await call(pool, d) == {"ok": True}
        assert await call(pool, d) == {"ok": True}
    assert server.connections == 2 and pool.connections() == (0, 0)


async def test_keep_alive_expiry() -> None:
    pool = HttpPool(PoolSettings(keepalive_s=0.05))
    await pool.start()
    try:
        with RawServer(keep_answering) as server:
            await call(pool, dep(server.url))
            await asyncio.sleep(0.2)
            assert pool.connections() == (0, 0)  # closed by the sweep
            await call(pool, dep(server.url))
    finally:
        await pool.close()
    assert server.connections == 2


def sse(data: bytes) -> bytes:
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def test_stream_is_delivered_incrementally(pool: HttpPool) -> None:
    async def stepwise(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(STREAM_HEAD + sse(b"1"))
        await asyncio.get_running_loop().run_in_executor(None, server.release.wait, 5)  # until the client saw "1"
        writer.write(sse(b"2") + b"0\r\n\r\n")
        await server.read_request(reader)

    with RawServer(stepwise) as server:
        d = dep(server.url)
        got = []
        async with post(pool, d, d.base_url + "/x", b"{}", {}, streaming=True) as resp:
            async for _event, data in sse_events(resp, d):
                got.append(data)
                server.release.set()
        assert got == [b"1", b"2"] and pool.connections() == (1, 0)


async def test_dropped_mid_stream_and_stalled_stream(pool: HttpPool) -> None:
    async def cut(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(STREAM_HEAD + sse(b"1"))
        await writer.drain()
        if len(server.heads) == 2:
            await asyncio.sleep(5)  # the second one stalls

    with RawServer(cut) as server:
        for expected, match in ((UpstreamStreamBroken, "broken"), (UpstreamTimeout, "stalled")):
            d = dep(server.url, timeout_s=0.2)
            got: list[bytes] = []

            async def read_all(d: Deployment = d, got: list[bytes] = got) -> None:
                async with post(pool, d, d.base_url + "/x", b"{}", {}, streaming=True) as resp:
                    async for _event, data in sse_events(resp, d):
                        got.append(data)

            with pytest.raises(expected, match=match):
                await read_all()
            assert got == [b"1"]
    assert pool.connections() == (0, 0)


OPENSSL_SELF_SIGNED = ("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x")


def self_signed(tmp: Path) -> ssl.SSLContext:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [*OPENSSL_SELF_SIGNED, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_tls_certificates_are_verified(pool: HttpPool, tmp_path: Path) -> None:
    server = RawServer(keep_answering, ssl_context=self_signed(tmp_path))
    with server, pytest.raises(UpstreamConnectError, match="cannot connect"):
        await call(pool, dep(f"https://127.0.0.1:{server.port}"))
    assert server.heads == []  # nothing was sent to a server that could not prove who it is
