"""Faults injected into the shared local cluster: replicas killed mid-request, Redis
stopped. Each test leaves the cluster whole again (replacements running, Redis back), so
it runs late, just before the lifecycle tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from bench import fault_injection as faults
from tests.conftest import (
    MODEL,
    NIXL_APP,
    NIXL_PREFILL_REPLICAS,
    SECURE_KEY,
    metric_samples,
    post_chats,
)

APP = "tandem"
RECOVERY_TIMEOUT_S = 300


def _chat(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 8, **extra}


@contextlib.contextmanager
def _replaced_afterwards(app: str, deployment: str, count: int = 1) -> Iterator[list[str]]:
    """Collects the replicas a test kills and, whatever the test asserts, waits for their
    replacements: a failing fault test must not leave the next tests a broken cluster."""
    killed: list[str] = []
    try:
        yield killed
    finally:
        for replica in killed:
            faults.wait_replaced(app, deployment, replica, count=count, timeout_s=RECOVERY_TIMEOUT_S)


def _wait_until_answered(url: str, body: dict, timeout_s: float = RECOVERY_TIMEOUT_S) -> float:
    """Seconds until a request succeeds again. Meanwhile only the pool being down (503 with
    Retry-After) or a request that reached the dead replica before Serve noticed (502) is
    acceptable, both OpenAI-shaped."""
    started = time.monotonic()
    with httpx.Client(timeout=120) as client:
        while True:
            response = client.post(f"{url}/v1/chat/completions", json=body)
            if response.status_code == 200:
                return time.monotonic() - started
            assert response.status_code in (502, 503), (response.status_code, response.text)
            assert response.json()["error"]["type"], response.text
            if response.status_code == 503:
                assert "Retry-After" in response.headers
            assert time.monotonic() - started < timeout_s, "never recovered"
            time.sleep(1)


def test_decode_killed_mid_stream_ends_the_stream_cleanly(cluster):
    # The engine core(s) of the replica about to be killed, as it reports them.
    engines_before = faults.replica_engine_pids(APP, "DecodeWorker")
    assert engines_before and faults.running(engines_before) == engines_before, (
        f"the DecodeWorker replicas {faults.replica_pids(APP, 'DecodeWorker')} report engine cores "
        f"{sorted(engines_before)}: {faults.describe_processes(engines_before)}")
    body = _chat("Write a very long story about a lighthouse keeper.", max_tokens=600, ignore_eos=True, stream=True)
    events: list[str] = []
    killed_at = None
    with _replaced_afterwards(APP, "DecodeWorker") as killed:
        with httpx.Client(base_url=cluster.url, timeout=httpx.Timeout(60, read=60)) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line:
                        continue
                    events.append(line)
                    if len(events) == 5:
                        killed.append(faults.kill_replica(APP, "DecodeWorker"))
                        killed_at = time.monotonic()
        assert killed_at is not None
        ended_after = time.monotonic() - killed_at
        # The client is told, in the stream, and the connection closes: no hang, no silent cut.
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))
        assert error["error"]["type"] == "server_error" and "decode worker failed" in error["error"]["message"]
        assert ended_after < 30, ended_after
        assert len(events) < 600  # it really was cut mid-answer

        recovered = _wait_until_answered(cluster.url, _chat("Say hello."))
        faults.wait_replaced(APP, "DecodeWorker", killed[0], timeout_s=RECOVERY_TIMEOUT_S)
    # The dead replica's engine-core process went with it (it notices its parent died within
    # seconds); its replacement brought its own.
    deadline = time.monotonic() + 60
    while faults.running(engines_before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not faults.running(engines_before), (
        f"the killed replica's engine core outlived it: {faults.describe_processes(engines_before)}")
    replacement = faults.replica_engine_pids(APP, "DecodeWorker")
    assert replacement and not replacement & engines_before, (replacement, engines_before)
    assert faults.running(replacement) == replacement, faults.describe_processes(replacement)
    print(f"decode kill: stream ended {ended_after:.1f}s after the kill, served again after {recovered:.1f}s; "
          f"engine cores {sorted(engines_before)} -> {faults.describe_processes(replacement)}")


def test_prefill_killed_with_requests_in_flight_loses_none(cluster):
    bodies = [_chat(f"Request {i}: explain in detail why the sky is blue. " * 30, max_tokens=12) for i in range(6)]
    unanswered_at_kill: list[bool] = []

    async def run(killed: list[str]) -> list[httpx.Response]:
        sent = asyncio.ensure_future(post_chats(cluster.nixl_url, bodies))
        await asyncio.sleep(0.5)  # the prompts are being prefilled on both replicas now
        killed.append(await asyncio.to_thread(faults.kill_replica, NIXL_APP, "PrefillWorker", 0))
        unanswered_at_kill.append(not sent.done())
        return await sent

    with _replaced_afterwards(NIXL_APP, "PrefillWorker", count=NIXL_PREFILL_REPLICAS) as killed:
        responses = asyncio.run(run(killed))
        assert unanswered_at_kill == [True]  # the kill really hit requests in flight
        # Every accepted request is answered: retried on the other prefill replica, or
        # recomputed by decode when its prefill or KV source died.
        assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
        for response in responses:
            choice = response.json()["choices"][0]
            assert choice["message"]["content"] and choice["finish_reason"] == "length"
        # New requests go on while the replacement starts.
        after = asyncio.run(post_chats(cluster.nixl_url, bodies[:3]))
        assert [r.status_code for r in after] == [200] * 3


def _recomputes(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for s in metric_samples(text, "tandem:prefill_recomputes_total"))


def test_lost_prefill_pool_is_served_by_decode_before_the_replacement_starts(cluster):
    recomputed_before = _recomputes(cluster.url)
    with _replaced_afterwards(APP, "PrefillWorker") as killed:
        killed.append(faults.kill_replica(APP, "PrefillWorker"))
        killed_at = time.monotonic()
        with httpx.Client(base_url=cluster.url, timeout=300) as client:
            for i in range(3):
                response = client.post("/v1/chat/completions", json=_chat(f"Question {i}: what is a prism?"))
                assert response.status_code == 200, response.text
        answered_after = time.monotonic() - killed_at
        faults.wait_replaced(APP, "PrefillWorker", killed[0], timeout_s=RECOVERY_TIMEOUT_S)
    replaced_after = time.monotonic() - killed_at
    # Decode recomputed the prompts instead of waiting for a new prefill engine to start.
    assert answered_after < replaced_after, (answered_after, replaced_after)
    assert _recomputes(cluster.url) >= recomputed_before + 3
    print(f"prefill pool lost: answered after {answered_after:.1f}s, replaced after {replaced_after:.1f}s")


@pytest.fixture()
def redis_down(cluster):
    port = faults.stop_redis()
    try:
        yield port
    finally:
        faults.start_redis(port)


def test_redis_outage_keeps_serving_and_state_returns(cluster, redis_down):
    from control_plane.redis_server import ping

    url = f"redis://127.0.0.1:{redis_down}/0"
    assert not ping(url)
    with httpx.Client(timeout=120) as client:
        for _ in range(2):
            plain = client.post(f"{cluster.url}/v1/chat/completions", json=_chat("Name a colour."))
            assert plain.status_code == 200, plain.text
            # API keys in settings keep working; quotas fail open (auth.quota_on_redis_failure).
            keyed = client.post(f"{cluster.secure_url}/v1/chat/completions", json=_chat("Name a colour."),
                                headers={"Authorization": f"Bearer {SECURE_KEY}"})
            assert keyed.status_code == 200, keyed.text
        assert client.get(f"{cluster.url}/health").status_code == 200
        assert client.get(f"{cluster.url}/metrics").status_code == 200

    from control_plane.state import list_workers

    restarted_at = time.time()
    faults.start_redis(redis_down)
    # The workers' heartbeats resume on their own.
    deadline = time.monotonic() + 30
    while True:
        fresh = [w for w in list_workers(url, APP) if w.get("heartbeat_at", 0) > restarted_at]
        if {w["role"] for w in fresh} >= {"prefill", "decode"}:
            break
        assert time.monotonic() < deadline, "worker heartbeats did not come back with Redis"
        time.sleep(1)
