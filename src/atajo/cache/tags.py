"""Dependency tags: where an entry's tags come from, and what an invalidation reaches.

Tags are tenant-relative strings such as ``user:42`` or ``doc:7``. An entry gets the tags its client sent
(``x-atajo-cache-tags``) plus those the configured rules derive from the request. An invalidation of a tag
reaches, through the dependency graph, every tag that depends on it (``profile:{id}`` →
``sessions:{id}``, ...), transitively; the graph is applied when invalidating, so changing it in config
takes effect for entries already stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from atajo.settings import TagRule
from atajo.types import JSONObject

TAG = re.compile(r"^[A-Za-z0-9_.:@#=+-]{1,200}$")
"""What a tag may hold: no spaces, commas or slashes, so tags read the same in headers, logs and keys."""

MAX_TAGS = 64
MAX_EXPANSION = 10_000
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def valid_tag(tag: str) -> bool:
    return TAG.match(tag) is not None


@dataclass(frozen=True, slots=True)
class _Rule:
    source: str
    template: str
    field: str | None
    pattern: re.Pattern[str] | None

    def tags(self, body: JSONObject) -> Iterable[str]:
        if self.source == "user":
            value = body.get("user")
            if isinstance(value, str) and value:
                yield self.template.replace("{value}", value)
        elif self.source == "metadata":
            metadata = body.get("metadata")
            value = metadata.get(self.field) if isinstance(metadata, dict) and self.field else None
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                yield self.template.replace("{value}", str(value))
        elif self.pattern is not None:
            for text in _message_texts(body.get("messages")):
                for match in self.pattern.finditer(text):
                    tag = self.template.replace("{value}", match.group(0))
                    for name, group in match.groupdict().items():
                        tag = tag.replace("{" + name + "}", group or "")
                    yield tag


def _message_texts(messages: object) -> Iterable[str]:
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


class TagRules:
    """The configured rules, compiled once."""

    def __init__(self, rules: Sequence[TagRule]) -> None:
        self._rules = [_Rule(r.source, r.tag, r.field, re.compile(r.pattern) if r.pattern else None) for r in rules]

    def derive(self, body: JSONObject) -> set[str]:
        """Tags the rules give this request; a derived value that does not make a valid tag is skipped."""
        out: set[str] = set()
        for rule in self._rules:
            for tag in rule.tags(body):
                if valid_tag(tag) and len(out) < MAX_TAGS:
                    out.add(tag)
        return out


class DependencyGraph:
    """``pattern → dependent patterns`` from config; ``expand`` follows it transitively (cycles are fine)."""

    def __init__(self, edges: Mapping[str, Sequence[str]]) -> None:
        self._edges = [(_compile(source), list(targets)) for source, targets in edges.items()]

    def expand(self, tags: Iterable[str]) -> frozenset[str]:
        seen = set(tags)
        todo = list(seen)
        while todo and len(seen) < MAX_EXPANSION:
            tag = todo.pop()
            for pattern, targets in self._edges:
                match = pattern.fullmatch(tag)
                if match is None:
                    continue
                values = match.groupdict()
                for target in targets:
                    dependent = _fill(target, values)
                    if dependent not in seen and valid_tag(dependent):
                        seen.add(dependent)
                        todo.append(dependent)
        return frozenset(seen)


def _fill(template: str, values: Mapping[str, str | None]) -> str:
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1)) or "", template)


def _compile(pattern: str) -> re.Pattern[str]:
    """``profile:{id}`` → a regex where ``{id}`` matches one tag segment (no ``:``) and is captured."""
    regex, pos = "", 0
    for match in _PLACEHOLDER.finditer(pattern):
        regex += re.escape(pattern[pos : match.start()]) + f"(?P<{match.group(1)}>[^:]+)"
        pos = match.end()
    return re.compile(regex + re.escape(pattern[pos:]))
