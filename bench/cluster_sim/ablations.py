"""DualMap with one of its parts switched off: the simulator's ablations (docs/simulator.md).

The production policy (`routing.policies.DualMapPolicy`) has no such switches; each
ablation overrides the step of `route` it removes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from routing.dualmap import Decision, InstanceLoad, choose
from routing.policies import DualMapPolicy, RouteRequest


class DualMapAblation(DualMapPolicy):
    """``slo_fallback=False``: the choice never leaves the candidates (and a cold prefix
    goes to the better of its two); ``rebalance=False``: hot instances keep what waits for
    them; ``grow=False``: holders do not join the ring pair; ``stay_when_overloaded=False``:
    a fallback that misses the SLO stands; ``cold_to_least_loaded=False``: a cold prefix goes
    to the better of its two candidates."""

    def __init__(self, *, slo_fallback: bool = True, rebalance: bool = True, grow: bool = True,
                 stay_when_overloaded: bool = True, cold_to_least_loaded: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slo_fallback = slo_fallback
        self.rebalance_enabled = rebalance
        self.grow = grow
        self.stay_when_overloaded = stay_when_overloaded
        self.cold_to_least_loaded = cold_to_least_loaded

    def place_cold(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        if self.cold_to_least_loaded and self.slo_fallback:
            return super().place_cold(request, loads)
        return self.choose_among(self.candidates(request.prefix_key, loads), request, loads, {})

    def candidates_for(self, request: RouteRequest, loads: Mapping[str, InstanceLoad],
                       held: Sequence[str]) -> tuple[str, ...]:
        if self.grow:
            return super().candidates_for(request, loads, held)
        return tuple(dict.fromkeys(self.candidates(request.prefix_key, loads)))

    def choose_among(self, candidates: tuple[str, ...], request: RouteRequest, loads: Mapping[str, InstanceLoad],
                     cached: Mapping[str, float]) -> Decision:
        return choose(candidates, loads, request.prompt_tokens, dict(cached), self.slo_ttft_s, self.predictor,
                      fallback=self.slo_fallback, footprint=self._footprint)

    def keep_hit_when_overloaded(self, decision: Decision, candidates: tuple[str, ...], request: RouteRequest,
                                 loads: Mapping[str, InstanceLoad], cached: Mapping[str, float]) -> Decision:
        if not self.stay_when_overloaded:
            return decision
        return super().keep_hit_when_overloaded(decision, candidates, request, loads, cached)

    def rebalance(self, waiting: Mapping[str, Sequence[RouteRequest]],
                  loads: Mapping[str, InstanceLoad]) -> list[tuple[RouteRequest, Decision]]:
        return super().rebalance(waiting, loads) if self.rebalance_enabled else []


def ablation_factory(**switches: bool):
    """A `ClusterSim` policy factory: DualMap with ``switches``, the simulator's defaults."""

    def factory(sim: Any) -> DualMapAblation:
        return DualMapAblation(**sim.policy_defaults(), **switches)

    return factory
