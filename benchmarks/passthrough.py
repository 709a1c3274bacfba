"""The baseline: a minimal aiohttp pass-through proxy, the least any Python gateway has to do.

It reads the request body, POSTs it unchanged to the same path on the upstream through one pooled
keep-alive ``ClientSession``, and returns the upstream's status, content type and body. When the upstream
answers with server-sent events it streams the bytes through as they arrive. No parsing, no auth, no
metrics, no retries.

    python benchmarks/passthrough.py --port 9002 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
FORWARDED = ("content-type", "authorization")


def build_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name: value for name in FORWARDED if (value := request.headers.get(name))}
        session = request.app[SESSION]
        async with session.post(base + request.path_qs, data=body, headers=headers) as up:
            content_type = up.headers.get("content-type", "application/json")
            if not content_type.startswith("text/event-stream"):
                return web.Response(status=up.status, body=await up.read(), headers={"content-type": content_type})
            resp = web.StreamResponse(
                status=up.status, headers={"content-type": content_type, "cache-control": "no-cache"}
            )
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    async def ready(_: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ready"}', headers={"content-type": "application/json"})

    async def start(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=50, keepalive_timeout=30)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=60, connect=5),
            skip_auto_headers=("User-Agent",),
        )

    async def close(app: web.Application) -> None:
        await app[SESSION].close()

    app = web.Application()
    app.add_routes(
        [
            web.post("/v1/chat/completions", proxy),
            web.post("/v1/embeddings", proxy),
            web.get("/ready", ready),
            web.get("/health", ready),
        ]
    )
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:9001")
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        pass
    web.run_app(build_app(args.upstream), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
