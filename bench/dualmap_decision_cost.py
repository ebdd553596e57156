"""Cost of one routing decision at 8, 64 and 512 instances (pure Python, one core), and how
many keys move when the pool changes.

- DualMap's core (two ring lookups plus the choice) on the affinity path (the preferred
  candidate meets the SLO) and on the fallback path (both candidates are hot: a pool scan);
- every prefill policy's whole `route` + `on_routed` (what the simulator runs);
- the Ray Serve adapter's whole decision (`choose_replicas` + `on_request_routed` +
  `on_request_completed`, with replicas as plain records), which is what a request pays;
- the fraction of keys whose first candidate changes when one instance joins or leaves
  (ideal: 1/(N+1) and 1/N).

Median over many decisions. Writes bench/results/dualmap_decision_cost.{json,csv,png}.

    python -m bench.dualmap_decision_cost
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.console import Console

from bench.common import RESULTS, markdown_table, median, write_results
from routing.dualmap import DualRing, InstanceLoad, TTFTPredictor, choose, prefix_key
from routing.policies import RouteRequest, make_policy, token_blocks

console = Console()
SIZES = (8, 64, 512)
PREFILL_POLICIES = ("dualmap", "round_robin", "least_loaded", "power_of_two", "consistent_hash", "prefix_tree")


def _requests(rng: random.Random, count: int, prefixes: int = 200) -> list[RouteRequest]:
    systems = [[rng.randrange(50_000) for _ in range(512)] for _ in range(prefixes)]
    out = []
    for i in range(count):
        tokens = systems[rng.randrange(prefixes)] + [rng.randrange(50_000) for _ in range(128)]
        out.append(RouteRequest(f"r{i}", prefix_key(tokens[:512]), len(tokens), 512, token_blocks(tokens)))
    return out


def _core(n: int, decisions: int, hot: bool) -> float:
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
    return median(samples) * 1e6


def _policy(name: str, n: int, decisions: int) -> float:
    rng = random.Random(n)
    loads = {f"instance-{i}": InstanceLoad(queued_prefill_tokens=rng.randrange(0, 2000), running=rng.randrange(4))
             for i in range(n)}
    policy = make_policy(name, seed=1)
    samples = []
    for request in _requests(rng, decisions):
        started = time.perf_counter()
        policy.on_routed(request, policy.route(request, loads))
        samples.append(time.perf_counter() - started)
    return median(samples) * 1e6


@dataclass
class _Replica:
    replica_id: Any
    routing_stats: dict = field(default_factory=dict)


def _adapter(n: int, decisions: int) -> float:
    from ray.serve._private.common import DeploymentID, ReplicaID, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    from routing.serve_router import TandemRequestRouter

    router = TandemRequestRouter.__new__(TandemRequestRouter)
    router.initialize_state(pool="prefill", policy="dualmap", observe_ttft=True)
    deployment = DeploymentID("PrefillWorker", "bench")
    replicas = [_Replica(ReplicaID(f"replica-{i}", deployment), {"kv_cache_usage": 0.1}) for i in range(n)]
    rng = random.Random(n)
    systems = [f"System prompt {k}: " + "rule " * rng.randrange(50, 400) for k in range(200)]
    async def run() -> list[float]:
        # PendingRequest holds an asyncio future: build them inside the loop.
        pending = [
            PendingRequest(
                args=["chat", {"messages": [{"role": "system", "content": systems[rng.randrange(200)]},
                                            {"role": "user", "content": f"question {i}"}], "max_tokens": 16}],
                kwargs={},
                metadata=RequestMetadata(request_id=str(i), internal_request_id=str(i)),
            )
            for i in range(decisions)
        ]
        samples = []
        for request in pending:
            started = time.perf_counter()
            chosen = (await router.choose_replicas(replicas, request))[0][0]
            router.on_request_routed(request, chosen.replica_id, None)
            router.on_request_completed(chosen.replica_id, request.metadata.internal_request_id)
            samples.append(time.perf_counter() - started)
        return samples

    return median(asyncio.run(run())) * 1e6


def _remapped(n: int, keys: int = 20_000) -> tuple[float, float]:
    rng = random.Random(n)
    names = [f"instance-{i}" for i in range(n)]
    sample = [prefix_key([rng.randrange(50_000) for _ in range(16)]) for _ in range(keys)]
    ring = DualRing(names)
    before = [ring.candidates(k)[0] for k in sample]
    ring.add("instance-new")
    joined = sum(a != ring.candidates(k)[0] for a, k in zip(before, sample, strict=True)) / keys
    ring.remove("instance-new")
    ring.remove(names[0])
    left = sum(a != ring.candidates(k)[0] for a, k in zip(before, sample, strict=True)) / keys
    return joined, left


def main(decisions: int = typer.Option(5000, help="Decisions per point.")) -> None:
    rows: list[dict[str, Any]] = []
    for n in SIZES:
        joined, left = _remapped(n)
        row: dict[str, Any] = {
            "instances": n,
            "core_affinity_us": _core(n, decisions, hot=False),
            "core_fallback_us": _core(n, decisions, hot=True),
            "serve_adapter_us": _adapter(n, decisions),
        }
        for name in PREFILL_POLICIES:
            row[f"{name}_us"] = _policy(name, n, decisions)
        row["remapped_on_join"] = joined
        row["ideal_on_join"] = 1 / (n + 1)
        row["remapped_on_leave"] = left
        row["ideal_on_leave"] = 1 / n
        rows.append(row)
        console.print(f"{n} instances done")
    write_results("dualmap_decision_cost", rows, {"decisions": decisions, "statistic": "median"})
    _plot(rows)
    console.print(markdown_table(rows, list(rows[0])))


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["instances"] for r in rows]
    series = ["core_affinity_us", "core_fallback_us", "serve_adapter_us"] + [f"{p}_us" for p in PREFILL_POLICIES]
    for key in series:
        style = "-" if key.startswith(("core", "serve")) else ":"
        ax.plot(xs, [r[key] for r in rows], style, marker="o", label=key.removesuffix("_us"))
    ax.axhline(50, color="grey", linestyle="--", label="goal at 64 instances: 50 µs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("instances in the pool")
    ax.set_ylabel("decision time (µs, median)")
    ax.set_title("Routing decision cost")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "dualmap_decision_cost.png", dpi=120)


if __name__ == "__main__":
    typer.run(main)
