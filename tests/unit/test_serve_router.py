"""The Serve adapter of the routing policies, driven the way Ray Serve's router drives it. The adapter
reads only `replica_id` and `routing_stats` of a replica; Serve's RunningReplica needs a
live actor, so replicas here are plain records with those two fields (the integration
suite routes real requests through the adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ray.serve._private.common import DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest

from routing.serve_router import TandemRequestRouter, request_text, session_id


@dataclass
class Replica:
    replica_id: ReplicaID
    routing_stats: dict = field(default_factory=dict)


def _replica(name: str, stats: dict | None = None) -> Replica:
    return Replica(ReplicaID(name, DeploymentID("PrefillWorker", "tandem")), stats or {})


def _request(system: str, user: str, request_id: str) -> PendingRequest:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id)
    return PendingRequest(args=["chat", body], kwargs={}, metadata=metadata)


def _router(policy: str = "dualmap", pool: str = "prefill", **kwargs) -> TandemRequestRouter:
    router = TandemRequestRouter.__new__(TandemRequestRouter)
    router.initialize_state(pool=pool, policy=policy, policy_kwargs={"slo_ttft_s": 2.0} if policy == "dualmap" else {}, **kwargs)
    return router


async def _route(router, replicas, request) -> str:
    ranks = await router.choose_replicas(replicas, request)
    assert len(ranks[0]) == 1  # one first-rank replica: Serve can't override the choice
    chosen = ranks[0][0]
    router.on_request_routed(request, chosen.replica_id, None)
    return chosen.replica_id.unique_id


async def test_shared_system_prompts_stick_to_one_replica():
    router = _router()
    replicas = [_replica(f"r{i}") for i in range(4)]
    for system in ("You are a pirate.", "You are a librarian.", "You are a chef."):
        chosen = {await _route(router, replicas, _request(system, f"question {i}", f"{system}{i}")) for i in range(6)}
        assert len(chosen) == 1, (system, chosen)


async def test_distinct_prefixes_spread_over_the_pool():
    router = _router()
    replicas = [_replica(f"r{i}") for i in range(4)]
    chosen = [await _route(router, replicas, _request(f"system prompt number {i}", "q", f"id{i}")) for i in range(64)]
    counts = {r: chosen.count(r) for r in set(chosen)}
    assert len(counts) == 4 and max(counts.values()) < 32


async def test_a_hot_replica_loses_affinity_then_regains_it():
    router = _router()
    replicas = [_replica(f"r{i}") for i in range(4)]
    first = await _route(router, replicas, _request("shared", "q0", "a0"))
    # The replica now reports a long queue of unprefilled prompt tokens: past the SLO.
    loaded = [_replica(r.replica_id.unique_id, {"in_flight_prompt_tokens": 100_000 if r.replica_id.unique_id == first else 0}) for r in replicas]
    moved = await _route(router, loaded, _request("shared", "q1", "a1"))
    assert moved != first
    router.on_request_completed(replicas[0].replica_id, "a0")
    router.on_request_completed(replicas[0].replica_id, "a1")
    assert await _route(router, replicas, _request("shared", "q2", "a2")) in (first, moved)


async def test_pool_changes_are_picked_up():
    router = _router()
    replicas = [_replica(f"r{i}") for i in range(3)]
    await _route(router, replicas, _request("s", "q", "x0"))
    fewer = replicas[:2]
    assert await _route(router, fewer, _request("s", "q", "x1")) in {"r0", "r1"}
    assert router.policy.ring.instances == {"r0", "r1"}


async def test_request_text_shared_prefix():
    shared, whole = request_text(_request("SYS", "hello", "i"))
    assert shared == "system:SYS\n" and whole.endswith("user:hello\n")
    completion = PendingRequest(args=["completions", {"prompt": "x" * 1000}], kwargs={},
                                metadata=RequestMetadata(request_id="c", internal_request_id="c"))
    assert request_text(completion) == ("x" * 256, "x" * 1000)


async def test_decisions_are_counted():
    from routing import metrics

    def count(reason: str) -> float:
        return metrics.REGISTRY.get_sample_value(
            "tandem:router_decisions_total", {"pool": "prefill", "reason": reason}
        ) or 0.0

    router = _router()
    before = count("cold"), count("affinity")
    await _route(router, [_replica(f"r{i}") for i in range(3)], _request("s", "q", "m0"))
    await _route(router, [_replica(f"r{i}") for i in range(3)], _request("s", "q2", "m1"))
    assert (count("cold"), count("affinity")) == (before[0] + 1, before[1] + 1)


async def test_a_full_replica_sheds_its_waiting_requests_on_retry():
    """Requests waiting here for a hot replica (Serve retries them while it is full) are
    moved to a cool one and counted as rebalances."""
    from routing import metrics

    router = _router()
    router.policy.hot_min_tokens = 100
    replicas = [_replica(f"r{i}") for i in range(3)]
    first = _request("hot system prompt " * 40, "q", "h0")
    hot = await _route(router, replicas, first)
    # Many more requests of the hot prefix arrive; none is accepted yet (replica full).
    waiting = [_request("hot system prompt " * 40, f"q{i}", f"h{i}") for i in range(1, 8)]
    for request in waiting:
        ranks = await router.choose_replicas(replicas, request)
        assert ranks == [[next(r for r in replicas if r.replica_id.unique_id == hot)]]
    before = metrics.REGISTRY.get_sample_value("tandem:router_rebalances_total", {"pool": "prefill"}) or 0.0
    # Serve retries the newest one: the hot replica's queue sheds onto the others.
    ranks = await router.choose_replicas(replicas, waiting[-1])
    assert ranks[0][0].replica_id.unique_id != hot
    moved = metrics.REGISTRY.get_sample_value("tandem:router_rebalances_total", {"pool": "prefill"}) - before
    assert 1 <= moved < len(waiting)


async def test_in_flight_accounting_and_ttft_feedback():
    router = _router(observe_ttft=True)
    replicas = [_replica(f"r{i}") for i in range(2)]
    request = _request("sys " * 100, "question", "t0")
    chosen = await _route(router, replicas, request)
    before = router.policy.predictor.predict_work(chosen, 1000)
    assert router._running[chosen] == 1 and router._queued_tokens[chosen] > 0
    router.on_request_completed(replicas[0].replica_id, "t0")
    assert router._running[chosen] == 0 and router._queued_tokens[chosen] == 0
    # The observed duration calibrated the predictor (well under the prior's prediction).
    assert router.policy.predictor.predict_work(chosen, 1000) < before


async def test_non_generate_calls_go_anywhere():
    router = _router()
    replicas = [_replica(f"r{i}") for i in range(2)]
    health = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id="h", internal_request_id="h"))
    assert await router.choose_replicas(replicas, health) == [replicas]


async def test_decode_placement_keeps_a_conversation_on_its_replica():
    router = _router(policy="kv_pressure", pool="decode")
    replicas = [_replica(f"d{i}", {"kv_cache_usage": 0.1 * i}) for i in range(3)]
    turn = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]}
    def pending(i: int) -> PendingRequest:
        return PendingRequest(args=["chat", turn], kwargs={}, metadata=RequestMetadata(request_id=f"c{i}", internal_request_id=f"c{i}"))
    first = await _route(router, replicas, pending(0))
    assert first == "d0"  # least KV pressure
    # d0 is now a little busier than d1, but within the slack: the conversation stays.
    busier = [_replica("d0", {"kv_cache_usage": 0.2}), _replica("d1", {"kv_cache_usage": 0.1}), replicas[2]]
    assert await _route(router, busier, pending(1)) == "d0"
    # Far busier: it moves.
    full = [_replica("d0", {"kv_cache_usage": 0.95}), _replica("d1", {"kv_cache_usage": 0.1}), replicas[2]]
    assert await _route(router, full, pending(2)) == "d1"


def test_session_identity():
    opening = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    turn2 = {"messages": [*opening, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
    turn3 = {"messages": [*turn2["messages"], {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]}
    assert session_id(turn2) == session_id(turn3) is not None
    assert session_id({"messages": opening}) is None  # a single turn has no session yet
    assert session_id({"messages": opening, "user": "alice"}) == "user:alice"


def test_sessions_are_keyed_by_their_opening_single_turns_by_their_system_prompt():
    from routing.serve_router import prefix_key_of

    system = {"role": "system", "content": "You are terse. " * 200}  # longer than the key's reach
    one = {"messages": [system, {"role": "user", "content": "hi"}]}
    other = {"messages": [system, {"role": "user", "content": "bye"}]}
    assert prefix_key_of(one, "system:" + system["content"], 1024) == prefix_key_of(other, "system:" + system["content"], 1024)
    turn2 = {"messages": [*one["messages"], {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]}
    turn3 = {"messages": [*turn2["messages"], {"role": "assistant", "content": "sure"}, {"role": "user", "content": "again"}]}
    other2 = {"messages": [*other["messages"], {"role": "assistant", "content": "ciao"}, {"role": "user", "content": "x"}]}
    assert prefix_key_of(turn2, "", 1024) == prefix_key_of(turn3, "", 1024) != prefix_key_of(other2, "", 1024)


_LOAD_SHIPPED_ROUTER = """
import sys, cloudpickle
from routing import serve_router
shipped = cloudpickle.loads(sys.stdin.buffer.read())
assert shipped is not serve_router.TandemRequestRouter, "not a by-value copy"

class Deployment:
    app_name, name = "pickled-app", "PrefillWorker"

router = shipped.__new__(shipped)
router._deployment_id = Deployment()
router.initialize_state(pool="prefill", policy="round_robin")
assert serve_router.router_for("pickled-app", "PrefillWorker") is router, "registered in a copy"
"""


def test_a_router_shipped_by_value_still_registers_where_the_ingress_looks():
    """Serve pickles request-router classes by value into the routing process; the router
    must still register where the ingress (which imports the module normally) looks."""
    import subprocess
    import sys

    import cloudpickle

    from routing import serve_router

    cloudpickle.register_pickle_by_value(serve_router)
    try:
        shipped = cloudpickle.dumps(TandemRequestRouter)
    finally:
        cloudpickle.unregister_pickle_by_value(serve_router)
    result = subprocess.run([sys.executable, "-c", _LOAD_SHIPPED_ROUTER], input=shipped, capture_output=True,
                            check=False, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr.decode()[-2000:]


async def test_calls_of_one_http_request_are_routed_and_accounted_apart():
    """Serve gives every handle call made while serving one HTTP request that request's
    internal id: a batch's prompts go to prefill at once under one id. Each is its own
    decision (not taken for a retry of another) and each completion settles one call."""
    router = _router(observe_ttft=True)
    replicas = [_replica(f"r{i}") for i in range(2)]
    calls = [_request("sys " * 100, f"prompt {i}", "one-http-request") for i in range(4)]
    for call in calls:  # all decided before any is accepted, as concurrent calls are
        ranks = await router.choose_replicas(replicas, call)
        assert len(ranks[0]) == 1
    chosen = []
    for call in calls:
        ranks = await router.choose_replicas(replicas, call)  # what Serve does on a retry
        router.on_request_routed(call, ranks[0][0].replica_id, None)
        chosen.append(ranks[0][0].replica_id)
    assert sum(router._running.values()) == 4 and not router._waiting
    for replica_id in chosen:
        router.on_request_completed(replica_id, "one-http-request")
    assert sum(router._running.values()) == 0 and sum(router._queued_tokens.values()) == 0
    assert not router._in_flight and not router.policy._routed
