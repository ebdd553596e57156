"""Discrete-event simulator of a disaggregated prefill/decode cluster behind one router.

Prefill instances run vLLM-like continuous batching with chunked prefill: each iteration
takes up to ``max_num_batched_tokens`` uncached tokens from its admitted requests, first
come first served, and costs what the profile's cost model says. Each instance has a prefix
cache (LRU over KV blocks): a request's cached prefix is the run of its leading blocks
present when it is first scheduled, and the blocks it computes are cached as each chunk
completes. An instance admits at most ``max_ongoing`` requests; the rest wait at the router
in a queue per instance (Ray Serve's max_ongoing_requests back-pressure), where the policy's
``rebalance`` may move them.

After prefill the KV moves to a decode instance (latency + bytes / bandwidth, one transfer
at a time per prefill instance's link), placed by the ``kv_pressure`` policy; decode
instances run iterations of their running sequences. TTFT = arrival to the end of the first
decode iteration that includes the request.

The router's load view is its own accounting, as in `routing.serve_router`: per prefill
instance the uncached prompt tokens it estimated (``Decision.uncached_tokens``) for requests
routed there and not yet prefilled, and their count; the simulator never shows a policy the
true cache contents or queue lengths.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.cluster_sim.cache import LRUBlockCache
from bench.cluster_sim.cost_model import CostModel
from bench.cluster_sim.workloads import Workload, arrival_times
from routing.dualmap import Decision, InstanceLoad
from routing.policies import RouteRequest, RoutingPolicy, make_policy

PREFILL_DONE, TRANSFER_DONE, DECODE_DONE = 0, 1, 2


@dataclass
class SimConfig:
    prefill_instances: int = 32
    decode_instances: int | None = None  # None: as many as prefill instances
    max_ongoing: int = 8  # requests one prefill instance admits (Serve's max_ongoing_requests)
    warmup_fraction: float = 0.2  # first requests excluded from metrics (cold caches)
    # How often (simulated seconds) the router offers waiting requests to policy.rebalance;
    # None: a quarter of a full-budget prefill iteration.
    rebalance_period_s: float | None = None

    @property
    def decode_count(self) -> int:
        return self.decode_instances if self.decode_instances is not None else self.prefill_instances


class SimRequest:
    """Per-run state of one request."""

    __slots__ = (
        "index",
        "route",
        "arrival",
        "instance",
        "estimate",
        "started",
        "cached",
        "done",
        "prefill_end",
        "first_token",
        "reason",
        "join_iteration",
    )

    def __init__(self, index: int, route: RouteRequest, arrival: float):
        self.index = index
        self.route = route
        self.arrival = arrival
        self.instance = ""
        self.estimate = 0  # router's estimate of uncached tokens (its load accounting)
        self.started = False
        self.cached = 0  # tokens found in the instance's prefix cache
        self.done = 0  # prompt tokens in the KV cache so far (cached + computed)
        self.prefill_end = 0.0
        self.first_token = 0.0
        self.reason = ""
        self.join_iteration = 0


class PrefillInstance:
    __slots__ = ("name", "cache", "queue", "busy", "chunks", "computed_tokens", "link_free_at", "iterations")

    def __init__(self, name: str, cache_blocks: int):
        self.name = name
        self.cache = LRUBlockCache(cache_blocks)
        self.queue: list[SimRequest] = []  # admitted, not yet prefilled (FCFS)
        self.busy = False
        self.chunks: list[tuple[SimRequest, int]] = []
        self.computed_tokens = 0  # prompt tokens this instance actually computed
        self.link_free_at = 0.0
        self.iterations = 0


class DecodeInstance:
    __slots__ = ("name", "pending", "batch", "context_tokens", "iteration", "finishing", "joined", "busy", "remaining_tokens")

    def __init__(self, name: str):
        self.name = name
        self.pending: list[SimRequest] = []  # KV arrived, waiting for the next iteration
        self.batch = 0
        self.context_tokens = 0  # Σ context of running sequences
        self.iteration = 0
        # iteration index -> final contexts of the sequences that finish with it
        self.finishing: dict[int, list[SimRequest]] = {}  # by the iteration of their last token
        self.joined: list[SimRequest] = []  # sequences whose first iteration is running
        self.busy = False
        self.remaining_tokens = 0  # tokens still to generate, running and pending


@dataclass
class SimResult:
    policy: str
    workload: str
    arrival: str
    rate: float
    instances: int
    requests: int
    measured: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    prefill_p90_s: float
    hit_rate: float  # token-weighted: cached prompt tokens / prompt tokens
    load_max_over_mean: float  # prefill tokens computed per instance
    load_cv: float
    throughput_rps: float
    makespan_s: float
    rebalance_moves: int
    reasons: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "reasons"}
        out["reasons"] = " ".join(f"{k}={v}" for k, v in sorted(self.reasons.items()))
        return out


PolicyFactory = Callable[["ClusterSim"], RoutingPolicy]


class ClusterSim:
    """One run: ``workload`` at ``rate`` requests/s through ``policy`` (a `routing.policies`
    name, built with `policy_defaults` overridden by ``policy_kwargs``, or a factory given
    the simulator) on the pools of ``config``, costed by ``cost``."""

    def __init__(
        self,
        cost: CostModel,
        workload: Workload,
        policy: str | PolicyFactory,
        rate: float,
        arrival: str = "poisson",
        config: SimConfig | None = None,
        seed: int = 0,
        slo_ttft_s: float = 1.0,
        policy_kwargs: Mapping[str, Any] | None = None,
        label: str | None = None,
    ):
        self.cost = cost
        self.workload = workload
        self.config = config or SimConfig()
        self.rate = rate
        self.arrival_kind = arrival
        self.seed = seed
        self.slo_ttft_s = slo_ttft_s
        self.now = 0.0
        cfg = self.config
        self.prefill = {name: PrefillInstance(name, cost.cache_blocks) for name in _names("prefill", cfg.prefill_instances)}
        self.decode = {name: DecodeInstance(name) for name in _names("decode", cfg.decode_count)}
        # The router's view: everything routed to an instance and not yet prefilled ...
        self.loads = {name: InstanceLoad() for name in self.prefill}
        # ... and only what was handed to the instance (for rebalance, which adds the waiting).
        self.sent_loads = {name: InstanceLoad() for name in self.prefill}
        self.decode_loads = {name: InstanceLoad() for name in self.decode}
        self.waiting: dict[str, list[SimRequest]] = {name: [] for name in self.prefill}
        self.waiting_count = 0
        self.admitted = dict.fromkeys(self.prefill, 0)
        self.by_id: dict[str, SimRequest] = {}
        self.reasons: Counter[str] = Counter()
        self.rebalance_moves = 0
        self.policy_name = label or (policy if isinstance(policy, str) else "custom")
        if isinstance(policy, str):
            self.policy = make_policy(policy, **{**self.policy_defaults(), **dict(policy_kwargs or {})})
        else:
            self.policy = policy(self)
        # Decode placement weighs tokens still to generate against a quarter of an instance's KV.
        self.decode_policy = make_policy("kv_pressure", token_budget=max(1, cost.decode_kv_tokens // 4))
        period = cfg.rebalance_period_s
        self.rebalance_period_s = period if period is not None else 0.25 * cost.prefill_iteration_s(((cost.max_num_batched_tokens, 0),))
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    def policy_defaults(self) -> dict[str, Any]:
        """What every policy may take from the environment (each ignores what it does not use)."""
        return {
            "clock": self.clock,
            "slo_ttft_s": self.slo_ttft_s,
            "prior_tokens_per_s": self.cost.prefill_tokens_per_s(),
            "fixed_s": self.cost.prefill_fixed_s,
            "seed": self.seed,
            # SGLang-style tree: remember about what an instance's prefix cache can hold.
            "max_blocks_per_instance": max(1, self.cost.cache_blocks),
        }

    # -- event plumbing -------------------------------------------------------------------

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, payload))

    # -- routing -------------------------------------------------------------------------

    def _assign(self, request: SimRequest, decision: Decision) -> None:
        name = decision.instance
        request.instance = name
        request.reason = decision.reason
        # A policy that does not estimate (0) is taken to expect the whole prompt.
        request.estimate = decision.uncached_tokens or request.route.prompt_tokens
        load = self.loads[name]
        load.queued_prefill_tokens += request.estimate
        load.running += 1
        if self.admitted[name] < self.config.max_ongoing:
            self._admit(request)
        else:
            self.waiting[name].append(request)
            self.waiting_count += 1

    def _unassign_waiting(self, request: SimRequest) -> None:
        name = request.instance
        self.waiting[name].remove(request)
        self.waiting_count -= 1
        load = self.loads[name]
        load.queued_prefill_tokens -= request.estimate
        load.running -= 1

    def _admit(self, request: SimRequest) -> None:
        name = request.instance
        self.admitted[name] += 1
        sent = self.sent_loads[name]
        sent.queued_prefill_tokens += request.estimate
        sent.running += 1
        instance = self.prefill[name]
        instance.queue.append(request)
        if not instance.busy:
            self._start_prefill(instance)

    def _route(self, request: SimRequest) -> None:
        decision = self.policy.route(request.route, self.loads)
        self.policy.on_routed(request.route, decision)
        self.reasons[decision.reason] += 1
        self._assign(request, decision)

    def _maybe_rebalance(self) -> None:
        if self.waiting_count == 0:
            return
        waiting = {name: [r.route for r in queue] for name, queue in self.waiting.items() if queue}
        moves = self.policy.rebalance(waiting, self.sent_loads)
        for route, decision in moves:
            request = self.by_id[route.request_id]
            if request.instance not in waiting or request not in self.waiting[request.instance]:
                continue  # not waiting any more: a stale move
            if decision.instance == request.instance:
                continue
            self._unassign_waiting(request)
            self.policy.on_routed(route, decision)
            self.reasons[decision.reason] += 1
            self.rebalance_moves += 1
            self._assign(request, decision)

    # -- prefill -------------------------------------------------------------------------

    def _start_prefill(self, instance: PrefillInstance) -> None:
        budget = self.cost.max_num_batched_tokens
        block_tokens = self.cost.block_tokens
        chunks: list[tuple[SimRequest, int]] = []
        pairs: list[tuple[int, int]] = []
        for request in instance.queue:
            if not request.started:
                # vLLM looks up the prefix cache when it first schedules a request, and
                # always computes at least the last prompt token.
                hits = instance.cache.match(request.route.blocks)
                request.cached = min(hits * block_tokens, request.route.prompt_tokens - 1)
                request.done = request.cached
                request.started = True
            take = min(request.route.prompt_tokens - request.done, budget)
            chunks.append((request, take))
            pairs.append((take, request.done))
            budget -= take
            if budget <= 0:
                break
        if not chunks:
            instance.busy = False
            return
        instance.busy = True
        instance.chunks = chunks
        instance.iterations += 1
        self._push(self.now + self.cost.prefill_iteration_s(pairs), PREFILL_DONE, instance)

    def _prefill_done(self, instance: PrefillInstance) -> None:
        block_tokens = self.cost.block_tokens
        finished = []
        for request, take in instance.chunks:
            before = request.done
            request.done += take
            instance.computed_tokens += take
            if request.done >= request.route.prompt_tokens:
                finished.append(request)  # its blocks are cached when it finishes
                continue
            # Blocks filled by this chunk are cached at once (other requests may hit them).
            blocks = request.route.blocks
            first, last = before // block_tokens, min(request.done // block_tokens, len(blocks))
            if last > first:
                instance.cache.insert(blocks[first:last])
        instance.chunks = []
        if finished:
            done = set(map(id, finished))
            instance.queue = [r for r in instance.queue if id(r) not in done]
            for request in finished:
                self._prefill_finished(instance, request)
            name = instance.name
            queue = self.waiting[name]
            while queue and self.admitted[name] < self.config.max_ongoing:
                self.waiting_count -= 1
                self._admit(queue.pop(0))
        self._start_prefill(instance)

    def _prefill_finished(self, instance: PrefillInstance, request: SimRequest) -> None:
        name = instance.name
        # Cache the prompt's blocks (re-touching the earlier chunks' ones) head last, so the
        # prefix head outlives its tail, as when vLLM frees a finished request's blocks.
        instance.cache.insert(request.route.blocks)
        self.admitted[name] -= 1
        for view in (self.loads[name], self.sent_loads[name]):
            view.queued_prefill_tokens -= request.estimate
            view.running -= 1
        request.prefill_end = self.now
        self.policy.on_completed(request.route.request_id, name, ttft_s=self.now - request.arrival)
        start = max(self.now, instance.link_free_at)
        end = start + request.route.prompt_tokens * self.cost.kv_bytes_per_token / self.cost.transfer_bytes_per_s
        instance.link_free_at = end
        self._push(end + self.cost.transfer_latency_s, TRANSFER_DONE, request)

    # -- decode --------------------------------------------------------------------------

    def _transfer_done(self, request: SimRequest) -> None:
        decision = self.decode_policy.route(request.route, self.decode_loads)
        self.decode_policy.on_routed(request.route, decision)
        instance = self.decode[decision.instance]
        instance.pending.append(request)
        instance.remaining_tokens += max(1, request.route.output_tokens)
        self._update_decode_load(instance)
        if not instance.busy:
            self._start_decode(instance)

    def _update_decode_load(self, instance: DecodeInstance) -> None:
        load = self.decode_loads[instance.name]
        pending_context = sum(r.route.prompt_tokens for r in instance.pending)
        load.kv_cache_usage = (instance.context_tokens + pending_context) / self.cost.decode_kv_tokens
        load.decode_tokens = instance.remaining_tokens
        load.running = instance.batch + len(instance.pending)

    def _join_batch(self, instance: DecodeInstance) -> list[SimRequest]:
        """Moves pending requests into the batch while slots and KV allow; returns them."""
        cost = self.cost
        joined = []
        still_pending = []
        for request in instance.pending:
            fits = instance.context_tokens + request.route.prompt_tokens <= cost.decode_kv_tokens
            # An empty instance takes a request even if it alone exceeds the KV budget.
            if instance.batch < cost.max_num_seqs and (fits or instance.batch == 0):
                instance.batch += 1
                instance.context_tokens += request.route.prompt_tokens
                request.join_iteration = instance.iteration
                # It leaves after its last token's iteration.
                finish = instance.iteration + max(1, request.route.output_tokens) - 1
                instance.finishing.setdefault(finish, []).append(request)
                joined.append(request)
            else:
                still_pending.append(request)
        instance.pending = still_pending
        instance.joined = joined
        return joined

    def _start_decode(self, instance: DecodeInstance) -> None:
        self._join_batch(instance)
        if instance.batch == 0:
            instance.busy = False
            return
        instance.busy = True
        self._push(self.now + self.cost.decode_iteration_s(instance.batch, instance.context_tokens), DECODE_DONE, instance)

    def _decode_done(self, instance: DecodeInstance) -> None:
        """One decode step ended: the requests that joined it have their first token, every
        stream one more, and those at their last token leave the batch."""
        for request in instance.joined:
            self._first_token(request)
        instance.joined = []
        instance.context_tokens += instance.batch
        instance.remaining_tokens -= instance.batch
        for request in instance.finishing.pop(instance.iteration, ()):
            instance.batch -= 1
            # It held its prompt and all its outputs but the last.
            instance.context_tokens -= request.route.prompt_tokens + max(1, request.route.output_tokens)
            self._left_batch(instance, request)
        instance.iteration += 1
        self._update_decode_load(instance)
        self._start_decode(instance)

    def _first_token(self, request: SimRequest) -> None:
        request.first_token = self.now
        self._first_tokens += 1

    def _left_batch(self, instance: DecodeInstance, request: SimRequest) -> None:
        """A request finished on ``instance`` (the static cluster needs nothing more)."""

    # -- run -----------------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        requests = self.workload.requests
        times = arrival_times(self.arrival_kind, len(requests), self.rate, self.seed)
        sim_requests = [SimRequest(i, spec.route, float(t)) for i, (spec, t) in enumerate(zip(requests, times, strict=True))]
        self.by_id = {r.route.request_id: r for r in sim_requests}
        self._first_tokens = 0
        events = self._events
        next_arrival = 0
        total = len(sim_requests)
        next_rebalance = 0.0
        while self._first_tokens < total:
            if next_arrival < total and (not events or sim_requests[next_arrival].arrival <= events[0][0]):
                request = sim_requests[next_arrival]
                next_arrival += 1
                self.now = request.arrival
                self._route(request)
            else:
                at, _, kind, payload = heapq.heappop(events)
                self.now = at
                if kind == PREFILL_DONE:
                    self._prefill_done(payload)
                elif kind == TRANSFER_DONE:
                    self._transfer_done(payload)
                else:
                    self._decode_done(payload)
            if self.waiting_count and self.now >= next_rebalance:
                self._maybe_rebalance()
                next_rebalance = self.now + self.rebalance_period_s
        return self._result(sim_requests, time.perf_counter() - started)

    def _result(self, requests: list[SimRequest], wall_s: float) -> SimResult:
        skip = int(len(requests) * self.config.warmup_fraction)
        measured = requests[skip:]
        ttft = np.array([r.first_token - r.arrival for r in measured])
        prefill = np.array([r.prefill_end - r.arrival for r in measured])
        prompt = sum(r.route.prompt_tokens for r in measured)
        cached = sum(r.cached for r in measured)
        computed = np.array([i.computed_tokens for i in self.prefill.values()], dtype=float)
        mean = computed.mean() if len(computed) else 0.0
        makespan = max(r.first_token for r in requests) - requests[0].arrival
        return SimResult(
            policy=self.policy_name,
            workload=self.workload.name,
            arrival=self.arrival_kind,
            rate=self.rate,
            instances=len(self.prefill),
            requests=len(requests),
            measured=len(measured),
            ttft_p50_s=float(np.percentile(ttft, 50)),
            ttft_p90_s=float(np.percentile(ttft, 90)),
            ttft_p99_s=float(np.percentile(ttft, 99)),
            prefill_p90_s=float(np.percentile(prefill, 90)),
            hit_rate=cached / prompt if prompt else 0.0,
            load_max_over_mean=float(computed.max() / mean) if mean else 0.0,
            load_cv=float(computed.std() / mean) if mean else 0.0,
            throughput_rps=len(requests) / makespan if makespan > 0 else 0.0,
            makespan_s=makespan,
            rebalance_moves=self.rebalance_moves,
            reasons=dict(self.reasons),
            wall_s=wall_s,
        )


def _names(role: str, count: int) -> list[str]:
    width = len(str(max(0, count - 1)))
    return [f"{role}-{i:0{width}d}" for i in range(count)]
