"""Sending one request through the pool and translating the client's failures into the error tree."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager

import orjson

from atajo.core.deployments import Deployment
from atajo.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from atajo.providers.connection import (
    ClientError,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    ReadTimeout,
    Response,
)
from atajo.providers.pool import HttpPool
from atajo.providers.status import error_for_status
from atajo.types import JSONObject


def describe(deployment: Deployment) -> str:
    return f"deployment {deployment.id}"


def deployment_headers(deployment: Deployment, **fixed: str) -> dict[str, str]:
    """Headers for every call to a deployment: JSON, its credentials in its auth header, its own extras."""
    headers = {"content-type": "application/json", **fixed}
    if deployment.api_key:
        if deployment.auth_header == "authorization":
            headers["authorization"] = f"Bearer {deployment.api_key}"
        else:
            headers[deployment.auth_header] = deployment.api_key
    headers.update(deployment.headers)
    return headers


def error_message(raw: bytes) -> tuple[str, str | None]:
    """The provider's error message and param from an OpenAI- or Anthropic-shaped error body."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:200].decode("utf-8", "replace").strip()
        return (text or "no error body"), None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err.get("type") or "error"), err.get("param")
    if isinstance(err, str):
        return err, None
    return str(data)[:200], None


async def post_json(
    pool: HttpPool, deployment: Deployment, url: str, payload: bytes, headers: Mapping[str, str]
) -> JSONObject:
    """POST and return the 2xx answer's JSON object; any failure comes out as an ``UpstreamError``.

    The plain (non-streaming) call, written without a context-manager generator: it is the hot path.
    """
    pool.count_sent(deployment.base_url)
    try:
        resp = await pool.request(url, payload, headers, pool.timeout(deployment, False))
    except ClientError as exc:
        raise _translate(exc, deployment) from None
    raw = resp.body()
    if resp.status >= 300:
        raise _status_error(resp, raw, deployment)
    return decode_object(raw, deployment)


async def call(
    pool: HttpPool,
    deployment: Deployment,
    method: str,
    url: str,
    payload: bytes,
    headers: Mapping[str, str],
) -> bytes:
    """Any method, the 2xx answer's body as bytes (a file's content); failures as in :func:`post_json`."""
    pool.count_sent(deployment.base_url)
    try:
        resp = await pool.request(url, payload, headers, pool.timeout(deployment, False), method)
    except ClientError as exc:
        raise _translate(exc, deployment) from None
    raw = resp.body()
    if resp.status >= 300:
        raise _status_error(resp, raw, deployment)
    return raw


async def call_json(
    pool: HttpPool,
    deployment: Deployment,
    method: str,
    url: str,
    body: JSONObject | None,
    headers: Mapping[str, str],
) -> JSONObject:
    """:func:`call` with a JSON body (or none) and a JSON object for an answer (the Batch APIs' calls)."""
    payload = orjson.dumps(body) if body is not None else b""
    return decode_object(await call(pool, deployment, method, url, payload, headers), deployment)


@asynccontextmanager
async def post(
    pool: HttpPool,
    deployment: Deployment,
    url: str,
    payload: bytes,
    headers: Mapping[str, str],
    *,
    streaming: bool,
) -> AsyncIterator[Response]:
    """POST and yield a 2xx response (for streams); any failure comes out as an ``UpstreamError``.

    Redirects are not followed: the request goes to the configured URL or nowhere, so an upstream (or
    anything in front of it) cannot send the body and the deployment's credentials to another host.
    """
    pool.count_sent(deployment.base_url)
    try:
        resp = await pool.request(url, payload, headers, pool.timeout(deployment, streaming))
    except ClientError as exc:
        raise _translate(exc, deployment) from None
    try:
        if resp.status >= 300:
            raise _status_error(resp, await resp.read(), deployment)
        yield resp
    except ClientError as exc:
        raise _translate(exc, deployment) from None
    finally:
        pool.release(resp)


def _status_error(resp: Response, raw: bytes, deployment: Deployment) -> UpstreamError:
    message, param = error_message(raw)
    return error_for_status(
        resp.status, message, where=describe(deployment), retry_after=resp.headers.get("retry-after"), param=param
    )


def _translate(exc: ClientError, deployment: Deployment) -> UpstreamError:
    """The client's failures → the error tree (anything else, a bug or a cancellation, is not caught)."""
    where = describe(deployment)
    if isinstance(exc, ConnectFailed):
        return UpstreamConnectError(f"{where}: cannot connect to {exc.host}:{exc.port}")
    if isinstance(exc, ConnectTimeout):
        return UpstreamConnectError(f"{where}: no connection in time (host unreachable or connection pool full)")
    if isinstance(exc, ReadTimeout):
        return UpstreamTimeout(f"{where}: no answer within {deployment.timeout_s:g} s")
    if isinstance(exc, Disconnected):
        return UpstreamUnavailable(f"{where}: connection dropped (ServerDisconnected)")
    return UpstreamUnavailable(f"{where}: connection dropped ({type(exc).__name__})")


def decode_object(
    raw: bytes, deployment: Deployment, what: str = "an answer", error: type[UpstreamError] = UpstreamUnavailable
) -> JSONObject:
    """A provider's JSON object: a whole answer, or one stream event (``error=UpstreamStreamBroken``)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(f"{describe(deployment)} sent {what} that is not JSON (invalid JSON at {exc.pos})") from None
    if not isinstance(data, dict):
        raise error(f"{describe(deployment)} sent {what} that is a JSON {type(data).__name__}, not an object")
    return data


async def finish(resp: Response, within_s: float = 0.5) -> None:
    """Read what is left of a response whose answer is complete (a stream after its last event), so its
    connection goes back to the pool: a connection released with unread bytes on it is closed instead.

    The end of a chunked body normally arrives with the last event or right after it; an upstream that
    holds the stream open longer is not waited for, and its connection is closed as before.
    """
    try:
        async with asyncio.timeout(within_s):
            while not resp.at_eof():
                if not await resp.readany():
                    break
    except (TimeoutError, ClientError):
        pass


async def sse_events(resp: Response, deployment: Deployment) -> AsyncGenerator[tuple[str, bytes], None]:
    """(event, data) pairs of a server-sent-event stream; mid-stream failures become UpstreamStreamBroken."""
    event, data, rest = "", b"", b""
    try:
        while True:
            chunk = await resp.readany()
            if not chunk:
                lines = [rest] if rest else []
            else:
                lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
                rest = lines.pop()
            for raw_line in lines:
                line = raw_line.rstrip(b"\r")
                if not line:
                    if data:
                        yield event, data
                    event, data = "", b""
                elif line.startswith(b"data:"):
                    part = line[5:].lstrip(b" ")
                    data = part if not data else data + b"\n" + part
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode("utf-8", "replace")
            if not chunk:
                break
        if data:
            yield event, data
    except ReadTimeout:
        raise UpstreamTimeout(f"{describe(deployment)}: stream stalled for {deployment.timeout_s:g} s") from None
    except ClientError as exc:
        raise UpstreamStreamBroken(f"{describe(deployment)}: stream broken ({type(exc).__name__})") from None
