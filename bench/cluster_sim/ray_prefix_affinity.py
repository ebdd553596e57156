"""Ray Serve's `PrefixCacheAffinityRouter` algorithm as a `RoutingPolicy`, on Ray's own
`PrefixTree` (in-process, not the actor).

Ray 2.60's router (ray.llm._internal.serve.routing_policies.prefix_aware), per request:

1. draw the power-of-two fallback pair (two random replicas);
2. if the replicas' queue lengths differ by more than ``imbalanced_threshold`` (default
   infinity: never), use the fallback pair;
3. else match the prompt text in the prefix tree: if the matched fraction is at least
   ``match_rate_threshold`` (default 0.1), the replicas owning the longest match; else the
   replicas with the fewest characters in the tree ("smallest tenants");
4. Serve then takes the replica with the smallest queue among that set (first on ties);
5. after routing, the whole prompt text is inserted into the tree for the chosen replica.

Defaults kept: ``imbalanced_threshold=inf``, ``match_rate_threshold=0.1``,
``do_eviction=False`` (the tree keeps everything). The tree matches text, so the simulator
renders a prompt's token ids as one character each (`workloads.token_text`).

Differences from Serve, by construction of the simulator: the queue length is the router's
count of requests sent to a replica and not yet prefilled (Serve probes the replica's
ongoing requests; both include requests queued inside the engine), and a request whose
chosen replica is full waits for it at the router (Serve would retry the same choice with
backoff, which also waits for it while the tree still prefers it).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from routing.dualmap import Decision, InstanceLoad
from routing.policies import RouteRequest, RoutingPolicy, healthy_instances


def _prefix_tree_class() -> type:
    # Imported lazily: it pulls in Ray (not a running cluster) only when this policy is used.
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

    return PrefixTree


class RayPrefixAffinityPolicy(RoutingPolicy):
    name = "ray_prefix_affinity"

    def __init__(
        self,
        prompt_text: Callable[[RouteRequest], str],
        clock: Callable[[], float],
        imbalanced_threshold: float = math.inf,
        match_rate_threshold: float = 0.1,
        seed: int | None = None,
        **_: Any,
    ) -> None:
        self.prompt_text = prompt_text
        self.clock = clock
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold
        self._random = random.Random(seed)
        self.tree = _prefix_tree_class()()
        self._known: set[str] = set()
        # request id -> its text, between route() and on_routed() (rendered once)
        self._texts: OrderedDict[str, str] = OrderedDict()

    def _sync(self, loads: Mapping[str, InstanceLoad]) -> None:
        if loads.keys() == self._known:
            return
        gone = list(self._known - loads.keys())
        if gone:
            self.tree.remove_tenants(gone)
        added = sorted(loads.keys() - self._known)
        if added:
            self.tree.add_tenants(added, self.clock())
        self._known = set(loads)

    def _text(self, request: RouteRequest) -> str:
        text = self._texts.get(request.request_id)
        if text is None:
            text = self.prompt_text(request)
            self._texts[request.request_id] = text
            while len(self._texts) > 4096:
                self._texts.popitem(last=False)
        return text

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        self._sync(loads)
        healthy = healthy_instances(loads)
        fallback = self._random.sample(healthy, 2) if len(healthy) > 1 else list(healthy)
        queue = {i: loads[i].running for i in healthy}
        chosen: list[str] = []
        reason = "power_of_two"
        match_rate = 0.0
        text = self._text(request)
        if text and max(queue.values()) - min(queue.values()) <= self.imbalanced_threshold:
            matched, tenants = self.tree.prefix_match(text, healthy)
            match_rate = len(matched) / len(text)
            if match_rate < self.match_rate_threshold:
                smallest = self.tree.get_smallest_tenants()
                chosen = [t for t in smallest or () if t in queue]
                reason = "smallest_tenant"
            else:
                chosen = [t for t in tenants or () if t in queue]
                reason = "prefix_match"
        if not chosen:
            chosen, reason, match_rate = fallback, "power_of_two", 0.0
        instance = min(chosen, key=queue.__getitem__)
        uncached = int(request.prompt_tokens * (1.0 - match_rate)) if reason == "prefix_match" else request.prompt_tokens
        return Decision(instance, reason, uncached_tokens=max(1, uncached))

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        self.tree.insert(self._text(request), decision.instance, self.clock())
        self._texts.pop(request.request_id, None)
