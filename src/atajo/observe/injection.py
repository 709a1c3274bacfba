"""Prompt-injection attempts in what users send: phrases that try to override the system prompt, unlock a
"mode", or get the hidden instructions printed.

A list of patterns, not a model: it catches the common, literal attempts (the ones that fill the public
jailbreak collections) cheaply and predictably, and misses paraphrased or encoded ones. What it finds is
counted and fed to the adaptive limits as a flag on the client; it blocks only where configured.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PATTERNS: dict[str, str] = {
    "override": r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,20}?\b(previous|prior|above|earlier|"
    r"preceding|system|initial|original)\b[^.\n]{0,20}\b(instructions?|prompts?|rules|guidelines|directions|"
    r"messages?|context|policies)\b|\b(ignore|disregard|forget)\s+(all\s+|everything\s+)?(of\s+)?(the\s+)?"
    r"above\b",
    "reveal": r"\b(reveal|show|print|repeat|output|tell me|give me|leak|display)\b[^.\n]{0,30}\b(your|the)\b"
    r"[^.\n]{0,20}\b(system prompt|initial prompt|hidden (instructions|prompt)|original instructions|"
    r"instructions above)\b",
    "persona": r"\b(you are now|from now on,? you are|act as|pretend (to be|you are))\b[^.\n]{0,40}"
    r"\b(DAN|do anything now|jailbroken|unrestricted|without (any )?(restrictions|limits|filters|rules))\b",
    "mode": r"\b(developer|god|jailbreak|unrestricted|debug) mode\b[^.\n]{0,30}\b(on|enabled|activated?)\b|"
    r"\benable\b[^.\n]{0,20}\b(developer|god|jailbreak) mode\b",
    "delimiter": r"(<\|im_start\|>|<\|im_end\|>|\[/?INST\]|<</?SYS>>|^\s*###\s*(system|instruction)s?\s*:)",
}
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE | re.MULTILINE)) for name, pattern in PATTERNS.items()]
MAX_CHARS = 20_000
"""Only the first characters of each text are scanned (bounded cost per request)."""


def detect(texts: Iterable[str]) -> str | None:
    """The kind of the first injection attempt found in ``texts`` (``override``, ``reveal``, ``persona``,
    ``mode``, ``delimiter``), or ``None``."""
    for text in texts:
        head = text[:MAX_CHARS]
        for name, pattern in _COMPILED:
            if pattern.search(head):
                return name
    return None


def user_texts(body: object) -> list[str]:
    """The text of a chat request's user messages (string contents and text parts)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    texts: list[str] = []
    if not isinstance(messages, list):
        return texts
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return texts
