"""Effective capacity: the highest arrival rate whose P90 TTFT meets the SLO, by bisection.

Every rate of a bisection replays the same requests (same workload seed, same unit-rate
arrival gaps scaled by the rate), and every policy sees the same ones, so the comparison
is paired. P90 TTFT grows with the rate up to noise; bisection assumes it is monotone and
reports the bracket it ended in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.cluster_sim.ablations import ablation_factory
from bench.cluster_sim.cost_model import CostModel
from bench.cluster_sim.ray_prefix_affinity import RayPrefixAffinityPolicy
from bench.cluster_sim.simulator import ClusterSim, SimConfig, SimResult
from bench.cluster_sim.workloads import Workload, token_text

# The compared policies: routing.policies' baselines, Ray's prefix-affinity router, DualMap.
BASELINES = ("round_robin", "least_loaded", "power_of_two", "consistent_hash", "prefix_tree", "ray_prefix_affinity")
ABLATIONS = ("dualmap_no_fallback", "dualmap_no_rebalance")
POLICIES = (*BASELINES, "dualmap")


def policy_spec(name: str, workload: Workload) -> tuple[Any, dict[str, Any]]:
    """(policy name or factory, extra kwargs) for a simulator run of ``name``."""
    if name == "dualmap_no_fallback":
        return ablation_factory(slo_fallback=False), {}
    if name == "dualmap_no_rebalance":
        return ablation_factory(rebalance=False), {}
    if name == "ray_prefix_affinity":
        by_id = {spec.route.request_id: spec for spec in workload.requests}

        def factory(sim: ClusterSim) -> RayPrefixAffinityPolicy:
            return RayPrefixAffinityPolicy(
                prompt_text=lambda route: token_text(by_id[route.request_id].tokens()),
                clock=sim.clock,
                seed=sim.seed,
            )

        return factory, {}
    return name, {}


def simulate(
    cost: CostModel,
    workload: Workload,
    policy: str,
    rate: float,
    arrival: str,
    config: SimConfig,
    slo_ttft_s: float,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> SimResult:
    target, kwargs = policy_spec(policy, workload)
    kwargs.update(extra or {})
    sim = ClusterSim(
        cost,
        workload,
        target,
        rate,
        arrival=arrival,
        config=config,
        seed=seed,
        slo_ttft_s=slo_ttft_s,
        policy_kwargs=kwargs,
        label=policy,
    )
    return sim.run()


@dataclass
class Bisection:
    capacity: float  # highest rate found feasible (0 if none)
    infeasible: float  # lowest rate found infeasible (inf if none)
    probes: list[tuple[float, bool]] = field(default_factory=list)


def bisect_capacity(
    feasible: Callable[[float], bool],
    guess: float,
    rel_tol: float = 0.04,
    max_probes: int = 24,
    floor_ratio: float = 1 / 256,
) -> Bisection:
    """Largest x with ``feasible(x)`` for a monotone predicate (True below, False above).

    Brackets by doubling/halving from ``guess``, then bisects geometrically until the
    bracket's ratio is within 1 + ``rel_tol``. Returns 0 if even ``guess * floor_ratio``
    fails, and ``infeasible=inf`` if ``max_probes`` doublings never failed.
    """
    if guess <= 0:
        raise ValueError("guess must be positive")
    probes: list[tuple[float, bool]] = []

    def probe(x: float) -> bool:
        ok = feasible(x)
        probes.append((x, ok))
        return ok

    lo, hi = 0.0, math.inf
    x = guess
    if probe(x):
        lo = x
        while len(probes) < max_probes:
            x *= 2
            if probe(x):
                lo = x
            else:
                hi = x
                break
    else:
        hi = x
        while x > guess * floor_ratio and len(probes) < max_probes:
            x /= 2
            if probe(x):
                lo = x
                break
            hi = x
        if lo == 0.0:
            return Bisection(0.0, hi, probes)
    while math.isfinite(hi) and hi / lo > 1 + rel_tol and len(probes) < max_probes:
        mid = math.sqrt(lo * hi)
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return Bisection(lo, hi, probes)


def rate_guess(cost: CostModel, workload: Workload, instances: int) -> float:
    """Requests/s the prefill pool sustains if nothing were cached: a starting point."""
    per_request = cost.prefill_alone_s(int(workload.mean_prompt_tokens))
    return instances / per_request


SLO_REFERENCE_TOKENS = 2000
SLO_MULTIPLE = 3.0


def slo_for(cost: CostModel, multiple: float = SLO_MULTIPLE, reference_tokens: int = SLO_REFERENCE_TOKENS) -> float:
    """A profile's TTFT SLO: ``multiple`` x the unloaded TTFT (nothing cached) of a
    ``reference_tokens`` prompt, about the median prompt of every workload."""
    return multiple * cost.unloaded_ttft_s(reference_tokens)
