from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from atajo.cache.semantic.embedder import Embedder
from atajo.cache.semantic.evaluate import Pair, Pairs, load_pairs, run, split_of, swapped_names
from atajo.cli.semantic import calibrate, eval_semantic

ORIGIN_PAIRS: list[dict[str, object]] = [
    {"origin": "How do I reset my password?", "similar": "How can I change my password?"},
    {"origin": "What is the capital of France?", "similar": "Which city is the capital of France?"},
    {"origin": "How many calories are in 2 eggs?", "similar": "How many calories are in 3 eggs?"},
]
DUPLICATE_PAIRS: list[dict[str, object]] = [
    {"text_a": "How do I reset my password?", "text_b": "How can I change my password?", "duplicate": True},
    {"text_a": "Is it safe to eat raw eggs?", "text_b": "Is it not safe to eat raw eggs?", "duplicate": False},
    {"text_a": "What is the capital of France?", "text_b": "How tall is the Eiffel tower?", "duplicate": False},
]


def write(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.usefixtures("embedder")
@pytest.mark.parametrize(("rows", "positives"), [(ORIGIN_PAIRS, 3), (DUPLICATE_PAIRS, 1)])
def test_eval_prints_its_figures_as_json_on_the_last_line(
    tmp_path: Path, rows: list[dict[str, object]], positives: int
) -> None:
    params = tmp_path / "config.yaml"
    params.write_text("cache:\n  semantic:\n    decision:\n      model: default\n      threshold: 0.1\n")
    pairs = write(tmp_path / "p.jsonl", rows)
    result = CliRunner().invoke(eval_semantic, ["--pairs", pairs, "--params", str(params), "--at-recall", "0.3"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["at_recall"]["recall"] >= 0.3
    assert {"hits", "correct_hits", "wrong_hits", "precision", "recall"} <= figures.keys()
    assert figures["pairs"] == 3
    assert figures["positives"] == positives
    assert figures["wrong_hits"] == 0  # the number and the negation never hit
    assert figures["hits"] == figures["correct_hits"] >= 1


def test_eval_rejects_an_unknown_format(tmp_path: Path) -> None:
    result = CliRunner().invoke(eval_semantic, ["--pairs", write(tmp_path / "p.jsonl", [{"q": "x"}])])
    assert result.exit_code != 0
    assert "expected {origin, similar}" in result.output


def test_splits_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = [{"text_a": f"question {i}?", "text_b": f"query {i}?", "duplicate": i % 2 == 0} for i in range(300)]
    path = write(tmp_path / "p.jsonl", rows)
    parts = {s: {(p.stored, p.asked) for p in load_pairs(path, s).pairs} for s in ("fit", "calibrate", "test")}
    assert sum(map(len, parts.values())) == 300
    assert not (parts["fit"] & parts["test"]) and not (parts["calibrate"] & parts["test"])
    assert all(parts["test"]) and {split_of(p) for p in load_pairs(path, "test").pairs} == {"test"}
    assert len(load_pairs(path, "all", limit=10).pairs) == 10


def test_calibrate_writes_the_decision_into_the_config(tmp_path: Path, embedder: Embedder) -> None:
    rows: list[dict[str, object]] = []
    for i in range(40):
        rows.append({"text_a": f"How do I cook rice number {i}?", "text_b": f"How should I cook rice number {i}?",
                     "duplicate": True})  # fmt: skip
        rows.append({"text_a": f"Where is the river {i} delta?", "text_b": f"Where is the river {i} source?",
                     "duplicate": False})  # fmt: skip
    config = tmp_path / "atajo.yaml"
    config.write_text("server:\n  port: 4000\n")
    result = CliRunner().invoke(
        calibrate, ["--pairs", write(tmp_path / "q.jsonl", rows), "--target-error", "0.1", "--write", str(config)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["split"] == "test"
    import yaml

    written = yaml.safe_load(config.read_text())
    assert written["server"] == {"port": 4000}
    decision = written["cache"]["semantic"]["decision"]
    assert decision == report["decision"]
    assert decision["model"] == "atajo.semantic-decision.npz" and (tmp_path / decision["model"]).is_file()
    assert decision["target_error"] == 0.1
    # What was written is what eval reads back.
    result = CliRunner().invoke(eval_semantic, ["--pairs", str(tmp_path / "q.jsonl"), "--params", str(config)])
    assert result.exit_code == 0, result.output


def test_calibrate_can_keep_the_shipped_weights(tmp_path: Path, embedder: Embedder) -> None:
    rows = [
        {
            "text_a": f"How do I cook rice number {i}?",
            "text_b": f"How should I cook rice number {i}?",
            "duplicate": i % 3 > 0,
        }
        for i in range(60)
    ]
    result = CliRunner().invoke(
        calibrate, ["--pairs", write(tmp_path / "q.jsonl", rows), "--target-error", "0.4", "--keep-weights"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["decision"]["model"] == "default"
    assert report["decision"]["target_error"] == 0.4


def test_eval_can_embed_through_an_openai_compatible_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For a decision that will serve a provider's embeddings (cache.semantic.embedder): the texts are
    embedded by that endpoint, with the key from the named environment variable."""
    from tests.e2e.test_semantic_e2e import bag_of_words
    from tests.upstreams.live import LiveServer
    from tests.upstreams.openai_server import OpenAIUpstream

    upstream = OpenAIUpstream(embed_text=bag_of_words)
    monkeypatch.setenv("EMB_KEY", "sk-emb")
    pairs = write(tmp_path / "p.jsonl", ORIGIN_PAIRS)
    with LiveServer(upstream.app()) as server:
        args = ["--pairs", pairs, "--embeddings-url", server.url + "/v1", "--embeddings-model", "emb"]
        result = CliRunner().invoke(eval_semantic, [*args, "--api-key-env", "EMB_KEY"])
        missing = CliRunner().invoke(eval_semantic, ["--pairs", pairs, "--embeddings-url", server.url + "/v1"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["pairs"] == 3 and figures["wrong_hits"] == 0
    calls = [r for r in upstream.received if r.path == "/v1/embeddings"]
    assert calls and all(r.body["model"] == "emb" and r.headers["Authorization"] == "Bearer sk-emb" for r in calls)
    assert sorted(t for r in calls for t in r.body["input"]) == sorted(
        {str(t) for p in ORIGIN_PAIRS for t in p.values()}
    )
    assert missing.exit_code == 2 and "--embeddings-model" in missing.output


def test_swapped_names_make_different_question_pairs_from_paraphrases(embedder: Embedder) -> None:
    pairs = Pairs(
        "origin",
        [
            Pair("How do I install PyTorch on Windows?", "How can I set up PyTorch on Windows?", True),
            Pair("Is TensorFlow faster than JAX?", "Does TensorFlow run faster than JAX?", True),
            Pair("what is a list", "what's a list", True),  # no name-like token: nothing to swap
        ],
    )
    negatives = swapped_names(run(pairs, embedder.embed, None), embedder.embed)
    assert len(negatives) == 2
    for negative, pair in zip(negatives, pairs.pairs, strict=False):
        assert not negative.same
        assert negative.stored == pair.stored
        asked, swapped = set(pair.asked.split()), set(negative.query.split())
        assert len(asked - swapped) == 1 and len(swapped - asked) == 1  # one name replaced by another pair's
        assert (swapped - asked).pop().rstrip("?").lower() in {"pytorch", "windows", "tensorflow", "jax"}
        assert negative.query_vector is not None and negative.stored_vector is not None
        assert negative.cosine == pytest.approx(float(negative.query_vector @ negative.stored_vector), abs=1e-5)
    again = swapped_names(run(pairs, embedder.embed, None), embedder.embed)
    assert [n.query for n in again] == [n.query for n in negatives]  # deterministic


@pytest.mark.usefixtures("embedder")
def test_open_set_hides_each_origin_so_every_hit_is_a_wrong_answer(tmp_path: Path) -> None:
    # two origins are the same question: with one hidden, its paraphrase finds the other (a hit, and wrong by
    # the file's labels); the capital of France has no twin, so its paraphrase must miss
    rows: list[dict[str, object]] = [
        {"origin": "How do I reset my password?", "similar": "How can I reset my password?"},
        {"origin": "How can I reset my password please?", "similar": "How do I reset my password please?"},
        {"origin": "What is the capital of France?", "similar": "Which city is the capital of France?"},
    ]
    pairs = write(tmp_path / "p.jsonl", rows)
    closed = json.loads(CliRunner().invoke(eval_semantic, ["--pairs", pairs]).output.strip().splitlines()[-1])
    # all stored, France's paraphrase finds its origin; the twins stand too close to each other to choose
    assert (closed["correct_hits"], closed["wrong_hits"], closed["open_set"]) == (1, 0, False)
    result = CliRunner().invoke(eval_semantic, ["--pairs", pairs, "--open-set"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["open_set"] is True
    assert figures["correct_hits"] == 0
    assert figures["hits"] == figures["wrong_hits"] == 2
    assert figures["reasons"]["below_floor"] == 1  # France, with its origin hidden, has nothing near it


def test_open_set_needs_an_origin_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(eval_semantic, ["--pairs", write(tmp_path / "p.jsonl", DUPLICATE_PAIRS), "--open-set"])
    assert result.exit_code != 0
    assert "--open-set needs an {origin, similar} file" in result.output
