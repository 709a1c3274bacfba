"""Core results and errors → HTTP responses: JSON bodies, SSE streams, OpenAI-format errors, our headers."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator

import orjson

from atajo.core.context import RequestContext
from atajo.errors import AtajoError, ClientClosed
from atajo.server.edge import Request, Response, Stream
from atajo.types import JSONObject

log = logging.getLogger("atajo.server")

JSON_TYPE = "application/json"
SSE_DONE = b"data: [DONE]\n\n"


def error_body(err: AtajoError) -> bytes:
    return orjson.dumps({"error": err.to_openai()})


def atajo_headers(ctx: RequestContext) -> dict[str, str]:
    ctx.reported_overhead_ms = ctx.overhead_ms()  # what the client is told is what metrics record
    headers = {
        "x-request-id": ctx.request_id,
        "x-atajo-cache": ctx.cache_status,
        "x-atajo-attempts": str(ctx.attempts),
        "x-atajo-overhead-ms": f"{ctx.reported_overhead_ms:.3f}",
    }
    if ctx.routed_model:
        headers["x-atajo-model"] = ctx.routed_model
    if ctx.deployment:
        headers["x-atajo-deployment"] = ctx.deployment
    if ctx.simulated:
        headers["x-atajo-simulated"] = "true"
    if ctx.cache_age_s is not None:
        headers["age"] = str(int(ctx.cache_age_s))
    if ctx.cache_key is not None:
        headers["x-atajo-cache-key"] = ctx.cache_key.partition("/")[2]  # without the tenant
    if ctx.coalesced:
        headers["x-atajo-coalesced"] = "true"
    if ctx.route_reason is not None:
        headers["x-atajo-route-reason"] = ctx.route_reason
    if ctx.cost_estimate_micros is not None:
        headers["x-atajo-cost-estimate-micros"] = str(ctx.cost_estimate_micros)
    if ctx.extra_headers:
        headers.update(ctx.extra_headers)
    return headers


def error_response(err: AtajoError, ctx: RequestContext) -> Response:
    headers = atajo_headers(ctx)
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after is not None or err.status in (429, 503):
        seconds = retry_after if isinstance(retry_after, (int, float)) and math.isfinite(retry_after) else 1
        headers["retry-after"] = str(max(1, math.ceil(seconds)))
    headers["content-type"] = JSON_TYPE
    return Response(err.status, headers, error_body(err))


def json_response(body: JSONObject | bytes, ctx: RequestContext, status: int = 200) -> Response:
    """``body`` as an object, or already encoded (an answer from the cache)."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)  # before the headers: overhead counts it
    headers = atajo_headers(ctx)
    headers["content-type"] = JSON_TYPE
    return Response(status, headers, payload)


def sse_event(chunk: JSONObject) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def stream_response(
    request: Request, ctx: RequestContext, chunks: AsyncGenerator[JSONObject, None], include_usage: bool
) -> tuple[Stream, AtajoError | None]:
    """Write chunks as server-sent events. A failure after the headers went out is sent as an OpenAI error
    event (the SDK raises it) and returned, since the status can no longer change."""
    headers = atajo_headers(ctx)
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    headers["content-type"] = "text/event-stream"
    failure: AtajoError | None = None
    resp = request.stream(200, headers)
    try:
        try:
            async for chunk in chunks:
                if not include_usage and not chunk.get("choices") and chunk.get("usage"):
                    continue  # the usage chunk we asked for ourselves
                await resp.write(sse_event(chunk))
            await resp.write(SSE_DONE)
        except AtajoError as err:
            failure = err
            log.warning("stream %s failed after headers: %s", ctx.request_id, err.message)
            await resp.write(b"data: " + error_body(err) + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            # The status is sent; the client must still learn the stream failed rather than see it just stop.
            log.exception("unexpected error in stream %s", ctx.request_id)
            failure = AtajoError(f"The gateway had an internal error; request id {ctx.request_id}.")
            await resp.write(b"data: " + error_body(failure) + b"\n\n")
        await resp.end()
    except ConnectionResetError:
        log.debug("client of %s went away mid-stream", ctx.request_id)
        failure = ClientClosed("the client closed the connection mid-stream")
    finally:
        await chunks.aclose()
    return resp, failure
