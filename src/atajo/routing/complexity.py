"""How much a request needs the strong model: a score in [0, 1] from the prompt's text, in pure Python.

Two logistic models over the same features predict whether a weak (cheap) model and a strong (expensive)
model answer correctly; the score is the expected accuracy gained by calling the strong one, mapped from
[-1, 1] to [0, 1]: ``(1 + P(strong right) - P(weak right)) / 2``. 0.5 means no expected gain; above it the
strong model is expected to help, below it the weak one is expected to do as well or better.

Features are cheap and depend on the prompt's format. A multiple-choice prompt has lexical ones: which words
and word pairs it has (lower-cased ASCII words, numbers as one token, punctuation); which kind of question it
is (its subject) says most about whether a weaker model gets it wrong, and words recognise that well. Any
other prompt has the shape of a math word problem instead (``complexity_problem``: how many numbers,
sentences, names, which operations...): within one kind of question words name the topic rather than the
difficulty. Four numbers about its shape (length, digits, lines, numbers) count for both. The weights were
fitted on the RouteLLM labels (Mixtral-8x7B as weak, GPT-4 as strong, on MMLU and GSM8K prompts) by
``scripts/fit_complexity.py`` and ship as ``complexity.json`` beside this module. Scoring costs a fraction
of a millisecond; it reads at most ``max_chars`` of the prompt.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from itertools import pairwise
from pathlib import Path
from typing import Any

from atajo.core.requests import ChatRequest, Request
from atajo.routing.complexity_problem import problem_features

FORMAT_VERSION = 2  # 2: open prompts have word-problem features instead of words
MAX_CHARS = 4000
DENSE = ("log_chars", "log_digits", "lines", "log_numbers")
_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
_NUMBER = re.compile(r"\d+")
_OPTION = re.compile(r"^\(?[A-Ea-e][.)] ", re.MULTILINE)


def prompt_format(text: str) -> str:
    """``choice`` when the prompt lists lettered options (``A. ...`` / ``(b) ...`` lines), else ``open``."""
    return "choice" if len(_OPTION.findall(text)) >= 2 else "open"


def features(text: str, max_chars: int = MAX_CHARS) -> set[str]:
    """The prompt's sparse features, by its format.

    A multiple-choice prompt (``choice``): ``u:<token>`` for each token, ``b:<word>_<word>`` for adjacent words,
    and each again prefixed (``choice|u:...``), so a word can weigh differently in a multiple-choice question
    than elsewhere while sharing what is common. Any other prompt (``open``): the shape of a word problem
    (``open|m:numbers=3``, ``complexity_problem``; nothing without a number) and no words: within the word
    problems the labels hold, words named the topic more than the difficulty, and weights on them routed worse."""
    head = text[:max_chars]
    if prompt_format(head) == "open":
        return problem_features(head, "open|m:")
    tokens = _TOKEN.findall(head.lower())
    found = {"u:<num>" if token.isdigit() else "u:" + token for token in tokens}
    words = [token for token in tokens if token[0].isalpha()]
    found.update("b:" + a + "_" + b for a, b in pairwise(words))
    found.update(["choice|" + name for name in found])
    return found


def dense_features(text: str) -> tuple[float, ...]:
    """The prompt's shape, scaled to about [0, 1]: length, digits, lines, numbers (the whole text)."""
    digits = sum(c.isdigit() for c in text)
    return (
        math.log1p(len(text)) / 8,
        math.log1p(digits) / 5,
        min(text.count("\n"), 30) / 10,
        math.log1p(len(_NUMBER.findall(text))) / 3,
    )


def prompt_text(request: Request) -> str:
    """What a chat request asks: its last user message's text (RouteLLM routes on the same)."""
    if not isinstance(request, ChatRequest):
        return ""
    messages = request.body.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            return ""
    return ""


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True, slots=True)
class ComplexityModel:
    """Weights of the two logistic heads (strong right, weak right); ``score`` is all serving needs."""

    weights: Mapping[str, tuple[float, float]]
    dense_weights: tuple[tuple[float, float], ...]
    bias: tuple[float, float]
    max_chars: int = MAX_CHARS
    meta: Mapping[str, Any] | None = None
    """How the weights were fitted and what they scored on held-out prompts (shipped for the record)."""

    def logits(self, text: str) -> tuple[float, float]:
        strong, weak = self.bias
        get = self.weights.get
        for name in features(text, self.max_chars):
            pair = get(name)
            if pair is not None:
                strong += pair[0]
                weak += pair[1]
        for value, (ws, ww) in zip(dense_features(text), self.dense_weights, strict=True):
            strong += value * ws
            weak += value * ww
        return strong, weak

    def score(self, text: str) -> float:
        """In [0, 1]: (1 + P(strong right) - P(weak right)) / 2; higher means the strong model is needed more."""
        strong, weak = self.logits(text)
        return (1.0 + _sigmoid(strong) - _sigmoid(weak)) / 2.0

    def score_request(self, request: Request) -> float:
        return self.score(prompt_text(request))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "heads": ["strong_correct", "weak_correct"],
            "max_chars": self.max_chars,
            "bias": list(self.bias),
            "dense": {name: list(w) for name, w in zip(DENSE, self.dense_weights, strict=True)},
            "meta": dict(self.meta or {}),
            "weights": {name: list(pair) for name, pair in sorted(self.weights.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComplexityModel:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"complexity model format {data.get('version')!r}, expected {FORMAT_VERSION}")
        dense = data["dense"]
        if list(dense) != list(DENSE):
            raise ValueError(f"complexity model dense features {list(dense)}, expected {list(DENSE)}")
        return cls(
            weights={str(k): _pair(v) for k, v in data["weights"].items()},
            dense_weights=tuple(_pair(dense[name]) for name in DENSE),
            bias=_pair(data["bias"]),
            max_chars=int(data.get("max_chars", MAX_CHARS)),
            meta=data.get("meta") or {},
        )

    @classmethod
    def load(cls, path: str | Path | None = None) -> ComplexityModel:
        """The model at ``path``, or the one shipped with Atajo."""
        if path is None:
            text = files("atajo.routing").joinpath("complexity.json").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


def _pair(value: Sequence[Any]) -> tuple[float, float]:
    strong, weak = value
    return float(strong), float(weak)
