"""Elastic P/D pools in the cluster simulator: engines start (taking ``engine_start_s``
before they serve), drain and stop while a workload whose mix and rate shift runs through
them, under a scaler that decides the pools' sizes every interval.

It extends `ClusterSim` (the same prefill iterations, prefix caches, router, KV transfer
and decode iterations) with:

- scale events: a new instance serves after the engine start time; a removed one either
  drains (the router stops sending to it, its queue finishes, its KV leaves, then it stops:
  Serve's graceful shutdown with Tandem's drain) or, for a scaler that does not drain, stops
  at once and the requests on it are lost;
- per-request TPOT (the mean time between a request's tokens after the first), so each
  request's attainment is "TTFT and TPOT both met";
- engine-seconds: every instance from its start to its stop, starting time included (the
  accelerator is held while the engine loads);
- the measurements a planner reads each interval (`Observation`).

The scalers compared (`SCALERS`): a static pool, Ray Serve's per-deployment default policy
(ongoing requests per replica), a Dynamo-style SLA planner (offline profile + correction
factors + constant load predictor, scale-down without drain), and Tandem's planner
(`control_plane.planner`).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bench.cluster_sim.cost_model import CostModel
from bench.cluster_sim.simulator import (
    DECODE_DONE,
    PREFILL_DONE,
    TRANSFER_DONE,
    ClusterSim,
    DecodeInstance,
    PrefillInstance,
    SimConfig,
    SimRequest,
)
from bench.cluster_sim.workloads import Workload
from control_plane.planner.policy import DecodeSample, Observation, Planner
from control_plane.settings import PlannerSettings
from routing.dualmap import InstanceLoad

TICK, READY = 10, 11


@dataclass
class Life:
    """One engine's life: started (asked for), ready (serving), stopped."""

    started: float
    ready: float
    stopped: float | None = None
    draining: bool = False


@dataclass
class ElasticResult:
    scaler: str
    workload: str
    requests: int
    measured: int
    attainment: float  # TTFT and TPOT both met (lost requests count as missed)
    ttft_attainment: float
    tpot_attainment: float
    lost: int
    engine_hours: float
    prefill_engine_hours: float
    decode_engine_hours: float
    goodput_per_engine_hour: float  # attained requests per engine-hour
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    scale_events: int
    by_stretch: dict[int, float] = field(default_factory=dict)  # attainment per workload stretch
    timeline: list[dict[str, float]] = field(default_factory=list)  # per tick: pools, rate, attainment

    def row(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("timeline", "by_stretch")}
        out["by_stretch"] = " ".join(f"{k}:{v:.3f}" for k, v in sorted(self.by_stretch.items()))
        return out


class Scaler(Protocol):
    name: str
    drains: bool  # False: a removed instance stops at once, its requests are lost
    interval_s: float

    def initial(self) -> tuple[int, int]: ...

    def tick(self, sim: ElasticSim, obs: Observation) -> tuple[int, int]: ...


class ElasticSim(ClusterSim):
    def __init__(
        self,
        cost: CostModel,
        workload: Workload,
        arrivals: np.ndarray,
        scaler: Scaler,
        slo_ttft_s: float,
        slo_tpot_s: float,
        engine_start_s: float = 60.0,
        policy: str = "dualmap",
        warmup_s: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(cost, workload, policy, rate=1.0, config=SimConfig(prefill_instances=0, decode_instances=0),
                         seed=seed, slo_ttft_s=slo_ttft_s)
        self.arrivals = arrivals
        self.scaler = scaler
        self.slo_tpot_s = slo_tpot_s
        self.engine_start_s = engine_start_s
        self.warmup_s = warmup_s
        self.lives: dict[str, Life] = {}
        self.serving_prefill: set[str] = set()
        self.serving_decode: set[str] = set()
        self.counter = {"prefill": 0, "decode": 0}
        self.scale_events = 0
        self._window = _Window()
        self.timeline: list[dict[str, float]] = []
        self.lost: set[int] = set()
        self.finished: dict[int, float] = {}  # request index -> time of its last token
        self._done = 0

    # -- pools ----------------------------------------------------------------------------

    def _add(self, role: str, ready_now: bool = False) -> None:
        name = f"{role}-{self.counter[role]:03d}"
        self.counter[role] += 1
        ready = self.now if ready_now else self.now + self.engine_start_s
        self.lives[name] = Life(self.now, ready)
        if role == "prefill":
            self.prefill[name] = PrefillInstance(name, self.cost.cache_blocks)
            self.loads[name] = InstanceLoad()
            self.sent_loads[name] = InstanceLoad()
            self.waiting[name] = []
            self.admitted[name] = 0
        else:
            self.decode[name] = DecodeInstance(name)
            self.decode_loads[name] = InstanceLoad()
        if ready_now:
            self._ready(name)
        else:
            self._push(ready, READY, name)

    def _ready(self, name: str) -> None:
        life = self.lives[name]
        if life.stopped is not None or life.draining:
            return
        (self.serving_prefill if name in self.prefill else self.serving_decode).add(name)

    def _alive(self, role: str) -> list[str]:
        pool = self.prefill if role == "prefill" else self.decode
        return [n for n in pool if self.lives[n].stopped is None and not self.lives[n].draining]

    def _scale(self, role: str, target: int) -> None:
        alive = self._alive(role)
        if target > len(alive):
            for _ in range(target - len(alive)):
                self._add(role)
            self.scale_events += 1
        elif target < len(alive):
            # Starting engines go first (nothing on them), then the least busy.
            starting = [n for n in alive if self.lives[n].ready > self.now]
            serving = sorted((n for n in alive if n not in starting), key=lambda n: self._work(role, n))
            for name in (starting + serving)[: len(alive) - target]:
                self._remove(role, name)
            self.scale_events += 1

    def _work(self, role: str, name: str) -> float:
        if role == "prefill":
            return self.loads[name].queued_prefill_tokens + len(self.waiting[name])
        instance = self.decode[name]
        return instance.batch + len(instance.pending)

    def _remove(self, role: str, name: str) -> None:
        life = self.lives[name]
        serving = self.serving_prefill if role == "prefill" else self.serving_decode
        serving.discard(name)
        if life.ready > self.now:
            # Not serving yet: what waits for it goes elsewhere, and it stops at once.
            life.stopped = self.now
            self._evacuate(role, name)
            return
        if not self.scaler.drains:
            self._stop_dropping(role, name)
            return
        life.draining = True
        if role == "prefill":
            self._evacuate(role, name)  # the router stops sending; its queue at the router moves
        self._maybe_stopped(role, name)

    def _evacuate(self, role: str, name: str) -> None:
        if role == "prefill":
            for request in list(self.waiting[name]):
                self._unassign_waiting(request)
                self._route(request)
        else:
            instance = self.decode[name]
            pending, instance.pending = instance.pending, []
            for request in pending:
                instance.remaining_tokens -= max(1, request.route.output_tokens)
                self._place_decode(request)

    def _stop_dropping(self, role: str, name: str) -> None:
        self.lives[name].stopped = self.now
        if role == "prefill":
            instance = self.prefill[name]
            for request in list(self.waiting[name]) + list(instance.queue):
                self._lose(request)
            self.waiting_count -= len(self.waiting[name])
            self.waiting[name] = []
            instance.queue = []
            instance.chunks = []
        else:
            instance = self.decode[name]
            running = [r for r in self._running.get(name, ())]
            for request in list(instance.pending) + running:
                self._lose(request)
            instance.pending = []
            self._running[name] = set()

    def _maybe_stopped(self, role: str, name: str) -> None:
        life = self.lives[name]
        if not life.draining or life.stopped is not None:
            return
        if role == "prefill":
            instance = self.prefill[name]
            idle = not instance.queue and not self.waiting[name] and instance.link_free_at <= self.now
        else:
            instance = self.decode[name]
            idle = instance.batch == 0 and not instance.pending
        if idle:
            life.stopped = self.now

    def _lose(self, request: SimRequest) -> None:
        if request.index in self.lost or request.index in self.finished:
            return
        self.lost.add(request.index)
        self._done += 1

    # -- routing restricted to serving instances -------------------------------------------

    def _route(self, request: SimRequest) -> None:
        loads = {n: self.loads[n] for n in self.serving_prefill}
        if not loads:  # every prefill engine is starting: the request waits at the first one
            loads = {n: self.loads[n] for n in self._alive("prefill")}
        decision = self.policy.route(request.route, loads)
        self.policy.on_routed(request.route, decision)
        self.reasons[decision.reason] += 1
        self._assign(request, decision)

    def _admit(self, request: SimRequest) -> None:
        if self.lives[request.instance].ready > self.now:
            self.waiting[request.instance].append(request)  # the engine is not up yet
            self.waiting_count += 1
            return
        super()._admit(request)

    def _maybe_rebalance(self) -> None:
        if self.waiting_count == 0:
            return
        waiting = {n: [r.route for r in q] for n, q in self.waiting.items() if q and n in self.serving_prefill}
        if not waiting:
            return
        moves = self.policy.rebalance(waiting, {n: self.sent_loads[n] for n in self.serving_prefill})
        for route, decision in moves:
            request = self.by_id[route.request_id]
            if decision.instance not in self.serving_prefill or request.instance not in waiting:
                continue
            if request not in self.waiting[request.instance] or decision.instance == request.instance:
                continue
            self._unassign_waiting(request)
            self.policy.on_routed(route, decision)
            self.rebalance_moves += 1
            self._assign(request, decision)

    # -- prefill and decode with measurements ---------------------------------------------

    def _start_prefill(self, instance: PrefillInstance) -> None:
        if self.lives[instance.name].stopped is not None:
            return
        before = self._seq
        super()._start_prefill(instance)
        if self._seq > before:  # an iteration was scheduled: the engine is busy until it ends
            self._window.prefill_busy_s += self._events_last_push - self.now
        # The prefix-cache lookups of requests that just started.
        for request, _take in instance.chunks:
            if request.index not in self._hit_seen:
                self._hit_seen.add(request.index)
                self._window.cached += request.cached
                self._window.prompt += request.route.prompt_tokens

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._events_last_push = at
        super()._push(at, kind, payload)

    def _prefill_done(self, instance: PrefillInstance) -> None:
        if self.lives[instance.name].stopped is not None:
            return
        for _request, take in instance.chunks:
            self._window.prefill_tokens += take
        super()._prefill_done(instance)
        self._maybe_stopped("prefill", instance.name)

    def _prefill_finished(self, instance: PrefillInstance, request: SimRequest) -> None:
        super()._prefill_finished(instance, request)
        self._window.transfers.append(instance.link_free_at - self.now + self.cost.transfer_latency_s)
        self._window.transfer_tokens += request.route.prompt_tokens

    def _transfer_done(self, request: SimRequest) -> None:
        if request.index in self.lost:
            return
        source = self.lives[request.instance]
        if source.stopped is not None and source.stopped < self.now and not self.scaler.drains:
            self._lose(request)  # its prefill engine went before the KV left
            return
        if request.instance in self.prefill and source.draining:
            self._maybe_stopped("prefill", request.instance)
        self._place_decode(request)

    def _place_decode(self, request: SimRequest) -> None:
        loads = {n: self.decode_loads[n] for n in self.serving_decode} or {
            n: self.decode_loads[n] for n in self._alive("decode")}
        decision = self.decode_policy.route(request.route, loads)
        self.decode_policy.on_routed(request.route, decision)
        instance = self.decode[decision.instance]
        self._placed_at.setdefault(request.index, self.now)
        instance.pending.append(request)
        instance.remaining_tokens += max(1, request.route.output_tokens)
        self._update_decode_load(instance)
        if not instance.busy and self.lives[instance.name].ready <= self.now:
            self._start_decode(instance)

    def _start_decode(self, instance: DecodeInstance) -> None:
        if self.lives[instance.name].stopped is not None:
            instance.busy = False
            return
        self._running.setdefault(instance.name, set()).update(self._join_batch(instance))
        if instance.batch == 0:
            instance.busy = False
            self._maybe_stopped("decode", instance.name)
            return
        instance.busy = True
        step = self.cost.decode_iteration_s(instance.batch, instance.context_tokens)
        self._step_started = self.now
        window = self._window.decode.setdefault(instance.name, [0.0, 0.0, 0.0, 0])
        window[0] += instance.batch
        window[1] += instance.context_tokens
        window[2] += step
        window[3] += 1
        self._push(self.now + step, DECODE_DONE, instance)

    def _decode_done(self, instance: DecodeInstance) -> None:
        if self.lives[instance.name].stopped is None:
            super()._decode_done(instance)

    def _first_token(self, request: SimRequest) -> None:
        if request.index not in self.lost:
            request.first_token = self.now
            self._window.decode_queue.append(self._step_started - self._placed_at.pop(request.index, self._step_started))

    def _left_batch(self, instance: DecodeInstance, request: SimRequest) -> None:
        self._running[instance.name].discard(request)
        if request.index not in self.lost:
            self.finished[request.index] = self.now
            self._done += 1
            self._window.completed.append(request)

    # -- run ------------------------------------------------------------------------------

    def observation(self) -> Observation:
        w = self._window
        prefill_n = len(self._alive("prefill"))
        decode_n = len(self._alive("decode"))
        arrived = w.arrived
        met_ttft = met_tpot = 0
        for request in w.completed:
            ttft, tpot = self.latencies(request)
            met_ttft += ttft <= self.slo_ttft_s
            met_tpot += tpot <= self.slo_tpot_s
        samples = tuple(
            DecodeSample(b / n, c / n, s / n) for b, c, s, n in w.decode.values() if n
        )
        window = self.scaler.interval_s
        decode_alive = [n for n in self._alive("decode") if n in self.serving_decode]
        return Observation(
            now=self.now,
            window_s=window,
            prefill_replicas=prefill_n,
            decode_replicas=decode_n,
            prefill_starting=sum(1 for n in self._alive("prefill") if self.lives[n].ready > self.now),
            decode_starting=sum(1 for n in self._alive("decode") if self.lives[n].ready > self.now),
            arrivals=len(arrived),
            prompt_tokens=sum(r.route.prompt_tokens for r in arrived),
            output_tokens=sum(r.route.output_tokens for r in arrived),
            prompt_tokens_p90=float(np.percentile([r.route.prompt_tokens for r in arrived], 90)) if arrived else None,
            prefix_hit_rate=(w.cached / w.prompt) if w.prompt else None,
            prefill_tokens_per_s=(w.prefill_tokens / w.prefill_busy_s) if w.prefill_busy_s > 0.5 else None,
            prefill_queued_tokens=float(sum(self.loads[n].queued_prefill_tokens for n in self.prefill
                                            if self.lives[n].stopped is None)),
            decode_samples=samples,
            decode_running=float(sum(self.decode[n].batch for n in decode_alive)),
            decode_waiting=float(sum(len(self.decode[n].pending) for n in decode_alive)),
            decode_kv_usage=float(np.mean([self.decode[n].context_tokens / self.cost.decode_kv_tokens
                                           for n in decode_alive])) if decode_alive else None,
            # What an engine's stats tell of its capacity: KV held over KV use, where it is
            # full enough to tell.
            decode_kv_capacity_tokens=self._kv_capacity(decode_alive),
            decode_queue_s=float(np.mean(w.decode_queue)) if w.decode_queue else None,
            transfer_s=float(np.mean(w.transfers)) if w.transfers else None,
            transfer_s_per_token=float(np.sum(w.transfers)) / w.transfer_tokens if w.transfer_tokens else None,
            completed=len(w.completed),
            ttft_met=met_ttft,
            tpot_met=met_tpot,
        )

    def _kv_capacity(self, names: list[str]) -> float | None:
        held = [(self.decode[n].context_tokens, self.decode[n].context_tokens / self.cost.decode_kv_tokens)
                for n in names]
        capacities = [c / u for c, u in held if u > 0.2]
        return float(np.mean(capacities)) if capacities else None

    def latencies(self, request: SimRequest) -> tuple[float, float]:
        ttft = request.first_token - request.arrival
        outputs = max(1, request.route.output_tokens)
        end = self.finished.get(request.index, request.first_token)
        tpot = (end - request.first_token) / (outputs - 1) if outputs > 1 else 0.0
        return ttft, tpot

    def _tick(self) -> None:
        obs = self.observation()
        prefill, decode = self.scaler.tick(self, obs)
        self._scale("prefill", prefill)
        self._scale("decode", decode)
        completed = len(self._window.completed)
        self.timeline.append({
            "t": self.now,
            "prefill": len(self._alive("prefill")),
            "decode": len(self._alive("decode")),
            "prefill_serving": len(self.serving_prefill),
            "decode_serving": len(self.serving_decode),
            "rate": obs.arrivals / obs.window_s if obs.window_s else 0.0,
            "attainment": (min(obs.ttft_met, obs.tpot_met) / completed) if completed else float("nan"),
            "ttft_attainment": obs.ttft_met / completed if completed else float("nan"),
            "tpot_attainment": obs.tpot_met / completed if completed else float("nan"),
            "prompt_mean": obs.prompt_tokens / obs.arrivals if obs.arrivals else 0.0,
        })
        self._window = _Window()

    def run(self) -> ElasticResult:  # type: ignore[override]
        requests = self.workload.requests
        sim_requests = [SimRequest(i, spec.route, float(t)) for i, (spec, t) in enumerate(zip(requests, self.arrivals, strict=True))]
        self.by_id = {r.route.request_id: r for r in sim_requests}
        self._running: dict[str, set[SimRequest]] = {}
        self._hit_seen: set[int] = set()
        self._placed_at: dict[int, float] = {}
        self._step_started = 0.0
        self._events_last_push = 0.0
        prefill, decode = self.scaler.initial()
        for _ in range(prefill):
            self._add("prefill", ready_now=True)
        for _ in range(decode):
            self._add("decode", ready_now=True)
        self._push(self.scaler.interval_s, TICK, None)
        total = len(sim_requests)
        next_arrival = 0
        next_rebalance = 0.0
        events = self._events
        while self._done < total:
            if next_arrival < total and (not events or sim_requests[next_arrival].arrival <= events[0][0]):
                request = sim_requests[next_arrival]
                next_arrival += 1
                self.now = request.arrival
                self._window.arrived.append(request)
                self._route(request)
            else:
                at, _, kind, payload = heapq.heappop(events)
                self.now = at
                if kind == PREFILL_DONE:
                    self._prefill_done(payload)
                elif kind == TRANSFER_DONE:
                    self._transfer_done(payload)
                elif kind == DECODE_DONE:
                    self._decode_done(payload)
                elif kind == READY:
                    self._on_ready(payload)
                elif kind == TICK:
                    self._tick()
                    if self._done < total:
                        self._push(self.now + self.scaler.interval_s, TICK, None)
            if self.waiting_count and self.now >= next_rebalance:
                self._maybe_rebalance()
                next_rebalance = self.now + self.rebalance_period_s
        end = self.now
        for life in self.lives.values():
            if life.stopped is None:
                life.stopped = end
        return self._elastic_result(sim_requests)

    def _on_ready(self, name: str) -> None:
        self._ready(name)
        if name in self.prefill:
            # Requests that waited for this engine to come up are admitted now.
            queue = self.waiting[name]
            while queue and self.admitted[name] < self.config.max_ongoing:
                self.waiting_count -= 1
                ClusterSim._admit(self, queue.pop(0))
        else:
            instance = self.decode[name]
            if instance.pending and not instance.busy:
                self._start_decode(instance)

    def _elastic_result(self, requests: list[SimRequest]) -> ElasticResult:
        measured = [r for r in requests if r.arrival >= self.warmup_s]
        ttfts, tpots, ok_ttft, ok_tpot, ok = [], [], 0, 0, 0
        groups: dict[int, list[int]] = {}
        specs = self.workload.requests
        for r in measured:
            group = groups.setdefault(specs[r.index].group, [0, 0])
            group[1] += 1
            if r.index in self.lost:
                continue
            ttft, tpot = self.latencies(r)
            ttfts.append(ttft)
            tpots.append(tpot)
            a, b = ttft <= self.slo_ttft_s, tpot <= self.slo_tpot_s
            ok_ttft += a
            ok_tpot += b
            ok += a and b
            group[0] += a and b
        hours = {"prefill": 0.0, "decode": 0.0}
        for name, life in self.lives.items():
            role = "prefill" if name in self.prefill else "decode"
            hours[role] += ((self.now if life.stopped is None else life.stopped) - life.started) / 3600
        total_h = hours["prefill"] + hours["decode"]
        n = len(measured)
        return ElasticResult(
            scaler=self.scaler.name,
            workload=self.workload.name,
            requests=len(requests),
            measured=n,
            attainment=ok / n,
            ttft_attainment=ok_ttft / n,
            tpot_attainment=ok_tpot / n,
            lost=len(self.lost),
            engine_hours=total_h,
            prefill_engine_hours=hours["prefill"],
            decode_engine_hours=hours["decode"],
            goodput_per_engine_hour=ok / total_h if total_h else 0.0,
            ttft_p50_s=float(np.percentile(ttfts, 50)) if ttfts else math.nan,
            ttft_p90_s=float(np.percentile(ttfts, 90)) if ttfts else math.nan,
            tpot_p50_s=float(np.percentile(tpots, 50)) if tpots else math.nan,
            tpot_p90_s=float(np.percentile(tpots, 90)) if tpots else math.nan,
            scale_events=self.scale_events,
            by_stretch={g: met / n for g, (met, n) in groups.items()},
            timeline=self.timeline,
        )


@dataclass
class _Window:
    """What happened since the last tick."""

    arrived: list[SimRequest] = field(default_factory=list)
    completed: list[SimRequest] = field(default_factory=list)
    cached: int = 0
    prompt: int = 0
    prefill_tokens: int = 0
    prefill_busy_s: float = 0.0
    transfers: list[float] = field(default_factory=list)
    transfer_tokens: int = 0  # the prompt tokens whose KV those transfers moved
    decode_queue: list[float] = field(default_factory=list)  # KV arrived -> first step began
    decode: dict[str, list[float]] = field(default_factory=dict)  # name -> [Σbatch, Σcontext, Σstep, steps]


# -- scalers ---------------------------------------------------------------------------------


@dataclass
class StaticScaler:
    prefill: int
    decode: int
    interval_s: float = 10.0
    drains: bool = True

    @property
    def name(self) -> str:
        return f"static {self.prefill}P:{self.decode}D"

    def initial(self) -> tuple[int, int]:
        return self.prefill, self.decode

    def tick(self, sim: ElasticSim, obs: Observation) -> tuple[int, int]:
        return self.prefill, self.decode


@dataclass
class ServeDefaultScaler:
    """Ray Serve's default policy, per deployment and blind to the other: replicas =
    ceil(ongoing requests averaged over the look-back window / target_ongoing_requests),
    moved only after the decision held upscale_delay_s (up) or downscale_delay_s (down).
    Ongoing at the prefill deployment: requests routed to it and not yet prefilled; at the
    decode deployment: streams (a decode call lasts its whole stream)."""

    target_prefill: float
    target_decode: float
    start: tuple[int, int] = (1, 1)
    bounds: tuple[int, int, int, int] = (1, 8, 1, 8)
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_s: float = 30.0
    interval_s: float = 1.0  # Serve's control loop decides often; metrics are averaged
    drains: bool = True
    history: dict[str, deque] = field(default_factory=lambda: {"prefill": deque(), "decode": deque()})
    pending: dict[str, tuple[int, float] | None] = field(default_factory=lambda: {"prefill": None, "decode": None})

    @property
    def name(self) -> str:
        return f"serve default (target {self.target_prefill:g}/{self.target_decode:g})"

    def initial(self) -> tuple[int, int]:
        return self.start

    def tick(self, sim: ElasticSim, obs: Observation) -> tuple[int, int]:
        ongoing = {
            "prefill": sum(sim.loads[n].running for n in sim.prefill if sim.lives[n].stopped is None),
            "decode": obs.decode_running + obs.decode_waiting,
        }
        current = {"prefill": obs.prefill_replicas, "decode": obs.decode_replicas}
        out = {}
        lo = {"prefill": self.bounds[0], "decode": self.bounds[2]}
        hi = {"prefill": self.bounds[1], "decode": self.bounds[3]}
        for role, target in (("prefill", self.target_prefill), ("decode", self.target_decode)):
            history = self.history[role]
            history.append((obs.now, ongoing[role]))
            while history and history[0][0] < obs.now - self.look_back_s:
                history.popleft()
            mean = sum(v for _, v in history) / len(history)
            desired = min(hi[role], max(lo[role], math.ceil(mean / target)))
            if desired == current[role]:
                self.pending[role] = None
                out[role] = current[role]
                continue
            direction = desired > current[role]
            held = self.pending[role]
            if held is None or (held[0] > current[role]) != direction:
                self.pending[role] = (desired, obs.now)
                held = self.pending[role]
            delay = self.upscale_delay_s if direction else self.downscale_delay_s
            if obs.now - held[1] >= delay:
                out[role] = desired
                self.pending[role] = None
            else:
                out[role] = current[role]
        return out["prefill"], out["decode"]


@dataclass
class DynamoScaler:
    """NVIDIA Dynamo's SLA planner as documented: every adjustment interval, the next
    interval's requests, ISL and OSL from a constant predictor (the last interval's); the
    offline profile's prefill throughput per engine at that ISL and the best decode
    throughput per engine whose ITL meets the target at context ISL + OSL / 2; correction
    factors observed/expected TTFT and ITL; P = ceil(load · min(1, prefill correction) /
    throughput), D = ceil(decode tokens/s / throughput at ITL / correction). It scales down
    without draining: requests on a removed worker are lost."""

    cost: CostModel
    slo_ttft_s: float
    slo_tpot_s: float
    start: tuple[int, int] = (1, 1)
    bounds: tuple[int, int, int, int] = (1, 8, 1, 8)
    interval_s: float = 60.0
    drains: bool = False
    name: str = "dynamo-style"

    def initial(self) -> tuple[int, int]:
        return self.start

    def tick(self, sim: ElasticSim, obs: Observation) -> tuple[int, int]:
        if not obs.arrivals:
            return obs.prefill_replicas, obs.decode_replicas
        isl, osl = max(1.0, obs.prompt_tokens / obs.arrivals), max(1.0, obs.output_tokens / obs.arrivals)
        cost = self.cost
        # Profile: one prompt of isl tokens alone on an engine.
        expected_ttft = cost.prefill_alone_s(int(isl)) + cost.transfer_s(int(isl)) + cost.decode_iteration_s(1, int(isl))
        throughput = isl / cost.prefill_alone_s(int(isl))
        ttfts, itls = [], []
        for request in sim._window.completed:
            ttft, tpot = sim.latencies(request)
            ttfts.append(ttft)
            if request.route.output_tokens > 1:
                itls.append(tpot)
        p_corr = (float(np.mean(ttfts)) / expected_ttft) if ttfts else 1.0
        rate = obs.arrivals / obs.window_s
        prefill = math.ceil(rate * isl * min(1.0, p_corr) / throughput)
        context = isl + osl / 2
        # Decode profile: the best batch whose step (ITL) meets the corrected target.
        batches = range(1, cost.max_num_seqs + 1)

        def itl_at(batch: int) -> float:
            return cost.decode_iteration_s(batch, int(batch * context))

        expected_itl = itl_at(max(1, round(obs.decode_running / max(1, obs.decode_replicas))))
        d_corr = (float(np.mean(itls)) / expected_itl) if itls else 1.0
        corrected = self.slo_tpot_s / max(1e-6, d_corr)
        # The profiler's concurrency sweep stops where the KV cache is full.
        kv_limit = max(1, int(cost.decode_kv_tokens / max(1.0, isl + osl)))
        fitting = [b for b in batches if itl_at(b) <= corrected and b <= kv_limit]
        best = max(fitting) if fitting else 1
        per_engine = best / itl_at(best)
        decode = math.ceil(rate * osl / per_engine)
        lo_p, hi_p, lo_d, hi_d = self.bounds
        return min(hi_p, max(lo_p, prefill)), min(hi_d, max(lo_d, decode))


@dataclass
class TandemScaler:
    """Tandem's planner (control_plane.planner), fed the simulator's measurements."""

    settings: PlannerSettings
    start: tuple[int, int] = (1, 1)
    drains: bool = True
    name: str = "tandem planner"
    planner: Planner | None = None
    plans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def interval_s(self) -> float:
        return self.settings.interval_s

    def initial(self) -> tuple[int, int]:
        self.planner = Planner(self.settings)
        return self.start

    def tick(self, sim: ElasticSim, obs: Observation) -> tuple[int, int]:
        assert self.planner is not None
        # The state round-trips as Serve keeps it between calls.
        self.planner = Planner(self.settings, self.planner.to_state())
        plan = self.planner.decide(obs)
        self.plans.append({"t": obs.now, "prefill": plan.prefill.reason, "decode": plan.decode.reason,
                           "prefill_needed": plan.prefill.needed, "decode_needed": plan.decode.needed,
                           "prefill_correction": plan.prefill.correction,
                           "decode_correction": plan.decode.correction})
        return plan.prefill.target, plan.decode.target
