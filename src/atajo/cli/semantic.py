"""``atajo eval semantic`` and ``atajo cache calibrate``: measure and fit the semantic cache's match decision.

Both run the serving code (the local embedder, ``VectorIndex`` and ``Decider``) over labelled pairs
(formats in ``atajo.cache.semantic.evaluate``), show progress on stderr, and print one JSON object on the
last line of stdout.
"""

from __future__ import annotations

import json
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click

PAIRS_HELP = "JSON lines of {origin, similar} or {text_a, text_b, duplicate}."
CACHE_HELP = "An .npz file that keeps embeddings between runs (development; created if absent)."
LIMIT_HELP = "Use at most this many pairs, chosen deterministically by hash (for quick runs)."


def _progress(length: int, label: str) -> AbstractContextManager[Any]:
    return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True)


def _embedder(cache_file: str | None, url: str | None = None, model: str | None = None, key_env: str = "") -> Any:
    """The local model, or (``url``) an OpenAI-compatible embeddings endpoint, the key read from ``key_env``."""
    import os

    from atajo.cache.semantic.evaluate import CachedEmbed

    if url is not None:
        from atajo.cache.semantic.remote import RemoteEmbedder

        if not model:
            raise click.BadParameter("is required with --embeddings-url", param_hint="--embeddings-model")
        try:
            remote = RemoteEmbedder(url, model, os.environ.get(key_env) if key_env else None)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--embeddings-url") from exc
        embed = remote.embed
    else:
        from atajo.cache.semantic.embedder import Embedder, EmbedderUnavailable

        embedder = Embedder()
        try:
            embedder.load()
        except EmbedderUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        embed = embedder.embed
    return CachedEmbed(embed, cache_file) if cache_file else embed


def embeddings_source(command: Any) -> Any:
    """``--embeddings-url``, ``--embeddings-model``, ``--api-key-env``: fit and measure the decision on the
    embeddings of the provider model that will serve them (``cache.semantic.embedder``)."""
    for option in reversed(
        [
            click.option(
                "--embeddings-url",
                help="An OpenAI-compatible API base (…/v1) to embed with, instead of the local model.",
            ),
            click.option("--embeddings-model", help="The model to ask for at --embeddings-url."),
            click.option(
                "--api-key-env",
                default="OPENAI_API_KEY",
                show_default=True,
                help="Environment variable holding the key for --embeddings-url.",
            ),
        ]
    ):
        command = option(command)
    return command


def _read_params(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    import yaml

    data: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for part in ("cache", "semantic", "decision"):  # a whole config file, or just the decision's dict
        if isinstance(data, dict) and part in data:
            data = data[part]
    if not isinstance(data, dict) or "threshold" not in data:
        raise click.ClickException(f"{path}: no semantic decision parameters (cache.semantic.decision)")
    return data


def _decider(params: str | None) -> Any:
    from atajo.cache.semantic.decision import Decider

    loaded = _read_params(params)
    if loaded is None:
        return Decider.default()
    try:
        return Decider.from_dict(loaded, base=Path(params).parent if params else None)
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{params}: {exc}") from exc


@click.command("semantic")
@click.option("--pairs", "pairs_file", required=True, type=click.Path(exists=True, dir_okay=False), help=PAIRS_HELP)
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Draw precision and hit rate by threshold.")
@click.option(
    "--split",
    type=click.Choice(["all", "fit", "calibrate", "test"]),
    default="all",
    show_default=True,
    help="Evaluate only one hash split of the pairs (test: never used by calibrate).",
)
@click.option("--params", type=click.Path(exists=True, dir_okay=False), help="Config or YAML with decision params.")
@click.option("--limit", type=int, help=LIMIT_HELP)
@click.option("--embeddings-cache", type=click.Path(dir_okay=False), help=CACHE_HELP)
@click.option(
    "--at-recall",
    type=click.FloatRange(0.0, 1.0),
    help="Also report the precision where the recall reaches this share (the threshold moved; rules held).",
)
@click.option(
    "--open-set",
    is_flag=True,
    help="{origin, similar} files: ask each paraphrase with its own origin hidden; every hit is a wrong answer.",
)
@embeddings_source
def eval_semantic(
    pairs_file: str,
    plot_file: str | None,
    split: str,
    params: str | None,
    limit: int | None,
    embeddings_cache: str | None,
    at_recall: float | None,
    open_set: bool,
    embeddings_url: str | None,
    embeddings_model: str | None,
    api_key_env: str,
) -> None:
    """Run the semantic cache's match decision over labelled pairs and print its figures."""
    from atajo.cache.semantic import evaluate
    from atajo.cache.semantic.evaluate import CachedEmbed, load_pairs, plot, run, summarize, sweep

    try:
        pairs = load_pairs(pairs_file, split, limit)  # type: ignore[arg-type]
        if open_set and pairs.kind != "origin":
            raise ValueError(f"{pairs_file}: --open-set needs an {{origin, similar}} file")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    decider = _decider(params)
    embed = _embedder(embeddings_cache, embeddings_url, embeddings_model, api_key_env)
    outcomes = run(pairs, embed, decider, _progress, open_set=open_set)
    if isinstance(embed, CachedEmbed):
        embed.save()
    if plot_file:
        try:
            plot(sweep(outcomes, decider), decider, plot_file, f"{Path(pairs_file).name} ({split})")
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
    figures = summarize(pairs.kind, outcomes) | {"split": split, "open_set": open_set}
    if at_recall is not None:
        figures["at_recall"] = evaluate.at_recall(outcomes, at_recall)
    click.echo(json.dumps(figures))


@click.command("calibrate")
@click.option("--pairs", "pairs_file", required=True, type=click.Path(exists=True, dir_okay=False), help=PAIRS_HELP)
@click.option("--target-error", type=float, default=0.02, show_default=True, help="Highest share of wrong hits.")
@click.option(
    "--write",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML config to write the result into, under cache.semantic.decision (created if absent).",
)
@click.option("--limit", type=int, help=LIMIT_HELP)
@click.option("--embeddings-cache", type=click.Path(dir_okay=False), help=CACHE_HELP)
@click.option(
    "--calibration-pairs",
    "calibration_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Calibrate the thresholds on this file's calibrate split instead (the weights are then fitted on "
    "the fit and calibrate splits of --pairs).",
)
@click.option(
    "--refit/--keep-weights",
    default=True,
    show_default=True,
    help="Fit new weights, or keep the shipped ones and only calibrate the thresholds (the shipped weights were "
    "fitted on the fit split of GPTCache's pairs: recalibrating them on those same pairs promises less error than "
    "it gets).",
)
@embeddings_source
def calibrate(
    pairs_file: str,
    target_error: float,
    config_file: str | None,
    limit: int | None,
    embeddings_cache: str | None,
    calibration_file: str | None,
    refit: bool,
    embeddings_url: str | None,
    embeddings_model: str | None,
    api_key_env: str,
) -> None:
    """Fit the semantic match decision to a target error rate; report it on held-out pairs.

    With --write, new weights go to a file beside the config (CONFIG.semantic-decision.npz), which the
    config's cache.semantic.decision.model names relative to the config's directory.
    """
    from atajo.cache.semantic import evaluate

    if not 0.0 < target_error < 1.0:
        raise click.BadParameter("must be between 0 and 1", param_hint="--target-error")
    if embeddings_url is not None and not refit:
        raise click.BadParameter("the shipped weights are the local model's", param_hint="--keep-weights")
    embed = _embedder(embeddings_cache, embeddings_url, embeddings_model, api_key_env)
    try:
        decider, report = evaluate.calibrate(
            pairs_file, embed, target_error, _progress, limit, calibration_path=calibration_file, refit=refit
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if isinstance(embed, evaluate.CachedEmbed):
            embed.save()
    if config_file:
        import yaml

        path = Path(config_file)
        if refit:
            weights = path.with_name(f"{path.stem}.semantic-decision.npz")
            decider.model.save(weights)
            decider.model_file = weights.name
            click.echo(f"wrote the weights to {weights}", err=True)
        config: Any = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}
        config = config or {}
        config.setdefault("cache", {}).setdefault("semantic", {})["decision"] = decider.to_dict()
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        click.echo(f"wrote cache.semantic.decision into {path}", err=True)
    report["decision"] = decider.to_dict()
    click.echo(json.dumps(report))
