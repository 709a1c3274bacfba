"""Atajo's own OpenAI-compatible Files and Batches API, the way into the deferred lane.

``POST /v1/files`` (multipart, ``purpose=batch``) takes a JSONL file of ``{custom_id, method, url, body}``
lines, each checked as the synchronous endpoint would check it, errors naming the line. ``POST /v1/batches``
starts a batch of one file's lines for one endpoint; ``stages/deferred.py`` runs it. Files and batches belong
to the key's tenant: another tenant's are answered 404, as if they did not exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from atajo.batches.store import TERMINAL, BatchStore, Item, StoredFile
from atajo.core.batches import ENDPOINTS
from atajo.core.context import Principal
from atajo.errors import Conflict, InvalidRequest, ModelNotFound, NotFound, PayloadTooLarge
from atajo.server.edge import Request, Response
from atajo.server.http import Route
from atajo.server.json_api import Authenticate, JsonApi, RequestIdOf
from atajo.server.multipart import parse as parse_multipart
from atajo.server.parse import decode, parse_chat, parse_embeddings
from atajo.settings import BatchSettings
from atajo.stages.deferred import DeferredLane, new_id, usage_of
from atajo.stages.deferred_collect import new_batch
from atajo.types import JSONObject

MAX_CUSTOM_ID = 512
MAX_METADATA_PAIRS = 16


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    custom_id: str
    url: str
    model: str
    body: JSONObject


def read_input(content: bytes, max_lines: int) -> list[Line]:
    """A batch input file's lines, each checked; the first bad one raises ``InvalidRequest`` naming it."""
    lines: list[Line] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(lines) == max_lines:
            raise InvalidRequest(f"The file holds more than {max_lines} requests (batches.max_requests).", param="file")
        lines.append(_line(number, raw, seen))
    if not lines:
        raise InvalidRequest("The file holds no requests: one JSON object per line is expected.", param="file")
    return lines


def _line(number: int, raw: bytes, seen: set[str]) -> Line:
    where = f"Line {number}"
    try:
        data = decode(raw)
    except InvalidRequest as err:
        raise InvalidRequest(f"{where}: {err.message.replace('The request body', 'the line')}", param="file") from None
    unknown = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise InvalidRequest(f"{where}: unknown field '{unknown[0]}' (expected custom_id, method, url, body).",
                             param="file")  # fmt: skip
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise InvalidRequest(f"{where}: 'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters.", param="file")
    if custom_id in seen:
        raise InvalidRequest(f"{where}: custom_id {custom_id!r} is used twice; each request needs its own.",
                             param="file")  # fmt: skip
    seen.add(custom_id)
    if data.get("method") != "POST":
        raise InvalidRequest(f"{where}: 'method' must be \"POST\".", param="file")
    url = data.get("url")
    if url not in ENDPOINTS:
        raise InvalidRequest(f"{where}: 'url' must be one of {', '.join(ENDPOINTS)}, not {str(url)[:80]!r}.",
                             param="file")  # fmt: skip
    body = data.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest(f"{where}: 'body' must be a JSON object (the request to {url}).", param="file")
    if body.get("stream"):
        raise InvalidRequest(f"{where}: batch requests cannot stream; leave 'stream' out.", param="file")
    try:
        request = parse_chat(body) if url == "/v1/chat/completions" else parse_embeddings(body)
    except InvalidRequest as err:
        raise InvalidRequest(f"{where}: {err.message}", param="file") from None
    return Line(number, custom_id, str(url), request.model, request.body)


def file_object(f: StoredFile) -> JSONObject:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": int(f.created_at),
        "expires_at": int(f.expires_at) if f.expires_at is not None else None,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


class BatchesApi(JsonApi):
    route = "batches"

    def __init__(
        self,
        store: BatchStore,
        lane: DeferredLane,
        authenticate: Authenticate,
        request_id: RequestIdOf,
        settings: BatchSettings,
        has_model: Callable[[str], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.lane = lane
        self.authenticate = authenticate
        self.request_id = request_id
        self.settings = settings
        self.has_model = has_model
        self.clock = clock

    def routes(self) -> list[Route]:
        return [
            ("POST", "/v1/files", self.create_file),
            ("GET", "/v1/files", self.list_files),
            ("GET", "/v1/files/{file_id}", self.get_file),
            ("DELETE", "/v1/files/{file_id}", self.delete_file),
            ("GET", "/v1/files/{file_id}/content", self.file_content),
            ("POST", "/v1/batches", self.create_batch),
            ("GET", "/v1/batches", self.list_batches),
            ("GET", "/v1/batches/{batch_id}", self.get_batch),
            ("POST", "/v1/batches/{batch_id}/cancel", self.cancel_batch),
        ]

    # --- files ------------------------------------------------------------------------------------

    async def create_file(self, request: Request) -> Response:
        return await self._call(request, self._create_file)

    async def _create_file(self, principal: Principal, request: Request) -> JSONObject:
        limit = self.settings.max_file_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The file is larger than the limit of {limit} bytes (batches.max_file_bytes).")
        parts = parse_multipart(request.headers.get("content-type", ""), await request.body())
        purpose = parts.get("purpose")
        if purpose is None:
            raise InvalidRequest("Missing the form field 'purpose' (use \"batch\").", param="purpose")
        if purpose.data.decode("utf-8", "replace").strip() != "batch":
            raise InvalidRequest('Only purpose "batch" is supported: files here are batch inputs.', param="purpose")
        file = parts.get("file")
        if file is None or file.filename is None:
            raise InvalidRequest("Missing the form field 'file' (a JSONL file).", param="file")
        read_input(file.data, self.settings.max_requests)
        now = self.clock()
        stored = StoredFile(
            new_id("file-"),
            principal.tenant,
            "batch",
            file.filename[:255] or "input.jsonl",
            len(file.data),
            now,
            now + self.settings.keep_files_s,
        )
        await self.store.put_file(stored, file.data)
        return file_object(stored)

    async def list_files(self, request: Request) -> Response:
        return await self._call(request, self._list_files)

    async def _list_files(self, principal: Principal, request: Request) -> JSONObject:
        query = _query(request, "purpose", "limit")
        limit = _limit(query, default=10_000, most=10_000)
        purpose = query.get("purpose")
        files = await self.store.list_files(principal.tenant, purpose, limit + 1)
        data = [file_object(f) for f in files[:limit]]
        return _page(data, has_more=len(files) > limit)

    async def get_file(self, request: Request) -> Response:
        return await self._call(request, self._get_file)

    async def _get_file(self, principal: Principal, request: Request) -> JSONObject:
        return file_object(await self._file(principal, _segment(request, 3)))

    async def delete_file(self, request: Request) -> Response:
        return await self._call(request, self._delete_file)

    async def _delete_file(self, principal: Principal, request: Request) -> JSONObject:
        file_id = _segment(request, 3)
        if not await self.store.delete_file(principal.tenant, file_id):
            raise _no_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def file_content(self, request: Request) -> Response:
        return await self._call(request, self._file_content)

    async def _file_content(self, principal: Principal, request: Request) -> Response:
        file_id = _segment(request, 3)
        content = await self.store.file_content(principal.tenant, file_id)
        if content is None:
            raise _no_file(file_id)
        headers = {"content-type": "application/octet-stream", "x-request-id": self.request_id(request)}
        return Response(200, headers, content)

    async def _file(self, principal: Principal, file_id: str) -> StoredFile:
        found = await self.store.get_file(principal.tenant, file_id)
        if found is None:
            raise _no_file(file_id)
        return found

    # --- batches ----------------------------------------------------------------------------------

    async def create_batch(self, request: Request) -> Response:
        return await self._call(request, self._create_batch)

    async def _create_batch(self, principal: Principal, request: Request) -> JSONObject:
        data = decode(await request.body())
        unknown = sorted(set(data) - {"input_file_id", "endpoint", "completion_window", "metadata"})
        if unknown:
            raise InvalidRequest(f"Unknown field '{unknown[0]}'.", param=unknown[0])
        file_id = data.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise InvalidRequest("'input_file_id' must be the id of an uploaded file.", param="input_file_id")
        endpoint = data.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(
                f"'endpoint' must be one of {', '.join(ENDPOINTS)} (the endpoints Atajo's deferred lane runs).",
                param="endpoint",
            )
        if data.get("completion_window") != "24h":
            raise InvalidRequest("'completion_window' must be \"24h\".", param="completion_window")
        metadata = _metadata(data.get("metadata"))
        file = await self._file(principal, file_id)
        if file.purpose != "batch":
            raise InvalidRequest(
                f"File {file_id} is not a batch input (purpose {file.purpose}).", param="input_file_id"
            )
        content = await self.store.file_content(principal.tenant, file_id)
        if content is None:  # deleted meanwhile
            raise _no_file(file_id)
        lines = read_input(content, self.settings.max_requests)
        for line in lines:
            if line.url != endpoint:
                raise InvalidRequest(
                    f"Line {line.number}: url {line.url} does not match the batch's endpoint {endpoint}.",
                    param="input_file_id",
                )
            if not self.has_model(line.model):
                raise ModelNotFound(
                    f"Line {line.number}: the model `{line.model}` does not exist or you do not have access to it.",
                    param="input_file_id",
                )
        batch = new_batch(
            new_id("batch_"),
            endpoint,
            file_id,
            len(lines),
            self.clock(),
            self.settings,
            tenant=principal.tenant,
            key_name=principal.key_name,
            metadata=metadata,
        )
        items = [Item(i, line.custom_id, line.model, line.body) for i, line in enumerate(lines)]
        await self.store.create_batch(principal.tenant, batch, items)
        self.lane.wake()
        return await self._render(batch)

    async def get_batch(self, request: Request) -> Response:
        return await self._call(request, self._get_batch)

    async def _get_batch(self, principal: Principal, request: Request) -> JSONObject:
        return await self._render(await self._batch(principal, _segment(request, 3)))

    async def list_batches(self, request: Request) -> Response:
        return await self._call(request, self._list_batches)

    async def _list_batches(self, principal: Principal, request: Request) -> JSONObject:
        query = _query(request, "after", "limit")
        limit = _limit(query, default=20, most=100)
        after = query.get("after")
        if after is not None and await self.store.get_batch(principal.tenant, after) is None:
            raise NotFound(f"'after': no batch found with id {after[:80]!r}.", param="after")
        found = await self.store.list_batches(principal.tenant, after, limit + 1)
        data = [await self._render(b) for b in found[:limit]]
        return _page(data, has_more=len(found) > limit)

    async def cancel_batch(self, request: Request) -> Response:
        return await self._call(request, self._cancel_batch)

    async def _cancel_batch(self, principal: Principal, request: Request) -> JSONObject:
        batch_id = _segment(request, 3)
        for _ in range(3):  # the worker may move the batch on between our read and write
            batch = await self._batch(principal, batch_id)
            status = batch["status"]
            if status in ("cancelling", "cancelled"):
                return await self._render(batch)
            if status in TERMINAL or status == "expiring":
                raise Conflict(f"Cannot cancel a batch whose status is {_public_status(status)}.", param="batch_id")
            batch.update(status="cancelling", cancelling_at=int(self.clock()))
            if await self.store.save_batch(batch, status):
                self.lane.wake()
                return await self._render(batch)
        raise Conflict("The batch changed while it was being cancelled; try again.", param="batch_id")

    async def _batch(self, principal: Principal, batch_id: str) -> JSONObject:
        batch = await self.store.get_batch(principal.tenant, batch_id)
        if batch is None:
            raise NotFound(f"No batch found with id '{batch_id[:80]}'.", param="batch_id")
        return batch

    async def _render(self, batch: JSONObject) -> JSONObject:
        """The batch as clients see it: live counts while it runs, no internal fields."""
        out = {k: v for k, v in batch.items() if k != "_atajo"}
        out["status"] = _public_status(batch["status"])
        if batch["status"] not in TERMINAL:
            counts = await self.store.counts(batch["id"])
            out["request_counts"] = {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
            out["usage"] = usage_of(counts)
        return out


def _public_status(status: str) -> str:
    """``expiring`` is the worker's own step (stopping what runs, before ``expired``): clients see it as
    ``finalizing``, the results being gathered."""
    return "finalizing" if status == "expiring" else status


def _segment(request: Request, index: int) -> str:
    """The ``index``-th segment of the path (``/v1/files/{id}`` → 3)."""
    return request.path.split("/")[index]


def _no_file(file_id: str) -> NotFound:
    return NotFound(f"No file found with id '{file_id[:80]}'.", param="file_id")


def _query(request: Request, *allowed: str) -> dict[str, str]:
    query = {k: v[0] for k, v in parse_qs(request.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise InvalidRequest(f"Unknown query parameter '{unknown[0][:40]}' (expected {', '.join(allowed)}).",
                             param=unknown[0][:40])  # fmt: skip
    return query


def _limit(query: dict[str, str], *, default: int, most: int) -> int:
    raw = query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"'limit' must be a whole number from 1 to {most}.", param="limit")
    return int(raw)


def _page(data: list[JSONObject], *, has_more: bool) -> JSONObject:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA_PAIRS
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()
        )
    ):
        raise InvalidRequest(
            f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} string values (keys up to 64 characters,"
            " values up to 512).",
            param="metadata",
        )
    return dict(value)
