"""The simulated provider: answers with no network, for demos, benchmarks and tests.

Every answer is labelled (``system_fingerprint: "atajo-simulated"``, ids ``chatcmpl-sim-…``) and the
gateway adds ``x-atajo-simulated: true``. Latency follows the model's catalog figures (time to first token,
tokens per second) unless the deployment sets its own, with jitter; faults are injected at configured rates.
Answers are deterministic for a given request (and ``seed``), so caches and tests see stable text.

Latency model: the first token comes after ``ttft``, each later one ``slow_stream_factor / tokens_per_s``
after the one before, so a streamed answer ends when the same answer would arrive whole. The ``n`` choices
are generated side by side, so ``n`` does not lengthen the wait.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson

from atajo.core.catalog import Catalog
from atajo.core.deployments import Deployment
from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.core.results import Completion, Usage
from atajo.errors import UpstreamStreamBroken, UpstreamUnavailable
from atajo.providers.status import error_for_status
from atajo.types import JSONObject

FINGERPRINT = "atajo-simulated"
EMBEDDING_DIMENSIONS = 256
_WORDS = [
    "the",
    "a",
    "gateway",
    "cache",
    "answer",
    "model",
    "request",
    "token",
    "latency",
    "cost",
    "user",
    "system",
    "data",
    "simple",
    "quick",
    "result",
    "value",
    "service",
    "query",
    "response",
    "fast",
    "cheap",
    "correct",
    "stream",
    "provider",
    "context",
    "budget",
    "route",
    "check",
    "policy",
    "and",
    "of",
    "to",
    "in",
    "is",
    "for",
    "with",
    "on",
    "that",
    "this",
    "it",
    "as",
    "be",
    "by",
    "are",
    "can",
    "will",
]

Sleep = Callable[[float], Awaitable[None]]


def count_tokens(text: str) -> int:
    """About four characters a token, as OpenAI's rule of thumb; real tokenizers come with the catalog work."""
    return max(1, (len(text) + 3) // 4) if text else 0


def prompt_tokens(messages: list[JSONObject]) -> int:
    total = 3
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        total += 4 + count_tokens(str(content or ""))
    return total


class SimulatedProvider:
    name = "simulated"

    def __init__(self, catalog: Catalog, sleep: Sleep = asyncio.sleep) -> None:
        self.catalog = catalog
        self.sleep = sleep
        self._fault_rng: dict[str, random.Random] = {}

    # --- latency and faults ---------------------------------------------------------------------

    def _latency(self, deployment: Deployment, model: str) -> tuple[float, float]:
        """(time to first token in s, seconds per token) for this deployment and model."""
        sim = deployment.simulated
        info = self.catalog.get(model)
        fields = sim.model_fields_set
        ttft_ms = sim.ttft_ms if "ttft_ms" in fields or info is None else info.ttft_ms
        tps = (
            sim.tokens_per_s
            if "tokens_per_s" in fields or info is None or not info.tokens_per_s
            else (info.tokens_per_s)
        )
        return ttft_ms / 1000, sim.slow_stream_factor / tps

    def _jitter(self, rng: random.Random, seconds: float, jitter: float) -> float:
        return max(0.0, seconds * (1 + rng.uniform(-jitter, jitter))) if seconds else 0.0

    def _rng(self, deployment: Deployment) -> random.Random:
        rng = self._fault_rng.get(deployment.id)
        if rng is None:
            rng = self._fault_rng[deployment.id] = random.Random(deployment.simulated.seed)
        return rng

    def _maybe_fail(self, deployment: Deployment) -> None:
        sim = deployment.simulated
        if sim.error_rate and self._rng(deployment).random() < sim.error_rate:
            raise error_for_status(sim.error_status, "injected fault (simulated)", where=f"deployment {deployment.id}")

    def _drops(self, deployment: Deployment) -> bool:
        rate = deployment.simulated.drop_rate
        return bool(rate) and self._rng(deployment).random() < rate

    # --- chat -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest, deployment: Deployment, upstream_model: str) -> Completion:
        ttft, per_token = self._latency(deployment, upstream_model)
        self._maybe_fail(deployment)
        answer = _Answer(request.body, upstream_model, deployment)
        rng = random.Random(answer.seed)
        jitter = deployment.simulated.jitter
        later_tokens = max(0, answer.completion_tokens // answer.n - 1)  # the first one came with ttft
        await self.sleep(self._jitter(rng, ttft + per_token * later_tokens, jitter))
        if self._drops(deployment):
            raise UpstreamUnavailable(f"deployment {deployment.id}: connection dropped (simulated)")
        body = answer.completion()
        return Completion(body, Usage.from_openai(body["usage"]))

    async def chat_stream(
        self, request: ChatRequest, deployment: Deployment, upstream_model: str
    ) -> AsyncGenerator[JSONObject, None]:
        ttft, per_token = self._latency(deployment, upstream_model)
        self._maybe_fail(deployment)
        answer = _Answer(request.body, upstream_model, deployment)
        rng = random.Random(answer.seed)
        jitter = deployment.simulated.jitter
        stream = answer.stream()
        # A dropped stream is cut halfway, always after its first chunk (a cut before it is a failed call).
        drop_at = max(1, len(stream) // 2) if self._drops(deployment) else -1
        await self.sleep(self._jitter(rng, ttft, jitter))
        first_token = True
        for i, (chunk, tokens) in enumerate(stream):
            if i == drop_at:
                raise UpstreamStreamBroken(f"deployment {deployment.id}: connection dropped mid-stream (simulated)")
            if tokens:
                later_tokens = tokens - 1 if first_token else tokens  # the first token came with ttft
                first_token = False
                if later_tokens and per_token:
                    await self.sleep(self._jitter(rng, per_token * later_tokens, jitter))
            yield chunk

    # --- embeddings -----------------------------------------------------------------------------

    async def embeddings(self, request: EmbeddingsRequest, deployment: Deployment, upstream_model: str) -> Completion:
        self._maybe_fail(deployment)
        ttft, _ = self._latency(deployment, upstream_model)
        raw = request.body["input"]
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        dims = request.body.get("dimensions") or EMBEDDING_DIMENSIONS
        as_base64 = request.body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": _embedding(orjson.dumps(text), dims, as_base64)}
            for i, text in enumerate(inputs)
        ]
        tokens = sum(count_tokens(t) if isinstance(t, str) else len(t) for t in inputs)
        await self.sleep(self._jitter(random.Random(tokens), ttft, deployment.simulated.jitter))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        body = {"object": "list", "data": data, "model": upstream_model, "usage": usage}
        return Completion(body, Usage(prompt_tokens=tokens))


def _embedding(key: bytes, dims: int, as_base64: bool) -> list[float] | str:
    """A unit vector that depends only on the input, as floats or as base64 of little-endian float32."""
    rng = random.Random(hashlib.blake2b(key, digest_size=8).digest())
    vec = [rng.gauss(0, 1) for _ in range(dims)]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    unit = [round(v / norm, 6) for v in vec]
    return base64.b64encode(struct.pack(f"<{dims}f", *unit)).decode() if as_base64 else unit


class _Answer:
    """The deterministic answer to one request: text, tool calls or JSON, cut by ``stop`` and ``max_tokens``."""

    def __init__(self, body: JSONObject, model: str, deployment: Deployment) -> None:
        self.body = body
        self.model = model
        messages: list[JSONObject] = body["messages"]
        digest = hashlib.blake2b(orjson.dumps([model, messages, body.get("seed")]), digest_size=8)
        self.seed = int.from_bytes(digest.digest(), "big")
        self.id = f"chatcmpl-sim-{digest.hexdigest()}"
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens(messages)
        self.n = int(body.get("n") or 1)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        self.limit: int | None = limit
        rng = random.Random(self.seed)
        wanted = max(1, int(deployment.simulated.output_tokens * rng.uniform(0.5, 1.5)))
        self.truncated = limit is not None and wanted > limit
        self.target_tokens = min(wanted, limit) if limit is not None else wanted
        self.tool_calls = self._tool_calls(rng)
        self.text = None if self.tool_calls else self._text(rng)
        self.completion_tokens = self.n * (
            count_tokens(self.text or "") or sum(count_tokens(str(c)) for c in self.tool_calls or ())
        )

    def _tool_calls(self, rng: random.Random) -> list[JSONObject] | None:
        tools = self.body.get("tools") or []
        choice = self.body.get("tool_choice", "auto")
        last_role = self.body["messages"][-1].get("role")
        if not tools or choice == "none" or (choice == "auto" and last_role == "tool"):
            return None
        tool = tools[0]
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            tool = next((t for t in tools if (t.get("function") or {}).get("name") == name), tool)
        function = tool.get("function") or {}
        arguments = _fill_schema(function.get("parameters") or {}, rng)
        return [
            {
                "id": f"call_sim_{rng.getrandbits(48):012x}",
                "type": "function",
                "function": {
                    "name": function.get("name", "tool"),
                    "arguments": orjson.dumps(arguments).decode(),
                },
            }
        ]

    def _text(self, rng: random.Random) -> str:
        fmt = (self.body.get("response_format") or {}).get("type")
        if fmt == "json_schema":
            schema = ((self.body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
            return self._fit(orjson.dumps(_fill_schema(schema, rng)).decode())
        words = " ".join(rng.choice(_WORDS) for _ in range(max(1, self.target_tokens * 3 // 4)))
        text = f"[simulated {self.model}] {words.capitalize()}."
        if fmt == "json_object":
            return self._fit(orjson.dumps({"answer": _cut(text, max(1, self.target_tokens - 4))}).decode())
        text = _cut(text, self.target_tokens)
        for stop in _stops(self.body.get("stop")):
            if stop in text:
                self.truncated = False
                return text[: text.index(stop)]
        return text

    def _fit(self, json_text: str) -> str:
        """Structured output is whole, valid JSON when it fits in ``max_tokens``. When it does not, it is cut
        there (so it is invalid) and finish_reason is "length", as a real model's answer would be."""
        if self.limit is not None and count_tokens(json_text) > self.limit:
            self.truncated = True
            return _cut(json_text, self.limit)
        self.truncated = False
        return json_text

    def finish_reason(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        return "length" if self.truncated else "stop"

    def usage(self) -> JSONObject:
        return Usage(self.prompt_tokens, self.completion_tokens).to_openai()

    def completion(self) -> JSONObject:
        message: JSONObject = {"role": "assistant", "content": self.text, "refusal": None}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        choices = [
            {"index": i, "message": message, "logprobs": None, "finish_reason": self.finish_reason()}
            for i in range(self.n)
        ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": self.usage(),
        }

    def pieces(self) -> list[str]:
        text = self.text or ""
        words = text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []

    def _chunk(self, choices: list[JSONObject], usage: JSONObject | None = None) -> JSONObject:
        chunk: JSONObject = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def chunks(self) -> list[JSONObject]:
        return [chunk for chunk, _ in self.stream()]

    def stream(self) -> list[tuple[JSONObject, int]]:
        """The streamed answer's chunks, each with the completion tokens (of one choice) it carries; they add
        up to the usage the last chunk reports."""

        def choices(delta: JSONObject, finish: str | None = None) -> JSONObject:
            return self._chunk(
                [{"index": i, "delta": dict(delta), "logprobs": None, "finish_reason": finish} for i in range(self.n)]
            )

        out: list[tuple[JSONObject, int]] = [(choices({"role": "assistant", "content": ""}), 0)]
        if self.tool_calls:
            calls = [dict(c, index=j) for j, c in enumerate(self.tool_calls)]
            out.append((choices({"tool_calls": calls}), sum(count_tokens(str(c)) for c in self.tool_calls)))
        sent, counted = "", 0
        for piece in self.pieces():
            sent += piece
            tokens = count_tokens(sent) - counted
            counted += tokens
            out.append((choices({"content": piece}), tokens))
        out.append((choices({}, self.finish_reason()), 0))
        out.append((self._chunk([], self.usage()), 0))
        return out


def _cut(text: str, tokens: int) -> str:
    return text[: tokens * 4].rstrip()


def _stops(stop: Any) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop or () if isinstance(s, str) and s]


def _fill_schema(schema: JSONObject, rng: random.Random, depth: int = 0) -> Any:
    """A value that satisfies a simple JSON schema, for simulated tool arguments and structured output."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {k: _fill_schema(v, rng, depth + 1) for k, v in props.items() if depth < 5}
    if kind == "array":
        return [_fill_schema(schema.get("items") or {}, rng, depth + 1)] if depth < 5 else []
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    return rng.choice(_WORDS)
