"""A fast local OpenAI-format upstream for benchmarks: answers at once, from precomputed bytes.

``POST /v1/chat/completions`` returns a small fixed ``chat.completion``; with ``"stream": true`` it sends a
few ``chat.completion.chunk`` server-sent events (the first one immediately), a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. ``POST /v1/embeddings`` answers one small
vector per input (a string or a list of strings). ``GET /health`` answers 200. ``--latency-ms`` delays every
answer, as a real provider would (``benchmarks/coalesce.py``).

    python benchmarks/upstream.py --port 9001 [--chunk-delay-ms 0] [--latency-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from aiohttp import web

MODEL = "bench-model"
CREATED = 1_700_000_000

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    }
)


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNKS: list[bytes] = [
    _event(_chunk({"role": "assistant", "content": ""})),
    _event(_chunk({"content": "Hello!"})),
    _event(_chunk({"content": " How can I"})),
    _event(_chunk({"content": " help you today?"})),
    _event(_chunk({}, "stop")),
]
USAGE_CHUNK = _event(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    }
)
DONE = b"data: [DONE]\n\n"
JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


def build_app(chunk_delay_s: float = 0.0, latency_s: float = 0.0) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if latency_s:
            await asyncio.sleep(latency_s)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.Response(status=400, body=b'{"error":{"message":"bad json","type":"invalid_request_error"}}')
        if not isinstance(body, dict) or not body.get("stream"):
            return web.Response(body=COMPLETION, headers=JSON_HEADERS)
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        for i, chunk in enumerate(CHUNKS):
            if i and chunk_delay_s:
                await asyncio.sleep(chunk_delay_s)
            await resp.write(chunk)
        if usage:
            await resp.write(USAGE_CHUNK)
        await resp.write(DONE)
        await resp.write_eof()
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if latency_s:
            await asyncio.sleep(latency_s)
        given = body.get("input")
        inputs = given if isinstance(given, list) else [given]
        data = [
            {"object": "embedding", "index": i, "embedding": [len(str(t)) / 100, 0.5, 0.25]}
            for i, t in enumerate(inputs)
        ]
        tokens = sum(max(1, len(str(t)) // 4) for t in inputs)
        answer = {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.Response(body=orjson.dumps(answer), headers=JSON_HEADERS)

    async def health(_: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', headers=JSON_HEADERS)

    app = web.Application()
    app.add_routes(
        [
            web.post("/v1/chat/completions", chat),
            web.post("/chat/completions", chat),
            web.post("/v1/embeddings", embeddings),
            web.get("/health", health),
        ]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause between stream chunks after the first")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        pass
    web.run_app(
        build_app(args.chunk_delay_ms / 1000, args.latency_ms / 1000),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
