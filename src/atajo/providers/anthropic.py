"""Anthropic's Messages API (POST {base_url}/messages), spoken by translating OpenAI requests and answers.

The translation itself lives in ``anthropic_translate`` (pure functions); this adapter adds credentials
(``x-api-key`` and ``anthropic-version``), sends through the shared pool, and reads answers and streams
back. HTTP failures are mapped by ``providers/http.py`` like every other adapter's: Anthropic's error
body ``{"type": "error", "error": {"type": ..., "message": ...}}`` has its message where OpenAI's has.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

import orjson

from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.core.results import Completion
from atajo.errors import UnsupportedParameter, UpstreamStreamBroken, UpstreamUnavailable
from atajo.providers.anthropic_translate import StreamTranslator, from_anthropic, to_anthropic
from atajo.providers.http import decode_object, deployment_headers, describe, finish, post, post_json, sse_events
from atajo.providers.pool import HttpPool
from atajo.types import JSONObject

DEFAULT_VERSION = "2023-06-01"


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self._headers: dict[str, dict[str, str]] = {}

    def headers(self, deployment: Deployment) -> dict[str, str]:
        headers = self._headers.get(deployment.id)
        if headers is None:
            version = deployment.api_version or DEFAULT_VERSION
            headers = self._headers[deployment.id] = deployment_headers(deployment, **{"anthropic-version": version})
        return headers

    async def chat(self, request: ChatRequest, deployment: Deployment, upstream_model: str) -> Completion:
        translated = to_anthropic(request.body, upstream_model, stream=False)
        url = deployment.base_url + "/messages"
        payload = orjson.dumps(translated.body)
        data = await post_json(self.pool, deployment, url, payload, self.headers(deployment))
        if not isinstance(data.get("content"), list):
            # Not a message (a wrong base_url, a proxy's own page): better an error than an empty answer.
            raise UpstreamUnavailable(f"{describe(deployment)} answered 200 without a message's content")
        created = int(time.time())
        body, usage = from_anthropic(data, json_tool=translated.json_tool, created=created, model=upstream_model)
        return Completion(body, usage)

    async def chat_stream(
        self, request: ChatRequest, deployment: Deployment, upstream_model: str
    ) -> AsyncGenerator[JSONObject, None]:
        translated = to_anthropic(request.body, upstream_model, stream=True)
        where = describe(deployment)
        translator = StreamTranslator(
            where=where, model=upstream_model, created=int(time.time()), json_tool=translated.json_tool
        )
        url = deployment.base_url + "/messages"
        payload = orjson.dumps(translated.body)
        async with post(self.pool, deployment, url, payload, self.headers(deployment), streaming=True) as resp:
            async with aclosing(sse_events(resp, deployment)) as events:
                async for event, data in events:
                    for chunk in translator.feed(
                        event, decode_object(data, deployment, "a stream event", UpstreamStreamBroken)
                    ):
                        yield chunk
                    if translator.done:
                        break
            if not translator.done:
                raise UpstreamStreamBroken(f"{where} ended the stream before message_stop")
            await finish(resp)  # so the connection is reused

    async def embeddings(self, request: EmbeddingsRequest, deployment: Deployment, upstream_model: str) -> Completion:
        raise UnsupportedParameter(
            f"Model {request.model!r} is served by Anthropic, which has no embeddings API; "
            "use a model served by an OpenAI-compatible provider for embeddings.",
            param="model",
        )
