"""KV handoff faults and gone clients: the answer stays right, no KV block leaks, and each
failure is counted. Faults are injected on the real wire between real workers."""

from __future__ import annotations

import json
import secrets
import socket
import time

import pytest

from tests.conftest import MODEL, REFERENCE_APP, TTL_S
from tests.integration.wire_faults import FaultyProxy

BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Explain in two sentences why the sky is blue. " * 12}],
    "temperature": 0,
    "max_tokens": 24,
}


def _worker_reply(handle, body: dict) -> dict:
    replies = list(handle.options(stream=True).generate.remote("chat", body))
    assert replies[0].kind == "response", replies[0]
    return replies[0].body


def _text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def reference_text(cluster) -> str:
    return _text(_worker_reply(cluster.handle("ColocatedWorker", REFERENCE_APP), BODY))


def _prefill(cluster) -> dict:
    reply = _worker_reply(
        cluster.handle("PrefillWorker"),
        {**BODY, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    params = reply["kv_transfer_params"]
    assert params["tandem"]["num_blocks"] >= 1
    return params


def _decode_with(cluster, params: dict) -> tuple[str, dict, dict]:
    before = cluster.worker_stats("DecodeWorker")
    text = _text(_worker_reply(cluster.handle("DecodeWorker"), {**BODY, "kv_transfer_params": params}))
    return text, before, cluster.worker_stats("DecodeWorker")


def _assert_no_leaked_blocks(cluster) -> None:
    assert cluster.wait_blocks_free("PrefillWorker", TTL_S + 15), "prefill holds KV blocks"
    assert cluster.wait_blocks_free("DecodeWorker", 15), "decode holds KV blocks"


def test_clean_handoff_moves_kv(cluster, reference_text):
    text, before, after = _decode_with(cluster, _prefill(cluster))
    assert text == reference_text
    assert after["kv_transfers"] > before["kv_transfers"]
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"]
    _assert_no_leaked_blocks(cluster)


@pytest.mark.parametrize("mode", FaultyProxy.MODES)
def test_wire_fault_is_recomputed_and_counted(cluster, reference_text, mode):
    params = _prefill(cluster)
    real = params["tandem"]["address"]
    proxy = FaultyProxy((real["host"], real["port"]), mode)
    params["tandem"]["address"] = proxy.address
    try:
        text, before, after = _decode_with(cluster, params)
    finally:
        proxy.close()
    assert proxy.connections == 1  # the decode worker really pulled through the fault
    assert text == reference_text
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"] + 1
    _assert_no_leaked_blocks(cluster)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fault", ["peer_gone", "unknown_transfer_id"])
def test_unreachable_kv_is_recomputed(cluster, reference_text, fault):
    params = _prefill(cluster)
    if fault == "peer_gone":
        params["tandem"]["address"] = {"transport": "tcp", "host": "127.0.0.1", "port": _closed_port()}
    else:
        params["tandem"]["transfer_id"] = secrets.token_hex(16)
    text, before, after = _decode_with(cluster, params)
    assert text == reference_text
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"] + 1
    # The real transfer was never pulled: the prefill worker frees it after its TTL.
    _assert_no_leaked_blocks(cluster)


def test_unpulled_transfer_expires_and_frees_blocks(cluster):
    before = cluster.worker_stats("PrefillWorker")
    _prefill(cluster)
    assert not cluster.handle("PrefillWorker").reset_prefix_cache.remote().result()  # held
    assert cluster.wait_blocks_free("PrefillWorker", TTL_S + 15)
    deadline = time.monotonic() + 15
    while cluster.worker_stats("PrefillWorker")["kv_expired_requests"] == before["kv_expired_requests"]:
        assert time.monotonic() < deadline, "expiry was not counted"
        time.sleep(0.5)


def _wait_idle(cluster, deployment: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = cluster.worker_stats(deployment)
        if stats["running"] == 0 and stats["in_flight_requests"] == 0:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def test_client_disconnect_aborts_engine_request(cluster, http):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        busy = cluster.worker_stats("DecodeWorker")
        assert busy["in_flight_requests"] >= 1
    # The client hung up after a few tokens: the decode engine must stop generating long
    # before 1500 tokens would have taken.
    idle = _wait_idle(cluster, "DecodeWorker")
    assert idle["running"] == 0 and idle["in_flight_requests"] == 0, idle


def test_transfer_telemetry_reaches_redis_and_prometheus(cluster, http, reference_text):
    from control_plane.redis_server import embedded_url
    from kv_transport.telemetry import read_stream

    params = _prefill(cluster)
    transfer_id = params["tandem"]["transfer_id"]
    _decode_with(cluster, params)
    # The worker's sink writes from a thread of its own, after the pull: the record follows
    # the answer (within its retries when Redis is slow).
    deadline = time.monotonic() + 30
    while True:
        url = embedded_url()  # None while Redis misses its ping on a loaded host
        records = [r for r in read_stream(url) if r["transfer_id"] == transfer_id] if url else []
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(records) == 1
    record = records[0]
    assert record["ok"] and record["transport"] == "tcp" and record["codec"] == "identity"
    assert record["raw_bytes"] == record["wire_bytes"] > 0
    assert "->" in record["link"] and record["wire_s"] > 0 and record["goodput_bytes_per_s"] > 0
    # Worker metrics reach the ingress's /metrics with the next heartbeat.
    deadline = time.monotonic() + 20
    while True:
        text = http.get("/metrics").text
        if 'tandem:kv_transfers_total{' in text and 'outcome="ok"' in text:
            break
        assert time.monotonic() < deadline, "worker KV metrics never reached /metrics"
        time.sleep(1)
    assert 'tandem:kv_transfer_bytes_total{' in text and 'role="decode"' in text
    assert "tandem:engine_kv_cache_usage{" in text


def test_transfer_not_needed_is_released_at_once(cluster, reference_text):
    params = _prefill(cluster)
    # A decode request that loads nothing from the prefill worker (here: the transfer claims
    # no tokens) tells the publisher to free the blocks now rather than at the TTL.
    params["tandem"]["num_tokens"] = 0
    text, before, after = _decode_with(cluster, params)
    assert text == reference_text
    assert after["kv_transfers"] == before["kv_transfers"]  # nothing was pulled
    assert cluster.wait_blocks_free("PrefillWorker", TTL_S / 2)


def test_request_deadline_header_ends_a_stream_with_504_and_frees_the_engine(cluster, http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a whale."}],
            "max_tokens": 1500, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-tandem-timeout-s": "3"}) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert time.monotonic() - started < 30  # 1500 tokens would take minutes here
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]  # an OpenAI-shaped error event
    assert error["type"] == "timeout_error" and "timed out" in error["message"]
    idle = _wait_idle(cluster, "DecodeWorker")
    assert idle["running"] == 0 and idle["in_flight_requests"] == 0, idle
