"""OpenAI request JSON → core requests, checked field by field with errors that name the field.

Hand-written rather than a generic schema validator: it runs on every request, checks only what the
gateway or a provider relies on, and passes every other field through untouched, so new OpenAI
parameters keep working without a gateway release.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from atajo.core.requests import ChatRequest, EmbeddingsRequest
from atajo.errors import InvalidRequest, MalformedJSON
from atajo.types import JSONObject

_MODEL_NAME = re.compile(r"^[!-~]{1,256}$")  # it is echoed in headers: no spaces or control characters
MAX_TOKENS = 2**31 - 1
SAFE_INT = 2**53  # integers JSON tools (and JavaScript clients) carry exactly
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_NUMBER = (int, float)


def decode(raw: bytes) -> JSONObject:
    if not raw:
        raise MalformedJSON("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not a {_kind(body)}.")
    return body


def _kind(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), "null")


def _bad(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {_kind(value)}.", param=param)


def _check_number(body: JSONObject, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, _NUMBER) or isinstance(value, bool):
        raise _bad(name, "a number", value)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}, got {value}.", param=name)


def _check_int(body: JSONObject, name: str, low: int, high: int | None = None) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, float) and value.is_integer() and abs(value) <= SAFE_INT:
        value = body[name] = int(value)  # JSON has one number type: 4.0 is the integer 4
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, "an integer", value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"'{name}' must be {bound}, got {value}.", param=name)


def _check_type(body: JSONObject, name: str, kind: type | tuple[type, ...], expected: str) -> None:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind))):
        raise _bad(name, expected, value)


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _model(body: JSONObject) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model", "a non-empty string", model)
    if not _MODEL_NAME.match(model):
        raise InvalidRequest("'model' must be 1 to 256 printable ASCII characters without spaces.", param="model")
    return model


def parse_chat(body: JSONObject) -> ChatRequest:
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list):
        raise _bad("messages", "an array", messages)
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for i, message in enumerate(messages):
        _check_message(i, message)
    for key in body:  # only the fields the request has: most requests carry three or four
        check = _CHAT_FIELDS.get(key)
        if check is not None and body[key] is not None:
            check(body, key)
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return ChatRequest(model=model, body=body, stream=stream, include_usage=include_usage)


def _check_message(i: int, message: Any) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad(where, "an object", message)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(
            f"Invalid value for '{where}.role': expected one of {', '.join(sorted(ROLES))}.",
            param=f"{where}.role",
        )
    content = message.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise _bad(f"{where}.content", "a string or an array of content parts", content)
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"Invalid content part '{where}.content[{j}]': expected an object with a 'type'.",
                    param=f"{where}.content[{j}]",
                )
    if content is None and role in ("user", "system", "developer"):
        raise InvalidRequest(f"Missing required parameter: '{where}.content'.", param=f"{where}.content")
    for name in ("name", "tool_call_id"):
        value = message.get(name)
        if value is not None and not isinstance(value, str):
            raise _bad(f"{where}.{name}", "a string", value)
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and (
        not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls)
    ):
        raise _bad(f"{where}.tool_calls", "an array of objects", tool_calls)


def _check_stop(body: JSONObject, key: str) -> None:
    stop = body[key]
    if isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "a string or an array of strings", stop)
    if len(stop) > 4:
        raise InvalidRequest("'stop' may hold at most 4 sequences.", param="stop")


def _check_tools(body: JSONObject, key: str) -> None:
    tools = body[key]
    if not isinstance(tools, list):
        raise _bad("tools", "an array", tools)
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or tool.get("type") != "function"
        ):
            raise InvalidRequest(
                f'Invalid \'tools[{i}]\': expected {{"type": "function", "function": {{"name": ...}}}}.',
                param=f"tools[{i}]",
            )


def _check_stream_options(body: JSONObject, key: str) -> None:
    options = body[key]
    if not isinstance(options, dict):
        raise _bad("stream_options", "an object", options)
    _check_type(options, "include_usage", bool, "a boolean")


def _check_response_format(body: JSONObject, key: str) -> None:
    fmt = body[key]
    if not isinstance(fmt, dict):
        raise _bad("response_format", "an object", fmt)
    if fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            "Invalid 'response_format.type': expected 'text', 'json_object' or 'json_schema'.",
            param="response_format.type",
        )


def _is_token(value: Any) -> bool:
    # JSON has one number type, so 7.0 is the token 7 (normalised by _tokens below).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _tokens(value: list[Any]) -> list[Any]:
    return [_tokens(v) if isinstance(v, list) else int(v) for v in value]


def _number(low: float, high: float) -> Check:
    return lambda body, key: _check_number(body, key, low, high)


def _integer(low: int, high: int | None = None) -> Check:
    return lambda body, key: _check_int(body, key, low, high)


def _typed(kind: type | tuple[type, ...], expected: str) -> Check:
    return lambda body, key: _check_type(body, key, kind, expected)


Check = Callable[[JSONObject, str], None]

# Optional chat fields the gateway checks; any other field passes through to the provider untouched.
_CHAT_FIELDS: dict[str, Check] = {
    "stream": _typed(bool, "a boolean"),
    "stream_options": _check_stream_options,
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "n": _integer(1, 128),
    "max_tokens": _integer(1, MAX_TOKENS),
    "max_completion_tokens": _integer(1, MAX_TOKENS),
    "seed": _integer(-SAFE_INT, SAFE_INT),
    "top_logprobs": _integer(0, 20),
    "logprobs": _typed(bool, "a boolean"),
    "user": _typed(str, "a string"),
    "logit_bias": _typed(dict, "an object"),
    "metadata": _typed(dict, "an object"),
    "stop": _check_stop,
    "tools": _check_tools,
    "tool_choice": _typed((str, dict), "a string or an object"),
    "response_format": _check_response_format,
}


def parse_embeddings(body: JSONObject) -> EmbeddingsRequest:
    model = _model(body)
    value = body.get("input")
    if value is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' cannot be an empty string.", param="input")
    elif isinstance(value, list):
        if not value:
            raise InvalidRequest("'input' cannot be an empty array.", param="input")
        if len(value) > 2048:
            raise InvalidRequest("'input' may hold at most 2048 items.", param="input")
        if not (
            all(isinstance(v, str) and v for v in value)
            or all(_is_token(v) for v in value)
            or all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value)
        ):
            raise InvalidRequest(
                "'input' must be a string, an array of non-empty strings, or token arrays.", param="input"
            )
        if not isinstance(value[0], str):
            body["input"] = _tokens(value)
    else:
        raise _bad("input", "a string or an array", value)
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    _check_int(body, "dimensions", 1, 65536)
    _check_type(body, "user", str, "a string")
    return EmbeddingsRequest(model=model, body=body)
