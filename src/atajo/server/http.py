"""Routes and handlers: read the body, parse it into a core request, run the pipeline, write the answer.

Every failure is answered in OpenAI's error format with the right status; an unexpected exception is
logged with its trace and answered as a plain 500 naming the request id, never with the trace.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from random import getrandbits

import orjson

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
from atajo.server.edge import Reply, Response
from atajo.server.edge import Request as HttpRequest
from atajo.server.openapi import openapi_document
from atajo.server.parse import decode, parse_chat, parse_embeddings
from atajo.server.respond import JSON_TYPE, error_response, json_response, stream_response
from atajo.types import JSONObject

log = logging.getLogger("atajo.server")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
Handle = Callable[[HttpRequest], Awaitable[Reply]]
Route = tuple[str, str, Handle]
Defer = Callable[[Principal, str, Request, RequestContext], Awaitable[Response]]
"""Queue a checked request for the deferred lane (``x-atajo-priority: batch``): its 202 answer."""


class RequestIds:
    """Ids need to be unique, not secret: a random per-process prefix and a counter cost next to nothing."""

    def __init__(self) -> None:
        self._prefix = f"req_{getrandbits(64):016x}"
        self._counter = itertools.count(1)

    def __call__(self, request: HttpRequest) -> str:
        given = request.headers.get("x-request-id")
        return given if given and _REQUEST_ID.match(given) else f"{self._prefix}{next(self._counter):08x}"


def request_id(request: HttpRequest) -> str:
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
        on_answer: Callable[[Principal, int, str], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.model_names = model_names
        self.authenticate = authenticate
        self.ready_checks = ready_checks or {}
        self.on_answer = on_answer
        """Told (principal, status, error code) of every authenticated model request: the adaptive limits
        judge a client's behaviour from it."""
        self.accepting = False
        self.request_id = RequestIds()
        self._openapi: bytes | None = None
        self.defer: Defer | None = None
        """Set when the deferred lane is on (``server/deferred_requests.py``)."""

    def routes(self) -> list[Route]:
        """(method, path, handler); a path ending in ``/`` is a prefix whose rest is one path segment."""
        return [
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/chat/completions", self.chat_completions),
            ("POST", "/v1/embeddings", self.embeddings),
            ("POST", "/embeddings", self.embeddings),
            ("GET", "/v1/models", self.list_models),
            ("GET", "/v1/models/", self.get_model),
            ("GET", "/health", self.health),
            ("GET", "/ready", self.ready),
            ("GET", "/metrics", self.prometheus),
            ("GET", "/openapi.json", self.openapi),
        ]

    # --- model endpoints ------------------------------------------------------------------------

    async def chat_completions(self, request: HttpRequest) -> Reply:
        return await self._run(request, "chat", parse_chat)

    async def embeddings(self, request: HttpRequest) -> Reply:
        return await self._run(request, "embeddings", parse_embeddings)

    async def _run(self, request: HttpRequest, route: str, parse: Callable[[JSONObject], Request]) -> Reply:
        ctx = RequestContext(request_id=self.request_id(request), route=route, headers=request.headers)
        self.metrics.in_flight.value += 1
        status, code = 200, ""
        try:
            ctx.principal = await self.authenticate(request.headers)
            core = parse(decode(await self._body(request)))
            if request.headers.get("x-atajo-priority", "").strip().lower() == "batch":
                if self.defer is None:
                    raise InvalidRequest(
                        "x-atajo-priority: batch is not taken: the deferred lane is off on this gateway "
                        "(batches.enabled).",
                        code="batches_disabled",
                    )
                deferred = await self.defer(ctx.principal, route, core, ctx)
                status = deferred.status
                self._record_overhead(ctx)
                return deferred
            result = await self.pipeline(core, ctx)
            if isinstance(result, Completion):
                resp: Reply = json_response(result.raw or result.body, ctx)
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
            if self.on_answer is not None and ctx.principal is not None:
                self.on_answer(ctx.principal, status, code)

    def _record_overhead(self, ctx: RequestContext) -> None:
        # For streams, the figure at the headers: later time is spent writing to a possibly slow client.
        overhead_ms = ctx.reported_overhead_ms if ctx.reported_overhead_ms is not None else ctx.overhead_ms()
        self.metrics.overhead.labels(ctx.route).observe(overhead_ms / 1000)

    async def _body(self, request: HttpRequest) -> bytes:
        return await request.body()  # the edge holds it to max_body_bytes (413), declared or while reading

    # --- listing ----------------------------------------------------------------------------------

    def _ctx(self, request: HttpRequest, route: str) -> RequestContext:
        return RequestContext(request_id=self.request_id(request), route=route, headers=request.headers)

    async def list_models(self, request: HttpRequest) -> Response:
        ctx = self._ctx(request, "models")
        try:
            await self.authenticate(request.headers)
        except AuthenticationFailed as err:
            return error_response(err, ctx)
        data = [_model_object(name) for name in self.model_names()]
        return json_response({"object": "list", "data": data}, ctx)

    async def get_model(self, request: HttpRequest) -> Response:
        ctx = self._ctx(request, "models")
        name = request.path[len("/v1/models/") :]
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

    def _plain(self, request: HttpRequest, body: bytes, content_type: str, status: int = 200) -> Response:
        """Operations answers carry a request id too, so every response can be traced."""
        headers = {"content-type": content_type, "x-request-id": self.request_id(request)}
        return Response(status, headers, body)

    async def health(self, request: HttpRequest) -> Response:
        return self._plain(request, b'{"status":"ok"}', JSON_TYPE)

    async def ready(self, request: HttpRequest) -> Response:
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
            body["error"] = err.to_openai()
        return self._plain(request, orjson.dumps(body), JSON_TYPE, 200 if ok else 503)

    async def prometheus(self, request: HttpRequest) -> Response:
        return self._plain(request, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: HttpRequest) -> Response:
        if self._openapi is None:
            self._openapi = orjson.dumps(openapi_document())
        return self._plain(request, self._openapi, JSON_TYPE)


def _model_object(name: str) -> JSONObject:
    return {"id": name, "object": "model", "created": 0, "owned_by": "atajo"}


class Router:
    """Routes on (method, path), plus prefixes for one trailing path segment (``/v1/models/{id}``; a segment
    may hold an encoded ``/``, decoded before routing, unless a deeper route of the method takes it); and what
    was the errors middleware: unknown routes (404), wrong methods (405 with ``allow``) and anything unexpected
    (a plain 500 naming the request id, the trace only in the log), all in OpenAI's error format."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._exact: dict[tuple[str, str], Handle] = {}
        self._prefixes: list[tuple[str, str, Handle, bool]] = []
        self._templates: list[tuple[str, str, tuple[str, ...], Handle]] = []
        self._methods: dict[str, set[str]] = {}
        self._exact_paths: set[str] = set()
        self.add(routes)

    def add(self, routes: Iterable[Route]) -> None:
        """A path ending in ``/`` is a prefix whose rest is one segment; ending in ``/*``, two or more."""
        for method, path, handle in routes:
            if "{" in path:
                self._templates.append((method, path, tuple(path.split("/")), handle))
            elif path.endswith("/*"):
                self._prefixes.append((method, path[:-1], handle, True))
            elif path.endswith("/"):
                self._prefixes.append((method, path, handle, False))
            else:
                self._exact[method, path] = handle
                self._exact_paths.add(path)
            methods = self._methods.setdefault(path, set())
            methods.add(method)
            if method == "GET":
                methods.add("HEAD")

    def _find(self, method: str, path: str) -> tuple[Handle | None, str]:
        """The handler, and the path pattern that matched (for 405's ``allow``), or (None, "") for none."""
        handle = self._exact.get((method, path)) or (self._exact.get(("GET", path)) if method == "HEAD" else None)
        if handle is not None:
            return handle, path
        if path in self._exact_paths:  # not a pattern's own text: `/admin/keys/*` may be a key id's path
            return None, path
        if self._templates:
            found = self._match_template(method, path)
            if found[1]:
                return found
        matched = ""
        segment: tuple[Handle, str] | None = None
        for route_method, prefix, prefix_handle, deep in self._prefixes:
            rest = path[len(prefix) :]
            if not path.startswith(prefix) or not rest:
                continue
            same = route_method == method or (method == "HEAD" and route_method == "GET")
            if deep == ("/" in rest):
                pattern = prefix + "*" if deep else prefix
                if same:
                    return prefix_handle, pattern
                matched = matched or pattern
            elif same and not deep and segment is None:
                segment = prefix_handle, prefix
        # The edge decodes the path before routing, so one segment may have held an encoded "/" (an id):
        # a one-segment route of this method takes it (its handler answers for the id) rather than a 405.
        return segment if segment is not None else (None, matched)

    def _match_template(self, method: str, path: str) -> tuple[Handle | None, str]:
        """Paths like ``/v1/files/{file_id}/content``: each ``{…}`` is one non-empty segment."""
        segments = path.split("/")
        matched = ""
        for route_method, template, parts, handle in self._templates:
            if len(parts) != len(segments):
                continue
            if all(p == s or (p.startswith("{") and s) for p, s in zip(parts, segments, strict=True)):
                if route_method == method or (method == "HEAD" and route_method == "GET"):
                    return handle, template
                matched = template
        return None, matched

    async def dispatch(self, request: HttpRequest) -> Reply:
        handle, pattern = self._find(request.method, request.path)
        try:
            if handle is not None:
                return await handle(request)
        except PayloadTooLarge as err:  # a handler that does not map the edge's 413 itself
            return error_response(err, RequestContext(request_id=request_id(request), route="other", headers={}))
        except Exception:
            rid = request_id(request)
            log.exception("unexpected error in %s %s (request %s)", request.method, request.path, rid)
            crash = AtajoError(f"The gateway had an internal error; request id {rid}.")
            return error_response(crash, RequestContext(request_id=rid, route="other", headers={}))
        ctx = RequestContext(request_id=request_id(request), route="other", headers={})
        if not pattern:
            return error_response(NotFound(f"Unknown request URL: {request.method} {request.path}."), ctx)
        wrong = MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
        resp = error_response(wrong, ctx)
        resp.headers["allow"] = ", ".join(sorted(self._methods[pattern]))
        return resp
