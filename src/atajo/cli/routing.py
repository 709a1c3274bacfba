"""``atajo eval routing``: run the complexity estimator over labelled prompts and print the routing figures.

Each prompt is wrapped in a chat request and scored by ``ComplexityModel.score_request``, the call serving
makes; progress goes to stderr and one JSON object to the last line of stdout (formats and definitions in
``atajo.routing.evaluate``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click

LABELS_HELP = "JSON lines of {benchmark, subject, prompt, weak_correct, strong_correct}."


@click.command("routing")
@click.option("--labels", "labels_file", required=True, type=click.Path(exists=True, dir_okay=False), help=LABELS_HELP)
@click.option(
    "--split",
    type=click.Choice(["test", "fit", "all"]),
    default="test",
    show_default=True,
    help="Which hash split of the prompts to score (test: never seen by scripts/fit_complexity.py).",
)
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Draw the cost / quality curve (PNG).")
@click.option("--model", "model_file", type=click.Path(exists=True, dir_okay=False), help="A fitted model's JSON.")
def eval_routing(labels_file: str, split: str, plot_file: str | None, model_file: str | None) -> None:
    """Score every prompt with the complexity estimator; print strong_share_at_95 and APGR per benchmark."""
    from atajo.core.requests import ChatRequest
    from atajo.routing.complexity import ComplexityModel
    from atajo.routing.evaluate import curve, load_labels, plot, summarize

    try:
        items = load_labels(labels_file, split)  # type: ignore[arg-type]
        model = ComplexityModel.load(model_file)
    except (ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    scores: list[float] = []
    took_us: list[float] = []
    with click.progressbar(length=len(items), label="scoring", file=sys.stderr, show_pos=True) as bar:
        for item in items:
            request = ChatRequest("router", {"messages": [{"role": "user", "content": item.prompt}]})
            started = time.perf_counter()
            scores.append(model.score_request(request))
            took_us.append((time.perf_counter() - started) * 1e6)
            bar.update(1)
    result = summarize(scores, items)
    took_us.sort()
    result["split"] = split
    result["latency_us"] = {
        "median": round(statistics.median(took_us), 1),
        "p99": round(took_us[min(len(took_us) - 1, int(0.99 * len(took_us)))], 1),
        "max": round(took_us[-1], 1),
    }
    if plot_file:
        names = sorted({it.benchmark for it in items})
        curves = {"all": curve(scores, items)} if len(names) > 1 else {}
        for name in names:
            chosen = [i for i, it in enumerate(items) if it.benchmark == name]
            curves[name] = curve([scores[i] for i in chosen], [items[i] for i in chosen])
        try:
            plot(curves, plot_file, f"Complexity router on {Path(labels_file).name} ({split} split)")
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result))
