"""Conditional disaggregation: where a request is prefilled, in scripted states."""

from __future__ import annotations

import pytest

from routing.disagg import PrefillDecider, PrefillPlanInput

# Measured-like rates of this machine: prefill 0.5 ms a token, KV pull 0.05 ms a token,
# a second call's routing and RPC 20 ms.
PREFILL_S, TRANSFER_S, HOP_S = 0.0005, 0.00005, 0.02


def _calibrated(**options) -> PrefillDecider:
    decider = PrefillDecider("cost_model", min_samples=3, **options)
    for _ in range(3):
        decider.observe_remote(1000, 1000, 1000 * PREFILL_S, 1000 * TRANSFER_S, HOP_S)
    return decider


SHORT = PrefillPlanInput(prompt_tokens=40, decode_running=2)
LONG_COLD = PrefillPlanInput(prompt_tokens=2000, decode_running=2)
# The next turn of a conversation whose earlier turns the decode replica holds.
NEXT_TURN = PrefillPlanInput(prompt_tokens=2000, decode_cached_tokens=1950, decode_running=2)


@pytest.mark.parametrize("mode", ["threshold", "cost_model"])
@pytest.mark.parametrize(("plan", "where", "reason"), [
    (SHORT, "local", "short_prompt"),
    (LONG_COLD, "remote", "long_prompt"),
    (NEXT_TURN, "local", "cached_on_decode"),
])
def test_scripted_states(mode, plan, where, reason):
    decider = _calibrated() if mode == "cost_model" else PrefillDecider("threshold", threshold_tokens=256)
    decision = decider.decide(plan)
    assert decision.where == where
    if mode == "threshold":
        assert decision.reason == reason
    else:
        assert decision.reason == {"short_prompt": "cheaper_local", "long_prompt": "cheaper_remote"}.get(reason, reason)
        assert decision.remote_s is not None and decision.local_s is not None


def test_always_is_remote():
    assert PrefillDecider("always").decide(SHORT).where == "remote"


def test_the_cost_model_decides_as_the_threshold_until_it_has_measured_enough():
    decider = PrefillDecider("cost_model", threshold_tokens=256, min_samples=8)
    assert decider.decide(SHORT).reason == "short_prompt"
    assert decider.decide(LONG_COLD).reason == "long_prompt"


def test_a_busy_decode_replica_sends_a_medium_prompt_away():
    decider = _calibrated(interference=0.5)
    medium = PrefillPlanInput(prompt_tokens=120, decode_running=0)
    assert decider.decide(medium).where == "local"  # 60 ms here vs ~86 ms remote
    busy = PrefillPlanInput(prompt_tokens=120, decode_running=16)  # 16 streams would wait for it
    assert decider.decide(busy).where == "remote"


def test_a_queued_prefill_pool_keeps_prompts_local():
    decider = _calibrated()
    queued = PrefillPlanInput(prompt_tokens=2000, decode_running=2, remote_prefill_s=30.0)
    assert decider.decide(queued).where == "local"


def test_prompt_length_is_learned_from_real_counts():
    decider = PrefillDecider()
    assert decider.tokens_for(400) == 100  # 4 characters a token until measured
    for _ in range(20):
        decider.observe_prompt(500, 100)
    assert decider.tokens_for(400) == pytest.approx(80, abs=2)


# ---- decode lent to the prefill pool (lend_decode_at) -----------------------------------


@pytest.mark.parametrize("mode", ["always", "threshold", "cost_model"])
@pytest.mark.parametrize(("decode_running", "prefill_running", "queued", "where"), [
    (8, 0, 0, "lent"),  # decode at the mark, the prefill replica idle: the whole request goes there
    (8, 7, 512, "lent"),
    (8, 8, 0, None),  # as busy as decode: lending would only move the queue
    (7, 0, 0, None),  # decode below the mark
    (8, None, None, None),  # the prefill pool's load unknown (no replica seen yet)
    (8, 0, 1500, None),  # a long prompt queued on prefill: lent streams would stall behind it
])
def test_decode_is_lent_to_an_idle_prefill_replica_only_at_the_mark(mode, decode_running, prefill_running,
                                                                    queued, where):
    decider = _calibrated(lend_decode_at=8) if mode == "cost_model" else PrefillDecider(mode, lend_decode_at=8)
    plan = PrefillPlanInput(prompt_tokens=40, decode_running=decode_running, prefill_running=prefill_running,
                            prefill_queued_tokens=queued)
    decision = decider.decide(plan)
    if where == "lent":
        assert (decision.where, decision.reason) == ("lent", "decode_busy")
    else:
        assert decision.where != "lent"
        assert decision == PrefillDecider(mode).decide(plan) or mode == "cost_model"


def test_lending_is_off_by_default():
    plan = PrefillPlanInput(prompt_tokens=40, decode_running=500, prefill_running=0, prefill_queued_tokens=0)
    assert PrefillDecider("always").decide(plan).where == "remote"


def test_lending_leaves_the_prefill_replicas_slots_for_prefills():
    decider = PrefillDecider("always", lend_decode_at=4, lend_prefill_slots=8)
    plan = PrefillPlanInput(prompt_tokens=40, decode_running=60, prefill_running=7, prefill_queued_tokens=0)
    assert decider.decide(plan).where == "lent"
    full = PrefillPlanInput(prompt_tokens=40, decode_running=60, prefill_running=8, prefill_queued_tokens=0)
    assert decider.decide(full).where == "remote"
