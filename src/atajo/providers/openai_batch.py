"""OpenAI's Batch API, as any OpenAI-compatible upstream that has it speaks it: upload a JSONL file to
``/files`` (multipart, ``purpose=batch``), create ``/batches``, read it back until it is done, download its
output and error files (``/files/{id}/content``).

Input lines are ``{"custom_id", "method": "POST", "url", "body"}``; output and error lines are
``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {"code", "message"}
| null}`` (OpenAI's Batch API reference); ``core/batches.py`` writes both, as Atajo's own Batch API speaks it
too, and this module reads the output. URLs and credentials are the OpenAI provider's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import getrandbits

from atajo.core.batches import BatchLine, LineResult, UpstreamBatch, input_line
from atajo.core.deployments import Deployment
from atajo.errors import UpstreamUnavailable
from atajo.providers.http import call, call_json, decode_object, describe
from atajo.providers.openai import OpenAIProvider
from atajo.providers.pool import HttpPool
from atajo.types import JSONObject


class OpenAIBatchApi:
    name = "openai"

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.provider = OpenAIProvider(pool)

    async def _json(self, deployment: Deployment, method: str, path: str, body: JSONObject | None) -> JSONObject:
        url, headers = self.provider.url(deployment, path), self.provider.headers(deployment)
        return await call_json(self.pool, deployment, method, url, body, headers)

    async def submit(self, deployment: Deployment, endpoint: str, lines: Sequence[BatchLine]) -> UpstreamBatch:
        jsonl = b"".join(input_line(line.custom_id, endpoint, line.body) for line in lines)
        boundary = f"atajo-{getrandbits(64):016x}"
        form = multipart(boundary, {"purpose": b"batch"}, ("file", "atajo-batch.jsonl", jsonl))
        headers = {**self.provider.headers(deployment), "content-type": f"multipart/form-data; boundary={boundary}"}
        url = self.provider.url(deployment, "/files")
        raw = await call(self.pool, deployment, "POST", url, form, headers)
        uploaded = decode_object(raw, deployment)
        file_id = uploaded.get("id")
        if not isinstance(file_id, str) or not file_id:
            raise UpstreamUnavailable(f"{describe(deployment)} answered a file upload without a file id")
        body: JSONObject = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}
        return _batch(await self._json(deployment, "POST", "/batches", body), deployment)

    async def retrieve(self, deployment: Deployment, batch_id: str) -> UpstreamBatch:
        return _batch(await self._json(deployment, "GET", f"/batches/{_segment(batch_id)}", None), deployment)

    async def cancel(self, deployment: Deployment, batch_id: str) -> UpstreamBatch:
        return _batch(await self._json(deployment, "POST", f"/batches/{_segment(batch_id)}/cancel", None), deployment)

    async def results(self, deployment: Deployment, batch: UpstreamBatch) -> list[LineResult]:
        out: list[LineResult] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            url = self.provider.url(deployment, f"/files/{_segment(file_id)}/content")
            raw = await call(self.pool, deployment, "GET", url, b"", self.provider.headers(deployment))
            out.extend(_lines(raw, deployment))
        return out


def multipart(boundary: str, fields: dict[str, bytes], file: tuple[str, str, bytes]) -> bytes:
    """A multipart/form-data body: plain fields, then one file part."""
    parts = [
        f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        for name, value in fields.items()
    ]
    name, filename, content = file
    parts.append(
        f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "content-type: application/jsonl\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _segment(value: str) -> str:
    """An id the provider gave, used in a URL path: it may not reach another path or host."""
    if not value or any(c in value for c in "/?#%\\ \r\n") or value in (".", ".."):
        raise UpstreamUnavailable(f"an upstream Batch API gave an unusable id {value[:40]!r}")
    return value


def _batch(data: JSONObject, deployment: Deployment) -> UpstreamBatch:
    batch_id, status = data.get("id"), data.get("status")
    if not isinstance(batch_id, str) or not isinstance(status, str):
        raise UpstreamUnavailable(f"{describe(deployment)} answered a batch without an id or status")

    def file(name: str) -> str | None:
        value = data.get(name)
        return value if isinstance(value, str) and value else None

    return UpstreamBatch(batch_id, status, file("output_file_id"), file("error_file_id"), file("input_file_id"))


def _lines(raw: bytes, deployment: Deployment) -> list[LineResult]:
    out: list[LineResult] = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        data = decode_object(line, deployment, f"batch result line {number}")
        custom_id = data.get("custom_id")
        if not isinstance(custom_id, str):
            continue  # not one of ours: nothing to map it back to
        response = data.get("response")
        error = data.get("error")
        status_code: int | None = None
        body: JSONObject | None = None
        if isinstance(response, dict):
            code = response.get("status_code")
            status_code = code if isinstance(code, int) else None
            body = response.get("body") if isinstance(response.get("body"), dict) else None
        out.append(LineResult(custom_id, status_code, body, error if isinstance(error, dict) else None))
    return out
