"""Anthropic's Message Batches API, behind the same ``BatchApi`` interface as OpenAI's Batch API.

``POST {base_url}/messages/batches`` with ``{"requests": [{"custom_id", "params"}]}`` (``params`` a Messages
API request), ``GET {base_url}/messages/batches/{id}`` until ``processing_status`` is ``ended``, ``POST
…/{id}/cancel``, and the results as JSONL at ``…/{id}/results``: one ``{"custom_id", "result": {"type":
"succeeded", "message"} | {"type": "errored", "error"} | {"type": "canceled"} | {"type": "expired"}}`` per
request (Anthropic's Message Batches reference).

OpenAI chat bodies are translated with the Anthropic provider's own translation (``anthropic_translate``),
and each succeeded message back into a ``chat.completion``. Results are read from the deployment's own
``base_url``, never from the ``results_url`` the answer names, so our API key only goes where it is
configured to go. A request in JSON mode is sent with the suffix ``_json`` on its custom id, so its answer is
read back the same way the synchronous path reads it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from atajo.core.batches import BatchLine, LineResult, UpstreamBatch
from atajo.core.deployments import Deployment
from atajo.errors import AtajoError, UpstreamUnavailable
from atajo.providers.anthropic import AnthropicProvider
from atajo.providers.anthropic_translate import JSON_TOOL, from_anthropic, to_anthropic
from atajo.providers.http import call, call_json, decode_object, describe
from atajo.providers.openai_batch import _segment
from atajo.providers.pool import HttpPool
from atajo.types import JSONObject

JSON_SUFFIX = "_json"
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


class AnthropicBatchApi:
    name = "anthropic"

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.provider = AnthropicProvider(pool)  # its credentials and anthropic-version header

    async def _json(self, deployment: Deployment, method: str, path: str, body: JSONObject | None) -> JSONObject:
        url, headers = deployment.base_url + path, self.provider.headers(deployment)
        return await call_json(self.pool, deployment, method, url, body, headers)

    async def submit(self, deployment: Deployment, endpoint: str, lines: Sequence[BatchLine]) -> UpstreamBatch:
        if endpoint != "/v1/chat/completions":
            raise UpstreamUnavailable(f"{describe(deployment)}: Anthropic's Message Batches run chat requests only")
        requests: list[JSONObject] = []
        for line in lines:
            try:
                translated = to_anthropic(line.body, str(line.body["model"]), stream=False)
            except AtajoError as err:
                # One request the translation refuses (n > 1, logprobs…): the share goes through the pipeline,
                # where that request gets its own error and the others their answers.
                raise UpstreamUnavailable(
                    f"{describe(deployment)}: request {line.custom_id} cannot be sent as a Messages request "
                    f"({err.message})"
                ) from None
            custom_id = line.custom_id + (JSON_SUFFIX if translated.json_tool else "")
            requests.append({"custom_id": custom_id, "params": translated.body})
        return _batch(await self._json(deployment, "POST", "/messages/batches", {"requests": requests}), deployment)

    async def retrieve(self, deployment: Deployment, batch_id: str) -> UpstreamBatch:
        path = f"/messages/batches/{_segment(batch_id)}"
        return _batch(await self._json(deployment, "GET", path, None), deployment)

    async def cancel(self, deployment: Deployment, batch_id: str) -> UpstreamBatch:
        path = f"/messages/batches/{_segment(batch_id)}/cancel"
        return _batch(await self._json(deployment, "POST", path, None), deployment)

    async def results(self, deployment: Deployment, batch: UpstreamBatch) -> list[LineResult]:
        if batch.output_file_id is None:  # ended without results (none is kept for a batch that never ran)
            return []
        url = f"{deployment.base_url}/messages/batches/{_segment(batch.id)}/results"
        raw = await call(self.pool, deployment, "GET", url, b"", self.provider.headers(deployment))
        created = int(time.time())
        return [result for line in raw.splitlines() if (result := _result(line, deployment, created)) is not None]


def _batch(data: JSONObject, deployment: Deployment) -> UpstreamBatch:
    """A Message Batch in OpenAI's words: ``in_progress``, ``cancelling``, then ``completed`` (or
    ``cancelled`` when a cancel was asked for); ``output_file_id`` holds the results URL once there is one."""
    batch_id, status = data.get("id"), data.get("processing_status")
    if not isinstance(batch_id, str) or not isinstance(status, str):
        raise UpstreamUnavailable(f"{describe(deployment)} answered a message batch without an id or status")
    if status == "ended":
        status = "cancelled" if data.get("cancel_initiated_at") else "completed"
    elif status == "canceling":
        status = "cancelling"
    else:
        status = "in_progress"
    results_url = data.get("results_url")
    return UpstreamBatch(batch_id, status, results_url if isinstance(results_url, str) and results_url else None)


def _result(line: bytes, deployment: Deployment, created: int) -> LineResult | None:
    if not line.strip():
        return None
    data = decode_object(line, deployment, "a message batch result line")
    custom_id, result = data.get("custom_id"), data.get("result")
    if not isinstance(custom_id, str) or not isinstance(result, dict):
        return None  # not one of ours: nothing to map it back to
    json_tool = None
    if custom_id.endswith(JSON_SUFFIX):
        custom_id, json_tool = custom_id[: -len(JSON_SUFFIX)], JSON_TOOL
    kind = result.get("type")
    message = result.get("message")
    if kind == "succeeded" and isinstance(message, dict):
        body, _ = from_anthropic(message, json_tool=json_tool, created=created, model=str(message.get("model") or ""))
        return LineResult(custom_id, 200, body)
    if kind == "errored":
        error = result.get("error")
        inner = error.get("error") if isinstance(error, dict) else None
        inner = inner if isinstance(inner, dict) else {}
        error_type = str(inner.get("type") or "api_error")
        message_text = str(inner.get("message") or "The request failed in the message batch.")
        body = {"error": {"message": message_text, "type": error_type, "param": None, "code": None}}
        return LineResult(custom_id, ERROR_STATUS.get(error_type, 500), body)
    if kind in ("canceled", "expired"):
        code = "batch_cancelled" if kind == "canceled" else "batch_expired"
        return LineResult(custom_id, None, None, {"code": code, "message": f"The message batch request was {kind}."})
    return LineResult(custom_id, None, None, {"code": "batch_error", "message": f"Unknown result type {kind!r}."})
