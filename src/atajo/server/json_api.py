"""What the JSON APIs beside the proxy share (cache operations, keys and tenants, files and batches, queued
requests): each call is authenticated, answered as JSON, and any ``AtajoError`` becomes its OpenAI-format
error; a store's own failures are a 503 rather than a crash."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar

from atajo.core.context import Principal, RequestContext
from atajo.errors import AtajoError, PermissionDenied, ServiceUnavailable
from atajo.server.edge import Request, Response
from atajo.server.respond import error_response, json_response
from atajo.types import JSONObject

Authenticate = Callable[[Mapping[str, str]], Awaitable[Principal]]
RequestIdOf = Callable[[Request], str]
Answer = JSONObject | tuple[int, JSONObject] | Response
"""A body (200), a status and a body, or a response of the handler's own (files' raw content)."""
Handle = Callable[[Principal, Request], Awaitable[Answer]]


class JsonApi:
    route: ClassVar[str]
    """The ``route`` label of these calls in metrics and logs."""
    admin_only: ClassVar[str | None] = None
    """Set: every call needs the master key, and this is what others are told (403)."""
    store_errors: ClassVar[tuple[type[Exception], ...]] = ()
    store_down: ClassVar[str] = "The store is unavailable; try again shortly."
    """What a call that failed with one of ``store_errors`` is answered (503)."""

    authenticate: Authenticate
    request_id: RequestIdOf

    async def _call(self, request: Request, handle: Handle) -> Response:
        ctx = RequestContext(request_id=self.request_id(request), route=self.route, headers=request.headers)
        try:
            principal = await self.authenticate(request.headers)
            if self.admin_only is not None and not principal.is_admin:
                raise PermissionDenied(self.admin_only)
            answer = await handle(principal, request)
            if isinstance(answer, Response):
                return answer
            status, body = answer if isinstance(answer, tuple) else (200, answer)
            return json_response(body, ctx, status)
        except self.store_errors:
            return error_response(ServiceUnavailable(self.store_down), ctx)
        except AtajoError as err:
            return error_response(err, ctx)
