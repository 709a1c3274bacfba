"""``atajo eval routing``: the estimator over a labels file, one JSON line of figures, and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from atajo.cli.main import cli
from atajo.routing.complexity import DENSE, ComplexityModel

# Two benchmarks. "toy" is the hand-computed case of tests/routing/test_complexity.py: scores
# alpha > beta > plain > gamma > delta, weak accuracy .6, strong .8, 95 % of strong (.76) reached at 0.16 strong
# calls, APGR 1.3. "flat": every prompt scores 0.5 (no known word), weak 1/4, strong 3/4: random routing, so
# 95 % of strong (.7125) needs (.7125 - .25) / .5 = 0.925 strong calls, APGR 0.5.
CHOICES = "\nA. yes\nB. no"  # multiple-choice prompts have word features (u:alpha...)
LABELS = [
    ("toy", "alpha question" + CHOICES, False, True),
    ("toy", "beta question" + CHOICES, False, True),
    ("toy", "plain question" + CHOICES, True, True),
    ("toy", "gamma question" + CHOICES, True, False),
    ("toy", "delta question" + CHOICES, True, True),
    ("flat", "one", False, True),
    ("flat", "two", False, True),
    ("flat", "three", True, False),
    ("flat", "four", False, True),
]


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(
            json.dumps({"benchmark": b, "subject": "", "prompt": p, "weak_correct": w, "strong_correct": s}) + "\n"
            for b, p, w, s in LABELS
        )
    )
    weights = {"u:alpha": (3.0, -3.0), "u:beta": (1.0, -1.0), "u:gamma": (-1.0, 1.0), "u:delta": (-3.0, 3.0)}
    model = tmp_path / "model.json"
    model.write_text(json.dumps(ComplexityModel(weights, ((0.0, 0.0),) * len(DENSE), (0.0, 0.0)).to_dict()))
    return labels, model


def test_figures_match_the_hand_computed_ones(tmp_path: Path) -> None:
    labels, model = write_inputs(tmp_path)
    plot = tmp_path / "curve.png"
    args = ["eval", "routing", "--labels", str(labels), "--split", "all", "--model", str(model), "--plot", str(plot)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    toy, flat = out["benchmarks"]["toy"], out["benchmarks"]["flat"]
    assert (toy["prompts"], toy["weak_accuracy"], toy["strong_accuracy"]) == (5, 0.6, 0.8)
    assert (toy["strong_share_at_95"], toy["apgr"], toy["random_share_at_95"]) == (0.16, 1.3, 0.8)
    assert (flat["strong_share_at_95"], flat["apgr"]) == (0.925, 0.5)
    assert out["prompts"] == 9 and out["split"] == "all"
    assert out["latency_us"]["median"] > 0
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_the_shipped_estimator_runs_and_a_bad_file_is_an_error(tmp_path: Path) -> None:
    labels, _ = write_inputs(tmp_path)
    result = CliRunner().invoke(cli, ["eval", "routing", "--labels", str(labels), "--split", "all"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0.0 <= out["strong_share_at_95"] <= 1.0 and out["apgr"] is not None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(cli, ["eval", "routing", "--labels", str(bad)])
    assert result.exit_code == 1 and "expected {benchmark" in result.output
