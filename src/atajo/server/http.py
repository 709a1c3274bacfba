"""Routes and handlers: read the body, parse it into a core request, run the pipeline, write the answer.

Every failure is answered in OpenAI's error format with the right status; an unexpected exception is
logged with its trace and answered as a plain 500 naming the request id, never with the trace.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from random import getrandbits

import orjson
from aiohttp import web

from atajo.core.context import Principal, RequestContext
from atajo.core.pipeline import Handler
from atajo.core.requests import Request
from atajo.core.results import Completion
from atajo.errors import (
    AtajoError,
    AuthenticationFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from atajo.observe.metrics import GatewayMetrics
from atajo.server.openapi import openapi_document
from atajo.server.parse import decode, parse_chat, parse_embeddings
from atajo.server.respond import JSON_TYPE, error_response, json_response, stream_response
from atajo.types import JSONObject

log = logging.getLogger("atajo.server")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


class RequestIds:
    """Ids need to be unique, not secret: a random per-process prefix and a counter cost next to nothing."""

    def __init__(self) -> None:
        self._prefix = f"req_{getrandbits(64):016x}"
        self._counter = itertools.count(1)

    def __call__(self, request: web.Request) -> str:
        given = request.headers.get("x-request-id")
        return given if given and _REQUEST_ID.match(given) else f"{self._prefix}{next(self._counter):08x}"


def request_id(request: web.Request) -> str:
    """For the rare paths outside a server instance (unknown routes, crashes)."""
    given = request.headers.get("x-request-id")
    return given if given and _REQUEST_ID.match(given) else f"req_{getrandbits(96):024x}"


class GatewayServer:
    def __init__(
        self,
        pipeline: Handler,
        metrics: GatewayMetrics,
        *,
        max_body_bytes: int,
        model_names: Callable[[], list[str]],
        authenticate: Callable[[Mapping[str, str]], Awaitable[Principal]],
        ready_checks: dict[str, ReadyCheck] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.model_names = model_names
        self.authenticate = authenticate
        self.ready_checks = ready_checks or {}
        self.accepting = False
        self.request_id = RequestIds()
        self._openapi: bytes | None = None

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/chat/completions", self.chat_completions),
            web.post("/v1/embeddings", self.embeddings),
            web.post("/embeddings", self.embeddings),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
            web.get("/health", self.health),
            web.get("/ready", self.ready),
            web.get("/metrics", self.prometheus),
            web.get("/openapi.json", self.openapi),
        ]

    # --- model endpoints ------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "chat", parse_chat)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "embeddings", parse_embeddings)

    async def _run(
        self, request: web.Request, route: str, parse: Callable[[JSONObject], Request]
    ) -> web.StreamResponse:
        ctx = RequestContext(request_id=self.request_id(request), route=route, headers=request.headers)
        self.metrics.in_flight.value += 1
        status, code = 200, ""
        try:
            ctx.principal = await self.authenticate(request.headers)
            core = parse(decode(await self._body(request)))
            result = await self.pipeline(core, ctx)
            if isinstance(result, Completion):
                resp: web.StreamResponse = json_response(result.raw or result.body, ctx)
            else:
                include_usage = getattr(core, "include_usage", False)
                resp, failure = await stream_response(request, ctx, result.chunks, include_usage)
                code = (failure.code or failure.type) if failure else ""
            self._record_overhead(ctx)
            return resp
        except AtajoError as err:
            status, code = err.status, err.code or err.type
            self._record_overhead(ctx)
            return error_response(err, ctx)
        finally:
            self.metrics.in_flight.value -= 1
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(ctx.elapsed_ns() / 1e9)
            if code:
                self.metrics.errors.labels(route, code).inc()

    def _record_overhead(self, ctx: RequestContext) -> None:
        # For streams, the figure at the headers: later time is spent writing to a possibly slow client.
        overhead_ms = ctx.reported_overhead_ms if ctx.reported_overhead_ms is not None else ctx.overhead_ms()
        self.metrics.overhead.labels(ctx.route).observe(overhead_ms / 1000)

    async def _body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise self._too_large()
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the limit of {self.max_body_bytes} bytes.")

    # --- listing ----------------------------------------------------------------------------------

    def _ctx(self, request: web.Request, route: str) -> RequestContext:
        return RequestContext(request_id=self.request_id(request), route=route, headers=request.headers)

    async def list_models(self, request: web.Request) -> web.Response:
        ctx = self._ctx(request, "models")
        try:
            await self.authenticate(request.headers)
        except AuthenticationFailed as err:
            return error_response(err, ctx)
        data = [_model_object(name) for name in self.model_names()]
        return json_response({"object": "list", "data": data}, ctx)

    async def get_model(self, request: web.Request) -> web.Response:
        ctx = self._ctx(request, "models")
        name = request.match_info["model"]
        try:
            await self.authenticate(request.headers)
            if name not in self.model_names():
                raise NotFound(
                    f"The model `{name}` does not exist or you do not have access to it.",
                    param="model",
                    code="model_not_found",
                )
        except AtajoError as err:
            return error_response(err, ctx)
        return json_response(_model_object(name), ctx)

    # --- operations -------------------------------------------------------------------------------

    def _plain(self, request: web.Request, body: bytes, content_type: str, status: int = 200) -> web.Response:
        """Operations answers carry a request id too, so every response can be traced."""
        headers = {"content-type": content_type, "x-request-id": self.request_id(request)}
        return web.Response(body=body, status=status, headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        return self._plain(request, b'{"status":"ok"}', JSON_TYPE)

    async def ready(self, request: web.Request) -> web.Response:
        checks: dict[str, str] = {}
        ok = self.accepting
        if not self.accepting:
            checks["server"] = "starting or stopping"
        for name, check in self.ready_checks.items():
            passed, detail = await check()
            checks[name] = detail
            ok = ok and passed
        body: JSONObject = {"status": "ready" if ok else "unavailable", "checks": checks}
        if not ok:
            err = ServiceUnavailable("not ready: " + "; ".join(f"{k}: {v}" for k, v in checks.items()))
            body["error"] = _error_dict(err)
        return self._plain(request, orjson.dumps(body), JSON_TYPE, 200 if ok else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return self._plain(request, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = orjson.dumps(openapi_document())
        return self._plain(request, self._openapi, JSON_TYPE)


def _model_object(name: str) -> JSONObject:
    return {"id": name, "object": "model", "created": 0, "owned_by": "atajo"}


def _error_dict(err: AtajoError) -> JSONObject:
    return {"message": err.message, "type": err.type, "param": err.param, "code": err.code}


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes, wrong methods and anything unexpected, in OpenAI's error format."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err: AtajoError
        if exc.status == 404:
            err = NotFound(f"Unknown request URL: {request.method} {request.path}.")
        elif exc.status == 405:
            err = MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
        elif exc.status == 413:
            err = PayloadTooLarge("The request body is too large.")
        else:
            err = InvalidRequest(exc.reason)
            err.status = exc.status
        ctx = RequestContext(request_id=request_id(request), route="other", headers={})
        resp = error_response(err, ctx)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            resp.headers["allow"] = ", ".join(sorted(exc.allowed_methods))
        return resp
    except Exception:
        rid = request_id(request)
        log.exception("unexpected error in %s %s (request %s)", request.method, request.path, rid)
        err = AtajoError(f"The gateway had an internal error; request id {rid}.")
        ctx = RequestContext(request_id=rid, route="other", headers={})
        return error_response(err, ctx)
