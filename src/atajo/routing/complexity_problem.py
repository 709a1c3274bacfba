"""What makes a math word problem hard for a weak model, as counts taken in one pass over its tokens.

Within one kind of question (grade-school word problems) words say more about the topic than about the
difficulty, and weights on them overfit: on the RouteLLM GSM8K labels, a model over these counts routes
better than one over words (docs/routing.md, "Other options measured"). The counts describe the problem's
shape: how many numbers and quantities, sentences and clauses, names, which operations it asks for (twice,
half, percent, each, per, remaining, more, less, total, average, ratio...), money, units, time, large numbers
and decimals. ``problem_features`` turns each count into one bin feature (``m:numbers=3``), so a model over
them is still a dict lookup per feature. One tokenising regex and dict lookups per token keep a 4,000
character prompt within a few times the cost of the word features (one regex per cue was 15 times slower).
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import pairwise

_TOKEN = re.compile(r"[A-Za-z]+|\d[\d,]*(?:\.\d+)?|[^\sA-Za-z\d]")
_SENTENCE_END = frozenset(".!?")

# Cue words by the operation or quantity they signal: whole words, and word stems (``increas`` for increase,
# increased, increasing). A word can signal several.
_CUE_WORDS = {
    "twice": ("twice",),
    "half": ("half", "halves"),
    "percent": (),
    "each": ("each", "every"),
    "per": ("per",),
    "remain": ("left", "rest"),
    "more": ("more",),
    "less": ("less", "fewer"),
    "total": (),
    "average": ("mean",),
    "ratio": ("ratio",),
    "times": ("times",),
    "fraction": (),
    "money": ("dollar", "dollars", "cent", "cents"),
    "price_change": ("off", "sale", "tax", "tip"),
    "time": ("hour", "hours", "minute", "minutes", "second", "seconds", "am", "pm"),
    "unit": (),
    "calendar": ("day", "days", "week", "weeks", "month", "months", "year", "years"),
    "condition": ("if", "after", "then", "before", "until", "while"),
    "than": ("than",),
    "age": ("old", "age", "younger", "older"),
    "speed": ("mph", "faster", "slower"),
    "change": (),
    "remainder": ("rest", "remainder", "remaining"),
    "how_much_more": ("difference",),
}
_CUE_STEMS = {
    "twice": ("double",),
    "percent": ("percent",),
    "remain": ("remain",),
    "total": ("total", "altogether", "combined"),
    "average": ("average",),
    "ratio": ("proportion",),
    "fraction": ("third", "quarter", "fifth"),
    "price_change": ("discount", "interest", "profit"),
    "speed": ("speed",),
    "change": ("increas", "decreas", "rais", "drop"),
}
# Word pairs and triples that signal a cue on their own (``in all`` is a total, ``an hour`` a rate).
_CUE_PHRASES = {
    ("in", "all"): "total",
    ("an", "hour"): "per",
    ("a", "day"): "per",
    ("a", "week"): "per",
    ("per", "hour"): "speed",
    ("what", "percent"): "what_share",
    ("what", "fraction"): "what_share",
    ("the", "ratio"): "what_share",
    ("many", "more"): "how_much_more",
    ("much", "more"): "how_much_more",
    ("many", "less"): "how_much_more",
    ("much", "less"): "how_much_more",
}
CUES = (*_CUE_WORDS, "what_share")
_UNITS = frozenset(
    [
        "mile",
        "miles",
        "km",
        "meter",
        "meters",
        "metre",
        "metres",
        "feet",
        "foot",
        "inch",
        "inches",
        "yard",
        "yards",
        "pound",
        "pounds",
        "ounce",
        "ounces",
        "gram",
        "grams",
        "kg",
        "liter",
        "liters",
        "litre",
        "litres",
        "gallon",
        "gallons",
        "cup",
        "cups",
        "mph",
    ]
)
_NUMBER_WORDS = frozenset(
    [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "fifteen",
        "twenty",
        "thirty",
        "forty",
        "fifty",
        "hundred",
        "thousand",
        "million",
        "dozen",
        "half",
        "third",
        "quarter",
        "twice",
        "thrice",
        "double",
        "triple",
    ]
)
# Capitalised words that open sentences rather than name someone or something.
_OPENERS = frozenset(
    [
        "a",
        "after",
        "all",
        "an",
        "and",
        "as",
        "at",
        "before",
        "but",
        "by",
        "each",
        "every",
        "for",
        "he",
        "her",
        "his",
        "how",
        "i",
        "if",
        "in",
        "it",
        "its",
        "now",
        "of",
        "on",
        "one",
        "she",
        "so",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "to",
        "two",
        "we",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "why",
        "with",
        "you",
    ]
)
# Counts divided by these before binning (words by fifteens...); the others are binned as they are.
_STEP = {"words": 15, "words_per_sentence": 5, "question_words": 4}


@lru_cache(maxsize=4096)
def _cues_of(word: str) -> tuple[str, ...]:
    """The cues a lower-cased word signals (cached: problems reuse a small vocabulary)."""
    found = [cue for cue, words in _CUE_WORDS.items() if word in words]
    found += [cue for cue, stems in _CUE_STEMS.items() if word.startswith(stems)]
    if word in _UNITS or word.startswith("kilomet"):
        found.append("unit")
    return tuple(found)


def problem_counts(text: str) -> dict[str, int]:
    """The problem's shape as whole counts; ``questions`` and the ``question_*`` counts read the last sentence."""
    tokens = _TOKEN.findall(text)
    words = [t.lower() for t in tokens if t[0].isalpha()]
    numbers = [t.rstrip(",") for t in tokens if t[0].isdigit()]
    values = {float(n.replace(",", "")) for n in numbers}
    sentences = _sentences(tokens)
    question = sentences[-1] if sentences else []
    cues = dict.fromkeys(CUES, 0)
    for word in words:
        for cue in _cues_of(word):
            cues[cue] += 1
    for pair in pairwise(words):
        phrase = _CUE_PHRASES.get(pair)
        if phrase is not None:
            cues[phrase] += 1
    cues["percent"] += text.count("%")
    cues["money"] += text.count("$")
    for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
        if a[0].isdigit() and c[0].isdigit():
            if b == ":":  # a clock time, 7:30
                cues["time"] += 1
            elif b == "/":  # a fraction, 3/4
                cues["fraction"] += 1
    counts = {
        "words": len(words),
        "numbers": len(numbers),
        "distinct_numbers": len(values),
        "quantities": len(numbers) + sum(1 for w in words if w in _NUMBER_WORDS),
        "sentences": len(sentences),
        "words_per_sentence": len(words) // max(1, len(sentences)),
        "questions": text.count("?"),
        "commas": text.count(","),
        "ands": words.count("and"),
        "max_digits": max((len(str(int(v))) for v in values if v < 1e15), default=0),
        "large_numbers": sum(v >= 1000 for v in values),
        "decimals": sum("." in n for n in numbers),
        "dollar_signs": text.count("$"),
        "unit_kinds": len({w for w in words if w in _UNITS or w.startswith("kilomet")}),
        "names": len({t for t in tokens if t[0].isupper() and t[1:].islower() and t.lower() not in _OPENERS}),
        "question_words": sum(1 for t in question if t[0].isalpha()),
        "question_numbers": sum(1 for t in question if t[0].isdigit()),
    }
    counts.update(("cue_" + name, count) for name, count in cues.items())
    counts["cue_kinds"] = sum(1 for count in cues.values() if count)
    return counts


def problem_features(text: str, prefix: str = "m:") -> set[str]:
    """One feature per count, its bin: the value itself up to 5, then ``6-9`` and ``10+``; none for a text
    without a number or a number word, which is no word problem (small talk then scores as the empty prompt:
    the estimator knows nothing about it, rather than as an average word problem)."""
    counts = problem_counts(text)
    if not counts["quantities"]:
        return set()
    found = set()
    for name, count in counts.items():
        value = count // _STEP.get(name, 1)
        found.add(f"{prefix}{name}=" + (str(value) if value < 6 else "6-9" if value < 10 else "10+"))
    return found


def _sentences(tokens: list[str]) -> list[list[str]]:
    """Tokens split after each run of . ! ? (a decimal point is inside its number), keeping pieces with a word
    or a number: the last one is the problem's question."""
    pieces: list[list[str]] = []
    start = 0
    for k, token in enumerate(tokens):
        if token in _SENTENCE_END and (k + 1 == len(tokens) or tokens[k + 1] not in _SENTENCE_END):
            pieces.append(tokens[start : k + 1])
            start = k + 1
    pieces.append(tokens[start:])
    return [piece for piece in pieces if any(t[0].isalnum() for t in piece)]
