"""The cascade's checks: does a cheap model's answer need the strong model after all?

Each check reads the whole ``chat.completion`` body and says why it failed, or nothing:

- ``truncated``: a choice stopped at the token limit (``finish_reason: length``).
- ``refusal``: the message carries OpenAI's ``refusal`` field, or its text opens by declining.
- ``invalid_json``: the request asked for JSON (``response_format`` json_object / json_schema) and a choice's
  content does not parse.
- ``low_confidence``: the answer says it is unsure ("I'm not sure", "I don't know", "confidence: low" or a
  stated confidence under 50 %).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from atajo.types import JSONObject

_REFUSAL = re.compile(
    r"^\s*(?:(?:I'?m|I am) sorry,?(?: but)? I (?:can(?:no|')t|won'?t|am unable to|'m unable to)"
    r"|I (?:can(?:no|')t|won'?t|am unable to|'m unable to) (?:help|assist|comply|provide|do that|answer))",
    re.IGNORECASE,
)
_UNSURE = re.compile(
    r"\b(?:I'?m not (?:sure|certain|confident)|I am not (?:sure|certain|confident)|I don'?t know|I'?m unsure|"
    r"confidence:?\s*(?:low|very low|[0-4]?\d(?:\.\d+)?\s*%|0?\.[0-4]\d*))",
    re.IGNORECASE,
)
CHECKS = ("truncated", "refusal", "invalid_json", "low_confidence")


def wants_json(request_body: JSONObject) -> bool:
    response_format = request_body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def failed_check(answer: JSONObject, request_body: JSONObject, checks: Iterable[str]) -> str | None:
    """The first of ``checks`` the answer fails, or None when it passes them all."""
    enabled = set(checks)
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        message: Any = choice.get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        text = content if isinstance(content, str) else ""
        if "truncated" in enabled and choice.get("finish_reason") == "length":
            return "truncated"
        if "refusal" in enabled and ((isinstance(message, dict) and message.get("refusal")) or _REFUSAL.search(text)):
            return "refusal"
        if "invalid_json" in enabled and wants_json(request_body) and not message.get("tool_calls"):
            try:
                json.loads(text)
            except ValueError:
                return "invalid_json"
        if "low_confidence" in enabled and _UNSURE.search(text):
            return "low_confidence"
    return None
