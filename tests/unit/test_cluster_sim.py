"""The cluster simulator (bench/cluster_sim): cache, cost model, workloads, bisection, and
small end-to-end runs. No vLLM, no Ray cluster (Ray's PrefixTree class is used in-process)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from bench.cluster_sim.cache import LRUBlockCache
from bench.cluster_sim.capacity import bisect_capacity, simulate, slo_for
from bench.cluster_sim.cost_model import CostModel, load_profile, profile_names
from bench.cluster_sim.ray_prefix_affinity import RayPrefixAffinityPolicy
from bench.cluster_sim.simulator import ClusterSim, SimConfig
from bench.cluster_sim.workloads import (
    BlockChain,
    arrival_times,
    make_workload,
    token_text,
    unit_rate_gaps,
)
from routing.dualmap import InstanceLoad
from routing.policies import RouteRequest, token_blocks

# Importing Ray's PrefixTree pulls in Serve's pydantic models, which warn about Pydantic V2.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A small CPU-like engine: ~2,000 prompt tokens/s, small prefix caches.
TOY = CostModel(
    name="toy",
    prefill_fixed_s=0.01,
    prefill_per_token_s=5e-4,
    prefill_attention_s=1e-8,
    max_num_batched_tokens=1024,
    decode_fixed_s=0.01,
    decode_per_seq_s=1e-4,
    decode_per_context_token_s=1e-7,
    max_num_seqs=64,
    block_tokens=16,
    kv_bytes_per_token=1000,
    cache_blocks=400,
    decode_kv_tokens=200_000,
    transfer_latency_s=0.001,
    transfer_bytes_per_s=1e9,
)


# -- prefix cache ------------------------------------------------------------------------


def test_cache_matches_only_the_leading_run_of_blocks():
    cache = LRUBlockCache(10)
    cache.insert([1, 2, 3])
    assert cache.match([1, 2, 3, 4]) == 3
    assert cache.match([1, 9, 3]) == 1
    assert cache.match([9, 1, 2]) == 0  # cached blocks after a miss do not count


def test_cache_evicts_least_recently_used_and_keeps_prefix_heads_longest():
    cache = LRUBlockCache(4)
    cache.insert([1, 2, 3])
    cache.insert([7, 8])  # one over capacity: the oldest *tail* block (3) goes first
    assert 3 not in cache and 1 in cache and 2 in cache
    cache.match([1, 2])  # refresh the first prefix
    cache.insert([9, 10])
    assert len(cache) == 4
    assert 1 in cache and 2 in cache and 7 not in cache and 8 not in cache


def test_cache_with_zero_capacity_never_hits():
    cache = LRUBlockCache(0)
    cache.insert([1, 2])
    assert cache.match([1, 2]) == 0 and len(cache) == 0


# -- cost model --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["toy", *profile_names()])
def test_cost_model_is_monotone(profile):
    cost = TOY if profile == "toy" else load_profile(profile)
    assert cost.prefill_tokens_per_s() > 0
    times = [cost.prefill_alone_s(n) for n in (16, 256, 1024, 2048, 4096, 8192)]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    # More cached prefix: less work.
    assert cost.prefill_alone_s(4000, cached_tokens=3000) < cost.prefill_alone_s(4000, cached_tokens=1000)
    # Same new tokens after a longer context: more attention.
    assert cost.prefill_iteration_s([(512, 4096)]) > cost.prefill_iteration_s([(512, 0)])
    decode = [cost.decode_iteration_s(b, b * 1000) for b in (1, 8, 64)]
    assert decode[0] < decode[1] < decode[2]
    assert cost.decode_iteration_s(8, 80_000) > cost.decode_iteration_s(8, 8_000)
    assert cost.transfer_s(4000) > cost.transfer_s(100) > 0
    assert 0 < cost.unloaded_ttft_s(2000) < slo_for(cost)


def test_chunking_only_adds_fixed_costs():
    # The attention term sums to L²/2 however the prompt is chunked.
    whole = replace(TOY, max_num_batched_tokens=10_000).prefill_alone_s(4096)
    chunked = TOY.prefill_alone_s(4096)  # four chunks of 1024
    assert chunked == pytest.approx(whole + 3 * TOY.prefill_fixed_s)
    expected = TOY.prefill_fixed_s + TOY.prefill_per_token_s * 4096 + TOY.prefill_attention_s * 4096**2 / 2
    assert whole == pytest.approx(expected)


# -- workloads ---------------------------------------------------------------------------


def test_block_chain_equals_routing_token_blocks():
    rng = np.random.default_rng(3)
    tokens = rng.integers(100, 30_000, size=1000, dtype=np.uint32)
    incremental = BlockChain(16).extended(tokens[:333]).extended(tokens[333:700]).extended(tokens[700:])
    assert incremental.blocks == token_blocks(tokens.tolist()) == BlockChain(16).extended(tokens).blocks


def test_shared_prefix_popularity_is_zipf_skewed():
    workload = make_workload("shared_prefix", 3000, seed=1, prompts=100)
    counts = np.sort(np.bincount([spec.group for spec in workload.requests], minlength=100))[::-1]
    # Zipf s=1.1 over 100 prompts: the top prompt draws ~19%, the median one well under 1%.
    assert 0.12 < counts[0] / 3000 < 0.28
    assert counts[0] > 20 * counts[50]
    # Requests of one system prompt share its key and its leading blocks.
    by_group: dict[int, list] = {}
    for spec in workload.requests:
        by_group.setdefault(spec.group, []).append(spec.route)
    first, second = by_group[workload.requests[0].group][:2]
    assert first.prefix_key == second.prefix_key
    shared_blocks = first.prefix_tokens // 16
    assert first.blocks[:shared_blocks] == second.blocks[:shared_blocks]


def test_workloads_are_deterministic_by_seed():
    for name in ("shared_prefix", "multi_turn", "hot_prefix", "no_sharing"):
        a, b = make_workload(name, 200, seed=5), make_workload(name, 200, seed=5)
        c = make_workload(name, 200, seed=6)
        assert [r.route for r in a.requests] == [r.route for r in b.requests]
        assert [r.route.blocks for r in a.requests] != [r.route.blocks for r in c.requests]
    np.testing.assert_array_equal(unit_rate_gaps("bursty", 100, 1), unit_rate_gaps("bursty", 100, 1))


def test_sessions_grow_turn_by_turn_and_extend_their_own_history():
    workload = make_workload("multi_turn", 2000, seed=2, active_sessions=50)
    turns: dict[str, list] = {}
    for spec in workload.requests:
        turns.setdefault(spec.route.session_id, []).append(spec)
    long_sessions = [t for t in turns.values() if len(t) >= 3]
    assert long_sessions
    for session in long_sessions:
        for earlier, later in zip(session, session[1:], strict=False):
            assert later.route.prompt_tokens > earlier.route.prompt_tokens
            # The later turn's prompt starts with the whole earlier prompt (and its answer).
            assert later.route.prefix_tokens >= earlier.route.prompt_tokens
            held = earlier.route.prompt_tokens // 16
            assert later.route.blocks[:held] == earlier.route.blocks[:held]
            np.testing.assert_array_equal(later.tokens()[: earlier.route.prompt_tokens], earlier.tokens())
    assert max(s.route.prompt_tokens for s in workload.requests) <= 6000


def test_hot_prefix_takes_half_the_traffic_after_the_jump():
    workload = make_workload("hot_prefix", 4000, seed=3, prompts=100, hot_from=0.5, hot_share=0.5)
    before = [s.group for s in workload.requests[:2000]]
    after = [s.group for s in workload.requests[2000:]]
    hot = max(set(after), key=after.count)
    assert 0.45 < after.count(hot) / len(after) < 0.6
    assert before.count(hot) / len(before) < 0.05


def test_no_sharing_prompts_share_nothing():
    workload = make_workload("no_sharing", 300, seed=4)
    assert len({s.route.prefix_key for s in workload.requests}) == 300
    assert len({s.route.blocks[0] for s in workload.requests}) == 300


def test_arrival_processes_have_unit_mean_and_the_stated_burstiness():
    poisson, bursty = unit_rate_gaps("poisson", 50_000, 0), unit_rate_gaps("bursty", 50_000, 0)
    assert poisson.mean() == pytest.approx(1.0, rel=0.03)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)
    assert bursty.mean() == pytest.approx(1.0, rel=0.1)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)
    assert arrival_times("poisson", 100, rate=10.0)[-1] == pytest.approx(np.cumsum(unit_rate_gaps("poisson", 100))[-1] / 10)


# -- bisection ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.7, 37.3, 5000.0])
def test_bisection_finds_the_threshold_of_a_monotone_predicate(threshold):
    result = bisect_capacity(lambda x: x <= threshold, guess=10.0, rel_tol=0.01)
    assert result.capacity <= threshold < result.infeasible
    assert result.infeasible / result.capacity <= 1.01 + 1e-9
    assert len(result.probes) < 24


def test_bisection_reports_zero_when_nothing_is_feasible():
    result = bisect_capacity(lambda x: False, guess=10.0)
    assert result.capacity == 0.0 and result.probes[-1][0] < 10.0 / 128


def test_bisection_reports_unbounded_when_everything_is_feasible():
    result = bisect_capacity(lambda x: True, guess=1.0, max_probes=6)
    assert result.capacity == 32.0 and math.isinf(result.infeasible)


# -- Ray's prefix-affinity router --------------------------------------------------------


def _text_request(request_id: str, text: str) -> RouteRequest:
    return RouteRequest(request_id=request_id, prefix_key=text[:8].encode(), prompt_tokens=len(text))


def test_ray_baseline_routes_same_prefix_requests_together():
    texts: dict[str, str] = {}
    now = [0.0]
    policy = RayPrefixAffinityPolicy(prompt_text=lambda r: texts[r.request_id], clock=lambda: now[0], seed=0)
    loads = {f"p{i}": InstanceLoad() for i in range(8)}
    system = {k: f"system prompt {k} " * 40 for k in "abc"}
    placed: dict[str, set[str]] = {k: set() for k in system}
    for i in range(30):
        k = "abc"[i % 3]
        texts[f"r{i}"] = system[k] + f"user question {i}"
        decision = policy.route(_text_request(f"r{i}", texts[f"r{i}"]), loads)
        policy.on_routed(_text_request(f"r{i}", texts[f"r{i}"]), decision)
        loads[decision.instance].running += 1  # every replica stays busy: no tie-breaking luck
        placed[k].add(decision.instance)
        now[0] += 1
    # Each system prompt sticks to the replica that first served it; new prefixes went to
    # the replicas with the smallest trees, so the three prompts are on three replicas.
    assert all(len(instances) == 1 for instances in placed.values())
    assert len(set.union(*placed.values())) == 3


def test_ray_baseline_picks_the_shortest_queue_among_matching_replicas():
    texts = {"a": "x" * 100, "b": "x" * 100 + "y", "c": "x" * 100 + "z"}
    policy = RayPrefixAffinityPolicy(prompt_text=lambda r: texts[r.request_id], clock=lambda: 0.0, seed=0)
    loads = {"p0": InstanceLoad(), "p1": InstanceLoad()}
    # Both replicas served the prefix: the one with the shorter queue wins.
    policy.on_routed(_text_request("a", texts["a"]), policy.route(_text_request("a", texts["a"]), loads))
    policy.tree.insert(texts["a"], "p0", 0.0)
    policy.tree.insert(texts["a"], "p1", 0.0)
    loads["p0"].running, loads["p1"].running = 5, 1
    assert policy.route(_text_request("b", texts["b"]), loads).instance == "p1"
    loads["p0"].running, loads["p1"].running = 0, 3
    assert policy.route(_text_request("c", texts["c"]), loads).instance == "p0"


def test_token_text_is_one_character_per_token_and_prefix_preserving():
    tokens = np.array([100, 101, 32_099], dtype=np.uint32)
    text = token_text(tokens)
    assert len(text) == 3 and token_text(tokens[:2]) == text[:2]
    assert all(not 0xD800 <= ord(c) <= 0xDFFF for c in text)


# -- end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_shared_prefix():
    return make_workload("shared_prefix", 600, seed=11, prompts=24, system_tokens=(400, 1200), user_tokens=(20, 100))


def _run(workload, policy, rate=6.0, instances=8, **config):
    return simulate(TOY, workload, policy, rate, "poisson", SimConfig(prefill_instances=instances, **config), slo_ttft_s=3.0)


def test_cache_affinity_beats_round_robin_on_hit_rate(small_shared_prefix):
    spread = _run(small_shared_prefix, "round_robin").hit_rate
    for policy in ("consistent_hash", "dualmap"):
        affine = _run(small_shared_prefix, policy).hit_rate
        assert affine > spread + 0.25, (policy, affine, spread)
        assert affine > 1.5 * spread


def test_every_request_finishes_and_the_load_view_drains(small_shared_prefix):
    sim = ClusterSim(TOY, small_shared_prefix, "dualmap", 20.0, config=SimConfig(prefill_instances=4, max_ongoing=2), slo_ttft_s=2.0)
    result = sim.run()
    assert result.measured == 480 and result.requests == 600
    assert all(load.queued_prefill_tokens == 0 and load.running == 0 for load in sim.loads.values())
    assert all(load.queued_prefill_tokens == 0 and load.running == 0 for load in sim.sent_loads.values())
    assert sim.waiting_count == 0 and all(not q for q in sim.waiting.values())
    # Overloaded (20/s on 4 small instances) with back-pressure: every decision is one of
    # DualMap's (rebalancing itself is tested on scripted states in test_policies.py).
    assert set(result.reasons) <= {"cold", "affinity", "second_choice", "fallback", "rebalance", "overloaded_stay"}
    assert result.reasons.get("affinity", 0) > result.requests // 2
    assert result.ttft_p50_s <= result.ttft_p90_s <= result.ttft_p99_s
    # No request is faster than its own unloaded prefill of the uncached part.
    assert result.ttft_p50_s > TOY.prefill_fixed_s


def test_more_load_means_longer_ttft(small_shared_prefix):
    light = _run(small_shared_prefix, "least_loaded", rate=2.0)
    heavy = _run(small_shared_prefix, "least_loaded", rate=100.0)
    assert heavy.ttft_p90_s > 3 * light.ttft_p90_s


def test_the_ablations_run_in_the_simulator_with_their_part_off(small_shared_prefix):
    # 80/s on 4 small instances: overloaded, so the full policy rebalances.
    full = _run(small_shared_prefix, "dualmap", rate=80.0, instances=4, max_ongoing=2)
    assert {"cold", "affinity", "rebalance"} <= set(full.reasons)
    # No fallback: never leaves the two candidates, a cold prefix included.
    no_fallback = _run(small_shared_prefix, "dualmap_no_fallback", rate=80.0, instances=4, max_ongoing=2)
    assert set(no_fallback.reasons) <= {"affinity", "second_choice"}
    no_rebalance = _run(small_shared_prefix, "dualmap_no_rebalance", rate=80.0, instances=4, max_ongoing=2)
    assert "rebalance" not in no_rebalance.reasons and no_rebalance.rebalance_moves == 0
    assert "cold" in no_rebalance.reasons


def test_ray_baseline_runs_in_the_simulator(small_shared_prefix):
    result = _run(small_shared_prefix, "ray_prefix_affinity")
    assert result.hit_rate > _run(small_shared_prefix, "round_robin").hit_rate + 0.25
    assert set(result.reasons) <= {"prefix_match", "smallest_tenant", "power_of_two"}


def test_dualmap_credits_every_recent_holder():
    from routing.dualmap import Decision
    from routing.policies import DualMapPolicy

    one = DualMapPolicy(holders=1, clock=lambda: 0.0)
    several = DualMapPolicy(holders=4, clock=lambda: 0.0)
    request = RouteRequest("a", b"key", prompt_tokens=1000, prefix_tokens=800)
    for policy in (one, several):
        for instance in ("p0", "p1", "p2"):
            policy.on_routed(request, Decision(instance, "affinity", 0.1, 200))
    # One holder remembers only the last instance; four keep all three.
    assert one.holders_of(b"key") == ["p2"]
    assert several.holders_of(b"key") == ["p0", "p1", "p2"]
