"""`tandem profile`: the command line of the offline profiler, kept light to import (the
`tandem` CLI mounts it on every start); the work is in `control_plane.profiler.cli`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

profile_app = typer.Typer(help="Measure KV codec profiles on the model and this hardware; publish the profile library.")


@profile_app.callback(invoke_without_command=True)
def profile(
    model: str | None = typer.Option(None, "--model", "-m", help="Model folder or hub id (default: the bundled SmolLM2)."),
    name: str | None = typer.Option(None, "--name", help="Library key (default: the served model name)."),
    trials: int = typer.Option(40, help="Trials of the Bayesian (optuna) search over the whole space."),
    random_trials: int | None = typer.Option(None, help="Trials of the random-sampling baseline (default: --trials; 0: skip)."),
    grid: bool = typer.Option(True, help="Run the exhaustive grid-subset baseline."),
    builtins: bool = typer.Option(True, help="Also measure the built-in codec profiles."),
    prompts: int = typer.Option(4, help="Calibration prompts (spread over lengths; 10 bundled)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 2 short prompts, 8 trials, 6-point grid, stores nothing."),
    sampler: str = typer.Option("tpe", help="optuna sampler: tpe, nsga2, random or gp (gp needs scipy)."),
    seed: int = typer.Option(0),
    repeats: int = typer.Option(3, help="Timed repeats per size (median)."),
    threads: int = typer.Option(1, help="torch threads (speeds are per this many cores)."),
    store: bool | None = typer.Option(None, help="Store the library on disk and in Redis (default: unless --quick)."),
    redis_url: str | None = typer.Option(None, help="Redis to publish to (default: the embedded one if up)."),
    out: Path | None = typer.Option(None, help="Folder for a copy of the library JSON and the Pareto plot."),
    results: bool | None = typer.Option(None, help="Write bench/results/profiler_search.* (default: unless --quick)."),
) -> None:
    # Heavy imports (torch, the codecs, optuna) only when the command runs.
    from control_plane.model import ModelPreparationError
    from control_plane.profiler import cli
    from control_plane.profiler.quality import ModelMissingError

    try:
        cli.run_profile(
            model, name, trials=trials, random_trials=random_trials, grid=grid, builtins=builtins,
            prompts=prompts, quick=quick, sampler=sampler, seed=seed, repeats=repeats,
            threads=threads, store=store, redis_url=redis_url, out=out, results=results,
        )  # fmt: skip
    except (ModelPreparationError, ModelMissingError) as exc:
        Console(stderr=True).print(f"[red]{exc}")
        raise typer.Exit(1) from None
