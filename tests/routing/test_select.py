"""Model selection without HTTP: hard constraints exclude, the wanted quality picks, reasons and errors name why."""

from __future__ import annotations

from typing import Any

import pytest

from atajo.core.catalog import load_catalog
from atajo.core.requests import ChatRequest
from atajo.errors import NoHealthyModel, NoModelMeetsConstraints
from atajo.routing.cascade import failed_check
from atajo.routing.complexity import ComplexityModel
from atajo.routing.select import (
    Candidate,
    Constraints,
    Limit,
    Selector,
    guess_task,
    required_capabilities,
    wanted_quality,
)
from atajo.routing.tokens import TokenCounter
from atajo.settings import QualityTier, RoutingSettings

CATALOG = load_catalog()
COUNTER = TokenCounter(CATALOG)
COMPLEXITY = ComplexityModel.load()


def chat(text: str, **body: Any) -> ChatRequest:
    return ChatRequest("auto", {"model": "auto", "messages": [{"role": "user", "content": text}], **body})


def selector(*names: str, healthy: Any = None, **kwargs: Any) -> Selector:
    routing = RoutingSettings()
    candidates = []
    for name in names:
        info = CATALOG.get(name)
        assert info is not None
        candidates.append(Candidate(name, info, (f"{name}#0",)))
    return Selector(
        "auto", candidates, COUNTER, COMPLEXITY, routing.quality_tiers, routing.task_min_quality,
        healthy=healthy or (lambda _: True), **kwargs,
    )  # fmt: skip


def test_capabilities_come_from_the_request() -> None:
    assert required_capabilities(chat("hi")) == frozenset()
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert required_capabilities(chat("hi", tools=tools)) == {"tools"}
    assert required_capabilities(chat("hi", response_format={"type": "json_object"})) == {"json_mode"}
    assert required_capabilities(chat("hi", response_format={"type": "text"})) == frozenset()
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
    assert required_capabilities(ChatRequest("auto", {"messages": [image]})) == {"vision"}


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("hi, how are you?", "general"),
        ("What is the capital of France?", "general"),
        ("Fix this bug in my Python code", "code"),
        ("```\nx = 1\n```", "code"),
        ("Solve 3x + 5 = 11", "math"),
        ("How many apples are left?", "math"),
        ("SELECT name FROM users WHERE id = 4", "code"),
        ("PROVE THAT THE SQUARE ROOT OF TWO IS IRRATIONAL", "math"),
        ("I Def Know The Way", "code"),  # cues are matched whatever their case
    ],
)
def test_task_guess(text: str, task: str) -> None:
    assert guess_task(text) == task


def test_tiers_map_scores_to_quality() -> None:
    tiers = [
        QualityTier(below=0.5, min_quality=0.1),
        QualityTier(below=0.7, min_quality=0.5),
        QualityTier(min_quality=0.9),
    ]
    assert [wanted_quality(s, tiers) for s in (0.0, 0.49, 0.5, 0.69, 0.7, 1.0)] == [0.1, 0.1, 0.5, 0.5, 0.9, 0.9]


def test_cheapest_meeting_the_wanted_quality() -> None:
    s = selector("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet")
    choice = s.choose(chat("hi"), Constraints())
    assert choice.name == "gpt-4o-mini"
    assert [o.candidate.name for o in choice.eligible] == ["gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet"]
    # code wants 0.88 for the task: gpt-4o-mini (0.872) is not enough, gpt-4o (0.902) is the cheapest that is
    code = s.choose(chat("Write a Python function that parses dates"), Constraints())
    assert code.task == "code" and code.name == "gpt-4o"


def test_nothing_reaches_the_wanted_quality_gives_the_best() -> None:
    s = selector("gpt-4o-mini", "gpt-3.5-turbo")
    choice = s.choose(chat("Solve 3x + 5 = 11 for x"), Constraints())
    assert choice.name == "gpt-4o-mini"  # math 0.702 > 0.44, neither reaches 0.85
    assert choice.reason.startswith("best quality (0.702)")


def test_hard_constraints_and_the_error_naming_them() -> None:
    s = selector("gpt-4o", "gpt-4o-mini")
    cheap = s.choose(chat("hi"), Constraints()).option.estimate_micros
    with pytest.raises(NoModelMeetsConstraints) as caught:
        s.choose(chat("hi"), Constraints(max_cost_micros=Limit(cheap - 1, "x-atajo-max-cost")))
    assert caught.value.param == "x-atajo-max-cost"
    assert "gpt-4o-mini: cost" in caught.value.message
    with pytest.raises(NoModelMeetsConstraints) as caught:
        s.choose(chat("hi"), Constraints(min_quality=Limit(0.99, "auth.keys[a].route.min_quality")))
    assert caught.value.param == "model" and "auth.keys[a].route.min_quality" in caught.value.message
    no_tools = selector("gpt-3.5-turbo-0301")
    with pytest.raises(NoModelMeetsConstraints, match="no tools"):
        no_tools.choose(chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]), Constraints())


def test_context_window() -> None:
    s = selector("gpt-4", "gpt-4o")  # 8K and 128K
    long = chat("word " * 9000)
    choice = s.choose(long, Constraints())
    assert choice.name == "gpt-4o" and "gpt-4: context too small" in choice.reason


def test_health() -> None:
    s = selector("gpt-4o", "gpt-4o-mini", healthy=lambda c: c.name != "gpt-4o-mini")
    choice = s.choose(chat("hi"), Constraints())
    assert choice.name == "gpt-4o" and "gpt-4o-mini: circuit open" in choice.reason
    down = selector("gpt-4o", healthy=lambda c: False)
    with pytest.raises(NoHealthyModel):
        down.choose(chat("hi"), Constraints())


def test_no_candidates_at_all() -> None:
    with pytest.raises(NoModelMeetsConstraints, match="no model to choose from"):
        selector().choose(chat("hi"), Constraints())


def answer(content: str | None, finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message},
                         "finish_reason": finish}]}  # fmt: skip


ALL = ("truncated", "refusal", "invalid_json", "low_confidence")


@pytest.mark.parametrize(
    ("body", "request_body", "expected"),
    [
        (answer("Paris."), {}, None),
        (answer("Paris is the cap", "length"), {}, "truncated"),
        (answer("I'm sorry, but I can't help with that."), {}, "refusal"),
        (answer("I cannot assist with that request."), {}, "refusal"),
        (answer(None, refusal="no"), {}, "refusal"),
        (answer("Sorry to hear that! Here is a recipe."), {}, None),
        (answer("{not json"), {"response_format": {"type": "json_object"}}, "invalid_json"),
        (answer('{"a": 1}'), {"response_format": {"type": "json_object"}}, None),
        (answer("{not json"), {}, None),
        (answer("I'm not sure, but maybe 42."), {}, "low_confidence"),
        (answer("42. Confidence: 30%"), {}, "low_confidence"),
        (answer("42. Confidence: 95%"), {}, None),
    ],
)
def test_cascade_checks(body: dict[str, Any], request_body: dict[str, Any], expected: str | None) -> None:
    assert failed_check(body, request_body, ALL) == expected


def test_cascade_checks_can_be_turned_off() -> None:
    assert failed_check(answer("x", "length"), {}, ("refusal",)) is None
