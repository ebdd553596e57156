"""Routing policies of a worker pool behind one interface: DualMap and the baselines.

The Ray Serve adapter (`routing.serve_router`) and the cluster simulator
(`bench/cluster_sim`) drive the same classes, so what is simulated is what is served.
The environment owns the load view (`InstanceLoad` per instance, healthy or not) and tells
the policy what it routed and what completed; policies keep only their own memory (rings,
recent prefixes, prefix trees, sessions). Pure Python: no Ray, no vLLM.
"""

from __future__ import annotations

import inspect
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import xxhash

from routing.dualmap import (
    DEFAULT_VNODES,
    Decision,
    DualRing,
    HashRing,
    InstanceLoad,
    TTFTPredictor,
    choose,
)

if TYPE_CHECKING:
    from control_plane.settings import RoutingSettings


@dataclass(frozen=True, slots=True)
class RouteRequest:
    request_id: str
    prefix_key: bytes  # canonical shared-prefix key (see routing.dualmap.prefix_key)
    prompt_tokens: int
    # Tokens the prefix key covers: what a replica that served the key before has cached.
    # 0 means the whole prompt.
    prefix_tokens: int = 0
    # Chained hashes of the prompt's fixed-size chunks, in order: prefix-tree routers match
    # on them (two prompts share chunk i's hash only if they share everything up to it).
    blocks: tuple[int, ...] = ()
    session_id: str | None = None  # conversation identity (decode placement)
    output_tokens: int = 0  # decode budget (max_tokens), for decode placement

    @property
    def cacheable_fraction(self) -> float:
        if self.prefix_tokens <= 0 or self.prompt_tokens <= 0:
            return 1.0
        return min(1.0, self.prefix_tokens / self.prompt_tokens)


def chained_hashes(chunks: Iterable[bytes]) -> tuple[int, ...]:
    """Hash of each chunk chained with all chunks before it (vLLM hashes KV blocks alike)."""
    out: list[int] = []
    parent = 0
    for chunk in chunks:
        parent = xxhash.xxh64_intdigest(chunk, seed=parent)
        out.append(parent)
    return tuple(out)


def text_blocks(text: str, chunk_chars: int = 64) -> tuple[int, ...]:
    """Chained chunk hashes of a prompt known as text (64 chars ~ 16 tokens, a KV block)."""
    data = text.encode("utf-8", "surrogatepass")
    return chained_hashes(data[i : i + chunk_chars] for i in range(0, len(data) - chunk_chars + 1, chunk_chars))


def token_blocks(tokens: Sequence[int], block_tokens: int = 16) -> tuple[int, ...]:
    """Chained hashes of a prompt's full token blocks."""
    whole = len(tokens) - len(tokens) % block_tokens
    return chained_hashes(
        b"".join(int(t).to_bytes(4, "little") for t in tokens[i : i + block_tokens])
        for i in range(0, whole, block_tokens)
    )


def healthy_instances(loads: Mapping[str, InstanceLoad]) -> list[str]:
    healthy = [i for i, load in loads.items() if load.healthy]
    if not healthy:
        raise LookupError("no healthy instance in the pool")
    return healthy


class RoutingPolicy:
    """One pool's routing policy. ``loads`` lists every known instance of the pool."""

    name: ClassVar[str] = ""
    # Whether requests must carry `blocks` (chunk hashes cost a few µs per request).
    uses_blocks: ClassVar[bool] = False

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        raise NotImplementedError

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        """The request was handed to ``decision.instance``."""

    def on_completed(self, request_id: str, instance: str, ttft_s: float | None = None) -> None:
        """The request finished; ``ttft_s`` is its observed time to first token if known."""

    def rebalance(
        self, waiting: Mapping[str, Sequence[RouteRequest]], loads: Mapping[str, InstanceLoad]
    ) -> list[tuple[RouteRequest, Decision]]:
        """Moves for requests still waiting at the router for an instance. None by default."""
        return []


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self, **_: Any) -> None:
        self._next = 0

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        healthy = sorted(healthy_instances(loads))
        instance = healthy[self._next % len(healthy)]
        self._next += 1
        return Decision(instance, "round_robin", uncached_tokens=request.prompt_tokens)


def _load_order(load: InstanceLoad) -> tuple[int, int]:
    return (load.running, load.queued_prefill_tokens)


class LeastLoadedPolicy(RoutingPolicy):
    name = "least_loaded"

    def __init__(self, **_: Any) -> None:
        pass

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        instance = min(healthy_instances(loads), key=lambda i: _load_order(loads[i]))
        return Decision(instance, "least_loaded", uncached_tokens=request.prompt_tokens)


class PowerOfTwoPolicy(RoutingPolicy):
    """Two instances at random, the less loaded wins (Ray Serve's default)."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None, **_: Any) -> None:
        self._random = random.Random(seed)

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        healthy = healthy_instances(loads)
        pair = self._random.sample(healthy, 2) if len(healthy) > 1 else healthy
        instance = min(pair, key=lambda i: _load_order(loads[i]))
        return Decision(instance, "power_of_two", uncached_tokens=request.prompt_tokens)


class _RingSync:
    """Keeps a ring's members equal to the pool's known instances (healthy or not: a
    briefly unhealthy instance keeps its keys)."""

    def __init__(self, ring: HashRing | DualRing):
        self.ring = ring
        self._known: set[str] = set()

    def sync(self, loads: Mapping[str, InstanceLoad]) -> None:
        if loads.keys() == self._known:
            return
        for gone in self._known - loads.keys():
            self.ring.remove(gone)
        for new in loads.keys() - self._known:
            self.ring.add(new)
        self._known = set(loads)


class ConsistentHashPolicy(RoutingPolicy):
    """One ring: every request of a prefix goes to one instance, whatever its load."""

    name = "consistent_hash"

    def __init__(self, vnodes: int = DEFAULT_VNODES, **_: Any) -> None:
        self._ring = _RingSync(HashRing(vnodes=vnodes, seed=0x5EED_0001))

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        self._ring.sync(loads)
        instance = self._ring.ring.lookup(request.prefix_key)  # type: ignore[union-attr]
        if not loads[instance].healthy:
            instance = min(healthy_instances(loads), key=lambda i: _load_order(loads[i]))
        return Decision(instance, "consistent_hash", uncached_tokens=request.prompt_tokens)


class PrefixTreePolicy(RoutingPolicy):
    """Cache-aware routing as SGLang's router does it: an approximate prefix tree per
    instance of what was routed there. If the pool is imbalanced (max−min running requests
    above an absolute AND a relative threshold) send to the least loaded; else to the
    instance with the longest prefix match if the match rate exceeds ``cache_threshold``;
    else to the instance with the smallest tree (most free cache)."""

    name = "prefix_tree"
    uses_blocks = True

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        max_blocks_per_instance: int = 1 << 20,
        **_: Any,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self.max_blocks = max_blocks_per_instance
        # instance -> chained block hash -> None, in LRU order (the tree's nodes)
        self._trees: dict[str, OrderedDict[int, None]] = {}

    def _matched(self, instance: str, blocks: tuple[int, ...]) -> int:
        tree = self._trees.get(instance)
        if not tree:
            return 0
        count = 0
        for block in blocks:
            if block not in tree:
                break
            count += 1
        return count

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        for gone in self._trees.keys() - loads.keys():
            del self._trees[gone]
        healthy = healthy_instances(loads)
        running = [loads[i].running for i in healthy]
        high, low = max(running), min(running)
        if high - low > self.balance_abs and high > low * self.balance_rel:
            instance = min(healthy, key=lambda i: _load_order(loads[i]))
            return Decision(instance, "balance", uncached_tokens=request.prompt_tokens)
        blocks = request.blocks
        best, matched = healthy[0], -1
        for instance in healthy:
            count = self._matched(instance, blocks)
            if count > matched:
                best, matched = instance, count
        rate = matched / len(blocks) if blocks else 0.0
        if rate > self.cache_threshold:
            uncached = int(request.prompt_tokens * (1.0 - rate))
            return Decision(best, "cache_hit", uncached_tokens=uncached)
        smallest = min(healthy, key=lambda i: (len(self._trees.get(i, ())), _load_order(loads[i])))
        return Decision(smallest, "smallest_tree", uncached_tokens=request.prompt_tokens)

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        tree = self._trees.setdefault(decision.instance, OrderedDict())
        for block in request.blocks:
            tree[block] = None
            tree.move_to_end(block)
        while len(tree) > self.max_blocks:
            tree.popitem(last=False)


# A new prefix's instance: predicted TTFTs within 10% + 50 ms of the best count as equal.
COLD_TIE_RATIO = 1.1
COLD_TIE_S = 0.05


class DualMapPolicy(RoutingPolicy):
    """DualMap: two independent rings give each prefix two candidates; the one likely to
    hold the prefix wins unless its predicted TTFT breaks the SLO, then the other one, then
    the pool's best (SLO-aware fallback). Hot instances shed requests still waiting for
    them, and the moved prefixes prefer their new instance for ``flip_s``.

    Beyond the paper, each measured in the cluster simulator (docs/simulator.md, whose
    ablations switch them off in `bench/cluster_sim/ablations.py`): remember up to
    ``holders`` instances per prefix, not only the last (one fallback would otherwise make
    the ring candidates look cold and unravel affinity); those holders join the two
    candidates, so a hot prefix spreads over the instances that already computed it; when
    nobody meets the SLO, keep the cache hit rather than add work elsewhere; and a prefix
    nobody holds goes to the least loaded instance of the pool rather than the better of its
    two candidates. Rebalancing charges a moved request the tokens it would compute where it
    goes (not the whole prompt on both sides).

    `route` is these steps, each its own method: the live holders of the prompt's prefix
    (`holders_in`); none: the cold placement (`place_cold`); else the candidates (`candidates_for`:
    ring pair and holders), the SLO-aware choice among them (`choose_among`), and the
    overload rule (`keep_hit_when_overloaded`).
    """

    name = "dualmap"

    def __init__(
        self,
        slo_ttft_s: float = 2.0,
        prior_tokens_per_s: float = 2000.0,
        fixed_s: float = 0.02,
        hot_ratio: float = 2.0,
        hot_min_tokens: int = 2048,
        flip_s: float = 30.0,
        holders: int = 4,
        memory: int = 65536,
        vnodes: int = DEFAULT_VNODES,
        clock: Callable[[], float] = time.monotonic,
        **_: Any,
    ) -> None:
        self.slo_ttft_s = slo_ttft_s
        self.hot_ratio = hot_ratio
        self.hot_min_tokens = hot_min_tokens
        self.flip_s = flip_s
        self.holders = max(1, holders)
        self.memory = memory
        self.clock = clock
        self.predictor = TTFTPredictor(prior_tokens_per_s=prior_tokens_per_s, fixed_s=fixed_s)
        self._rings = _RingSync(DualRing(vnodes=vnodes))
        # prefix key -> instances that recently prefilled it (their caches likely hold it),
        # most recent last
        self._holders: OrderedDict[bytes, OrderedDict[str, None]] = OrderedDict()
        # instance -> how many remembered prefixes it holds (spreads new prefixes)
        self._footprint: dict[str, int] = {}
        # prefix key -> (instance it was moved to by a rebalance, until when)
        self._flipped: dict[bytes, tuple[str, float]] = {}
        # request id -> (work at routing time (-1: unknown), uncached tokens): calibration
        # from the observed TTFT, and what a move off its instance relieves
        self._routed: OrderedDict[str, tuple[int, int]] = OrderedDict()

    @property
    def ring(self) -> DualRing:
        return self._rings.ring  # type: ignore[return-value]

    def candidates(self, key: bytes, loads: Mapping[str, InstanceLoad]) -> tuple[str, str]:
        """The key's two candidates, a recent rebalance target first."""
        self._rings.sync(loads)
        primary, secondary = self.ring.distinct_candidates(key)
        flipped = self._flipped.get(key)
        if flipped is not None:
            instance, until = flipped
            if until < self.clock() or instance not in loads:
                del self._flipped[key]
            else:
                return instance, primary
        return primary, secondary

    def holders_of(self, key: bytes) -> list[str]:
        return list(self._holders.get(key, ()))

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        self._rings.sync(loads)  # the rings follow the pool, whichever step decides
        held = self.holders_in(request, loads)
        if not held:
            return self.place_cold(request, loads)
        cached = dict.fromkeys(held, request.cacheable_fraction)
        candidates = self.candidates_for(request, loads, held)
        decision = self.choose_among(candidates, request, loads, cached)
        return self.keep_hit_when_overloaded(decision, candidates, request, loads, cached)

    # ---- the steps of `route` ----------------------------------------------------------

    def holders_in(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> list[str]:
        """Filter: the instances of the pool that recently prefilled the prompt's prefix."""
        return [i for i in self.holders_of(request.prefix_key) if i in loads]

    def candidates_for(self, request: RouteRequest, loads: Mapping[str, InstanceLoad],
                       held: Sequence[str]) -> tuple[str, ...]:
        """The two ring candidates, then the holders (most recent first), each once."""
        return tuple(dict.fromkeys([*self.candidates(request.prefix_key, loads), *reversed(held)]))

    def choose_among(self, candidates: tuple[str, ...], request: RouteRequest, loads: Mapping[str, InstanceLoad],
                     cached: Mapping[str, float]) -> Decision:
        """Score and pick: the likeliest cache hit that meets the SLO, else the other
        candidate that does, else the pool's lowest predicted TTFT (`dualmap.choose`)."""
        return choose(candidates, loads, request.prompt_tokens, dict(cached), self.slo_ttft_s, self.predictor,
                      footprint=self._footprint)

    def keep_hit_when_overloaded(self, decision: Decision, candidates: tuple[str, ...], request: RouteRequest,
                                 loads: Mapping[str, InstanceLoad], cached: Mapping[str, float]) -> Decision:
        """A fallback that misses the SLO too (nobody meets it) stays with the cache hit:
        moving would only add work elsewhere."""
        if decision.reason != "fallback" or decision.predicted_ttft_s <= self.slo_ttft_s:
            return decision
        live = [c for c in candidates if c in loads and loads[c].healthy]
        if not live:
            return decision
        stay = min(live, key=lambda i: self._predict(i, loads, request, cached))
        return Decision(stay, "overloaded_stay", self._predict(stay, loads, request, cached),
                        self._uncached(stay, request, cached), loads[stay].queued_prefill_tokens)

    def place_cold(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        """A prefix nobody holds: no affinity to keep, so the pool's least loaded takes it
        (the one caching fewer prefixes among equals)."""
        healthy = healthy_instances(loads)
        predicted = {i: self._predict(i, loads, request, {}) for i in healthy}
        # Predictions this close are the same load seen through calibration noise: among
        # them, the instance caching fewer prefixes takes the new one.
        fastest = min(predicted.values())
        # So is an instance no busier than the least busy one and within the SLO: the gap
        # is then its calibration, not its load, and a calibration only updates with
        # traffic, so one fitted slower by noise would otherwise never get a new prefix.
        least_queued = min(loads[i].queued_prefill_tokens for i in healthy)
        near = [
            i for i in healthy
            if predicted[i] <= fastest * COLD_TIE_RATIO + COLD_TIE_S
            or (loads[i].queued_prefill_tokens <= least_queued and predicted[i] <= self.slo_ttft_s)
        ]
        best = min(near, key=lambda i: (self._footprint.get(i, 0), predicted[i]))
        return Decision(best, "cold", predicted[best], request.prompt_tokens, loads[best].queued_prefill_tokens)

    def _uncached(self, instance: str, request: RouteRequest, cached: Mapping[str, float]) -> int:
        return int(request.prompt_tokens * (1.0 - cached.get(instance, 0.0)))

    def _predict(self, instance: str, loads: Mapping[str, InstanceLoad], request: RouteRequest,
                 cached: Mapping[str, float]) -> float:
        return self.predictor.predict(instance, loads[instance], self._uncached(instance, request, cached))

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        key = request.prefix_key
        held = self._holders.get(key)
        if held is None:
            held = self._holders[key] = OrderedDict()
        if decision.instance not in held:
            self._footprint[decision.instance] = self._footprint.get(decision.instance, 0) + 1
        held[decision.instance] = None
        held.move_to_end(decision.instance)
        while len(held) > self.holders:
            dropped, _ = held.popitem(last=False)
            self._footprint[dropped] -= 1
        self._holders.move_to_end(key)
        while len(self._holders) > self.memory:
            _, forgotten = self._holders.popitem(last=False)
            for instance in forgotten:
                self._footprint[instance] -= 1
        work = decision.queued_tokens + decision.uncached_tokens if decision.queued_tokens >= 0 else -1
        self._routed[request.request_id] = (work, decision.uncached_tokens or request.prompt_tokens)
        while len(self._routed) > self.memory:
            self._routed.popitem(last=False)

    def on_completed(self, request_id: str, instance: str, ttft_s: float | None = None) -> None:
        routed = self._routed.pop(request_id, None)
        if routed is not None and ttft_s is not None and routed[0] >= 0:
            self.predictor.observe(instance, routed[0], ttft_s)

    def is_hot(self, load_tokens: float, mean_tokens: float) -> bool:
        """Per instance, relative to the pool: never a fleet-wide max−min gate."""
        return load_tokens > self.hot_ratio * mean_tokens and load_tokens - mean_tokens >= self.hot_min_tokens

    def rebalance(
        self, waiting: Mapping[str, Sequence[RouteRequest]], loads: Mapping[str, InstanceLoad]
    ) -> list[tuple[RouteRequest, Decision]]:
        if not waiting:
            return []
        healthy = [i for i, load in loads.items() if load.healthy]
        if len(healthy) < 2:
            return []

        def relief(request: RouteRequest) -> int:
            # What it would compute where it waits (its routed estimate).
            routed = self._routed.get(request.request_id)
            return routed[1] if routed is not None else request.prompt_tokens

        # Load = work already sent plus work waiting at the router for the instance.
        work = {i: float(loads[i].queued_prefill_tokens) for i in healthy}
        for instance, requests in waiting.items():
            if instance in work:
                work[instance] += sum(relief(r) for r in requests)
        mean = sum(work.values()) / len(work)
        moves: list[tuple[RouteRequest, Decision]] = []
        for hot, requests in waiting.items():
            # Newest first: the oldest have waited longest and are next in line.
            for request in reversed(requests):
                if hot not in work or not self.is_hot(work[hot], mean):
                    break
                held = set(self.holders_of(request.prefix_key))
                fraction = request.cacheable_fraction

                def cost(target: str, request: RouteRequest = request, held: set[str] = held,
                         fraction: float = fraction) -> int:
                    return int(request.prompt_tokens * (1.0 - (fraction if target in held else 0.0)))

                target = min((i for i in healthy if i != hot), key=lambda i: work[i] + cost(i))
                added = cost(target)
                if work[target] + added >= work[hot]:
                    break  # moving would only make the target the new hotspot
                work[hot] -= relief(request)
                work[target] += added
                self._flipped[request.prefix_key] = (target, self.clock() + self.flip_s)
                predicted = self.predictor.predict(target, loads[target], added)
                moves.append((request, Decision(target, "rebalance", predicted, added,
                                                loads[target].queued_prefill_tokens)))
        return moves


class KVPressurePolicy(RoutingPolicy):
    """Decode placement: the instance with the least KV-cache pressure (blocks in use plus
    tokens its requests still have to generate), except that a conversation stays on the
    instance that decoded its previous turn while that one is not much busier: its prefix
    cache already holds the conversation, so only the new turn's KV has to move."""

    name = "kv_pressure"

    def __init__(
        self,
        token_budget: int = 16384,
        session_slack: float = 0.25,
        max_kv_usage: float = 0.9,
        memory: int = 65536,
        **_: Any,
    ) -> None:
        self.token_budget = token_budget
        self.session_slack = session_slack
        self.max_kv_usage = max_kv_usage
        self.memory = memory
        self._sessions: OrderedDict[str, str] = OrderedDict()

    def pressure(self, load: InstanceLoad) -> float:
        return load.kv_cache_usage + load.decode_tokens / self.token_budget

    def route(self, request: RouteRequest, loads: Mapping[str, InstanceLoad]) -> Decision:
        healthy = healthy_instances(loads)
        best = min(healthy, key=lambda i: (self.pressure(loads[i]), loads[i].running))
        previous = self._sessions.get(request.session_id) if request.session_id else None
        if previous is not None and previous in loads and loads[previous].healthy:
            load = loads[previous]
            if (
                load.kv_cache_usage < self.max_kv_usage
                and self.pressure(load) <= self.pressure(loads[best]) + self.session_slack
            ):
                return Decision(previous, "session")
        return Decision(best, "least_pressure")

    def session_holder(self, session_id: str) -> str | None:
        """The instance that decoded the session's last turn (its prefix cache holds it)."""
        return self._sessions.get(session_id)

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        if request.session_id:
            self._sessions[request.session_id] = decision.instance
            self._sessions.move_to_end(request.session_id)
            while len(self._sessions) > self.memory:
                self._sessions.popitem(last=False)


POLICIES: dict[str, type[RoutingPolicy]] = {
    cls.name: cls
    for cls in (
        DualMapPolicy,
        RoundRobinPolicy,
        LeastLoadedPolicy,
        PowerOfTwoPolicy,
        ConsistentHashPolicy,
        PrefixTreePolicy,
        KVPressurePolicy,
    )
}


def check_policy_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError for an unknown policy or an option its constructor does not take
    (a typo in a config file must fail loudly)."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}")
    accepted = {
        p.name
        for p in inspect.signature(POLICIES[name].__init__).parameters.values()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    } - {"self", "clock"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for routing policy {name!r}; it takes {sorted(accepted)}"
        )


def check_routing_settings(routing: RoutingSettings) -> None:
    """Raise ValueError if the settings name a router option its policy does not take:
    `tandem up` checks before it starts anything, and the app's builder again."""
    check_policy_options(routing.prefill_router, routing.prefill_router_options)
    check_policy_options(routing.decode_router, routing.decode_router_options)


def make_policy(name: str, **kwargs: Any) -> RoutingPolicy:
    try:
        return POLICIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(POLICIES)}") from None
