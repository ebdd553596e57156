"""Cost of one DualMap routing decision at 8, 64 and 512 instances (pure Python, one core).

Measures the two hash lookups plus the choice, on the affinity path (the preferred
candidate meets the SLO) and on the fallback path (both candidates are hot: a scan of the
pool). Median over many decisions. Writes bench/results/dualmap_decision_cost.{json,csv,png}.

    python -m bench.dualmap_decision_cost
"""

from __future__ import annotations

import random
import time
from typing import Any

import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, median, write_results
from routing.dualmap import DualRing, InstanceLoad, TTFTPredictor, choose, prefix_key

console = Console()


def _measure(n: int, decisions: int, hot: bool) -> list[float]:
    rng = random.Random(n)
    names = [f"instance-{i}" for i in range(n)]
    ring = DualRing(names)
    loads = {name: InstanceLoad(queued_prefill_tokens=rng.randrange(0, 2000)) for name in names}
    predictor = TTFTPredictor(prior_tokens_per_s=2000.0)
    slo = 0.0 if hot else 1e9  # hot: nobody meets the SLO, so every decision falls back
    keys = [prefix_key([rng.randrange(50_000) for _ in range(64)]) for _ in range(decisions)]
    samples = []
    for key in keys:
        started = time.perf_counter()
        candidates = ring.candidates(key)
        choose(candidates, loads, 1000, {candidates[0]: 0.5}, slo, predictor)
        samples.append(time.perf_counter() - started)
    return samples


def main(decisions: int = typer.Option(5000, help="Decisions per point.")) -> None:
    rows: list[dict[str, Any]] = []
    for n in (8, 64, 512):
        affinity = median(_measure(n, decisions, hot=False)) * 1e6
        fallback = median(_measure(n, decisions, hot=True)) * 1e6
        rows.append({"instances": n, "affinity_path_us": affinity, "fallback_path_us": fallback})
    write_results("dualmap_decision_cost", rows, {"decisions": decisions, "statistic": "median"})
    _plot(rows)
    console.print(markdown_table(rows, list(rows[0])))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["instances"] for r in rows]
    ax.plot(xs, [r["affinity_path_us"] for r in rows], marker="o", label="affinity path")
    ax.plot(xs, [r["fallback_path_us"] for r in rows], marker="o", label="fallback path (pool scan)")
    ax.axhline(50, color="grey", linestyle="--", label="goal at 64 instances: 50 µs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("instances in the pool")
    ax.set_ylabel("decision time (µs, median)")
    ax.set_title("DualMap routing decision cost")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "dualmap_decision_cost.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
