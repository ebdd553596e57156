"""The P:D planner's policy: how many prefill and decode engines the next minutes need.
Pure (no Ray, no clock of its own): `Planner.decide` takes one interval's `Observation` and
returns a `Plan`; its state round-trips through `to_state` / `from_state`.

Predictive part, at the load forecast one engine start ahead (``λ``, requests/s):

- prefill: the uncached prompt tokens per second (prompt tokens/s forecast · (1 − hit)), over what
  one engine computes per second (measured), planned at a utilization ``ρ`` low enough
  that a p90 prompt still meets the TTFT budget (queueing as M/M/1: time ≈ s / (1 − ρ),
  so ``ρ = 1 − s90 / budget``, within [min_utilization, max_utilization]); plus what clears
  a backlog already waiting by the time a new engine could serve.
- decode: the largest batch whose TPOT (fitted online as fixed + B · (per_seq + per_token
  · context)) meets the TPOT SLO, ``B*``; streams in flight by Little's law,
  output tokens/s forecast · TPOT(B*); engines = streams / B*; fewer streams per engine when
  the KV cache, not the TPOT, is the limit (learned from the pool's KV use).

The request rate and the prompt and output token rates are forecast separately (Holt's
linear smoothing), so a shift of the mix (short chat to long documents) moves the plan in
one interval, without waiting for smoothed means to catch up.

Corrective part: each phase's plan is multiplied by a correction that grows while the
interval's attainment of that phase's SLO is below target and relaxes slowly while it is
comfortably above (an integral controller on the model's error).

Hysteresis: a pool grows as soon as the plan exceeds it; it shrinks only when even the plan
at ``down_band`` of the utilization is smaller, after that held ``downscale_delay_s``, one
step at a time. Bounds: min/max per phase and a total budget, shared in proportion to need.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from control_plane.planner.fits import DecodeStepFit, Ema, RateForecast
from control_plane.settings import PlannerSettings

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")
MAX_STEP_UP = 1.25  # the most one interval's shortfall raises a correction


@dataclass(frozen=True)
class DecodeSample:
    """One decode replica's steps over the interval: mean sequences, mean context tokens
    (all sequences together), mean step seconds."""

    sequences: float
    context_tokens: float
    step_s: float


@dataclass(frozen=True)
class ClassAttainment:
    """One SLO class's finished requests in the interval and how many met each SLO."""

    name: str
    completed: int
    ttft_met: int
    tpot_met: int


@dataclass(frozen=True)
class Observation:
    """What the pools and the ingress measured over one interval."""

    now: float
    window_s: float
    prefill_replicas: int  # the pools' current targets (running + starting)
    decode_replicas: int
    prefill_starting: int = 0  # of them, engines not serving yet
    decode_starting: int = 0
    arrivals: int = 0  # requests accepted in the window
    prompt_tokens: int = 0  # their prompt tokens, all together
    output_tokens: int = 0  # the tokens they ask to generate (max_tokens), all together
    prompt_tokens_p90: float | None = None
    prefix_hit_rate: float | None = None  # cached / prompt tokens at prefill
    prefill_tokens_per_s: float | None = None  # one engine's compute while busy
    prefill_queued_tokens: float = 0.0  # uncached tokens waiting at the prefill pool
    decode_samples: tuple[DecodeSample, ...] = ()
    decode_running: float = 0.0  # streams the decode pool is decoding
    decode_waiting: float = 0.0  # streams whose KV arrived, waiting for a batch slot or KV
    decode_kv_usage: float | None = None  # the decode pool's mean KV-cache use, 0..1
    decode_kv_capacity_tokens: float | None = None  # one decode engine's KV capacity, if known
    decode_queue_s: float | None = None  # mean wait at decode before a request's first step
    transfer_s: float | None = None  # mean KV handoff
    # KV handoff seconds per prompt token, over the links the requests used (traffic-weighted).
    transfer_s_per_token: float | None = None
    # Completed requests in the window and how many met each SLO.
    completed: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    classes: tuple[ClassAttainment, ...] = ()  # the same, per SLO class


@dataclass(frozen=True)
class PhasePlan:
    target: int
    reason: str  # why the target is what it is (a metric label)
    needed: float  # engines the predictive part asks for (before correction and rounding)
    correction: float
    utilization: float  # planned (prefill) or batch fraction (decode)


@dataclass(frozen=True)
class Plan:
    prefill: PhasePlan
    decode: PhasePlan
    rate_now: float
    rate_forecast: float
    predicted_ttft_s: float  # the model's TTFT at the planned prefill pool
    predicted_tpot_s: float  # the model's TPOT at the planned decode pool
    attainment: dict[str, float | None] = field(default_factory=dict)

    def targets(self) -> dict[Phase, int]:
        return {"prefill": self.prefill.target, "decode": self.decode.target}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Load:
    """The forecast the plan is for."""

    rate: float  # requests/s
    prompt_rate: float  # prompt tokens/s
    output_rate: float  # output tokens/s
    prompt_mean: float  # tokens per request, now
    output_mean: float


@dataclass
class _PhaseState:
    correction: float = 1.0
    down_since: float | None = None
    last_up_at: float | None = None
    last_change_at: float | None = None


class Planner:
    def __init__(self, settings: PlannerSettings, state: dict[str, Any] | None = None):
        self.settings = settings
        state = state or {}
        self.rate = RateForecast.from_state(state.get("rate"))
        self.prompt_rate = RateForecast.from_state(state.get("prompt_rate"))
        self.output_rate = RateForecast.from_state(state.get("output_rate"))
        prior = (settings.prior_decode_step_s, settings.prior_decode_per_seq_s, 0.0)
        self.decode_fit = DecodeStepFit.from_state(state.get("decode_fit"), prior)
        self.prefill_tps = Ema(0.3, state.get("prefill_tps"))
        self.prompt_p90 = Ema(0.5, state.get("prompt_p90"))
        self.prompt_mean = Ema(0.5, state.get("prompt_mean"))  # tokens per request
        self.output_mean = Ema(0.5, state.get("output_mean"))
        self.hit = Ema(0.5, state.get("hit"))
        self.transfer = Ema(0.3, state.get("transfer"))
        self.transfer_per_token = Ema(0.3, state.get("transfer_per_token"))
        self.kv_tokens = Ema(0.3, state.get("kv_tokens"))  # one decode engine's KV capacity
        self.step = Ema(0.3, state.get("step"))  # a decode step now, as observed
        self.phases = {p: _PhaseState(**state.get(p, {})) for p in PHASES}

    def to_state(self) -> dict[str, Any]:
        return {
            "rate": self.rate.to_state(),
            "prompt_rate": self.prompt_rate.to_state(),
            "output_rate": self.output_rate.to_state(),
            "decode_fit": self.decode_fit.to_state(),
            "prefill_tps": self.prefill_tps.value,
            "prompt_p90": self.prompt_p90.value,
            "prompt_mean": self.prompt_mean.value,
            "output_mean": self.output_mean.value,
            "hit": self.hit.value,
            "transfer": self.transfer.value,
            "transfer_per_token": self.transfer_per_token.value,
            "kv_tokens": self.kv_tokens.value,
            "step": self.step.value,
            **{p: asdict(s) for p, s in self.phases.items()},
        }

    # -- one interval

    def decide(self, obs: Observation) -> Plan:
        cfg = self.settings
        self._learn(obs)
        rate_now = self.rate.forecast(0.0)
        # Plan for the load one engine start (and one interval) ahead; never below now's.
        ahead = cfg.engine_start_s + cfg.interval_s
        rate = max(rate_now, self.rate.forecast(ahead))
        # Headroom: capacity above the forecast for bursts no forecast sees coming (a new
        # engine serves only after it starts; until then only the headroom absorbs them).
        extra = 1.0 + cfg.headroom
        load = _Load(
            rate=rate * extra,
            prompt_rate=max(self.prompt_rate.forecast(0.0), self.prompt_rate.forecast(ahead)) * extra,
            output_rate=max(self.output_rate.forecast(0.0), self.output_rate.forecast(ahead)) * extra,
            prompt_mean=self.prompt_mean.get(0.0),
            output_mean=self.output_mean.get(0.0),
        )
        attainment = self._attainment(obs)

        prefill_need, prefill_down, rho, ttft_pred, prefill_reason = self._prefill_need(obs, load)
        decode_need, decode_down, batch_frac, tpot_pred, decode_reason = self._decode_need(obs, load)
        current = {"prefill": obs.prefill_replicas, "decode": obs.decode_replicas}
        needs = {"prefill": (prefill_need, prefill_down, prefill_reason),
                 "decode": (decode_need, decode_down, decode_reason)}
        # TTFT misses are prefill's unless requests waited at decode for a slot (a decode
        # pool short of batch slots or KV shows up in TTFT first); TPOT misses are decode's.
        decode_queued = (obs.decode_queue_s or 0.0) > 0.25 * cfg.slo_ttft_s
        ttft_att, tpot_att = attainment["ttft"], attainment["tpot"]
        decode_att = min(a for a in (tpot_att, ttft_att if decode_queued else None, 1.0) if a is not None)
        starting = {"prefill": obs.prefill_starting, "decode": obs.decode_starting}
        for phase, attained in (("prefill", None if decode_queued else ttft_att),
                                ("decode", decode_att if obs.completed else None)):
            # Misses the model already explains (it asks for more engines than serve, or
            # some are starting) say nothing of its bias.
            need = needs[phase][0] * self.phases[phase].correction
            explained = starting[phase] > 0 or math.ceil(need - 1e-9) > current[phase] - starting[phase]
            self._correct(phase, attained, obs.completed, explained)

        wanted: dict[Phase, tuple[int, str]] = {}
        for phase in PHASES:
            need, down_need, reason = needs[phase]
            corr = self.phases[phase].correction
            floor = cfg.min_prefill if phase == "prefill" else cfg.min_decode
            wanted[phase] = self._hysteresis(phase, current[phase], math.ceil(need * corr - 1e-9),
                                             max(floor, math.ceil(down_need * corr - 1e-9)), reason, obs.now)
        targets = self._bounded({p: wanted[p][0] for p in PHASES})
        plans = {}
        for phase in PHASES:
            target, reason = targets[phase], wanted[phase][1]
            if target != wanted[phase][0]:
                reason = "budget" if target < wanted[phase][0] else "minimum"
            state = self.phases[phase]
            if target != current[phase]:
                state.last_change_at = obs.now
                if target > current[phase]:
                    state.last_up_at = obs.now
                state.down_since = None
            plans[phase] = PhasePlan(
                target=target, reason=reason, needed=needs[phase][0], correction=state.correction,
                utilization=rho if phase == "prefill" else batch_frac,
            )
        return Plan(
            prefill=plans["prefill"], decode=plans["decode"], rate_now=rate_now, rate_forecast=rate,
            predicted_ttft_s=ttft_pred, predicted_tpot_s=tpot_pred,
            attainment={k: v for k, v in attainment.items()},
        )

    # -- learning

    def _learn(self, obs: Observation) -> None:
        if obs.window_s > 0:
            self.rate.add(obs.arrivals / obs.window_s, obs.now)
            self.prompt_rate.add(obs.prompt_tokens / obs.window_s, obs.now)
            self.output_rate.add(obs.output_tokens / obs.window_s, obs.now)
        if obs.arrivals:
            self.prompt_p90.add(obs.prompt_tokens_p90)
            self.prompt_mean.add(obs.prompt_tokens / obs.arrivals)
            self.output_mean.add(obs.output_tokens / obs.arrivals)
            self.hit.add(obs.prefix_hit_rate)
        self.prefill_tps.add(obs.prefill_tokens_per_s)
        self.transfer.add(obs.transfer_s)
        self.transfer_per_token.add(obs.transfer_s_per_token)
        samples = obs.decode_samples
        if obs.decode_kv_capacity_tokens:
            self.kv_tokens.add(obs.decode_kv_capacity_tokens)
        if samples:
            self.step.add(sum(s.step_s for s in samples) / len(samples))
            if not obs.decode_kv_capacity_tokens and obs.decode_kv_usage and obs.decode_kv_usage > 0.2:
                held = sum(s.context_tokens for s in samples) / len(samples)
                self.kv_tokens.add(held / min(1.0, obs.decode_kv_usage))
        for sample in obs.decode_samples:
            self.decode_fit.add(sample.sequences, sample.context_tokens, sample.step_s)

    def _attainment(self, obs: Observation) -> dict[str, float | None]:
        """Each SLO's attainment in the interval: the worst of all requests' and of each
        SLO class's with enough requests to tell (a class starved behind another, say the
        one whose KV travels uncompressed, is a miss even when the mean looks fine)."""
        if obs.completed <= 0:
            return {"ttft": None, "tpot": None}
        out = {"ttft": obs.ttft_met / obs.completed, "tpot": obs.tpot_met / obs.completed}
        for cls in obs.classes:
            if cls.completed >= self.settings.min_samples:
                out["ttft"] = min(out["ttft"], cls.ttft_met / cls.completed)
                out["tpot"] = min(out["tpot"], cls.tpot_met / cls.completed)
        return out

    def _correct(self, phase: Phase, attained: float | None, samples: int, explained: bool) -> None:
        """The correction estimates the model's bias, a slow quantity: it grows (at most
        by MAX_STEP_UP an interval) when the SLO is missed by a pool the model thought
        enough (not while it asks for engines that are not serving yet: that shortfall is
        known and being fixed), and relaxes towards 1 when comfortably met."""
        cfg = self.settings
        state = self.phases[phase]
        if attained is None or samples < cfg.min_samples:
            return
        slack = 1.0 - cfg.attainment_target
        if attained < cfg.attainment_target:
            if not explained:
                step = 1.0 + cfg.gain * (cfg.attainment_target - attained) / slack
                state.correction *= min(MAX_STEP_UP, step)
        elif attained >= cfg.attainment_target + slack / 2:
            state.correction = 1.0 + (state.correction - 1.0) * (1.0 - cfg.relax)
        state.correction = min(cfg.max_correction, max(1.0, state.correction))

    # -- the predictive part

    def _prefill_need(self, obs: Observation, load: _Load) -> tuple[float, float, float, float, str]:
        cfg = self.settings
        tps = self.prefill_tps.get(cfg.prior_prefill_tokens_per_s)
        hit = min(0.99, max(0.0, self.hit.get(0.0)))
        p90 = max(load.prompt_mean, self.prompt_p90.get(load.prompt_mean))
        uncached_rate = load.prompt_rate * (1.0 - hit)
        service_p90 = p90 * (1.0 - hit) / tps
        # What TTFT leaves to prefill: the KV handoff (a p90 prompt's, at the seconds per
        # token the links gave; else the mean handoff) and the first decode step (a step of
        # the running batch, as observed) take the rest.
        first_step = self.step.get(cfg.prior_decode_step_s)
        per_token = self.transfer_per_token.value
        transfer = p90 * per_token if per_token else self.transfer.get(0.0)
        budget = cfg.slo_ttft_s - transfer - first_step
        if budget <= service_p90:
            rho, reason = cfg.min_utilization, "ttft_tight"
        else:
            rho = min(cfg.max_utilization, max(cfg.min_utilization, 1.0 - service_p90 / budget))
            reason = "load"
        need = uncached_rate / (tps * rho)
        down = uncached_rate / (tps * rho * cfg.down_band)
        # Work already waiting: what is still left of it when a new engine could serve.
        backlog = obs.prefill_queued_tokens / (tps * (cfg.engine_start_s + max(budget, 0.0) + cfg.interval_s))
        if backlog >= 0.5:
            need, down, reason = need + backlog, down + backlog, "backlog"
        engines = max(1, obs.prefill_replicas - obs.prefill_starting)
        utilization = uncached_rate / (engines * tps)
        ttft = service_p90 / max(1e-3, 1.0 - min(utilization, 0.999)) + transfer + first_step
        return need, down, rho, ttft, reason

    def _decode_need(self, obs: Observation, load: _Load) -> tuple[float, float, float, float, str]:
        cfg = self.settings
        context = load.prompt_mean + load.output_mean / 2
        batch = self.decode_fit.max_batch(cfg.slo_tpot_s, context, cfg.max_num_seqs)
        reason = "load" if batch > 1 else "tpot_tight"
        # KV capacity: the streams of this mix's context one engine holds (its capacity in
        # tokens is learned from what it holds and how full that is).
        if self.kv_tokens.value is not None and context > 0:
            fits = int(0.9 * self.kv_tokens.value / context)
            if fits < batch:
                batch, reason = max(1, fits), "kv_capacity"
        # The pool is planned at `max_utilization` of that batch (its TPOT has headroom).
        planned = max(1.0, batch * cfg.max_utilization)
        tpot = self.decode_fit.tpot(planned, context)
        streams = load.output_rate * tpot  # Little's law: tokens/s x seconds per token
        need = streams / planned
        down = streams / max(1.0, planned * cfg.down_band)
        # Streams waiting for a slot: each frees one after its answer; what is left of the
        # queue when a new engine could serve.
        if obs.decode_waiting > 0:
            duration = load.output_mean * tpot
            left = obs.decode_waiting * min(1.0, duration / (cfg.engine_start_s + cfg.interval_s))
            backlog = left / planned
            if backlog >= 0.5:
                need, down, reason = need + backlog, down + backlog, "backlog"
        return need, down, planned / cfg.max_num_seqs, tpot, reason

    # -- hysteresis and bounds

    def _hysteresis(self, phase: Phase, current: int, up: int, down: int, reason: str,
                    now: float) -> tuple[int, str]:
        cfg = self.settings
        state = self.phases[phase]
        if up > current:
            state.down_since = None
            if state.last_up_at is not None and now - state.last_up_at < cfg.upscale_cooldown_s:
                return current, "cooldown"
            return up, reason
        if down < current:
            if state.down_since is None:
                state.down_since = now
            if now - state.down_since >= cfg.downscale_delay_s:
                state.down_since = now  # the next step waits its own delay
                # Half the excess at a time (at least one, at most max_step_down).
                step = min(cfg.max_step_down, max(1, (current - down) // 2))
                return max(down, current - step), "idle"
            return current, "hold_down"
        state.down_since = None
        return current, "steady"

    def _bounded(self, wanted: dict[Phase, int]) -> dict[Phase, int]:
        cfg = self.settings
        lo = {"prefill": cfg.min_prefill, "decode": cfg.min_decode}
        hi = {"prefill": cfg.max_prefill, "decode": cfg.max_decode}
        out = {p: min(hi[p], max(lo[p], wanted[p])) for p in PHASES}
        if sum(out.values()) > cfg.max_total:
            # Share the budget in proportion to need, never below a phase's minimum (the
            # settings guarantee the minimums fit).
            total = sum(out.values())
            share = {p: max(lo[p], math.floor(out[p] * cfg.max_total / total)) for p in PHASES}
            while sum(share.values()) > cfg.max_total:  # minimums lifted a share: take back
                p = max((p for p in PHASES if share[p] > lo[p]), key=lambda p: share[p])
                share[p] -= 1
            spare = cfg.max_total - sum(share.values())
            for p in sorted(PHASES, key=lambda p: out[p] - share[p], reverse=True):
                add = min(spare, out[p] - share[p])
                share[p] += add
                spare -= add
            out = share
        return out
