"""The P:D planner against the alternatives on a day whose mix and rate shift
(`bench.cluster_sim.shifting.DAY`), in the elastic simulator, all in one run:

- every static P:D pool of a grid (DistServe's offline answer is the best of them, found
  with the future known);
- Ray Serve's per-deployment default autoscaling over a grid of targets, with Serve's
  default delays (30 s up, 600 s down) and with short ones (10 s, 60 s);
- a Dynamo-style SLA planner (offline profile, correction factors, constant predictor,
  scale-down without drain);
- Tandem's planner with its default settings (SLOs and pool bounds set for the run).

Reported per scaler: SLO attainment (TTFT and TPOT both met; lost requests count as
missed), engine-hours (starting engines included), goodput per engine-hour, requests lost.
Written to bench/results/planner_sim.{json,csv} and planner_sim_{timeline,frontier}.png.

    python -m bench.cluster_sim planner [--profile gpu_llama3_8b_h100] [--quick]
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.cluster_sim.cost_model import load_profile
from bench.cluster_sim.elastic import (
    DynamoScaler,
    ElasticResult,
    ElasticSim,
    ServeDefaultScaler,
    StaticScaler,
    TandemScaler,
)
from bench.cluster_sim.shifting import DAYS, shifting_workload
from control_plane.settings import PlannerSettings


@dataclass(frozen=True)
class Setup:
    profile: str = "gpu_llama3_8b_h100"
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.05
    engine_start_s: float = 60.0
    max_per_phase: int = 12
    max_total: int = 20
    start: tuple[int, int] = (2, 2)
    warmup_s: float = 60.0
    seed: int = 0
    day: str = "ramp"  # shifting.DAYS: the surge as a ramp, or as a step
    headroom: float | None = None  # the planner's, when not its default

    def planner_settings(self) -> PlannerSettings:
        """Tandem's defaults, with the run's SLOs, bounds and engine start time."""
        return PlannerSettings(
            enabled=True, slo_ttft_s=self.slo_ttft_s, slo_tpot_s=self.slo_tpot_s,
            engine_start_s=self.engine_start_s, max_prefill=self.max_per_phase,
            max_decode=self.max_per_phase, max_total=self.max_total,
            **({"headroom": self.headroom} if self.headroom is not None else {}),
        )


def scalers(quick: bool = False) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [("tandem", None), ("dynamo", None)]
    grid = (2, 3, 4, 5) if not quick else (3, 4)
    out += [("static", (p, d)) for p in grid for d in grid]
    targets = ((8, 64), (8, 128), (16, 256)) if not quick else ((8, 128),)
    for delays in ((30.0, 600.0), (10.0, 60.0)):
        out += [("serve", (tp, td, *delays)) for tp, td in targets]
    return out


def build(setup: Setup, kind: str, arg: Any):
    cost = load_profile(setup.profile)
    bounds = (1, setup.max_per_phase, 1, setup.max_per_phase)
    if kind == "tandem":
        return TandemScaler(setup.planner_settings(), start=setup.start)
    if kind == "dynamo":
        return DynamoScaler(cost, setup.slo_ttft_s, setup.slo_tpot_s, start=setup.start, bounds=bounds)
    if kind == "static":
        return StaticScaler(*arg)
    target_p, target_d, up, down = arg
    scaler = ServeDefaultScaler(target_p, target_d, start=setup.start, bounds=bounds,
                                upscale_delay_s=up, downscale_delay_s=down)
    return scaler


def run_one(setup: Setup, kind: str, arg: Any) -> tuple[str, dict[str, Any], list[dict[str, float]]]:
    cost = load_profile(setup.profile)
    workload, arrivals = shifting_workload(DAYS[setup.day], seed=setup.seed, block_tokens=cost.block_tokens)
    scaler = build(setup, kind, arg)
    started = time.perf_counter()
    result: ElasticResult = ElasticSim(
        cost, workload, arrivals, scaler, slo_ttft_s=setup.slo_ttft_s, slo_tpot_s=setup.slo_tpot_s,
        engine_start_s=setup.engine_start_s, warmup_s=setup.warmup_s, seed=setup.seed,
    ).run()
    name = scaler.name if kind != "serve" else f"{scaler.name} delays {arg[2]:g}/{arg[3]:g}s"
    if kind == "tandem" and setup.headroom is not None:
        name += f" headroom {setup.headroom:g}"
    row = {"kind": kind, **result.row(), "scaler": name, "wall_s": time.perf_counter() - started}
    return kind, row, result.timeline


def run_surge(setup: Setup, headrooms: tuple[float, ...] = (0.0, 0.1, 0.5),
              static: tuple[tuple[int, int], ...] = ((3, 4), (4, 4)), workers: int = 2) -> list[dict[str, Any]]:
    """The step-surge day: the planner at each headroom, and static pools, in one run."""
    from dataclasses import replace

    jobs = [(replace(setup, day="step", headroom=h), "tandem", None) for h in headrooms]
    jobs += [(replace(setup, day="step"), "static", pool) for pool in static]
    with ProcessPoolExecutor(workers) as pool:
        return [future.result()[1] for future in [pool.submit(run_one, *job) for job in jobs]]


def run_all(setup: Setup, quick: bool = False, workers: int = 2) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Every scaler's row, and the timelines of those the plot shows: Tandem, Dynamo-style,
    the static pool and the Serve configuration it is compared with."""
    rows: list[dict[str, Any]] = []
    timelines: dict[str, list] = {}
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(run_one, setup, kind, arg) for kind, arg in scalers(quick)]
        for future in futures:
            _kind, row, timeline = future.result()
            rows.append(row)
            timelines[row["scaler"]] = timeline
    picked = summary(rows)
    shown = [r["scaler"] for r in rows if r["kind"] in ("tandem", "dynamo")]
    shown += [picked[k] for k in ("static_same_attainment", "serve_nearest") if k in picked]
    return rows, {name: timelines[name] for name in shown}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's comparisons: Tandem against the cheapest static pool reaching its
    attainment (and reaching 95%), and against Serve's autoscaling nearest in engine-hours."""
    tandem = next(r for r in rows if r["kind"] == "tandem")
    static = sorted((r for r in rows if r["kind"] == "static"), key=lambda r: r["engine_hours"])
    same = next((r for r in static if r["attainment"] >= tandem["attainment"]), None)
    at95 = next((r for r in static if r["attainment"] >= 0.95), None)
    serve = [r for r in rows if r["kind"] == "serve"]
    nearest = min(serve, key=lambda r: abs(r["engine_hours"] - tandem["engine_hours"])) if serve else None
    cheaper = [r for r in serve if r["engine_hours"] <= tandem["engine_hours"] * 1.1]
    out: dict[str, Any] = {
        "tandem_attainment": tandem["attainment"],
        "tandem_engine_hours": tandem["engine_hours"],
        "tandem_lost": tandem["lost"],
    }
    if same:
        out["static_same_attainment"] = same["scaler"]
        out["engine_hours_saved_vs_static_same"] = 1 - tandem["engine_hours"] / same["engine_hours"]
    if at95:
        out["static_95"] = at95["scaler"]
        out["engine_hours_saved_vs_static_95"] = 1 - tandem["engine_hours"] / at95["engine_hours"]
    if nearest:
        out["serve_nearest"] = nearest["scaler"]
        out["serve_nearest_engine_hours"] = nearest["engine_hours"]
        out["serve_nearest_attainment"] = nearest["attainment"]
    out["serve_best_attainment_within_10pct_hours"] = max((r["attainment"] for r in cheaper), default=math.nan)
    return out


def plot(rows: list[dict[str, Any]], timelines: dict[str, list], stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import RESULTS

    paths = []
    fig, axes = plt.subplots(len(timelines) + 1, 1, figsize=(11, 2.2 * (len(timelines) + 1)), sharex=True)
    first = next(iter(timelines.values()))
    axes[0].plot([p["t"] for p in first], [p["rate"] for p in first], color="black", lw=1)
    axes[0].set_ylabel("req/s")
    ax2 = axes[0].twinx()
    ax2.plot([p["t"] for p in first], [p["prompt_mean"] for p in first], color="tab:gray", lw=1, ls=":")
    ax2.set_ylabel("prompt tokens", color="tab:gray")
    axes[0].set_title("the day: request rate (solid) and mean prompt (dotted)")
    for ax, (name, timeline) in zip(axes[1:], timelines.items(), strict=False):
        t = [p["t"] for p in timeline]
        ax.step(t, [p["prefill"] for p in timeline], where="post", label="prefill", color="tab:blue")
        ax.step(t, [p["decode"] for p in timeline], where="post", label="decode", color="tab:orange")
        ax.set_ylabel("engines")
        ax3 = ax.twinx()
        ax3.plot(t, [p["attainment"] for p in timeline], color="tab:green", lw=0.8, alpha=0.7)
        ax3.set_ylim(0, 1.05)
        ax3.set_ylabel("attainment", color="tab:green")
        row = next(r for r in rows if r["scaler"] == name)
        ax.set_title(f"{name}: attainment {row['attainment']:.1%}, {row['engine_hours']:.2f} engine-h, "
                     f"{row['lost']} lost")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("simulated seconds")
    fig.tight_layout()
    path = RESULTS / f"{stem}_timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(str(path))

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"static": ("s", "tab:gray"), "serve": ("^", "tab:purple"), "dynamo": ("D", "tab:red"),
              "tandem": ("*", "tab:green")}
    for kind, (marker, color) in styles.items():
        points = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["engine_hours"] for r in points], [r["attainment"] for r in points], marker=marker,
                   color=color, s=120 if kind == "tandem" else 40, label=kind, alpha=0.85)
    ax.axhline(0.95, color="black", lw=0.6, ls="--")
    ax.set_xlabel("engine-hours")
    ax.set_ylabel("SLO attainment (TTFT and TPOT)")
    ax.set_title("attainment vs engine-hours over the shifting day")
    ax.legend()
    fig.tight_layout()
    path = RESULTS / f"{stem}_frontier.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(str(path))
    return paths
