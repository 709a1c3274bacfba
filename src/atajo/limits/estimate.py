"""What a request will cost in tokens, estimated before the call (reserved), reconciled with the provider's
usage after it. The input is estimated from the text at about four characters a token (OpenAI's rule of
thumb for English); an exact tokenizer can replace ``estimate_input_tokens`` (it is handed to the limiter by
``app.py``). The output is ``max_completion_tokens`` / ``max_tokens`` when given (an upper bound), else
``limits.output_tokens``, times ``n``."""

from __future__ import annotations

from typing import Any

from atajo.core.requests import ChatRequest, Request

PER_MESSAGE = 4
"""Tokens of framing per chat message (role, separators), as OpenAI counts them."""


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                total += len(text) if isinstance(text, str) else 0
                if part.get("type") == "image_url":
                    total += 85 * 4  # a low-detail image, as OpenAI prices it
            elif isinstance(part, str):
                total += len(part)
        return total
    return 0


def estimate_input_tokens(request: Request) -> int:
    body = request.body
    if isinstance(request, ChatRequest):
        messages = body.get("messages") or []
        chars = sum(_text_chars(m.get("content")) + len(str(m.get("tool_calls") or "")) for m in messages)
        tools = body.get("tools")
        if tools:
            chars += len(str(tools))
        return (chars + 3) // 4 + PER_MESSAGE * len(messages)
    given = body.get("input")
    items = given if isinstance(given, list) else [given]
    tokens = 0
    for item in items:
        if isinstance(item, str):
            tokens += (len(item) + 3) // 4
        elif isinstance(item, list):
            tokens += len(item)  # token ids
        elif isinstance(item, int):
            tokens += 1
    return tokens


def estimate_output_tokens(request: Request, default: int) -> int:
    if not isinstance(request, ChatRequest):
        return 0
    body = request.body
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    n = body.get("n") or 1
    per_choice = limit if isinstance(limit, int) and limit > 0 else default
    return per_choice * (n if isinstance(n, int) and n > 0 else 1)


def estimate_tokens(request: Request, default_output: int) -> int:
    return estimate_input_tokens(request) + estimate_output_tokens(request, default_output)
