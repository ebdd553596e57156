"""The P:D planner's policy on synthetic traces: no Ray, a scripted clock."""

from __future__ import annotations

import json

import numpy as np
import pytest

from control_plane.planner.fits import DecodeStepFit, RateForecast
from control_plane.planner.policy import ClassAttainment, DecodeSample, Observation, Planner
from control_plane.settings import PlannerSettings

# An engine like the simulator's H100 profile: prefill 36K tokens/s, decode step
# 7 ms + 16 us a sequence + 0.05 us a context token.
TPS = 36_000.0
FIXED, PER_SEQ, PER_TOKEN = 0.007, 1.6e-5, 4.9e-8
INTERVAL = 10.0


def settings(**overrides) -> PlannerSettings:
    base = {"enabled": True, "slo_ttft_s": 2.0, "slo_tpot_s": 0.05, "interval_s": INTERVAL,
            "engine_start_s": 60.0, "max_prefill": 12, "max_decode": 12, "max_total": 20,
            "headroom": 0.0, "downscale_delay_s": 60.0}
    return PlannerSettings(**{**base, **overrides})


def step_s(batch: float, context: float) -> float:
    return FIXED + PER_SEQ * batch + PER_TOKEN * context


def observe(now: float, rate: float, prompt: int, output: int, prefill: int, decode: int, *,
            hit: float = 0.0, batch: float = 100.0, completed: int | None = None, ttft_met: float = 1.0,
            tpot_met: float = 1.0, **extra) -> Observation:
    """One interval of a steady workload: ``rate`` requests/s of ``prompt`` / ``output``
    tokens, the decode replicas each running ``batch`` sequences."""
    arrivals = round(rate * INTERVAL)
    done = arrivals if completed is None else completed
    context = batch * (prompt + output / 2)
    samples = tuple(DecodeSample(batch, context, step_s(batch, context)) for _ in range(decode))
    return Observation(
        now=now, window_s=INTERVAL, prefill_replicas=prefill, decode_replicas=decode, arrivals=arrivals,
        prompt_tokens=arrivals * prompt, output_tokens=arrivals * output, prompt_tokens_p90=prompt * 1.2,
        prefix_hit_rate=hit, prefill_tokens_per_s=TPS, decode_samples=samples, decode_running=batch * decode,
        transfer_s=0.01, completed=done, ttft_met=round(done * ttft_met), tpot_met=round(done * tpot_met), **extra,
    )


def run(planner: Planner, trace, start=(2, 2), t0: float = 0.0):
    """Feed ``trace`` (a list of (rate, prompt, output)) one interval each, applying each
    plan as if the engines started at once; returns the targets after each interval."""
    prefill, decode = start
    out = []
    for i, (rate, prompt, output) in enumerate(trace):
        plan = planner.decide(observe(t0 + (i + 1) * INTERVAL, rate, prompt, output, prefill, decode))
        prefill, decode = plan.prefill.target, plan.decode.target
        out.append((prefill, decode, plan))
    return out


def test_the_mix_sets_the_ratio():
    """Short prompts with long answers need decode engines; long documents with short
    answers need prefill engines: the planner moves the ratio with the mix."""
    planner = Planner(settings())
    chat = run(planner, [(60.0, 300, 400)] * 30)
    p_chat, d_chat, _ = chat[-1]
    docs = run(planner, [(12.0, 9000, 60)] * 40, start=(p_chat, d_chat), t0=300.0)
    p_docs, d_docs, _ = docs[-1]
    assert d_chat > p_chat
    assert p_docs > d_docs
    assert p_docs > p_chat and d_docs < d_chat


def test_plan_matches_the_load():
    """The predictive part in numbers: prefill engines ~ uncached tokens/s over a
    utilization-bounded engine; decode engines ~ streams (Little) over the TPOT-bound batch."""
    planner = Planner(settings())
    *_, (p, d, plan) = run(planner, [(20.0, 4000, 200)] * 20)
    # 80K prompt tokens/s at <= 85% of 36K tokens/s: 3 engines.
    assert p == 3
    assert plan.prefill.needed == pytest.approx(80_000 / (TPS * plan.prefill.utilization), rel=0.05)
    # Decode: 4000 tokens/s x TPOT at the planned batch, over that batch.
    assert d == int(np.ceil(plan.decode.needed))
    assert plan.predicted_tpot_s <= 0.05


def test_steady_noisy_load_does_not_flap():
    rng = np.random.default_rng(3)
    planner = Planner(settings())
    trace = [(rng.poisson(400) / INTERVAL, 1200, 300) for _ in range(120)]
    targets = [(p, d) for p, d, _ in run(planner, trace)]
    settled = targets[20:]
    changes = sum(1 for a, b in zip(settled, settled[1:], strict=False) if a != b)
    assert changes <= 2, settled


def test_scale_down_waits_then_steps_by_half_the_excess():
    planner = Planner(settings(downscale_delay_s=60.0, max_step_down=4))
    high = run(planner, [(40.0, 6000, 100)] * 15)
    p_high, d_high, _ = high[-1]
    assert p_high >= 6
    low = run(planner, [(2.0, 6000, 100)] * 30, start=(p_high, d_high), t0=150.0)
    prefill = [p for p, _, _ in low]
    # Nothing moves before the delay has held ...
    assert prefill[:5] == [p_high] * 5
    # ... then each step removes at most half the excess, a delay apart, down to the need.
    steps = [(a, b) for a, b in zip(prefill, prefill[1:], strict=False) if b != a]
    assert steps and all(b < a for a, b in steps)
    assert all(a - b <= max(1, (a - 1) // 2) for a, b in steps)
    assert prefill[-1] == 1


def test_bounds_and_a_total_budget_shared_by_need():
    planner = Planner(settings(max_prefill=6, max_decode=6, max_total=8))
    *_, (p, d, plan) = run(planner, [(200.0, 8000, 800)] * 5)
    assert p + d == 8 and p <= 6 and d <= 6
    assert "budget" in (plan.prefill.reason, plan.decode.reason)
    planner = Planner(settings(min_prefill=2, min_decode=3))
    *_, (p, d, _) = run(planner, [(0.1, 100, 10)] * 20)
    assert (p, d) == (2, 3)


def test_the_correction_grows_on_misses_the_model_does_not_explain():
    cfg = settings(min_samples=10)
    planner = Planner(cfg)
    run(planner, [(20.0, 2000, 200)] * 10)
    p, d = 2, 2
    plan = planner.decide(observe(110.0, 20.0, 2000, 200, p, d, ttft_met=0.5))
    assert plan.prefill.correction == pytest.approx(1.25)  # the most one interval raises it
    assert plan.decode.correction == 1.0  # TTFT misses are prefill's
    # While engines it asked for are still starting, misses say nothing of the model.
    before = planner.phases["prefill"].correction
    planner.decide(observe(120.0, 20.0, 2000, 200, p + 1, d, ttft_met=0.5, prefill_starting=1))
    assert planner.phases["prefill"].correction == before
    # Comfortably met: back towards 1, never below.
    for i in range(60):
        planner.decide(observe(130.0 + i * INTERVAL, 20.0, 2000, 200, 3, 2))
    assert planner.phases["prefill"].correction == pytest.approx(1.0, abs=0.01)
    assert planner.phases["prefill"].correction >= 1.0


def test_ttft_misses_from_waiting_at_decode_are_decode_s():
    planner = Planner(settings(min_samples=10))
    run(planner, [(20.0, 2000, 200)] * 10)
    plan = planner.decide(observe(110.0, 20.0, 2000, 200, 2, 2, ttft_met=0.5, decode_queue_s=1.5))
    assert plan.prefill.correction == 1.0
    assert plan.decode.correction > 1.0


def test_a_starved_slo_class_drives_the_correction():
    planner = Planner(settings(min_samples=10))
    run(planner, [(20.0, 2000, 200)] * 10)
    # 90% of all requests met TTFT (the target's edge), but the strict class met 40% of its own.
    classes = (ClassAttainment("standard", 170, 170, 170), ClassAttainment("strict", 30, 12, 30))
    plan = planner.decide(observe(110.0, 20.0, 2000, 200, 2, 2, ttft_met=0.91, classes=classes))
    assert plan.attainment["ttft"] == pytest.approx(0.4)
    assert plan.prefill.correction > 1.0
    # A class with too few requests to tell is not acted on.
    other = Planner(settings(min_samples=10))
    run(other, [(20.0, 2000, 200)] * 10)
    few = (ClassAttainment("standard", 197, 197, 197), ClassAttainment("strict", 3, 0, 3))
    assert other.decide(observe(110.0, 20.0, 2000, 200, 2, 2, classes=few)).prefill.correction == 1.0


def test_a_slower_link_leaves_prefill_less_of_the_ttft():
    """The handoff of a p90 prompt, at the links' measured seconds per token, comes out of the
    TTFT budget: a slow link means prefill must run less loaded, so more prefill engines."""
    fast, slow = Planner(settings(slo_ttft_s=0.5)), Planner(settings(slo_ttft_s=0.5))
    for planner, per_token in ((fast, 1e-6), (slow, 1e-4)):  # 2.4 ms vs 240 ms for a 2,400-token p90
        for i in range(5):
            planner.decide(observe((i + 1) * INTERVAL, 20.0, 2000, 200, 4, 4, transfer_s_per_token=per_token))
    assert slow.transfer_per_token.value == pytest.approx(1e-4)
    fast_plan = fast.decide(observe(60.0, 20.0, 2000, 200, 4, 4, transfer_s_per_token=1e-6))
    slow_plan = slow.decide(observe(60.0, 20.0, 2000, 200, 4, 4, transfer_s_per_token=1e-4))
    assert slow_plan.prefill.needed > fast_plan.prefill.needed
    assert slow_plan.predicted_ttft_s > fast_plan.predicted_ttft_s + 0.2


def test_kv_capacity_caps_the_streams_per_engine():
    planner = Planner(settings())
    # Each engine holds 40 sequences of 10K tokens and its KV cache is full.
    for i in range(5):
        obs = observe((i + 1) * INTERVAL, 4.0, 9000, 2000, 2, 2, batch=40.0, decode_kv_usage=1.0)
        plan = planner.decide(obs)
    assert plan.decode.reason == "kv_capacity"
    assert planner.kv_tokens.value == pytest.approx(40 * 10_000, rel=0.01)


def test_state_round_trips_through_json():
    a = Planner(settings())
    run(a, [(30.0, 1500, 300)] * 12)
    state = json.loads(json.dumps(a.to_state()))
    b = Planner(settings(), state)
    obs = observe(130.0, 35.0, 1500, 300, 2, 3)
    assert a.decide(obs).to_dict() == b.decide(obs).to_dict()


def test_decode_step_fit():
    rng = np.random.default_rng(0)
    fit = DecodeStepFit(prior=(0.03, 0.001, 0.0))
    for _ in range(200):
        batch = rng.integers(1, 256)
        context = batch * rng.integers(200, 8000)
        fit.add(batch, context, step_s(batch, context))
    fixed, per_seq, per_token = fit.coefficients()
    assert fixed == pytest.approx(FIXED, rel=0.05)
    assert per_seq == pytest.approx(PER_SEQ, rel=0.1)
    assert per_token == pytest.approx(PER_TOKEN, rel=0.05)
    # Sequences and context moving together: coefficients stay non-negative, predictions right.
    steady = DecodeStepFit(prior=(0.03, 0.001, 0.0))
    for batch in rng.integers(5, 12, size=100):
        steady.add(batch, batch * 1400, step_s(batch, batch * 1400))
    assert min(steady.coefficients()) >= 0
    assert steady.tpot(8, 1400) == pytest.approx(step_s(8, 8 * 1400), rel=0.02)
    assert steady.max_batch(0.05, 1400, cap=256) == 256
    assert DecodeStepFit(prior=(0.06, 0.0, 0.0)).max_batch(0.05, 1000, cap=256) == 1


def test_rate_forecast_follows_a_ramp_and_caps_a_step():
    ramp = RateForecast()
    for i in range(20):
        ramp.add(10.0 + i, i * INTERVAL)  # +0.1 req/s each second
    assert ramp.forecast(60.0) == pytest.approx(29.0 + 6.0, rel=0.1)
    step = RateForecast()
    for i in range(5):
        step.add(5.0, i * INTERVAL)
    step.add(50.0, 5 * INTERVAL)
    assert step.forecast(70.0) <= 2 * step.level


def test_settings_refuse_inconsistent_bounds():
    with pytest.raises(ValueError):
        PlannerSettings(min_prefill=5, max_prefill=4)
    with pytest.raises(ValueError):
        PlannerSettings(min_prefill=6, min_decode=6, max_total=10)


def test_minimums_never_push_the_total_over_budget():
    planner = Planner(settings(max_total=5, min_decode=3, max_prefill=12, max_decode=12))
    assert planner._bounded({"prefill": 8, "decode": 3}) == {"prefill": 2, "decode": 3}
    assert sum(planner._bounded({"prefill": 12, "decode": 12}).values()) == 5
