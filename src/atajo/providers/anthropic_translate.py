"""OpenAI Chat Completions ⇄ Anthropic Messages, as pure functions (no I/O), so they can be tested alone.

Request: system/developer messages become the top-level ``system``; tool messages become ``tool_result``
blocks in a user turn; consecutive turns of one role are merged (Anthropic wants user and assistant to
alternate); tools, tool_choice, stop, user and the sampling knobs are renamed or clamped. OpenAI fields
with no Anthropic equivalent that only tune sampling (seed, penalties, logit_bias...) are dropped; those
that would change the shape of the answer (``n`` > 1, logprobs, audio, legacy functions) are refused.

JSON mode (``response_format`` json_object / json_schema): Anthropic has no such switch, so the request
gets one extra tool whose ``input_schema`` is the wanted schema and ``tool_choice`` forces the model to
call it. Tool inputs are always a JSON object (constrained by the schema), so the tool's input is returned
as the message content and the finish reason is "stop". This is exact, unlike asking nicely in the prompt.
When the caller also sends tools of their own, forcing one tool would stop the model from calling theirs,
so the schema goes into the system prompt as an instruction instead (best effort).

Response: text blocks joined into ``content``, ``tool_use`` blocks into ``tool_calls``; usage counts
cache reads and writes as prompt tokens (OpenAI's prompt_tokens includes cached tokens, Anthropic's
input_tokens does not). The stream is translated event by event by ``StreamTranslator``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from atajo.core.results import Usage
from atajo.errors import InvalidRequest, UnsupportedParameter, UpstreamStreamBroken, UpstreamUnavailable
from atajo.types import JSONObject

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI's default is "as many as fit"
JSON_TOOL = "json_response"
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_DATA_URL = re.compile(r"^data:([^;,]+)((?:;[^;,]*)*),(.*)$", re.DOTALL)

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Stream error events that mean "busy", as the HTTP status Anthropic would have answered with.
_RETRYABLE_STREAM_ERRORS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}


@dataclass(frozen=True, slots=True)
class AnthropicRequest:
    body: JSONObject
    json_tool: str | None = None
    """The name of the forced tool that carries a JSON-mode answer, if JSON mode is emulated that way."""


# --- request ---------------------------------------------------------------------------------------


def to_anthropic(body: JSONObject, model: str, *, stream: bool) -> AnthropicRequest:
    """An OpenAI chat request body (already checked by ``server/parse.py``) as an Anthropic Messages body."""
    _refuse_unsupported(body)
    system, messages = convert_messages(body["messages"])
    out: JSONObject = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    temperature = body.get("temperature")
    if temperature is not None:
        out["temperature"] = min(max(temperature, 0), 1)  # OpenAI allows 0..2, Anthropic 0..1
    for name in ("top_p", "top_k"):  # top_k is not OpenAI's, but clients send it as an extra field
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    if stream:
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(tool, i) for i, tool in enumerate(tools)]
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if choice is not None:
            out["tool_choice"] = choice
    json_tool = _json_mode(body.get("response_format"), out, system, has_tools=bool(tools))
    if system:
        out["system"] = "\n\n".join(system)
    return AnthropicRequest(out, json_tool)


def _refuse_unsupported(body: JSONObject) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise UnsupportedParameter("Anthropic models return one choice per request; 'n' must be 1.", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise UnsupportedParameter("Anthropic models do not return log probabilities.", param="logprobs")
    if body.get("audio") is not None or "audio" in (body.get("modalities") or ()):
        raise UnsupportedParameter("Anthropic models do not produce audio.", param="modalities")
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise UnsupportedParameter(
                f"'{name}' is deprecated and not translated for Anthropic models; use 'tools'.", param=name
            )


def convert_messages(messages: list[JSONObject]) -> tuple[list[str], list[JSONObject]]:
    """(system texts, alternating user/assistant turns with content blocks)."""
    system: list[str] = []
    turns: list[JSONObject] = []
    for i, message in enumerate(messages):
        role = message["role"]
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            text = _plain_text(message.get("content"), where)
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, where)]
        else:
            raise UnsupportedParameter(
                f"'{where}.role' {role!r} is deprecated and not translated for Anthropic models; use 'tool'.",
                param=f"{where}.role",
            )
        if not blocks:
            continue  # Anthropic rejects empty turns; an empty OpenAI message says nothing anyway
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)  # e.g. several tool results, then the user's next words
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _plain_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content or ()):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"'{where}.content[{j}]': only text parts are allowed in this message.", param=f"{where}.content[{j}]"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _text_block(text: Any, where: str) -> list[JSONObject]:
    if not isinstance(text, str):
        raise InvalidRequest(f"'{where}.text' must be a string.", param=f"{where}.text")
    return [{"type": "text", "text": text}] if text else []  # Anthropic rejects empty text blocks


def _user_blocks(content: Any, where: str) -> list[JSONObject]:
    if isinstance(content, str):
        return _text_block(content, where)
    blocks: list[JSONObject] = []
    for j, part in enumerate(content or ()):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind == "text":
            blocks += _text_block(part.get("text"), at)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append({"type": "image", "source": _image_source(url, f"{at}.image_url.url")})
        elif kind == "file":
            blocks.append(_document(part.get("file"), f"{at}.file"))
        else:
            message = f"Content parts of type {kind!r} are not supported by Anthropic models."
            raise UnsupportedParameter(message, param=at)
    return blocks


def _image_source(url: Any, where: str) -> JSONObject:
    if isinstance(url, str):
        if url.startswith(("http://", "https://")):
            return {"type": "url", "url": url}
        match = _DATA_URL.match(url)
        if match and ";base64" in match.group(2):
            return {"type": "base64", "media_type": match.group(1), "data": match.group(3)}
    raise InvalidRequest(f"'{where}' must be an http(s) URL or a base64 data: URL.", param=where)


def _document(file: Any, where: str) -> JSONObject:
    data = file.get("file_data") if isinstance(file, dict) else None
    match = _DATA_URL.match(data) if isinstance(data, str) else None
    if match is None or ";base64" not in match.group(2):
        raise UnsupportedParameter(
            "Only files sent inline as base64 data: URLs in 'file_data' are supported by Anthropic models.",
            param=where,
        )
    return {"type": "document", "source": {"type": "base64", "media_type": match.group(1), "data": match.group(3)}}


def _assistant_blocks(message: JSONObject, where: str) -> list[JSONObject]:
    content = message.get("content")
    blocks: list[JSONObject] = []
    if isinstance(content, str):
        blocks += _text_block(content, where)
    else:
        for j, part in enumerate(content or ()):
            kind = part.get("type")
            if kind not in ("text", "refusal"):
                raise UnsupportedParameter(
                    f"Assistant content parts of type {kind!r} are not supported by Anthropic models.",
                    param=f"{where}.content[{j}]",
                )
            blocks += _text_block(part.get(kind), f"{where}.content[{j}]")
    for j, call in enumerate(message.get("tool_calls") or ()):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not call.get("id"):
            raise InvalidRequest(f"'{at}' must have an 'id' and a 'function' with a 'name'.", param=at)
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": function["name"],
                "input": _arguments(function.get("arguments"), f"{at}.function.arguments"),
            }
        )
    return blocks


def _arguments(arguments: Any, where: str) -> JSONObject:
    """A tool call's arguments (a JSON string in OpenAI's schema) as the object Anthropic wants."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}  # a function without parameters
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{where}' must be a JSON object for Anthropic models.", param=where)
    return value


def _tool_result(message: JSONObject, where: str) -> JSONObject:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"Missing required parameter: '{where}.tool_call_id'.", param=f"{where}.tool_call_id")
    block: JSONObject = {"type": "tool_result", "tool_use_id": call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content:
        block["content"] = _user_blocks(content, where)
    return block


def _tool(tool: JSONObject, i: int) -> JSONObject:
    if tool.get("type", "function") != "function":
        raise UnsupportedParameter(
            f"Tools of type {tool.get('type')!r} are not supported by Anthropic models.", param=f"tools[{i}]"
        )
    function = tool["function"]
    out: JSONObject = {
        "name": function["name"],
        # Anthropic requires a schema; a function without parameters takes an empty object.
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any) -> JSONObject | None:
    if choice is None:
        return None
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return {"type": "tool", "name": function["name"]}
    raise InvalidRequest(
        "Invalid 'tool_choice': expected 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}.',
        param="tool_choice",
    )


def _json_mode(fmt: Any, out: JSONObject, system: list[str], *, has_tools: bool) -> str | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("json_object", "json_schema"):
        return None
    name, description, schema = JSON_TOOL, "Give the answer as this tool's input.", {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        spec = spec if isinstance(spec, dict) else {}
        schema = spec.get("schema") or schema
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidRequest(
                '\'response_format.json_schema.schema\' must describe an object ("type": "object").',
                param="response_format.json_schema.schema",
            )
        if isinstance(spec.get("name"), str) and _TOOL_NAME.match(spec["name"]):
            name = spec["name"]
        if isinstance(spec.get("description"), str) and spec["description"]:
            description = spec["description"]
    if has_tools:
        instruction = "Answer with a single JSON object and nothing else: no prose, no code fences."
        if kind == "json_schema":
            instruction += " The object must match this JSON schema: " + orjson.dumps(schema).decode()
        system.append(instruction)
        return None
    out["tools"] = [{"name": name, "description": description, "input_schema": schema}]
    out["tool_choice"] = {"type": "tool", "name": name}
    return name


# --- response --------------------------------------------------------------------------------------


def usage_from_anthropic(usage: Any, into: Usage | None = None) -> Usage:
    """Anthropic usage (whole, or the partial one of a stream event) as OpenAI-style counts."""
    result = into or Usage()
    if not isinstance(usage, dict):
        return result
    fresh = usage.get("input_tokens")
    read = usage.get("cache_read_input_tokens")
    written = usage.get("cache_creation_input_tokens")
    if fresh is not None or read is not None or written is not None:
        result.prompt_tokens = int(fresh or 0) + int(read or 0) + int(written or 0)
        result.cached_tokens = int(read or 0)
    if usage.get("output_tokens") is not None:
        result.completion_tokens = int(usage["output_tokens"])
    return result


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _arguments_json(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def from_anthropic(message: JSONObject, *, json_tool: str | None, created: int, model: str) -> tuple[JSONObject, Usage]:
    """An Anthropic ``message`` as an OpenAI ``chat.completion`` body, and its usage."""
    texts: list[str] = []
    calls: list[JSONObject] = []
    answer: str | None = None
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use" and json_tool is not None and block.get("name") == json_tool:
            answer = _arguments_json(block.get("input"))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": _arguments_json(block.get("input"))},
                }
            )
        # thinking and server-tool blocks have no place in an OpenAI message: skipped
    finish = finish_reason(message.get("stop_reason"))
    if answer is not None:
        content: str | None = answer  # any text around the forced tool call would spoil the JSON
        if finish == "tool_calls":
            finish = "stop"
    else:
        content = "".join(texts) if texts or not calls else None
    reply: JSONObject = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        reply["tool_calls"] = calls
    usage = usage_from_anthropic(message.get("usage"))
    body: JSONObject = {
        "id": message.get("id") or "chatcmpl-anthropic",
        "object": "chat.completion",
        "created": created,
        "model": message.get("model") or model,
        "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}],
        "usage": usage.to_openai(),
    }
    return body, usage


@dataclass(slots=True)
class StreamTranslator:
    """Anthropic stream events in, OpenAI ``chat.completion.chunk`` objects out.

    ``feed`` returns the chunks an event becomes (often none). The role chunk comes with message_start,
    the finish chunk and the usage chunk (``choices: []``, as OpenAI sends with include_usage) with
    message_stop, after which ``done`` is true. An ``error`` event raises: ``UpstreamUnavailable`` (so the
    call is retried) when it is a busy signal and nothing was sent yet, else ``UpstreamStreamBroken``.
    """

    where: str
    model: str
    created: int
    json_tool: str | None = None
    id: str = "chatcmpl-anthropic"
    usage: Usage = field(default_factory=Usage)
    done: bool = False
    started: bool = False
    _stop_reason: Any = None
    _tool_index: dict[int, int] = field(default_factory=dict)  # Anthropic block index → OpenAI tool_calls index
    _json_blocks: set[int] = field(default_factory=set)

    def feed(self, event: str, data: JSONObject) -> list[JSONObject]:
        kind = data.get("type") or event
        chunks: list[JSONObject] = []
        if kind == "message_start":
            message = data.get("message") or {}
            self.id = message.get("id") or self.id
            self.model = message.get("model") or self.model
            usage_from_anthropic(message.get("usage"), self.usage)
            chunks.append(self._chunk({"role": "assistant", "content": ""}))
        elif kind == "content_block_start":
            chunks += self._block_start(data.get("index", 0), data.get("content_block") or {})
        elif kind == "content_block_delta":
            chunks += self._block_delta(data.get("index", 0), data.get("delta") or {})
        elif kind == "message_delta":
            delta = data.get("delta") or {}
            self._stop_reason = delta.get("stop_reason") or self._stop_reason
            usage_from_anthropic(data.get("usage"), self.usage)
        elif kind == "message_stop":
            finish = finish_reason(self._stop_reason)
            if self._json_blocks and finish == "tool_calls":
                finish = "stop"
            chunks.append(self._chunk({}, finish))
            chunks.append(self._usage_chunk())
            self.done = True
        elif kind == "error":
            self._fail(data.get("error"))
        # ping, content_block_stop and event types added later carry nothing to translate
        self.started = self.started or bool(chunks)
        return chunks

    def _block_start(self, index: int, block: JSONObject) -> list[JSONObject]:
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if kind != "tool_use":
            return []
        if self.json_tool is not None and block.get("name") == self.json_tool:
            self._json_blocks.add(index)
            return []
        position = self._tool_index[index] = len(self._tool_index)
        call = {
            "index": position,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": ""},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, index: int, delta: JSONObject) -> list[JSONObject]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind != "input_json_delta" or not delta.get("partial_json"):
            return []  # thinking, signature and citation deltas have no OpenAI counterpart
        fragment = delta["partial_json"]
        if index in self._json_blocks:
            return [self._chunk({"content": fragment})]
        if index not in self._tool_index:
            return []
        return [self._chunk({"tool_calls": [{"index": self._tool_index[index], "function": {"arguments": fragment}}]})]

    def _fail(self, error: Any) -> None:
        kind = error.get("type") if isinstance(error, dict) else None
        message = (error.get("message") if isinstance(error, dict) else None) or kind or "error event"
        status = _RETRYABLE_STREAM_ERRORS.get(kind or "")
        if status is not None and not self.started:
            raise UpstreamUnavailable(f"{self.where} answered {status} ({kind}): {message}", upstream_status=status)
        raise UpstreamStreamBroken(f"{self.where} failed mid-stream: {message}")

    def _chunk(self, delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def _usage_chunk(self) -> JSONObject:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage.to_openai(),
        }
