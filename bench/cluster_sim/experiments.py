"""EXPERIMENT, not a policy Tandem serves: DualMap variants for the changes proposed in
docs/simulator.md, prototyped as subclasses so `routing/` stays untouched.

`DualMapExperiment` adds two switches to `routing.policies.DualMapPolicy`:

* ``holders`` (remember every instance that recently served a prefix, up to ``holders``
  per key, instead of only the last one): the stock policy keeps one instance per key, so a
  single fallback or rebalance move makes it forget that the ring candidates hold the
  prefix; both candidates then look cold (whole prompt to compute), their predicted TTFT
  jumps, and more requests fall back: affinity unravels under load.
* ``sticky_overload`` (leave the two candidates for the pool's best only if that one is
  predicted to meet the SLO): when every instance is past the SLO, a fallback gives up a
  cache hit, adds work to the overloaded pool, and meets no SLO anyway.
* ``holder_candidates`` (the recent holders of a prefix join its two ring candidates): a
  hot prefix can then grow past two instances, each computing it once, instead of being
  spread request by request over instances that never keep it.
* ``rebalance_uncached`` (rebalance counts a waiting request as the tokens it would
  compute where it waits, its routed estimate, against the whole prompt where it would
  go, minus what that instance holds): the stock rebalance counts the whole prompt on
  both sides, so moving a request that hits its hot instance's cache looks free while it
  multiplies the work, and under load moves pile up until the hit rate collapses.
* ``cold_least_loaded`` (a prefix no instance is known to hold goes to the instance with
  the lowest predicted TTFT in the pool, not to its primary ring candidate): with nothing
  cached there is no affinity to keep, and two hashed candidates balance worse than the
  whole pool (power of two choices against least loaded).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from routing.dualmap import Decision, InstanceLoad
from routing.policies import DualMapPolicy, RouteRequest


class DualMapExperiment(DualMapPolicy):
    name = "dualmap_experiment"

    def __init__(
        self,
        holders: int = 1,
        sticky_overload: bool = False,
        holder_candidates: bool = False,
        rebalance_uncached: bool = False,
        cold_least_loaded: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.holders = max(1, holders)
        self.sticky_overload = sticky_overload
        self.holder_candidates = holder_candidates
        self.rebalance_uncached = rebalance_uncached
        self.cold_least_loaded = cold_least_loaded
        # request id -> uncached tokens estimated where it was routed (for rebalance)
        self._estimates: OrderedDict[str, int] = OrderedDict()
        # prefix key -> instances that recently prefilled it, most recent last
        self._holders: OrderedDict[bytes, OrderedDict[str, None]] = OrderedDict()

    def _cached_fraction(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> dict[str, float]:
        fraction = request.cacheable_fraction
        if self.holders == 1:
            recent = self._recent.get(request.prefix_key)
            return {recent: fraction} if recent in loads else {}
        held = self._holders.get(request.prefix_key, {})
        return {instance: fraction for instance in held if instance in loads}

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        cached = self._cached_fraction(request, loads)

        def uncached(instance: str) -> int:
            return int(request.prompt_tokens * (1.0 - cached.get(instance, 0.0)))

        def predicted(instance: str) -> float:
            return self.predictor.predict(instance, loads[instance], uncached(instance))

        healthy = [i for i, load in loads.items() if load.healthy]
        if not healthy:
            raise LookupError("no healthy instance in the pool")
        candidates = list(self.candidates(request.prefix_key, loads))
        if self.holder_candidates:
            candidates += list(reversed(self._holders.get(request.prefix_key, {})))
        live = [c for c in dict.fromkeys(candidates) if c in loads and loads[c].healthy]
        ranked = sorted(live, key=lambda i: -cached.get(i, 0.0))
        if self.cold_least_loaded and not any(cached.get(i, 0.0) > 0 for i in live):
            best = min(healthy, key=predicted)
            return Decision(best, "cold", predicted(best), uncached(best))
        if self.holder_candidates and ranked:
            # Among the instances that hold the prefix (and the ring pair), the fastest first.
            ranked = sorted(ranked, key=predicted)
        for reason, instance in zip(("affinity", "second_choice"), ranked, strict=False):
            ttft = predicted(instance)
            if ttft <= self.slo_ttft_s:
                return Decision(instance, reason, ttft, uncached(instance))
        if not self.slo_fallback and ranked:
            best = min(ranked, key=predicted)
            return Decision(best, "second_choice", predicted(best), uncached(best))
        best = min(healthy, key=predicted)
        if self.sticky_overload and ranked and predicted(best) > self.slo_ttft_s:
            # Nobody meets the SLO: keep the cache hit rather than add work elsewhere.
            stay = min(ranked, key=predicted)
            return Decision(stay, "overloaded_stay", predicted(stay), uncached(stay))
        return Decision(best, "fallback", predicted(best), uncached(best))

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        super().on_routed(request, decision)
        self._estimates[request.request_id] = decision.uncached_tokens or request.prompt_tokens
        while len(self._estimates) > self.memory:
            self._estimates.popitem(last=False)
        if self.holders > 1:
            held = self._holders.setdefault(request.prefix_key, OrderedDict())
            held[decision.instance] = None
            held.move_to_end(decision.instance)
            while len(held) > self.holders:
                held.popitem(last=False)
            self._holders.move_to_end(request.prefix_key)
            while len(self._holders) > self.memory:
                self._holders.popitem(last=False)


    def rebalance(
        self, waiting: Mapping[str, Any], loads: Mapping[str, InstanceLoad]
    ) -> list[tuple[RouteRequest, Decision]]:
        if not self.rebalance_uncached:
            return super().rebalance(waiting, loads)
        if not self.rebalance_enabled or not waiting:
            return []
        healthy = [i for i, load in loads.items() if load.healthy]
        if len(healthy) < 2:
            return []

        def estimate(request: RouteRequest) -> int:
            return self._estimates.get(request.request_id, request.prompt_tokens)

        work = {i: float(loads[i].queued_prefill_tokens) for i in healthy}
        for instance, requests in waiting.items():
            if instance in work:
                work[instance] += sum(estimate(r) for r in requests)
        mean = sum(work.values()) / len(work)
        moves: list[tuple[RouteRequest, Decision]] = []
        for hot, requests in waiting.items():
            for request in reversed(requests):
                if hot not in work or not self.is_hot(work[hot], mean):
                    break
                held = self._holders.get(request.prefix_key, {}) if self.holders > 1 else {}
                fraction = request.cacheable_fraction

                def cost(target: str, request: RouteRequest = request, held: Any = held, fraction: float = fraction) -> int:
                    return int(request.prompt_tokens * (1.0 - (fraction if target in held else 0.0)))

                target = min((i for i in healthy if i != hot), key=lambda i: work[i] + cost(i))
                relief, added = estimate(request), cost(target)
                if work[target] + added >= work[hot]:
                    break  # the target would become the new hotspot
                work[hot] -= relief
                work[target] += added
                self._flipped[request.prefix_key] = (target, self.clock() + self.flip_s)
                predicted = self.predictor.predict(target, loads[target], added)
                moves.append((request, Decision(target, "rebalance", predicted, added)))
        return moves


EXPERIMENTS: dict[str, dict[str, Any]] = {
    "dualmap_x_holders": {"holders": 4},
    "dualmap_x_sticky": {"sticky_overload": True},
    "dualmap_x_grow": {"holders": 4, "holder_candidates": True, "sticky_overload": True},
    "dualmap_x_rebal": {"holders": 4, "rebalance_uncached": True},
    "dualmap_x_all": {"holders": 4, "holder_candidates": True, "sticky_overload": True, "rebalance_uncached": True},
    "dualmap_x_cold": {"cold_least_loaded": True},
    "dualmap_x_all_cold": {
        "holders": 4,
        "holder_candidates": True,
        "sticky_overload": True,
        "rebalance_uncached": True,
        "cold_least_loaded": True,
    },
}
