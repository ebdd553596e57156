"""DualMap end to end: the nixl app has two prefill replicas behind Tandem's router.

Requests that share a system prompt must land on the same prefill replica (its prefix cache
holds the prompt), while distinct system prompts spread over both replicas.
"""

from __future__ import annotations

import time

from openai import OpenAI

from tests.conftest import MODEL, NIXL_APP, NIXL_PREFILL_REPLICAS

GROUPS = 6
PER_GROUP = 3


def _system_prompt(group: int) -> str:
    return f"You are assistant number {group}. " + " ".join(
        f"Rule {k} of assistant {group}: answer briefly and politely." for k in range(12)
    )


def _requests_by_replica(cluster) -> dict[str, int]:
    return {rid: stats["requests_total"] for rid, stats in cluster.replica_stats("prefill", NIXL_APP).items()}


def _wait_for_heartbeats(cluster, before: dict[str, int], expected: int) -> dict[str, int]:
    """Per-replica request deltas once the heartbeats (every 5 s) account for all."""
    deadline = time.monotonic() + 30
    while True:
        now = _requests_by_replica(cluster)
        delta = {rid: now[rid] - before.get(rid, 0) for rid in now}
        if sum(delta.values()) >= expected or time.monotonic() > deadline:
            return delta
        time.sleep(1)


def test_shared_system_prompts_land_on_one_prefill_replica(cluster):
    client = OpenAI(base_url=f"{cluster.nixl_url}/v1", api_key="unused", max_retries=0, timeout=300)
    # Both replicas heartbeat before we start counting.
    deadline = time.monotonic() + 60
    while len(_requests_by_replica(cluster)) < NIXL_PREFILL_REPLICAS:
        assert time.monotonic() < deadline, "prefill replicas of the nixl app never heartbeat"
        time.sleep(1)

    homes: dict[int, str] = {}
    per_replica: dict[str, int] = {}
    for group in range(GROUPS):
        before = _requests_by_replica(cluster)
        for question in range(PER_GROUP):
            reply = client.chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": _system_prompt(group)},
                    {"role": "user", "content": f"Question {question}: what is {question} + {group}?"},
                ],
                max_tokens=4,
                temperature=0,
            )
            assert reply.choices[0].message.content is not None
        delta = _wait_for_heartbeats(cluster, before, PER_GROUP)
        served = {rid: n for rid, n in delta.items() if n}
        assert len(served) == 1 and sum(served.values()) == PER_GROUP, (group, delta)
        homes[group] = next(iter(served))
        per_replica[homes[group]] = per_replica.get(homes[group], 0) + PER_GROUP

    # Distinct prefixes spread: both replicas got groups, neither more than 2/3 of them.
    assert len(per_replica) == NIXL_PREFILL_REPLICAS, homes
    assert max(per_replica.values()) <= 2 * GROUPS * PER_GROUP // 3, per_replica

    # The router's decisions are exported.
    metrics = cluster_metrics(cluster)
    assert 'tandem:router_decisions_total{pool="prefill",reason="affinity"}' in metrics
    assert "tandem:router_in_flight_requests" in metrics


def cluster_metrics(cluster) -> str:
    import httpx

    return httpx.get(f"{cluster.nixl_url}/metrics", timeout=30).text


def test_a_conversation_s_next_turn_pulls_only_its_new_kv(cluster, openai_client, reference_client):
    """The decode worker that answered turn 1 still caches it: turn 2's pull skips those
    blocks (counted as saved bytes) and the answer stays token-exact."""
    system = "You are a careful assistant. " + " ".join(
        f"Guideline {k}: keep answers short, factual and friendly." for k in range(30)
    )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a primary colour."}]
    first = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And another one?"},
    ]
    before = cluster.worker_stats("DecodeWorker")
    second = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    after = cluster.worker_stats("DecodeWorker")
    reference = reference_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)

    assert second.choices[0].message.content == reference.choices[0].message.content
    assert after["kv_transfers"] > before["kv_transfers"]  # turn 2's KV still came over the link
    assert after["kv_saved_bytes"] > before["kv_saved_bytes"]  # but not the blocks it held
