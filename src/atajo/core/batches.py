"""The deferred lane's shared vocabulary: what a provider's Batch API is asked and answers, and what one
deferred request cost.

The worker (``stages/deferred.py``) speaks these types; each provider's Batch API wire format stays in its
adapter (``providers/openai_batch.py``, ``providers/anthropic_batch.py``), except the lines of OpenAI's
format that Atajo's own Batch API writes too (input, output and error lines, below).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from atajo.core.deployments import Deployment
from atajo.types import JSONObject

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
"""What a batch may run (as OpenAI's Batch API names them)."""
UPSTREAM_DONE = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request sent upstream: our own ``custom_id`` (never the client's) and the body, with the
    deployment's model name already in it."""

    custom_id: str
    body: JSONObject


@dataclass(frozen=True, slots=True)
class UpstreamBatch:
    id: str
    status: str
    """The provider's status, in OpenAI's words (validating, in_progress, finalizing, completed, …)."""
    output_file_id: str | None = None
    error_file_id: str | None = None
    input_file_id: str | None = None

    @property
    def done(self) -> bool:
        return self.status in UPSTREAM_DONE


@dataclass(frozen=True, slots=True)
class LineResult:
    """One request's outcome in an upstream batch: an HTTP answer (``status_code`` and ``body``), or an
    ``error`` ({code, message}) when the provider never ran it."""

    custom_id: str
    status_code: int | None
    body: JSONObject | None
    error: JSONObject | None = None


class BatchApi(Protocol):
    """A provider's Batch API, as the worker uses it. Failures raise ``UpstreamError`` subclasses."""

    async def submit(self, deployment: Deployment, endpoint: str, lines: Sequence[BatchLine]) -> UpstreamBatch:
        """Upload ``lines`` and start a batch of them (24 h window)."""
        ...

    async def retrieve(self, deployment: Deployment, batch_id: str) -> UpstreamBatch: ...

    async def cancel(self, deployment: Deployment, batch_id: str) -> UpstreamBatch: ...

    async def results(self, deployment: Deployment, batch: UpstreamBatch) -> list[LineResult]:
        """Every line of the batch's output and error files."""
        ...


@dataclass(frozen=True, slots=True)
class DeferredCost:
    """What one deferred request cost, as recorded for the ledger: ``cost_micros`` at the price paid (the
    provider's batch price when it went through a Batch API) and ``sync_cost_micros`` at the synchronous
    price; their difference is what the lane saved."""

    tenant: str
    batch_id: str
    custom_id: str
    model: str
    upstream_model: str
    deployment: str
    via_batch_api: bool
    cost_micros: int
    sync_cost_micros: int

    @property
    def saved_micros(self) -> int:
        return self.sync_cost_micros - self.cost_micros


def input_line(custom_id: str, url: str, body: JSONObject) -> bytes:
    """One line of a batch's input file, in OpenAI's Batch API format."""
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + b"\n"


def response_of(result: JSONObject, request_id: str) -> JSONObject | None:
    """A request's ``response`` in OpenAI's Batch API format, or None when it got no answer. ``result`` is what
    the worker stored: ``{"status_code", "body", "request_id"}`` for an answer (2xx or not), ``{"error": {code,
    message}}`` for a request that never got one; ``request_id`` stands in for a missing one."""
    if "status_code" not in result:
        return None
    return {
        "status_code": result["status_code"],
        "request_id": result.get("request_id") or request_id,
        "body": result.get("body"),
    }


def result_line(line_id: str, custom_id: str, result: JSONObject) -> bytes:
    """One line of a batch's output or error file, in OpenAI's Batch API format (``result`` as in
    :func:`response_of`)."""
    line = {
        "id": line_id,
        "custom_id": custom_id,
        "response": response_of(result, line_id),
        "error": result.get("error"),
    }
    return orjson.dumps(line) + b"\n"
