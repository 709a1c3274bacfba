"""``x-atajo-priority: batch`` on ``/v1/chat/completions`` and ``/v1/embeddings``: the request is checked
as usual, queued into its tenant's collection (``stages/deferred_collect.py``) and answered ``202 Accepted``
with a handle; ``GET /v1/batches/requests/{id}`` tells where it is and, once answered, gives the answer.

Why 202 and not the answer: a batch may take up to 24 hours, longer than any client waits on one HTTP call.
A client that sends the header knows it gets a handle, not a ``chat.completion``, and polls for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from atajo.batches.store import BatchStore, Queued, QueuedState
from atajo.core.batches import response_of
from atajo.core.context import Principal, RequestContext
from atajo.core.requests import ChatRequest
from atajo.core.requests import Request as CoreRequest
from atajo.errors import InvalidRequest, ModelNotFound, NotFound
from atajo.server.edge import Request, Response
from atajo.server.http import Route
from atajo.server.json_api import Authenticate, JsonApi, RequestIdOf
from atajo.server.respond import json_response
from atajo.stages.deferred import new_id
from atajo.stages.deferred_collect import Collector
from atajo.types import JSONObject

PATH = "/v1/batches/requests/"
ENDPOINTS = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}


class QueuedRequests(JsonApi):
    route = "batches"

    def __init__(
        self,
        store: BatchStore,
        collector: Collector,
        authenticate: Authenticate,
        request_id: RequestIdOf,
        has_model: Callable[[str], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.collector = collector
        self.authenticate = authenticate
        self.request_id = request_id
        self.has_model = has_model
        self.clock = clock

    def routes(self) -> list[Route]:
        return [("GET", PATH + "{request_id}", self.get)]

    async def defer(self, principal: Principal, route: str, request: CoreRequest, ctx: RequestContext) -> Response:
        """Queue an already checked request; 202 with its handle."""
        if isinstance(request, ChatRequest) and request.stream:
            raise InvalidRequest(
                "x-atajo-priority: batch cannot stream: the answer comes later, from "
                "GET /v1/batches/requests/{id}. Leave 'stream' out.",
                param="stream",
            )
        if not self.has_model(request.model):
            raise ModelNotFound(
                f"The model `{request.model}` does not exist or you do not have access to it "
                "(x-atajo-priority: batch takes configured model names).",
                param="model",
            )
        queued = Queued(
            new_id("batchreq_"),
            principal.tenant,
            principal.key_name,
            ENDPOINTS[route],
            request.model,
            request.body,
            self.clock(),
        )
        await self.collector.queue(queued)
        resp = json_response(handle(QueuedState(queued, None, None)), ctx, 202)
        resp.headers["location"] = PATH + queued.id
        return resp

    async def get(self, request: Request) -> Response:
        return await self._call(request, self._get)

    async def _get(self, principal: Principal, request: Request) -> JSONObject:
        request_id = request.path[len(PATH) :]
        state = await self.store.queued(principal.tenant, request_id)
        if state is None:
            raise NotFound(f"No queued request found with id '{request_id[:80]}'.", param="request_id")
        return handle(state)


def handle(state: QueuedState) -> JSONObject:
    """The ``batch.request`` object: status ``queued`` (in its collection), ``in_progress`` (in a batch),
    then ``completed`` (a 2xx answer in ``response``), ``failed`` (a 4xx/5xx answer in ``response``, or an
    ``error`` when it got none), ``expired`` or ``cancelled`` (its batch was; an ``error`` says so)."""
    q, item = state.request, state.item
    status, response, error = "queued", None, None
    if q.batch_id is not None:
        status = "in_progress"
    if item is not None and item.state == "done":
        result = item.result or {}
        response = response_of(result, q.id)
        if response is not None:
            status = "completed" if item.ok else "failed"
        else:
            error = result.get("error") or {"code": "batch_error", "message": "The request got no answer."}
            code = error.get("code") if isinstance(error, dict) else None
            status = {"batch_expired": "expired", "batch_cancelled": "cancelled"}.get(str(code), "failed")
    return {
        "id": q.id,
        "object": "batch.request",
        "endpoint": q.endpoint,
        "model": q.model,
        "status": status,
        "batch_id": q.batch_id,
        "created_at": int(q.created_at),
        "response": response,
        "error": error,
    }
