"""Command line of the cluster simulator.

    python -m bench.cluster_sim capacity --profile cpu_smollm2        # policies x workloads
    python -m bench.cluster_sim ablations --profile cpu_smollm2       # DualMap without parts
    python -m bench.cluster_sim curves --profile cpu_smollm2          # P90 TTFT vs rate
    python -m bench.cluster_sim scale --instances 1000                # one big run
    python -m bench.cluster_sim run --policy dualmap --rate 20        # one run, printed
    python -m bench.cluster_sim planner                               # elastic P:D pools

Results go to bench/results/cluster_sim_*.{json,csv,png}.
"""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.cluster_sim import report
from bench.cluster_sim.capacity import (
    ABLATIONS,
    POLICIES,
    SLO_MULTIPLE,
    SLO_REFERENCE_TOKENS,
    bisect_capacity,
    rate_guess,
    simulate,
    slo_for,
)
from bench.cluster_sim.cost_model import CostModel, load_profile
from bench.cluster_sim.simulator import SimConfig, SimResult
from bench.cluster_sim.workloads import ARRIVALS, WORKLOADS, Workload, make_workload
from bench.common import markdown_table, write_results

app = typer.Typer(add_completion=False, help=__doc__)
console = Console()

# Workload sizes per profile. The catalogue of system prompts is sized against the
# per-instance prefix cache (CPU: ~11.6K tokens, H100: ~396K tokens) so that the shared
# prompts do not fit in one instance's cache but do fit in the cluster's; the GPU profile
# needs more requests to fill its much larger caches before measuring.
PROFILE_WORKLOADS: dict[str, dict[str, Any]] = {
    "cpu_smollm2": {"requests": 3000, "shared_prompts": 100, "multi_turn_prompts": 50},
    "gpu_llama3_8b_h100": {"requests": 12000, "shared_prompts": 1000, "multi_turn_prompts": 200},
}
DEFAULT_PROFILE = "cpu_smollm2"


def workload_for(profile: str, name: str, requests: int | None = None, seed: int = 0) -> Workload:
    sizes = PROFILE_WORKLOADS.get(profile, PROFILE_WORKLOADS[DEFAULT_PROFILE])
    count = requests or sizes["requests"]
    if name in ("shared_prefix", "hot_prefix"):
        return make_workload(name, count, seed, prompts=sizes["shared_prompts"])
    if name in ("multi_turn", "multi_turn_session_keys"):
        # multi_turn_session_keys: an experiment, one prefix key per conversation.
        return make_workload(
            "multi_turn", count, seed, system_prompts=sizes["multi_turn_prompts"], session_keys=name.endswith("keys")
        )
    return make_workload(name, count, seed)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _capacity_rows(
    cost: CostModel,
    profile: str,
    policies: list[str],
    workloads: list[str],
    arrivals: list[str],
    config: SimConfig,
    requests: int | None,
    seed: int,
    rel_tol: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Effective capacity of each policy on each workload x arrival process; also every
    probe of every bisection (the P90-vs-rate points)."""
    slo = slo_for(cost)
    rows: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    combos = [(w, a, p) for w in workloads for a in arrivals for p in policies]
    with _progress() as progress:
        task = progress.add_task("capacity", total=len(combos))
        cache: dict[str, Workload] = {}
        for workload_name, arrival, policy in combos:
            progress.update(task, description=f"{workload_name}/{arrival}/{policy}")
            workload = cache.get(workload_name)
            if workload is None:
                workload = cache[workload_name] = workload_for(profile, workload_name, requests, seed)
            results: dict[float, SimResult] = {}

            def feasible(
                rate: float,
                workload: Workload = workload,
                arrival: str = arrival,
                policy: str = policy,
                results: dict[float, SimResult] = results,
            ) -> bool:
                result = simulate(cost, workload, policy, rate, arrival, config, slo, seed)
                results[rate] = result
                probes.append({"profile": profile, "slo_s": slo, **result.row()})
                return result.ttft_p90_s <= slo

            guess = rate_guess(cost, workload, config.prefill_instances)
            bisection = bisect_capacity(feasible, guess, rel_tol=rel_tol)
            at = results.get(bisection.capacity)
            rows.append(
                {
                    "profile": profile,
                    "workload": workload_name,
                    "arrival": arrival,
                    "policy": policy,
                    "instances": config.prefill_instances,
                    "slo_s": slo,
                    "capacity_rps": bisection.capacity,
                    "first_infeasible_rps": bisection.infeasible,
                    "probes": len(bisection.probes),
                    "ttft_p50_s": at.ttft_p50_s if at else float("nan"),
                    "ttft_p90_s": at.ttft_p90_s if at else float("nan"),
                    "ttft_p99_s": at.ttft_p99_s if at else float("nan"),
                    "hit_rate": at.hit_rate if at else float("nan"),
                    "load_max_over_mean": at.load_max_over_mean if at else float("nan"),
                    "load_cv": at.load_cv if at else float("nan"),
                    "rebalance_moves": at.rebalance_moves if at else 0,
                    "reasons": at.row()["reasons"] if at else "",
                }
            )
            progress.advance(task)
    return rows, probes


def _meta(cost: CostModel, config: SimConfig, requests: int | None, seed: int, profile: str) -> dict[str, Any]:
    return {
        "profile": profile,
        "profile_source": cost.source,
        "slo_ttft_s": slo_for(cost),
        "slo_definition": f"{SLO_MULTIPLE:g} x unloaded TTFT of a {SLO_REFERENCE_TOKENS}-token prompt (no cache hit)",
        "prefill_instances": config.prefill_instances,
        "decode_instances": config.decode_count,
        "max_ongoing": config.max_ongoing,
        "warmup_fraction": config.warmup_fraction,
        "requests": requests or PROFILE_WORKLOADS.get(profile, PROFILE_WORKLOADS[DEFAULT_PROFILE])["requests"],
        "seed": seed,
        "capacity_definition": "highest arrival rate (req/s) with P90 TTFT <= SLO, geometric bisection",
    }


def _config(instances: int, decode_instances: int | None, max_ongoing: int) -> SimConfig:
    return SimConfig(prefill_instances=instances, decode_instances=decode_instances, max_ongoing=max_ongoing)


@app.command()
def capacity(
    profile: str = typer.Option(DEFAULT_PROFILE, help="Cost profile (bench/cluster_sim/profiles)."),
    instances: int = typer.Option(32, help="Prefill instances."),
    decode_instances: int = typer.Option(None, help="Decode instances (default: as many as prefill)."),
    max_ongoing: int = typer.Option(8, help="Requests a prefill instance admits; more wait at the router."),
    policies: str = typer.Option(",".join(POLICIES), help="Comma-separated policies."),
    workloads: str = typer.Option(",".join(WORKLOADS), help="Comma-separated workloads."),
    arrivals: str = typer.Option(",".join(ARRIVALS), help="Comma-separated arrival processes."),
    requests: int = typer.Option(None, help="Requests per run (default per profile)."),
    seed: int = typer.Option(0),
    rel_tol: float = typer.Option(0.04, help="Bisection stops when the bracket is within this ratio."),
    tag: str = typer.Option("", help="Suffix of the result files."),
) -> None:
    """Effective capacity of every policy on every workload (the main comparison)."""
    cost = load_profile(profile)
    config = _config(instances, decode_instances, max_ongoing)
    started = time.perf_counter()
    rows, probes = _capacity_rows(
        cost, profile, _split(policies), _split(workloads), _split(arrivals), config, requests, seed, rel_tol
    )
    rows = report.add_ratios(rows)
    name = f"cluster_sim_capacity_{profile}{tag}"
    meta = _meta(cost, config, requests, seed, profile) | {"wall_s": time.perf_counter() - started}
    write_results(name, rows, meta)
    write_results(f"{name}_probes", probes, meta)
    report.plot_capacity(rows, name)
    report.plot_curves(probes, slo_for(cost), name)
    console.print(markdown_table(report.summary_rows(rows), report.SUMMARY_COLUMNS))


@app.command()
def ablations(
    profile: str = typer.Option(DEFAULT_PROFILE),
    instances: int = typer.Option(32),
    decode_instances: int = typer.Option(None),
    max_ongoing: int = typer.Option(8),
    workloads: str = typer.Option("shared_prefix,hot_prefix,no_sharing"),
    arrivals: str = typer.Option(",".join(ARRIVALS)),
    requests: int = typer.Option(None),
    seed: int = typer.Option(0),
    rel_tol: float = typer.Option(0.04),
    tag: str = typer.Option(""),
) -> None:
    """DualMap against DualMap without SLO fallback and without rebalancing."""
    cost = load_profile(profile)
    config = _config(instances, decode_instances, max_ongoing)
    started = time.perf_counter()
    rows, probes = _capacity_rows(
        cost, profile, ["dualmap", *ABLATIONS], _split(workloads), _split(arrivals), config, requests, seed, rel_tol
    )
    name = f"cluster_sim_ablations_{profile}{tag}"
    meta = _meta(cost, config, requests, seed, profile) | {"wall_s": time.perf_counter() - started}
    write_results(name, rows, meta)
    report.plot_capacity(rows, name)
    console.print(markdown_table(rows, ["workload", "arrival", "policy", "capacity_rps", "hit_rate", "ttft_p99_s", "rebalance_moves"]))


@app.command()
def curves(
    profile: str = typer.Option(DEFAULT_PROFILE),
    instances: int = typer.Option(32),
    max_ongoing: int = typer.Option(8),
    policies: str = typer.Option(",".join(POLICIES)),
    workload: str = typer.Option("shared_prefix"),
    arrival: str = typer.Option("poisson"),
    points: int = typer.Option(8, help="Rates from 0.25x to 4x the no-cache estimate, log-spaced."),
    requests: int = typer.Option(None),
    seed: int = typer.Option(0),
) -> None:
    """P90 TTFT against arrival rate for each policy on one workload."""
    cost = load_profile(profile)
    config = _config(instances, None, max_ongoing)
    slo = slo_for(cost)
    work = workload_for(profile, workload, requests, seed)
    guess = rate_guess(cost, work, instances)
    rates = [guess * 0.25 * 16 ** (i / max(1, points - 1)) for i in range(points)]
    rows = []
    with _progress() as progress:
        task = progress.add_task("curves", total=len(rates) * len(_split(policies)))
        for policy in _split(policies):
            for rate in rates:
                progress.update(task, description=f"{policy} @ {rate:.1f}/s")
                rows.append({"profile": profile, "slo_s": slo, **simulate(cost, work, policy, rate, arrival, config, slo, seed).row()})
                progress.advance(task)
    name = f"cluster_sim_curves_{profile}_{workload}_{arrival}"
    write_results(name, rows, _meta(cost, config, requests, seed, profile))
    report.plot_curves(rows, slo, name)
    console.print(markdown_table(rows, ["policy", "rate", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "hit_rate", "load_max_over_mean"]))


@app.command()
def scale(
    profile: str = typer.Option("gpu_llama3_8b_h100"),
    instances: int = typer.Option(1000),
    policies: str = typer.Option("dualmap,round_robin"),
    workload: str = typer.Option("shared_prefix"),
    arrival: str = typer.Option("poisson"),
    requests: int = typer.Option(100_000),
    load: float = typer.Option(1.0, help="Rate as a multiple of the no-cache estimate for the pool."),
    max_ongoing: int = typer.Option(8),
    seed: int = typer.Option(0),
) -> None:
    """One run per policy at a large pool size: is the simulator fast enough, and how do
    the policies compare there?"""
    cost = load_profile(profile)
    config = _config(instances, None, max_ongoing)
    slo = slo_for(cost)
    started = time.perf_counter()
    work = workload_for(profile, workload, requests, seed)
    generated = time.perf_counter() - started
    rate = load * rate_guess(cost, work, instances)
    rows = []
    for policy in _split(policies):
        console.print(f"{policy}: {instances} prefill + {instances} decode instances, {requests} requests at {rate:.0f}/s ...")
        result = simulate(cost, work, policy, rate, arrival, config, slo, seed)
        rows.append({"profile": profile, "slo_s": slo, "workload_generation_s": generated, **result.row()})
        console.print(f"  done in {result.wall_s:.1f} s wall: P90 TTFT {result.ttft_p90_s * 1e3:.0f} ms, hit rate {result.hit_rate:.2f}")
    name = f"cluster_sim_scale_{profile}_{instances}"
    write_results(name, rows, _meta(cost, config, requests, seed, profile))
    console.print(markdown_table(rows, ["policy", "instances", "requests", "rate", "wall_s", "ttft_p90_s", "ttft_p99_s", "hit_rate", "load_max_over_mean"]))


@app.command()
def run(
    profile: str = typer.Option(DEFAULT_PROFILE),
    policy: str = typer.Option("dualmap"),
    workload: str = typer.Option("shared_prefix"),
    arrival: str = typer.Option("poisson"),
    rate: float = typer.Option(None, help="Requests/s (default: the no-cache estimate)."),
    instances: int = typer.Option(32),
    max_ongoing: int = typer.Option(8),
    requests: int = typer.Option(None),
    seed: int = typer.Option(0),
) -> None:
    """One simulation, printed."""
    cost = load_profile(profile)
    config = _config(instances, None, max_ongoing)
    work = workload_for(profile, workload, requests, seed)
    rate = rate or rate_guess(cost, work, instances)
    result = simulate(cost, work, policy, rate, arrival, config, slo_for(cost), seed)
    for key, value in result.row().items():
        console.print(f"{key:>20}: {value}")


@app.command()
def planner(
    profile: str = typer.Option("gpu_llama3_8b_h100"),
    slo_ttft_s: float = typer.Option(2.0),
    slo_tpot_s: float = typer.Option(0.05),
    engine_start_s: float = typer.Option(60.0),
    quick: bool = typer.Option(False, help="A smaller grid of static and Serve configurations."),
    workers: int = typer.Option(2),
    seed: int = typer.Option(0),
) -> None:
    """Tandem's P:D planner vs static pools, Serve's per-deployment autoscaling and a
    Dynamo-style planner, over a day whose mix and rate shift (bench/cluster_sim/planner_bench.py)."""
    from bench.cluster_sim import planner_bench
    from bench.cluster_sim.shifting import DAY, shifting_workload

    setup = planner_bench.Setup(profile=profile, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
                                engine_start_s=engine_start_s, seed=seed)
    started = time.perf_counter()
    rows, timelines = planner_bench.run_all(setup, quick=quick, workers=workers)
    summary = planner_bench.summary(rows)
    workload, _ = shifting_workload(DAY, seed=seed)
    meta = {"setup": setup.__dict__, "workload": workload.description, "requests": len(workload.requests),
            "planner": setup.planner_settings().model_dump(), "summary": summary,
            "wall_s": time.perf_counter() - started}
    name = "planner_sim"
    write_results(name, rows, meta)
    paths = planner_bench.plot(rows, timelines, name)
    rows.sort(key=lambda r: (r["kind"] != "tandem", r["kind"], r["engine_hours"]))
    console.print(markdown_table(rows, ["scaler", "attainment", "engine_hours", "goodput_per_engine_hour", "lost",
                                        "ttft_p90_s", "tpot_p90_s", "scale_events", "by_stretch"]))
    for key, value in summary.items():
        console.print(f"{key:>42}: {value:.3f}" if isinstance(value, float) else f"{key:>42}: {value}")
    console.print("plots: " + ", ".join(paths))


@app.command("planner-surge")
def planner_surge(
    profile: str = typer.Option("gpu_llama3_8b_h100"),
    workers: int = typer.Option(2),
    seed: int = typer.Option(0),
) -> None:
    """The planner's day with a step surge instead of a ramp (60 -> 120 req/s at once): the
    planner at headroom 0, 0.1 (its default) and 0.5, and static pools, in one run."""
    from bench.cluster_sim import planner_bench
    from bench.cluster_sim.shifting import STEP_DAY, shifting_workload

    setup = planner_bench.Setup(profile=profile, seed=seed)
    started = time.perf_counter()
    rows = planner_bench.run_surge(setup, workers=workers)
    workload, _ = shifting_workload(STEP_DAY, seed=seed)
    meta = {"setup": setup.__dict__, "workload": workload.description, "requests": len(workload.requests),
            "wall_s": time.perf_counter() - started}
    write_results("planner_sim_step", rows, meta)
    console.print(markdown_table(rows, ["scaler", "attainment", "engine_hours", "lost", "ttft_p90_s", "by_stretch"]))


@app.command()
def replot(name: str = typer.Argument(..., help="Result name, e.g. cluster_sim_capacity_cpu_smollm2.")) -> None:
    """Draw a capacity run's plots again from its result files."""
    import json

    from bench.common import RESULTS

    data = json.loads((RESULTS / f"{name}.json").read_text())
    report.plot_capacity(data["rows"], name)
    probes = RESULTS / f"{name}_probes.json"
    if probes.exists():
        report.plot_curves(json.loads(probes.read_text())["rows"], data["meta"]["slo_ttft_s"], name)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


if __name__ == "__main__":
    app()
