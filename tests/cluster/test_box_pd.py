"""P/D across nodes: placement, addresses, token-exact answers, KV over the link."""

from __future__ import annotations

import json
import time

from tests.cluster.helpers import BoxCluster, tandem_cli, wait_until
from tests.conftest import MODEL, calibration_messages, metric_samples
from workers.deployments import HEARTBEAT_PERIOD_S

TOKENS = 32


def _transfers(cluster: BoxCluster, http) -> tuple[float, float]:
    """(ok transfers, wire bytes) so far, from the ingress's /metrics (workers' merged in)."""
    text = http.get("/metrics").text
    ok = sum(s.value for s in metric_samples(text, "tandem:kv_transfers_total") if s.labels.get("outcome") == "ok")
    wire = sum(s.value for s in metric_samples(text, "tandem:kv_transfer_bytes_total") if s.labels.get("stage") == "wire")
    return ok, wire


def _settled_transfers(cluster: BoxCluster, http) -> tuple[float, float]:
    """`_transfers` once the workers' last heartbeats have carried every finished transfer
    (workers publish their metrics every few seconds)."""
    last = _transfers(cluster, http)
    while True:
        time.sleep(HEARTBEAT_PERIOD_S + 1)
        now = _transfers(cluster, http)
        if now == last:
            return now
        last = now


def test_status_shows_nodes_links_and_where_each_replica_runs(cluster: BoxCluster):
    result = tandem_cli("cluster", "status", "--json", "--name", cluster.state.name)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["health"]["status"] == "ok"
    nodes = {node["node"]: node for node in report["nodes"]}
    assert [node["link"] for node in nodes.values()] == ["10gbit"] * 3
    prefill, decode = cluster.prefill_node, cluster.decode_node
    roles_on = {name: {(w["app"], w["role"]) for w in node["workers"]} for name, node in nodes.items()}
    assert roles_on[prefill.name] == {("tandem", "prefill")}
    assert roles_on[decode.name] == {("tandem", "decode"), ("reference", "colocated")}
    assert roles_on[cluster.state.head.name] == set()


def test_kv_listeners_advertise_their_node_address(cluster: BoxCluster):
    for role, node in (("prefill", cluster.prefill_node), ("decode", cluster.decode_node)):
        worker = cluster.worker(role)
        assert worker["node"] == node.address
        # Not loopback, not the head's: the address other nodes reach it at.
        assert worker["kv_listener"]["host"] == node.address


def test_greedy_float32_pd_across_nodes_equals_colocated_and_kv_crossed_the_link(
    cluster: BoxCluster, openai_client, reference_client, http
):
    ok_before, wire_before = _settled_transfers(cluster, http)
    link_before = cluster.link_bytes(cluster.decode_node)
    hits_before = cluster.worker("decode")["stats"]["external_kv_hits"]
    prompts = calibration_messages()[:4]
    for prompt_id, messages in prompts:
        pd = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0)
        ref = reference_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0)
        assert pd.choices[0].message.content == ref.choices[0].message.content, prompt_id
        assert pd.usage.prompt_tokens == ref.usage.prompt_tokens
    wait_until(lambda: _transfers(cluster, http)[0] >= ok_before + len(prompts), 30, what="every prompt's KV pulled")
    ok_after, wire_after = _settled_transfers(cluster, http)
    link_after = cluster.link_bytes(cluster.decode_node)
    assert wire_after > wire_before
    # Everything the decode node pulled came in through its veth.
    assert link_after["to_node"] - link_before["to_node"] >= wire_after - wire_before
    # The decode engine counted the pulled KV as external prefix hits.
    wait_until(
        lambda: cluster.worker("decode")["stats"]["external_kv_hits"] > hits_before, 20,
        what="decode reports external KV hits",
    )
    assert cluster.blocks_free("DecodeWorker") and cluster.blocks_free("PrefillWorker")


def test_batched_prompts_across_nodes_equal_colocated_one_by_one(cluster: BoxCluster, openai_client, reference_client):
    # Distinct prompts of different lengths: each gets its own prefill and its own pull.
    prompts = ["The capital of France is", "My favourite thing in the whole world is the stone. It is",
               "Apples, pears and", "Once upon a time, in a small village by the sea, there lived"]  # fmt: skip
    batch = openai_client.completions.create(model=MODEL, prompt=prompts, max_tokens=TOKENS, temperature=0)
    assert [choice.index for choice in batch.choices] == list(range(len(prompts)))
    for prompt, choice in zip(prompts, batch.choices, strict=True):
        alone = reference_client.completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0)
        assert choice.text == alone.choices[0].text, prompt
    # Within less than the TTL: every prompt's KV was pulled and released, none left to expire.
    assert cluster.blocks_free("PrefillWorker", 5)
