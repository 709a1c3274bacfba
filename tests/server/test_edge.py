"""The HTTP/1.1 edge itself, over raw sockets: framing, limits, timeouts, flow, shutdown.

Most tests serve a small echo dispatcher on an :class:`EdgeServer` with short timeouts; the auth and body-limit
tests run against a real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from atajo.errors import PayloadTooLarge
from atajo.server.edge import EdgeServer, Limits, Reply, Request, Response
from tests.conftest import GatewayFactory

CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Echo:
    """Answers with the request's body and a few of its fields; ``/slow`` waits, ``/stream`` streams forever."""

    def __init__(self) -> None:
        self.stream_closed = asyncio.Event()

    async def __call__(self, request: Request) -> Reply:
        if request.path == "/slow":
            await asyncio.sleep(0.3)
        if request.path == "/stream":
            stream = request.stream(200, {"content-type": "text/event-stream"})
            try:
                while True:
                    await stream.write(b"data: x\n\n")
                    await asyncio.sleep(0.01)
            except ConnectionResetError:
                self.stream_closed.set()
            return stream
        if request.path == "/auth" and request.headers.get("authorization") != "Bearer ok":
            return Response(401, {"content-type": "text/plain"}, b"no")
        try:
            body = await request.body()
        except PayloadTooLarge:
            return Response(413, {}, b"too large")
        headers = {"x-path": request.path, "x-query": request.query, "x-id": request.headers.get("x-id", "")}
        return Response(200, headers, body)


@pytest.fixture
async def edge() -> AsyncIterator[tuple[EdgeServer, Echo]]:
    echo = Echo()
    limits = Limits(max_body_bytes=4096, max_header_bytes=8192, header_timeout_s=0.3, keep_alive_s=0.3)
    server = EdgeServer(echo, limits)
    await server.listen(host="127.0.0.1", port=0)
    yield server, echo
    await server.shutdown(1)


async def connect(port: int) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def test_pipelined_requests_are_answered_in_order(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(
        b"GET /slow HTTP/1.1\r\nhost: x\r\nx-id: 1\r\n\r\n"
        b"POST /b?q=2 HTTP/1.1\r\nhost: x\r\nx-id: 2\r\ncontent-length: 3\r\n\r\nabc"
        b"GET /c HTTP/1.1\r\nhost: x\r\nx-id: 3\r\n\r\n"
    )
    answers = [await read_response(reader) for _ in range(3)]
    assert [h["x-id"] for _, h, _ in answers] == ["1", "2", "3"]
    assert answers[1][1]["x-query"] == "q=2"
    assert answers[1][2] == b"abc"
    assert all(h["date"].endswith("GMT") for _, h, _ in answers)
    writer.close()


async def test_chunked_request_body(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"POST /e HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await asyncio.sleep(0.05)
    writer.write(b"6\r\n world\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"hello world")
    writer.close()


async def test_chunked_body_over_the_limit_is_413(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"POST /e HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
    for _ in range(5):
        writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")  # 5 KB, over the 4 KB limit; the end never sent
    status, headers, _ = await read_response(reader)
    assert status == 413
    assert headers["connection"] == "close"
    assert await closed(reader)
    writer.close()


async def test_expect_100_continue(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"POST /e HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ping")
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"ping")
    writer.close()


async def test_expect_100_continue_refused_sends_no_continue(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"POST /auth HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 401  # not 100: the client never sends the body
    assert headers["connection"] == "close"
    writer.close()


async def test_head_has_the_length_but_no_body(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nGET /g HTTP/1.1\r\nhost: x\r\nx-id: after\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 0\r\n" in head
    status, headers, _ = await read_response(reader)  # the next answer follows at once: no body in between
    assert (status, headers["x-id"]) == (200, "after")
    writer.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_and_closed(edge: tuple[EdgeServer, Echo], raw: bytes) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(raw)
    status, headers, body = await read_response(reader)
    assert status == 400
    assert headers["connection"] == "close"
    assert b"Traceback" not in body
    assert await closed(reader)
    writer.close()


async def test_header_block_too_large_is_431(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10_000 + b"\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 431
    assert await closed(reader)
    writer.close()


async def test_idle_keep_alive_connection_is_closed(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    assert await closed(reader)  # after keep_alive_s (0.3 s) with nothing sent
    writer.close()


async def test_slow_headers_time_out(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n")
    await asyncio.sleep(0.2)
    writer.write(b"x-more: 1\r\n")  # trickling bytes does not extend header_timeout_s (0.3 s)
    status, _, _ = await read_response(reader)
    assert status == 408
    assert await closed(reader)
    writer.close()


async def test_connection_close_is_honoured(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    _, headers, _ = await read_response(reader)
    assert headers["connection"] == "close"
    assert await closed(reader)
    writer.close()


async def test_client_leaving_mid_stream_is_seen(edge: tuple[EdgeServer, Echo]) -> None:
    server, echo = edge
    reader, writer = await connect(server.port)
    writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"transfer-encoding: chunked" in head
    event = b"9\r\ndata: x\n\n\r\n"
    assert await asyncio.wait_for(reader.readexactly(len(event)), 5) == event  # one event per chunk
    writer.close()
    await asyncio.wait_for(echo.stream_closed.wait(), 5)


async def test_shutdown_lets_in_flight_requests_finish(edge: tuple[EdgeServer, Echo]) -> None:
    server, _ = edge
    port = server.port
    busy_reader, busy_writer = await connect(port)
    idle_reader, idle_writer = await connect(port)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.sleep(0.05)
    shutdown = asyncio.create_task(server.shutdown(5))
    status, headers, _ = await read_response(busy_reader)
    assert status == 200
    assert headers["connection"] == "close"
    assert await closed(idle_reader)  # idle connections are closed at once
    await shutdown
    with pytest.raises(OSError):
        await connect(port)
    busy_writer.close()
    idle_writer.close()


async def test_gateway_refuses_a_declared_oversize_body_without_reading_it(gateway: GatewayFactory) -> None:
    gw = gateway({"server": {"max_body_bytes": 2048}})
    reader, writer = await connect(gw.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n" + b"{" * 100)
    status, headers, body = await read_response(reader)  # 10 MB announced, 100 bytes sent
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "request_too_large"
    assert headers["connection"] == "close"
    writer.close()


async def test_gateway_checks_the_key_before_the_body(gateway: GatewayFactory) -> None:
    gw = gateway({"auth": {"master_key": "sk-master"}})
    reader, writer = await connect(gw.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n")
    status, _, body = await read_response(reader)  # no body byte was sent
    assert status == 401
    assert orjson.loads(body)["error"]["type"] == "authentication_error"
    writer.close()


async def test_gateway_keep_alive_and_pipelining(gateway: GatewayFactory) -> None:
    gw = gateway()
    reader, writer = await connect(gw.port)
    post = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nx-request-id: r%d\r\n\r\n%b"
    writer.write(b"".join(post % (len(CHAT), i, CHAT) for i in range(3)))
    ids = []
    for _ in range(3):
        status, headers, _ = await read_response(reader)
        assert status == 200
        ids.append(headers["x-request-id"])
    assert ids == ["r0", "r1", "r2"]
    writer.write(b"GET /v1/models/gpt-4o-mini HTTP/1.1\r\nhost: x\r\n\r\nPOST /v1/models/x HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    status, headers, _ = await read_response(reader)
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    writer.close()


async def test_http_1_0_stream_is_unframed_and_ends_with_the_close(edge: tuple[EdgeServer, Echo]) -> None:
    reader, writer = await connect(edge[0].port)
    writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"transfer-encoding" not in head
    assert b"connection: close" in head
    assert await asyncio.wait_for(reader.readexactly(9), 5) == b"data: x\n\n"
    writer.close()
