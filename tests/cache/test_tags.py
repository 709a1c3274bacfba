"""Tags derived from requests, and invalidations expanded through the dependency graph."""

from __future__ import annotations

from atajo.cache.tags import DependencyGraph, TagRules, valid_tag
from atajo.settings import TagRule


def test_rules_derive_tags_from_user_metadata_and_messages() -> None:
    rules = TagRules(
        [
            TagRule(source="user", tag="user:{value}"),
            TagRule(source="metadata", field="doc_id", tag="doc:{value}"),
            TagRule(source="messages", pattern=r"order #(?P<id>\d+)", tag="order:{id}"),
        ]
    )
    body = {
        "user": "42",
        "metadata": {"doc_id": "7", "other": "x"},
        "messages": [
            {"role": "system", "content": "You help with orders."},
            {"role": "user", "content": [{"type": "text", "text": "Where are order #123 and order #456?"}]},
        ],
    }
    assert rules.derive(body) == {"user:42", "doc:7", "order:123", "order:456"}
    assert rules.derive({"messages": [{"role": "user", "content": "nothing here"}]}) == set()


def test_values_that_do_not_make_valid_tags_are_skipped() -> None:
    rules = TagRules([TagRule(source="user", tag="user:{value}")])
    assert rules.derive({"user": "has spaces, and commas"}) == set()
    assert rules.derive({"user": ""}) == set()
    assert not valid_tag("a/b")
    assert valid_tag("user:42")


def test_graph_expands_transitively_and_only_for_the_same_id() -> None:
    graph = DependencyGraph(
        {
            "profile:{id}": ["sessions:{id}", "recommendations:{id}", "notifications:{id}"],
            "recommendations:{id}": ["digest:{id}"],
            "digest:{id}": ["profile:{id}"],  # a cycle must not loop
        }
    )
    assert graph.expand({"profile:42"}) == {
        "profile:42",
        "sessions:42",
        "recommendations:42",
        "notifications:42",
        "digest:42",
    }
    assert graph.expand({"sessions:42"}) == {"sessions:42"}, "edges point one way"
    assert graph.expand({"profile:43"}).isdisjoint(graph.expand({"profile:42"}))
    assert graph.expand({"profile:"}) == {"profile:"}, "an empty id matches no pattern"


def test_patterns_with_several_placeholders() -> None:
    graph = DependencyGraph({"doc:{tenant}:{id}": ["summary:{id}", "index:{tenant}"]})
    assert graph.expand({"doc:acme:7"}) == {"doc:acme:7", "summary:7", "index:acme"}
