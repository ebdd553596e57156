"""`tandem profile`: measure codec profiles on the model and this hardware, search the
space, and publish the profile library the compression controller reads.

    tandem profile                      # 4 prompts, 40 TPE trials, 40 random, 50-point grid
    tandem profile --quick              # smoke run: 2 short prompts, tiny searches, stores nothing
    tandem profile --trials 100 --prompts 10 --redis-url redis://host:6379/0
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from control_plane.profiler.calibration import load_prompts, select_prompts
from control_plane.profiler.export import build_library, hardware_id
from control_plane.profiler.plots import pareto_figure
from control_plane.profiler.quality import ModelQualityProbe
from control_plane.profiler.search import (
    GRID_SPACE,
    QUICK_GRID_SPACE,
    Evaluator,
    SearchTrace,
    grid_profiles,
    hypervolume_curves,
    run_grid,
    run_optuna,
    search_summary,
)
from kv_transport.codecs import BUILTIN_PROFILE_NAMES, get_profile, search_space_size

RESULTS_NAME = "profiler_search"


@dataclass
class ProfileRun:
    library: dict[str, Any]
    comparison: list[dict[str, Any]]
    wall_s: float
    library_path: Path | None = None
    plot_path: Path | None = None
    results_paths: list[Path] = field(default_factory=list)


def _default_model_name(model_path: str | None) -> str:
    from control_plane.settings import DEFAULT_SERVED_NAME

    return DEFAULT_SERVED_NAME if not model_path else Path(model_path).expanduser().name


def _redis_url(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    from control_plane.redis_server import embedded_url

    return embedded_url()


def pareto_table(library: dict[str, Any], title: str = "Pareto set") -> Table:
    table = Table(title=title)
    for column in ("profile", "ratio", "enc MB/s", "dec MB/s", "fixed ms", "KL (nats)", "KL 1st", "agree", "prefix", "relL2 K", "relL2 V"):
        table.add_column(column, justify="left" if column == "profile" else "right", overflow="fold")
    for entry in library["profiles"]:
        if not entry["pareto"]:
            continue

        def speed(key: str, e: dict[str, Any] = entry) -> str:
            return f"{e[key] / 1e6:,.0f}" if key in e else "raw"

        table.add_row(
            entry["name"],
            f"{entry['ratio']:.2f}",
            speed("encode_bytes_per_s"),
            speed("decode_bytes_per_s"),
            f"{entry['fixed_s'] * 1e3:.2f}",
            f"{entry['quality_loss']:.4f}",
            f"{entry['kl_first_token']:.4f}",
            f"{entry['greedy_agreement']:.3f}",
            f"{entry['greedy_prefix']:.3f}",
            f"{entry['rel_l2_k']:.3f}",
            f"{entry['rel_l2_v']:.3f}",
        )
    return table


def comparison_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="search comparison (hypervolume in normalised objective space)")
    budget = rows[0].get("budget") if rows else None
    columns = ["method", "trials", "evals", "HV", "vs grid", *([f"HV@{budget}"] if budget else []),
               "evals to 90%", "95%", "99%", "100%", "eval s"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"],
            str(row["trials"]),
            str(row["evaluations"]),
            f"{row['hypervolume']:.4f}",
            f"{row['hypervolume_vs_grid']:.1%}",
            *([f"{row['hypervolume_at_budget']:.4f}"] if budget else []),
            *(str(row[f"evals_to_{p}pct"] or "-") for p in (90, 95, 99, 100)),
            f"{row['evaluation_s']:.0f}",
        )
    return table


def run_profile(
    model_path: str | None = None,
    model_name: str | None = None,
    *,
    trials: int = 40,
    random_trials: int | None = None,
    grid: bool = True,
    builtins: bool = True,
    prompts: int = 4,
    generated_tokens: int = 32,
    quick: bool = False,
    sampler: str = "tpe",
    seed: int = 0,
    repeats: int = 3,
    speed_tokens: tuple[int, int] = (16, 1024),
    threads: int | None = 1,
    store: bool | None = None,
    redis_url: str | None = None,
    out: Path | None = None,
    results: bool | None = None,
    console: Console | None = None,
) -> ProfileRun:
    """Profile codecs on a model and this hardware and publish the library.

    `quick`: 2 shortest prompts, 8 trials of each search, a 6-point grid, 3 repeats, small
    speed sizes; by default it stores nothing (a smoke run must not replace a real
    library). `store` (default: not quick) writes the library with `store_library` (disk,
    and Redis when `redis_url` is given or the embedded Redis is up); `results` (default:
    not quick) writes bench/results/profiler_search.{json,csv,png}; `out` is a folder for
    a copy of the library JSON and its Pareto plot (default: next to the stored library).
    """
    from control_plane.controller.library import library_path, store_library
    from control_plane.model import resolve_model

    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = 200  # logs: room for the profile names instead of wrapping them
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if quick:
        prompts, trials, repeats, speed_tokens = 2, min(trials, 8), 3, (8, 256)
        random_trials = min(random_trials if random_trials is not None else trials, 8)
        builtins = False
    random_trials = trials if random_trials is None else random_trials
    store = (not quick) if store is None else store
    results = (not quick) if results is None else results
    name = model_name or _default_model_name(model_path)

    path = resolve_model(model_path)
    chosen = select_prompts(load_prompts(), prompts, spread=not quick)
    console.print(f"[bold]profiling[/] {name} on {hardware_id()}: prompts {[p.id for p in chosen]}")
    probe = ModelQualityProbe.from_path(path, chosen, generated_tokens)
    longest = probe.longest.prompt_tokens - 1
    sizes_tokens = (min(speed_tokens[0], longest), min(speed_tokens[1], longest))
    if sizes_tokens[0] >= sizes_tokens[1]:
        sizes_tokens = (max(1, sizes_tokens[1] // 8), sizes_tokens[1])
    speed_sizes = [probe.speed_kv(tokens) for tokens in sizes_tokens]
    console.print(
        f"references ready in {time.perf_counter() - started:.0f}s: prompt tokens "
        f"{[r.prompt_tokens for r in probe.references]}, speed sizes {sizes_tokens} tokens x {probe.num_layers} layers"
    )

    grid_list = grid_profiles(QUICK_GRID_SPACE if quick else GRID_SPACE) if grid else []
    builtin_list = [get_profile(n) for n in BUILTIN_PROFILE_NAMES] if builtins else []
    total = len(builtin_list) + len(grid_list) + trials + random_trials
    traces: list[SearchTrace] = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"), console=console, transient=False,
    ) as progress:
        task = progress.add_task("evaluating", total=total, last="")
        evaluator = Evaluator(
            probe, speed_sizes, repeats,
            on_evaluation=lambda e: progress.update(
                task, last=f"{e.profile.name}: x{e.ratio:.2f} KL {e.quality_loss:.4f}"
            ),
        )  # fmt: skip

        def step() -> None:
            progress.advance(task)

        for profile in builtin_list:
            progress.update(task, description="built-in profiles")
            evaluator.evaluate(profile, "builtin")
            step()
        if grid_list:
            progress.update(task, description="exhaustive grid")
            traces.append(run_grid(evaluator, grid_list, step))
        if trials:
            progress.update(task, description=f"optuna {sampler}")
            traces.append(run_optuna(evaluator, trials, sampler, seed, step=step))
        if random_trials:
            progress.update(task, description="random baseline")
            traces.append(run_optuna(evaluator, random_trials, "random", seed, step=step))

    grid_trace = next((t for t in traces if t.method == "grid"), None)
    curves = hypervolume_curves(traces, evaluator)
    target = curves["grid"][-1] if grid_trace is not None and curves["grid"] else max((c[-1] for c in curves.values() if c), default=0.0)
    # Equal-budget comparison: every search's hypervolume after as many distinct
    # evaluations as the exhaustive grid needed.
    budget = len(grid_list) or trials or None
    comparison = [search_summary(trace, evaluator, target, budget) for trace in traces]
    import optuna

    meta = {
        "prompts": [p.id for p in chosen],
        "prompt_tokens": [r.prompt_tokens for r in probe.references],
        "generated_tokens": generated_tokens,
        "speed_tokens": list(sizes_tokens),
        "speed_repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "sampler": sampler,
        "seed": seed,
        "optuna": optuna.__version__,
        "torch": torch.__version__,
        "evaluations": len(evaluator.evaluations),
        "search_space_points": search_space_size(),
        "grid_points": len(grid_list),
        "hypervolume_target": target,
        "comparison": comparison,
    }
    library = build_library(evaluator.evaluations, name, meta=meta)
    run = ProfileRun(library, comparison, time.perf_counter() - started)

    if store:
        import redis

        url = _redis_url(redis_url)
        try:
            run.library_path = store_library(library, name, url)
        except (redis.RedisError, OSError) as exc:  # Redis down: the file is written first, keep it
            console.print(f"[yellow]library not stored in Redis ({exc}); on disk at {library_path(name)}")
            run.library_path = library_path(name)
        from control_plane.redis_server import redacted

        console.print(f"library: {run.library_path}" + (f" and Redis {redacted(url)}" if url else ""))
    out_dir = out or (library_path(name).parent if store else None)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if out is not None:
            (out_dir / f"{name}.json").write_text(json.dumps(library, indent=2))
        try:
            run.plot_path = pareto_figure(library, out_dir / f"{name}.pareto.png")
        except ImportError:  # matplotlib is a dev extra: the library matters, the plot is a bonus
            console.print("[yellow]matplotlib is not installed: no Pareto plot")
    if results and comparison:
        run.results_paths = _write_bench_results(library, comparison, curves, target, meta)

    console.print(pareto_table(library, f"Pareto set ({sum(e['pareto'] for e in library['profiles'])} of {len(library['profiles'])} profiles)"))
    if comparison:
        console.print(comparison_table(comparison))
    console.print(f"done in {run.wall_s:.0f}s, {len(evaluator.evaluations)} distinct profiles evaluated")
    return run


def _write_bench_results(library: dict[str, Any], comparison: list[dict[str, Any]], curves: dict[str, list[float]],
                         target: float, meta: dict[str, Any]) -> list[Path]:
    try:
        from bench.common import RESULTS, write_results
    except ImportError:  # an installed package without the repository's bench/
        return []
    front = [
        {k: e.get(k) for k in ("name", "ratio", "encode_bytes_per_s", "decode_bytes_per_s", "fixed_s", "quality_loss",
                               "kl_first_token", "greedy_agreement", "greedy_prefix", "rel_l2_k", "rel_l2_v")}
        for e in library["profiles"] if e["pareto"]
    ]
    extra = {**{k: v for k, v in meta.items() if k != "comparison"}, "model": library["model"],
             "hardware": library["hardware"], "hypervolume_curves": curves, "pareto_set": front}
    json_path, csv_path = write_results(RESULTS_NAME, comparison, extra)
    try:
        png = pareto_figure(library, RESULTS / f"{RESULTS_NAME}.png", curves, target)
    except ImportError:
        return [json_path, csv_path]
    return [json_path, csv_path, png]


# The `tandem profile` command lives in a light module (no torch at import); re-exported.
from control_plane.profiler.command import profile_app  # noqa: E402,F401
