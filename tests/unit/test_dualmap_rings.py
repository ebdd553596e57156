"""DualMap's rings: remapping bounds and independence of the two hash functions."""

from __future__ import annotations

import random

import pytest

from routing.dualmap import DualRing, HashRing, InstanceLoad, TTFTPredictor, choose, prefix_key


def _keys(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [prefix_key([rng.randrange(50_000) for _ in range(64)]) for _ in range(n)]


@pytest.mark.parametrize("n", [8, 32])
def test_adding_an_instance_moves_about_one_nth_of_keys(n):
    keys = _keys(20_000)
    ring = HashRing([f"i{k}" for k in range(n)])
    before = [ring.lookup(k) for k in keys]
    ring.add("new")
    after = [ring.lookup(k) for k in keys]
    moved = [b for b, a in zip(before, after, strict=True) if a != b]
    # Only keys that now belong to the new instance move, and about 1/(n+1) of them.
    assert all(a == "new" for b, a in zip(before, after, strict=True) if a != b)
    assert 0.5 / (n + 1) < len(moved) / len(keys) < 1.6 / (n + 1)
    ring.remove("new")
    assert [ring.lookup(k) for k in keys] == before  # removal restores the old mapping


def test_load_is_balanced_by_virtual_nodes():
    keys = _keys(40_000)
    ring = HashRing([f"i{k}" for k in range(16)])
    counts: dict[str, int] = {}
    for key in keys:
        owner = ring.lookup(key)
        counts[owner] = counts.get(owner, 0) + 1
    mean = len(keys) / 16
    assert max(counts.values()) < 1.4 * mean and min(counts.values()) > 0.6 * mean


def test_the_two_rings_are_independent():
    keys = _keys(20_000)
    dual = DualRing([f"i{k}" for k in range(16)])
    pairs = [dual.candidates(k) for k in keys]
    same = sum(a == b for a, b in pairs) / len(pairs)
    assert abs(same - 1 / 16) < 0.03  # as if the second choice were independent
    # Knowing the primary says nothing about the secondary.
    primary_i0 = [b for a, b in pairs if a == "i0"]
    assert len(set(primary_i0)) == 16


def test_shared_prefixes_share_candidates():
    dual = DualRing([f"i{k}" for k in range(8)])
    system = list(range(300))
    a = prefix_key(system + [1, 2, 3])
    b = prefix_key(system + [9, 9, 9, 9])
    assert dual.candidates(a) == dual.candidates(b)


def test_empty_ring_raises():
    with pytest.raises(LookupError):
        HashRing().lookup(b"x")


# ---- the choice between candidates ------------------------------------------------------



PRED = TTFTPredictor(prior_tokens_per_s=1000.0, fixed_s=0.0)


def _loads(**queued: int) -> dict[str, InstanceLoad]:
    return {name: InstanceLoad(queued_prefill_tokens=q) for name, q in queued.items()}


def test_affinity_wins_while_the_slo_holds():
    loads = _loads(a=500, b=0, c=0)
    decision = choose(("a", "b"), loads, 1000, {"a": 0.9}, slo_ttft_s=1.0, predictor=PRED)
    # a: 500 queued + 100 uncached = 0.6 s <= 1 s, and a holds the prefix.
    assert (decision.instance, decision.reason) == ("a", "affinity")


def test_second_candidate_when_the_preferred_one_would_break_the_slo():
    loads = _loads(a=5000, b=100, c=0)
    decision = choose(("a", "b"), loads, 1000, {"a": 0.9}, slo_ttft_s=1.5, predictor=PRED)
    assert (decision.instance, decision.reason) == ("b", "second_choice")


def test_fallback_to_the_least_loaded_instance_when_both_candidates_are_hot():
    loads = _loads(a=5000, b=5000, c=10, d=800)
    decision = choose(("a", "b"), loads, 1000, {}, slo_ttft_s=1.5, predictor=PRED)
    assert (decision.instance, decision.reason) == ("c", "fallback")


def test_dead_candidates_are_skipped():
    loads = _loads(a=0, b=0, c=0)
    loads["a"].healthy = False
    decision = choose(("a", "b"), loads, 100, {"a": 1.0}, slo_ttft_s=1.0, predictor=PRED)
    assert decision.instance == "b"
    with pytest.raises(LookupError):
        choose(("a", "b"), {"a": InstanceLoad(healthy=False)}, 1, {}, 1.0, PRED)


def test_predictor_calibrates_to_observed_ttft():
    predictor = TTFTPredictor(prior_tokens_per_s=1000.0, fixed_s=0.0)
    load = InstanceLoad(queued_prefill_tokens=0)
    for _ in range(20):  # the instance is really twice as slow as the prior says
        predictor.observe("x", 1000, 2.0)
    assert abs(predictor.predict("x", load, 1000) - 2.0) < 0.05
    assert predictor.predict("y", load, 1000) == 1.0  # other instances keep the prior


def test_predictor_separates_fixed_cost_from_per_token_cost():
    """Real engines: ~0.4 s of overhead per request plus 500 tokens/s, noisy, with mostly
    cached prompts (little work). A multiplicative correction fitted on those predicted
    minutes for an uncached prompt; the fit predicts about the truth."""
    rng = random.Random(7)
    predictor = TTFTPredictor(prior_tokens_per_s=2000.0, fixed_s=0.02)
    for _ in range(200):
        work = rng.choice([0, 0, 0, 20, 40, 450, 900, 2000])
        predictor.observe("x", work, (0.4 + work / 500) * rng.uniform(0.9, 1.1))
    for work in (0, 450, 3000):
        truth = 0.4 + work / 500
        assert abs(predictor.predict_work("x", work) - truth) < 0.15 * truth + 0.05, work


def test_predictor_stays_bounded_on_degenerate_observations():
    predictor = TTFTPredictor(prior_tokens_per_s=2000.0, fixed_s=0.02)
    for _ in range(500):  # one work size only, and junk
        predictor.observe("x", 0, 1.0)
        predictor.observe("x", 10, float("nan"))
        predictor.observe("x", 10, -1.0)
    assert abs(predictor.predict_work("x", 0) - 1.0) < 0.05
    assert 0 < predictor.predict_work("x", 1000) < 1.0 + 1000 * 0.1  # at most 10 tokens/s


def test_distinct_candidates_always_offer_two_choices():
    keys = _keys(5_000)
    for n in (2, 3, 16):
        dual = DualRing([f"i{k}" for k in range(n)])
        pairs = [dual.distinct_candidates(k) for k in keys]
        assert all(a != b for a, b in pairs)
        # Agreeing keys are rare, so the primary is still the first ring's.
        assert all(a == dual.candidates(k)[0] for (a, _), k in zip(pairs, keys, strict=True))
    assert DualRing(["solo"]).distinct_candidates(b"k") == ("solo", "solo")


def test_new_prefixes_spread_over_an_idle_pool():
    """Sequential requests (the pool always idle) with distinct prefixes: the candidate
    caching fewer prefixes takes each new one, so two instances split them evenly."""
    from routing.policies import DualMapPolicy, RouteRequest

    policy = DualMapPolicy()
    loads = {"a": InstanceLoad(), "b": InstanceLoad()}
    placed = []
    for k in range(12):
        request = RouteRequest(f"r{k}", prefix_key([k] * 64), 500)
        decision = policy.route(request, loads)
        policy.on_routed(request, decision)
        placed.append(decision.instance)
    assert abs(placed.count("a") - placed.count("b")) <= 2
