"""The Serve adapter of DualMap, driven the way Ray Serve's router drives it. The adapter
reads only `replica_id` and `routing_stats` of a replica; Serve's RunningReplica needs a
live actor, so replicas here are plain records with those two fields (the integration
suite routes real requests through the adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.serve._private.common import DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest

from routing.serve_router import DualMapRequestRouter, request_text


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


def _router() -> DualMapRequestRouter:
    router = DualMapRequestRouter.__new__(DualMapRequestRouter)
    router.initialize_state(slo_ttft_s=2.0)
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
    assert router._ring.instances == {"r0", "r1"}


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
    before = count("affinity"), count("only_replica")
    await _route(router, [_replica(f"r{i}") for i in range(3)], _request("s", "q", "m0"))
    await _route(router, [_replica("r0")], _request("s", "q", "m1"))
    assert (count("affinity"), count("only_replica")) == (before[0] + 1, before[1] + 1)
