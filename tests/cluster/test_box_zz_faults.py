"""Links and nodes that fail under the box's P/D app: nothing hangs, nothing is lost, no KV
block leaks, and the answers stay those of a colocated engine."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest

from control_plane.cluster import box as boxlib
from control_plane.cluster.netns import LinkSpec, has_netem
from tests.cluster.helpers import LINK, BoxCluster, wait_healthy, wait_until
from tests.conftest import MODEL, metric_samples

# ~700 prompt tokens: about 32 MiB of float32 KV, seconds on a 50 Mbit link.
LONG_PROMPT = "Summarise the following notes in one sentence. " + " ".join(
    f"Note {i}: the shipment of item {i * 7 % 97} left warehouse {i % 5} on day {i % 28 + 1}." for i in range(40)
)


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _pulls(http) -> dict[str, float]:
    """Decode's KV pulls so far by outcome (ok, failed), from the ingress's /metrics."""
    counts = {"ok": 0.0, "failed": 0.0}
    for sample in metric_samples(http.get("/metrics").text, "tandem:kv_transfers_total"):
        if sample.labels.get("outcome") in counts:
            counts[sample.labels["outcome"]] += sample.value
    return counts


def _set_link(cluster: BoxCluster, node: boxlib.NodeState, spec: LinkSpec | None = None, up: bool | None = None):
    boxlib.set_link(cluster.state.name, node.name, spec, up)


@pytest.fixture()
def restore_links(cluster: BoxCluster):
    yield
    for node in cluster.state.nodes:
        _set_link(cluster, node, LINK, True)


def test_link_cut_mid_transfer_recomputes_and_leaks_nothing(cluster: BoxCluster, openai_client, reference_client,
                                                            http, restore_links):  # fmt: skip
    prefill = cluster.prefill_node
    seen = []
    # The cut lands once a few MiB of the KV left the prefill node; if the pull finished
    # first after all (counted ok), again with a new prompt (decode now caches the last one).
    for attempt in range(3):
        # New from its first token: no engine holds any of it (earlier tests sent prompts
        # that share LONG_PROMPT's start), so its whole KV crosses the link.
        text = f"Link cut {uuid.uuid4().hex}, attempt {attempt}. {LONG_PROMPT}"
        expected = reference_client.chat.completions.create(
            model=MODEL, messages=_messages(text), max_tokens=16, temperature=0
        ).choices[0].message.content
        # Slow enough that the cut lands while the KV is on the wire.
        _set_link(cluster, prefill, LinkSpec(rate="50mbit"), True)
        before = _pulls(http)
        sent_before = cluster.link_bytes(prefill)["from_node"]
        answer: dict = {}

        def ask(text: str = text, answer: dict = answer) -> None:
            try:
                reply = openai_client.chat.completions.create(
                    model=MODEL, messages=_messages(text), max_tokens=16, temperature=0
                )
                answer["content"] = reply.choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - reported below
                answer["error"] = exc

        client = threading.Thread(target=ask)
        client.start()

        def on_the_wire(sent: int = sent_before) -> bool:
            return cluster.link_bytes(prefill)["from_node"] - sent > 4 * 2**20

        # Until a few MiB crossed, or the answer came without them (then: the next attempt).
        wait_until(lambda client=client: on_the_wire() or not client.is_alive(), 120, 0.05, what="KV on the wire")
        if not on_the_wire():
            client.join()
            seen.append({"answered_before_4MiB_crossed": cluster.link_bytes(prefill)["from_node"] - sent_before,
                         "answer": answer})
            continue
        _set_link(cluster, prefill, up=False)
        cut_after = cluster.link_bytes(prefill)["from_node"] - sent_before
        client.join(timeout=120)
        assert not client.is_alive(), "the request hung with the link cut"
        assert "error" not in answer, answer.get("error")
        # The pull ended (at its deadline, or when it was cut) and decode recomputed the prompt.
        assert answer["content"] == expected
        # (Workers publish their counters with their heartbeat, every few seconds.)
        wait_until(lambda counted=before: _pulls(http) != counted, 30, what="the pull counted")
        after = _pulls(http)
        seen.append({"bytes_at_cut": cut_after, "before": before, "after": after})
        if after["failed"] > before["failed"]:
            break
    else:
        raise AssertionError(f"no attempt had its pull cut mid-transfer: {seen}")
    _set_link(cluster, prefill, LINK, True)
    # Prefill frees the unpulled KV at the TTL; decode freed what it had allocated.
    assert cluster.blocks_free("DecodeWorker", 60)
    assert cluster.blocks_free("PrefillWorker", 60)


@pytest.mark.parametrize(
    "spec",
    [
        LinkSpec(rate="10gbit", loss_pct=1.0),
        pytest.param(
            LinkSpec(rate="10gbit", delay_ms=20, loss_pct=1.0),
            marks=pytest.mark.skipif(not has_netem(), reason="this kernel has no netem: links cannot have a delay"),
        ),
    ],
    ids=str,
)
def test_lossy_slow_links_still_serve_correct_answers(cluster: BoxCluster, openai_client, reference_client,
                                                      spec, restore_links):  # fmt: skip
    for node in (cluster.prefill_node, cluster.decode_node):
        _set_link(cluster, node, spec)
    for i in range(3):
        messages = _messages(f"{LONG_PROMPT} Answer number {i}.")
        got = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        want = reference_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        assert got.choices[0].message.content == want.choices[0].message.content


def _stream_until_killed(cluster: BoxCluster, kill) -> tuple[list[str], float]:
    """Stream a long answer; ``kill()`` after a few chunks; the SSE events until the end."""
    events: list[str] = []
    body = {"model": MODEL, "messages": _messages("Write a long story about a lighthouse keeper."),
            "max_tokens": 400, "temperature": 0, "stream": True}  # fmt: skip
    started = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(180, read=120), trust_env=False) as client:
        with client.stream("POST", f"{cluster.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        kill()
    return events, time.monotonic() - started


def test_decode_node_killed_mid_stream_ends_cleanly_then_serves_after_restart(cluster: BoxCluster, openai_client):
    decode = cluster.decode_node
    events, _ = _stream_until_killed(cluster, lambda: boxlib.kill_node(cluster.state.name, decode.name))
    # Never a hang, never a silent cut: an error event (or a finished answer), then [DONE].
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert "error" in last or last["choices"][0].get("finish_reason") in ("stop", "length"), last
    # The node comes back; Serve puts the decode replica (and the reference engine) on it.
    boxlib.start_node(cluster.state.name, decode.name)
    wait_healthy(cluster.url, 600)
    wait_healthy(cluster.reference_url, 600)
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=_messages("What is the capital of France?"), max_tokens=8, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert cluster.worker("decode")["node"] == decode.address


def test_prefill_node_killed_requests_recompute_on_decode(cluster: BoxCluster, openai_client, reference_client):
    prefill = cluster.prefill_node
    messages = _messages("Name three colours of the rainbow.")
    want = reference_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    boxlib.kill_node(cluster.state.name, prefill.name)
    try:
        # Until Serve notices, a request may still be routed to the dead replica; it is
        # then recomputed on decode. Every answer is whole and right.
        for _ in range(3):
            got = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
            assert got.choices[0].message.content == want.choices[0].message.content
    finally:
        boxlib.start_node(cluster.state.name, prefill.name)
    wait_healthy(cluster.url, 600)
    assert cluster.worker("prefill")["node"] == prefill.address


def test_redis_down_serving_goes_on(cluster: BoxCluster, openai_client):
    boxlib.redis(cluster.state.name, "stop")
    try:
        for _ in range(2):
            reply = openai_client.chat.completions.create(
                model=MODEL, messages=_messages("What is the capital of France?"), max_tokens=8, temperature=0
            )
            assert "Paris" in reply.choices[0].message.content
    finally:
        boxlib.redis(cluster.state.name, "start")
    cluster.refresh()
    # The workers' heartbeats fill the fresh Redis again.
    wait_until(lambda: {w["role"] for w in cluster.workers()} >= {"prefill", "decode"}, 60, what="registry back")
