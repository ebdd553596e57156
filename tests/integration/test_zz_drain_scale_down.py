"""Scaling live pools down loses no work (the planner's and `tandem scale`'s scale-down).

Serve removes a replica the same way whoever lowered the target: it stops routing to it,
waits for the calls it is running, then runs its `__del__`. A prefill replica's work does
not end with its calls: the KV it published stays in its engine until decode pulls it. So a
prefill replica taken away with KV not yet pulled must wait for the pull, and a decode
replica taken away must finish its streams. Tested on the nixl app (2 prefill replicas),
resized through Serve's external scaler as `tandem scale` does. Runs after the fault tests
and leaves that app at one prefill and one decode replica."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx
import redis

from bench import fault_injection as faults
from control_plane.cli import scale_pool
from control_plane.redis_server import embedded_url
from control_plane.replicas import replica_ids
from control_plane.state import list_workers
from kv_transport.contract import PARAMS_KEY, PrefillAsk
from tests.conftest import (
    MODEL,
    NIXL_APP,
    NIXL_PREFILL_REPLICAS,
    NIXL_TTL_S,
    metric_samples,
    post_chats,
)
from workers.deployments import HEARTBEAT_PERIOD_S

START_TIMEOUT_S = 300


def _chat(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 8, **extra}


def _system_chat(system: str, content: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 6}


def _replica_states(deployment: str) -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(NIXL_APP)
    return dict(app.deployments[deployment].replica_states) if app else {}


def _wait_for(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout_s:.0f}s"
        time.sleep(0.5)


def _recomputes(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for s in metric_samples(text, "tandem:prefill_recomputes_total"))


async def _publish(handle, bodies: list[dict]) -> list[dict]:
    """Prefills whose KV is published and left unpulled: what the orchestrator sends a
    prefill replica, without the decode call that would follow."""

    async def one(body: dict) -> dict:
        replies = [r async for r in handle.options(stream=True).generate.remote("chat", body)]
        assert replies[0].kind == "response", replies[0]
        return replies[0].body["kv_transfer_params"]

    return await asyncio.gather(*(one({**b, "max_tokens": 1, "kv_transfer_params": PrefillAsk().to_params()})
                                  for b in bodies))


async def _pull(handle, bodies: list[dict], handoffs: list[dict]) -> list[dict]:
    async def one(body: dict, params: dict) -> dict:
        replies = [r async for r in handle.options(stream=True).generate.remote("chat", {**body, "kv_transfer_params": params})]
        assert replies[0].kind == "response", replies[0]
        return replies[0].body

    return await asyncio.gather(*(one(b, p) for b, p in zip(bodies, handoffs, strict=True)))


def _listener(params: dict) -> tuple[str, int]:
    address = params[PARAMS_KEY]["address"]
    return address["host"], int(address["port"])


def test_prefill_scale_down_waits_until_its_published_kv_is_pulled(cluster):
    prefill = cluster.handle("PrefillWorker", NIXL_APP)
    decode = cluster.handle("DecodeWorker", NIXL_APP)
    assert len(faults.replica_actor_names(NIXL_APP, "PrefillWorker")) == NIXL_PREFILL_REPLICAS
    # KV published on both prefill replicas, none pulled. The router keys a request by its
    # system prompt: distinct ones spread over the pool (a few rounds until both have some).
    bodies: list[dict] = []
    handoffs: list[dict] = []
    for round_ in range(6):
        batch = [_system_chat(f"You are harbour guide number {round_ * 6 + i}.",
                              "Describe a harbour at dawn in detail. " * 8) for i in range(6)]
        bodies += batch
        handoffs += asyncio.run(_publish(prefill, batch))
        if len({_listener(p) for p in handoffs}) == NIXL_PREFILL_REPLICAS:
            break
    assert len({_listener(p) for p in handoffs}) == NIXL_PREFILL_REPLICAS, "the prompts did not reach both replicas"
    before = cluster.worker_stats("DecodeWorker", NIXL_APP)
    recomputed_before = _recomputes(cluster.nixl_url)

    # Requests through the ingress are in flight while the pool shrinks.
    async def ingress_requests() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.nixl_url, timeout=300) as client:
            return await asyncio.gather(*(
                client.post("/v1/chat/completions", json=_chat(f"In flight {i}: why do tides happen? " * 20))
                for i in range(4)))

    async def shrink_under_load() -> list[httpx.Response]:
        sent = asyncio.ensure_future(ingress_requests())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(scale_pool, NIXL_APP, "PrefillWorker", 1)
        return await sent

    responses = asyncio.run(shrink_under_load())
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
    # Serve has taken one replica out of the pool; it is still there, waiting for its KV to
    # be pulled (without that wait its engine would be gone within a second or two).
    _wait_for(lambda: _replica_states("PrefillWorker").get("RUNNING") == 1, "the pool never shrank", 60)
    time.sleep(3)
    alive = faults.replica_actor_names(NIXL_APP, "PrefillWorker")
    assert len(alive) == NIXL_PREFILL_REPLICAS, f"the removed replica did not wait for its KV: {alive}"

    answers = asyncio.run(_pull(decode, bodies, handoffs))
    after = cluster.worker_stats("DecodeWorker", NIXL_APP)
    # Every handoff was pulled, the removed replica's included: no failed pull, no recompute.
    assert after["kv_transfers"] - before["kv_transfers"] >= len(bodies), (before, after)
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"], (before, after)
    assert all(a["choices"][0]["message"]["content"] for a in answers)
    assert _recomputes(cluster.nixl_url) == recomputed_before
    # Its KV pulled, the removed replica stops at once, not at its grace's end.
    _wait_for(lambda: len(faults.replica_actor_names(NIXL_APP, "PrefillWorker")) == 1,
              "the removed replica outlived its pulled KV", NIXL_TTL_S / 2)
    assert httpx.post(f"{cluster.nixl_url}/v1/chat/completions", json=_chat("Say hi."), timeout=120).status_code == 200


def _decode_stat(stat: str) -> dict[str, int]:
    """One heartbeat stat of each running decode replica of the app (none known when Redis
    is too busy to answer in time: the caller asks again)."""
    running = replica_ids(NIXL_APP, "DecodeWorker")
    url = embedded_url()  # None when Redis did not answer its ping in time
    try:
        workers = list_workers(url, NIXL_APP) if url else []
    except redis.RedisError:
        return {}
    return {w["replica_id"]: int(w.get("stats", {}).get(stat, 0)) for w in workers
            if w.get("role") == "decode" and w["replica_id"] in running}


def _decode_running() -> dict[str, int]:
    """Streams each decode replica runs."""
    return _decode_stat("running")


def _decode_requests() -> dict[str, int]:
    """Requests each decode replica has served."""
    return _decode_stat("requests_total")


def _until_the_ingress_routes_to_every_decode_replica(url: str, replicas: int, timeout_s: float) -> None:
    """Short chats, two at a time, until every decode replica has served one: Serve reports
    a new replica RUNNING before the ingress's router has it among its candidates."""
    def all_served() -> bool:
        served = _decode_requests()
        return len(served) == replicas and all(served.values())

    deadline = time.monotonic() + timeout_s
    for k in itertools.count(step=2):
        assert time.monotonic() < deadline, f"the ingress never routed to every decode replica: {_decode_requests()}"
        bodies = [_chat(f"Warm-up {k + i}: say hi.", max_tokens=2) for i in range(2)]
        responses = asyncio.run(post_chats(url, bodies, timeout_s=120))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        heard = time.monotonic() + HEARTBEAT_PERIOD_S + 1  # the replicas' next heartbeats
        while time.monotonic() < heard:
            if all_served():
                return
            time.sleep(0.5)


def test_decode_scale_down_finishes_the_streams_it_runs(cluster):
    scale_pool(NIXL_APP, "DecodeWorker", 2)
    _wait_for(lambda: _replica_states("DecodeWorker").get("RUNNING") == 2, "the second decode replica never ran",
              START_TIMEOUT_S)
    _until_the_ingress_routes_to_every_decode_replica(cluster.nixl_url, 2, 120)
    max_tokens = 160
    body = _chat("Tell a long story about a lighthouse.", max_tokens=max_tokens, ignore_eos=True, stream=True,
                 stream_options={"include_usage": True})
    results: list[list[str]] = []

    async def stream(client: httpx.AsyncClient) -> list[str]:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            return [line async for line in response.aiter_lines() if line]

    async def run() -> set[str]:
        async with httpx.AsyncClient(base_url=cluster.nixl_url, timeout=httpx.Timeout(60, read=120)) as client:
            tasks = [asyncio.ensure_future(stream(client)) for _ in range(6)]
            # Both replicas run streams (their heartbeats say so) before one is taken away.
            deadline = time.monotonic() + 60
            while sum(1 for n in (await asyncio.to_thread(_decode_running)).values() if n) < 2:
                assert time.monotonic() < deadline, f"the streams never ran on both replicas: {_decode_running()}"
                await asyncio.sleep(0.5)
            names = set(faults.replica_actor_names(NIXL_APP, "DecodeWorker"))
            await asyncio.to_thread(scale_pool, NIXL_APP, "DecodeWorker", 1)
            results.extend(await asyncio.gather(*tasks))
            return names

    names_before = asyncio.run(run())
    _wait_for(lambda: len(faults.replica_actor_names(NIXL_APP, "DecodeWorker")) == 1,
              "the removed decode replica never stopped", 120)
    assert len(names_before) == 2
    # Every stream ran to its end, also the ones on the replica that was removed.
    for events in results:
        assert events[-1] == "data: [DONE]", events[-3:]
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
        assert any(c["choices"] and c["choices"][0].get("finish_reason") == "length" for c in chunks)
    assert httpx.post(f"{cluster.nixl_url}/v1/chat/completions", json=_chat("Say hi."), timeout=120).status_code == 200
