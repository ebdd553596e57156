"""A broken KV handoff or a gone client: the answer stays right and no engine work leaks."""

from __future__ import annotations

import socket
import time
import uuid

from tests.conftest import MODEL, REFERENCE_APP

PROMPT = "Explain in two sentences why the sky is blue."


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_reply(handle, body: dict) -> dict:
    replies = list(handle.options(stream=True).generate.remote("chat", body))
    assert replies[0].kind == "response", replies[0]
    return replies[0].body


def test_failed_kv_handoff_is_recomputed_by_decode(cluster):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": 24,
    }
    prefill = _worker_reply(
        cluster.handle("PrefillWorker"),
        {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    params = dict(prefill["kv_transfer_params"])
    # The prefill worker's KV is real, but the decode worker is sent to a peer that is gone.
    params.update(remote_engine_id=str(uuid.uuid4()), remote_port=_closed_port())
    before = cluster.worker_stats("DecodeWorker")
    recomputed = _worker_reply(cluster.handle("DecodeWorker"), {**body, "kv_transfer_params": params})
    after = cluster.worker_stats("DecodeWorker")
    reference = _worker_reply(cluster.handle("ColocatedWorker", REFERENCE_APP), body)

    assert recomputed["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    # The connector promised the prompt's KV, the pull failed, and the failure was counted.
    assert after["kv_transfer_failures"] > before["kv_transfer_failures"], (before, after)


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
