"""DualMap end to end: the nixl app has two prefill replicas behind Tandem's router.

Requests that share a system prompt must land on the same prefill replica (its prefix cache
holds the prompt), while distinct system prompts spread over both replicas.
"""

from __future__ import annotations

import time

from openai import OpenAI

from control_plane.redis_server import embedded_url
from control_plane.state import list_workers
from tests.conftest import MODEL, NIXL_APP, NIXL_PREFILL_REPLICAS

GROUPS = 6
PER_GROUP = 3


def _system_prompt(group: int) -> str:
    return f"You are assistant number {group}. " + " ".join(
        f"Rule {k} of assistant {group}: answer briefly and politely." for k in range(12)
    )


def _fresh_requests_by_replica(cluster) -> dict[str, int]:
    """Requests each prefill replica has served, from heartbeats sent after this call
    (they come every 5 s, so earlier ones may miss the latest requests)."""
    since = time.time()
    deadline = time.monotonic() + 30
    while True:
        entries = [
            e for e in list_workers(embedded_url(), NIXL_APP) if e.get("role") == "prefill"
        ]
        if len(entries) >= NIXL_PREFILL_REPLICAS and all(e["heartbeat_at"] > since for e in entries):
            return {e["replica_id"]: e["stats"]["requests_total"] for e in entries}
        assert time.monotonic() < deadline, "prefill replicas of the nixl app stopped heartbeating"
        time.sleep(0.5)


def test_shared_system_prompts_land_on_one_prefill_replica(cluster):
    client = OpenAI(base_url=f"{cluster.nixl_url}/v1", api_key="unused", max_retries=0, timeout=300)
    homes: dict[int, str] = {}
    per_replica: dict[str, int] = {}
    before = _fresh_requests_by_replica(cluster)
    for group in range(GROUPS):
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
        after = _fresh_requests_by_replica(cluster)
        served = {rid: n - before.get(rid, 0) for rid, n in after.items() if n - before.get(rid, 0)}
        assert len(served) == 1 and sum(served.values()) == PER_GROUP, (group, served)
        homes[group] = next(iter(served))
        before = after
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
