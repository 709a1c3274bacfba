"""A local upstream speaking OpenAI's Files and Batch API wire format (per OpenAI's API reference), on top of
the fake Chat Completions / Embeddings upstream.

``POST /v1/files`` (multipart, purpose=batch), ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches/{id}`` (each read moves the batch one status on: validating → in_progress → finalizing →
completed, when the lines are run), ``POST /v1/batches/{id}/cancel`` (cancelling, then cancelled at the next
read). A line whose last message says ``FAIL`` gets a 400 in the error file; one that says ``DROP`` gets no
line at all (as when a provider loses one)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.openai_server import OpenAIUpstream

STEPS = ("validating", "in_progress", "finalizing", "completed")


def answer_for(body: dict[str, Any]) -> str:
    """What the fake says to a chat request: it names the question, so tests can match answers to requests."""
    return f"batch answer to: {body['messages'][-1]['content']}"


@dataclass
class BatchUpstream(OpenAIUpstream):
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    """Each upload's form fields and parsed lines."""
    polls: int = 0
    cancels: int = 0
    refuse_batches: bool = False
    """Answer ``POST /v1/batches`` with a 500 (the gateway should fall back to the normal path)."""
    hold: bool = False
    """Keep batches in progress (until cancelled)."""
    _ids: Any = field(default_factory=count)

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/files", self.create_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches/{batch_id}", self.retrieve_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)
        return app

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):04d}"

    async def create_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField), "the file must be sent as a file part"
        content = upload.file.read()
        lines = [orjson.loads(line) for line in content.splitlines() if line.strip()]
        self.uploads.append({"purpose": form["purpose"], "filename": upload.filename, "lines": lines})
        file_id = self._id("file-up")
        self.files[file_id] = content
        return web.json_response(
            {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
             "filename": upload.filename, "purpose": "batch"}
        )  # fmt: skip

    async def file_content(self, request: web.Request) -> web.Response:
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return web.json_response(
                {"error": {"message": "No such file", "type": "invalid_request_error"}}, status=404
            )
        return web.Response(body=content, content_type="application/octet-stream")

    async def create_batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refuse_batches:
            return web.json_response({"error": {"message": "batches are down", "type": "server_error"}}, status=500)
        if body.get("input_file_id") not in self.files or body.get("completion_window") != "24h":
            return web.json_response({"error": {"message": "bad batch", "type": "invalid_request_error"}}, status=400)
        batch_id = self._id("batch_up")
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        return web.json_response(self.batches[batch_id])

    async def retrieve_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response(
                {"error": {"message": "No such batch", "type": "invalid_request_error"}}, status=404
            )
        self.polls += 1
        if batch["status"] == "cancelling":
            batch["status"] = "cancelled"
        elif batch["status"] in STEPS[:-1] and not (self.hold and batch["status"] == "in_progress"):
            batch["status"] = STEPS[STEPS.index(batch["status"]) + 1]
            if batch["status"] == "completed":
                self._run(batch)
        return web.json_response(batch)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response(
                {"error": {"message": "No such batch", "type": "invalid_request_error"}}, status=404
            )
        self.cancels += 1
        if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            batch["status"] = "cancelling"
        return web.json_response(batch)

    def _run(self, batch: dict[str, Any]) -> None:
        """Answer every line: output file for the answers, error file for the failures."""
        output, errors = [], []
        for raw in self.files[batch["input_file_id"]].splitlines():
            line = orjson.loads(raw)
            body = line["body"]
            asked = body["messages"][-1]["content"] if "messages" in body else ""
            request_id = self._id("req_up")
            if "DROP" in asked:
                continue
            if "FAIL" in asked:
                error_body = {"error": {"message": "scripted failure", "type": "invalid_request_error"}}
                errors.append({"id": self._id("batch_req_up"), "custom_id": line["custom_id"],
                               "response": {"status_code": 400, "request_id": request_id, "body": error_body},
                               "error": None})  # fmt: skip
                continue
            if line["url"] == "/v1/embeddings":
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                answer: dict[str, Any] = {
                    "object": "list",
                    "data": [{"object": "embedding", "index": i, "embedding": [0.5, 0.5]} for i in range(len(inputs))],
                    "model": body["model"],
                    "usage": {"prompt_tokens": 1000, "total_tokens": 1000},
                }
            else:
                answer = {
                    "id": self._id("chatcmpl-up"),
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_for(body)},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000},
                }  # fmt: skip
            response = {"status_code": 200, "request_id": request_id, "body": answer}
            output.append({"id": self._id("batch_req_up"), "custom_id": line["custom_id"], "response": response,
                           "error": None})  # fmt: skip
        for kind, lines in (("output_file_id", output), ("error_file_id", errors)):
            if lines:
                file_id = self._id("file-out")
                self.files[file_id] = b"".join(orjson.dumps(x) + b"\n" for x in lines)
                batch[kind] = file_id
        total = len(output) + len(errors)
        batch["request_counts"] = {"total": total, "completed": len(output), "failed": len(errors)}
