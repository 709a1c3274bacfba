"""A local upstream speaking Anthropic's Message Batches wire format (per Anthropic's API reference), on top of
the fake Messages upstream.

``POST /v1/messages/batches`` (``{"requests": [{"custom_id", "params"}]}``; custom ids checked against
``^[a-zA-Z0-9_-]{1,64}$`` and unique), ``GET /v1/messages/batches/{id}`` (``processing_status``
``in_progress``, then ``ended`` at the next read, when the requests are run), ``POST …/{id}/cancel``
(``canceling``, then ``ended`` at the next read, every request ``canceled``), ``GET …/{id}/results`` (JSONL,
only once ended). Each request's ``params`` is checked as ``POST /v1/messages`` checks a body; one it refuses
is ``errored`` with Anthropic's error. A request whose last message says ``FAIL`` is ``errored``
(overloaded), one that says ``EXPIRE`` is ``expired``. Answers: 10 input tokens, 1000 output tokens.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.anthropic_server import AnthropicUpstream, Rejected, check_body, check_headers, error_response

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
OUTPUT_TOKENS = 1000


def batch_answer(params: dict[str, Any]) -> str:
    """What the fake says: it names the question, so tests can match answers to requests."""
    content = params["messages"][-1]["content"]
    text = content if isinstance(content, str) else " ".join(b.get("text", "") for b in content)
    return f"anthropic batch answer to: {text}"


@dataclass
class MessageBatchUpstream(AnthropicUpstream):
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    submitted: list[list[dict[str, Any]]] = field(default_factory=list)
    """The requests of each batch created."""
    results: dict[str, bytes] = field(default_factory=dict)
    polls: int = 0
    hold: bool = False
    """Keep batches in progress (until cancelled)."""
    _ids: Any = field(default_factory=count)

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/messages/batches", self.create)
        app.router.add_get("/v1/messages/batches/{batch_id}", self.retrieve)
        app.router.add_post("/v1/messages/batches/{batch_id}/cancel", self.cancel)
        app.router.add_get("/v1/messages/batches/{batch_id}/results", self.read_results)
        return app

    async def create(self, request: web.Request) -> web.Response:
        try:
            check_headers(request)
        except Rejected as exc:
            return error_response(exc.status, exc.message)
        body = orjson.loads(await request.read())
        requests = body.get("requests")
        if set(body) != {"requests"} or not isinstance(requests, list) or not requests:
            return error_response(400, "requests: a non-empty list is required")
        ids = [r.get("custom_id") for r in requests]
        if not all(isinstance(i, str) and CUSTOM_ID.match(i) for i in ids) or len(set(ids)) != len(ids):
            return error_response(400, "requests: custom_id must match ^[a-zA-Z0-9_-]{1,64}$ and be unique")
        if any(set(r) != {"custom_id", "params"} for r in requests):
            return error_response(400, "requests: Extra inputs are not permitted")
        self.submitted.append(requests)
        batch_id = f"msgbatch_{next(self._ids):04d}"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.batches[batch_id] = {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0, "canceled": 0,
                               "expired": 0},
            "ended_at": None,
            "created_at": now,
            "expires_at": now,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": None,
            "_requests": requests,
            "_origin": f"{request.scheme}://{request.host}",
        }  # fmt: skip
        return self._show(batch_id)

    def _show(self, batch_id: str) -> web.Response:
        return web.json_response({k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")})

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return error_response(404, "batch not found")
        self.polls += 1
        if batch["processing_status"] == "canceling" or (batch["processing_status"] == "in_progress" and not self.hold):
            self._end(batch)
        return self._show(batch["id"])

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return error_response(404, "batch not found")
        if batch["processing_status"] == "in_progress":
            batch["processing_status"] = "canceling"
            batch["cancel_initiated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return self._show(batch["id"])

    async def read_results(self, request: web.Request) -> web.Response:
        try:
            check_headers(request)
        except Rejected as exc:
            return error_response(exc.status, exc.message)
        content = self.results.get(request.match_info["batch_id"])
        if content is None:
            return error_response(404, "results are not available yet")
        return web.Response(body=content, content_type="application/binary")

    def _end(self, batch: dict[str, Any]) -> None:
        """Run (or cancel) every request and write the results."""
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        lines = []
        for r in batch["_requests"]:
            result = {"type": "canceled"} if batch["processing_status"] == "canceling" else self._run(r["params"])
            counts[result["type"]] += 1
            lines.append(orjson.dumps({"custom_id": r["custom_id"], "result": result}) + b"\n")
        self.results[batch["id"]] = b"".join(lines)
        batch.update(
            processing_status="ended",
            request_counts=counts,
            ended_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            results_url=f"{batch['_origin']}/v1/messages/batches/{batch['id']}/results",
        )

    def _run(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            check_body(params)
        except Rejected as exc:
            return {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error",
                                                                            "message": exc.message}}}  # fmt: skip
        asked = batch_answer(params)
        if "FAIL" in asked:
            return {"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error",
                                                                            "message": "Overloaded"}}}  # fmt: skip
        if "EXPIRE" in asked:
            return {"type": "expired"}
        content, stop_reason, _ = self._answer(params)
        if content[0]["type"] == "text":
            content = [{"type": "text", "text": asked}]
        message = {
            "id": f"msg_batch{next(self._ids):04d}",
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": OUTPUT_TOKENS},
        }  # fmt: skip
        return {"type": "succeeded", "message": message}
