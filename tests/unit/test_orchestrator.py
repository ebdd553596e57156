"""The P/D decision logic with scripted worker pools (the real pools are covered by the
integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from routing.orchestrator import (
    NO_PREFILL_REPLICA,
    PrefillOutcome,
    decode_body,
    prefill_body,
    run_prefill,
    run_prefill_watched,
)
from workers.engine import ERROR, RESPONSE, WorkerReply


class ScriptedPool:
    def __init__(self, *replies: WorkerReply, raises: Exception | None = None):
        self.replies = replies
        self.raises = raises
        self.bodies: list[dict[str, Any]] = []

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[WorkerReply]:
        self.bodies.append(body)
        if self.raises:
            raise self.raises
        for reply in self.replies:
            yield reply


BODY = {"model": "m", "messages": [], "stream": True, "max_tokens": 50, "n": 1,
        "stream_options": {"include_usage": True}, "min_tokens": 3, "max_completion_tokens": 50}


def test_prefill_body_asks_for_one_token_and_remote_decode():
    out = prefill_body(BODY)
    assert out["max_tokens"] == 1 and out["max_completion_tokens"] == 1
    assert out["stream"] is False
    assert out["kv_transfer_params"]["do_remote_decode"] is True
    assert "stream_options" not in out and "min_tokens" not in out and "n" not in out
    assert BODY["max_tokens"] == 50  # the client's body is not mutated
    assert "tandem_slo_class" not in out["kv_transfer_params"]
    assert prefill_body(BODY, "relaxed")["kv_transfer_params"]["tandem_slo_class"] == "relaxed"


async def test_prefill_ok_hands_params_to_decode():
    params = {"remote_engine_id": "e", "remote_block_ids": [[1]]}
    pool = ScriptedPool(WorkerReply(RESPONSE, {"kv_transfer_params": params}))
    result = await run_prefill(pool, "chat", BODY)
    assert result.outcome == PrefillOutcome.OK
    assert decode_body(BODY, result)["kv_transfer_params"] == params
    assert pool.bodies[0]["max_tokens"] == 1


async def test_client_errors_go_back_to_the_client():
    error = WorkerReply(ERROR, {"error": {"message": "too long"}}, 400)
    result = await run_prefill(ScriptedPool(error), "chat", BODY)
    assert result.outcome == PrefillOutcome.CLIENT_ERROR and result.error is error


async def test_worker_failures_mean_recompute():
    for pool in (
        ScriptedPool(raises=RuntimeError("replica died")),
        ScriptedPool(WorkerReply(ERROR, {"error": {}}, 500)),
        ScriptedPool(WorkerReply(RESPONSE, {"choices": []})),  # no kv_transfer_params
        ScriptedPool(),  # nothing at all
    ):
        result = await run_prefill(pool, "chat", BODY)
        assert result.outcome == PrefillOutcome.FAILED, pool
        assert "kv_transfer_params" not in decode_body(BODY, result)


class StalledPool:
    """A prefill routed to a replica that died: it waits at the router for a replacement."""

    def __init__(self):
        self.closed = asyncio.Event()

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[WorkerReply]:
        try:
            await asyncio.sleep(3600)
            yield WorkerReply(RESPONSE, {})
        finally:
            self.closed.set()  # the engine request would be aborted here


async def test_prefill_is_given_up_when_the_pool_empties():
    pool = StalledPool()
    replicas = [1]
    asyncio.get_running_loop().call_later(0.2, replicas.clear)
    result = await asyncio.wait_for(
        run_prefill_watched(pool, "chat", BODY, pool_has_replicas=lambda: bool(replicas), poll_s=0.05), 5
    )
    assert result.outcome == PrefillOutcome.FAILED and result.reason == NO_PREFILL_REPLICA
    assert pool.closed.is_set()  # the abandoned prefill stream was closed, not left running


async def test_no_prefill_replica_goes_straight_to_decode():
    pool = ScriptedPool(WorkerReply(RESPONSE, {"kv_transfer_params": {"x": 1}}))
    result = await run_prefill_watched(pool, "chat", BODY, pool_has_replicas=lambda: False)
    assert result.outcome == PrefillOutcome.FAILED and result.reason == NO_PREFILL_REPLICA
    assert pool.bodies == []  # never sent


async def test_watched_prefill_passes_results_through():
    params = {"remote_engine_id": "e"}
    pool = ScriptedPool(WorkerReply(RESPONSE, {"kv_transfer_params": params}))
    result = await run_prefill_watched(pool, "chat", BODY, pool_has_replicas=lambda: True, poll_s=0.01)
    assert result.outcome == PrefillOutcome.OK and result.kv_transfer_params == params


async def test_cancelled_request_closes_the_prefill_stream():
    pool = StalledPool()
    task = asyncio.ensure_future(run_prefill_watched(pool, "chat", BODY, pool_has_replicas=lambda: True, poll_s=0.05))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.wait_for(pool.closed.wait(), 2)
