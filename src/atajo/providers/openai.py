"""OpenAI-compatible upstreams: OpenAI, Azure OpenAI, vLLM, Ollama, llama.cpp server, Groq, Together...

The request body already follows OpenAI's schema; this adapter swaps in the upstream model name, adds the
deployment's credentials, and reads the answer back.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import orjson

from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.core.results import Completion, Usage
from atajo.errors import UpstreamStreamBroken
from atajo.providers.http import decode_object, deployment_headers, describe, finish, post, post_json, sse_events
from atajo.providers.pool import HttpPool
from atajo.types import JSONObject


class OpenAIProvider:
    name = "openai"

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self._headers: dict[str, dict[str, str]] = {}

    def url(self, deployment: Deployment, path: str) -> str:
        url = deployment.base_url + path
        return f"{url}?api-version={deployment.api_version}" if deployment.api_version else url

    def headers(self, deployment: Deployment) -> dict[str, str]:
        headers = self._headers.get(deployment.id)
        if headers is None:
            headers = self._headers[deployment.id] = deployment_headers(deployment)
        return headers

    async def chat(self, request: ChatRequest, deployment: Deployment, upstream_model: str) -> Completion:
        body = dict(request.body, model=upstream_model)
        body.pop("stream", None)
        body.pop("stream_options", None)
        url = self.url(deployment, "/chat/completions")
        data = await post_json(self.pool, deployment, url, orjson.dumps(body), self.headers(deployment))
        return Completion(data, Usage.from_openai(data.get("usage")))

    async def chat_stream(
        self, request: ChatRequest, deployment: Deployment, upstream_model: str
    ) -> AsyncGenerator[JSONObject, None]:
        body = dict(request.body, model=upstream_model, stream=True)
        if deployment.stream_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        url = self.url(deployment, "/chat/completions")
        payload = orjson.dumps(body)
        async with post(self.pool, deployment, url, payload, self.headers(deployment), streaming=True) as resp:
            done = False
            async with aclosing(sse_events(resp, deployment)) as events:
                async for _event, data in events:
                    if data == b"[DONE]":
                        done = True
                        break
                    yield _decode_chunk(data, deployment)
            if not done:
                raise UpstreamStreamBroken(f"{describe(deployment)} ended the stream before [DONE]")
            await finish(resp)  # so the connection is reused

    async def embeddings(self, request: EmbeddingsRequest, deployment: Deployment, upstream_model: str) -> Completion:
        body = dict(request.body, model=upstream_model)
        url = self.url(deployment, "/embeddings")
        data = await post_json(self.pool, deployment, url, orjson.dumps(body), self.headers(deployment))
        return Completion(data, Usage.from_openai(data.get("usage")))


def _decode_chunk(data: bytes, deployment: Deployment) -> JSONObject:
    chunk = decode_object(data, deployment, "a stream chunk", UpstreamStreamBroken)
    if "error" in chunk:
        err = chunk["error"]
        message = err.get("message") if isinstance(err, dict) else str(err)
        raise UpstreamStreamBroken(f"{describe(deployment)} failed mid-stream: {message}")
    return chunk
