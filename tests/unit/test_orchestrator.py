"""The P/D decision logic with scripted worker pools (the real pools are covered by the
integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from routing.orchestrator import (
    NO_PREFILL_REPLICA,
    Orchestrator,
    PrefillOutcome,
    decode_body,
    prefill_body,
    run_prefill,
    run_prefill_watched,
)
from workers.engine import CHUNK, ERROR, RESPONSE, WorkerReply


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


async def test_a_lent_request_runs_whole_on_the_prefill_pool():
    from routing.disagg import PrefillDecider, PrefillPlanInput

    chunks = [WorkerReply(CHUNK, 'data: {"choices": []}\n\n'), WorkerReply(CHUNK, "data: [DONE]\n\n")]
    prefill, decode = ScriptedPool(*chunks), ScriptedPool(*chunks)
    busy = PrefillPlanInput(prompt_tokens=10, decode_running=4, prefill_running=1, prefill_queued_tokens=0)
    orchestrator = Orchestrator("disaggregated", prefill=prefill, decode=decode,
                                decider=PrefillDecider("always", lend_decode_at=4), plan_input=lambda *_: busy)
    replies = [r async for r in await orchestrator.start("chat", BODY)]
    assert [r.body for r in replies] == [c.body for c in chunks]
    # The client's body as it is: no one-token prefill, no KV handoff, nothing on decode.
    assert prefill.bodies == [BODY] and not decode.bodies


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


# ---- batched prompts ---------------------------------------------------------------------

from routing.merge import batch_prompts, merge_responses, run_batch, split_batch  # noqa: E402


def test_only_a_list_of_prompts_is_a_batch():
    assert batch_prompts("completions", {"prompt": "a"}) is None
    assert batch_prompts("completions", {"prompt": [1, 2, 3]}) is None  # one prompt of token ids
    assert batch_prompts("completions", {"prompt": ["a", "b"]}) == ["a", "b"]
    assert batch_prompts("completions", {"prompt": [[1, 2], [3]]}) == [[1, 2], [3]]
    assert batch_prompts("chat", {"prompt": ["a", "b"]}) is None
    parts = split_batch({"prompt": ["a", "b"], "max_tokens": 3}, ["a", "b"])
    assert parts == [{"prompt": "a", "max_tokens": 3}, {"prompt": "b", "max_tokens": 3}]


def _response(text: str, prompt_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {"id": f"cmpl-{text}", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 2, "total_tokens": prompt_tokens + 2,
                      "prompt_tokens_details": {"cached_tokens": cached}},
            "metrics": {"ttft": 1.0}}


def test_merged_response_is_what_one_server_returns_for_the_batch():
    merged = merge_responses([_response("a", 5), _response("b", 7, cached=4)])
    assert [(c["index"], c["text"]) for c in merged["choices"]] == [(0, "a"), (1, "b")]
    assert merged["usage"]["prompt_tokens"] == 12 and merged["usage"]["completion_tokens"] == 4
    assert merged["usage"]["total_tokens"] == 16
    assert merged["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}  # the last prompt's, as vLLM
    assert merged["id"] == "cmpl-a" and "metrics" not in merged  # per-request metrics: one stream only
    two = merge_responses([_response("a", 5), _response("b", 7)], n=2)
    assert [c["index"] for c in two["choices"]] == [0, 2]


class ClosingStream:
    """A reply stream that records whether it was closed (what aborts an engine request)."""

    def __init__(self, *replies: WorkerReply, hang: bool = False):
        self.replies = list(replies)
        self.hang = hang
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> WorkerReply:
        if self.replies:
            return self.replies.pop(0)
        if self.hang:
            await asyncio.sleep(3600)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


async def _started(stream):
    return stream


async def _collect(replies) -> list[WorkerReply]:
    return [reply async for reply in replies]


async def test_a_batch_of_responses_merges_in_prompt_order():
    streams = [ClosingStream(WorkerReply(RESPONSE, _response(t, 3))) for t in "abc"]
    out = await _collect(run_batch([_started(s) for s in streams]))
    assert len(out) == 1 and out[0].kind == RESPONSE
    assert [c["text"] for c in out[0].body["choices"]] == ["a", "b", "c"]
    assert all(s.closed for s in streams)


def _sse(event: dict[str, Any] | str) -> str:
    return f"data: {event if isinstance(event, str) else __import__('json').dumps(event)}\n\n"


def _chunk(rid: str, text: str) -> WorkerReply:
    return WorkerReply(CHUNK, _sse({"id": rid, "created": 9, "object": "text_completion", "model": "m",
                                    "choices": [{"index": 0, "text": text, "finish_reason": None}]}))


def _usage_chunk(rid: str, prompt_tokens: int) -> WorkerReply:
    return WorkerReply(CHUNK, _sse({"id": rid, "created": 9, "object": "text_completion", "model": "m",
                                    "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 2,
                                                             "total_tokens": prompt_tokens + 2}}))


async def test_a_batch_of_streams_merges_into_one_stream():
    import json

    done = WorkerReply(CHUNK, _sse("[DONE]"))
    a = ClosingStream(_chunk("x", "a1"), _chunk("x", "a2"), _usage_chunk("x", 3), done)
    b = ClosingStream(_chunk("y", "b1"), _usage_chunk("y", 4), done)
    out = await _collect(run_batch([_started(a), _started(b)]))
    events = [e for reply in out for e in reply.body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and sum(e == "data: [DONE]" for e in events) == 1
    parsed = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {p["id"] for p in parsed} == {"x"}  # one request id, as one server answers
    texts = {(c["index"], c["text"]) for p in parsed for c in p["choices"]}
    assert texts == {(0, "a1"), (0, "a2"), (1, "b1")}
    usage = [p for p in parsed if not p["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["prompt_tokens"] == 7 and usage[0]["usage"]["completion_tokens"] == 4
    assert a.closed and b.closed


async def test_a_prompts_stream_ending_before_done_fails_the_batch_rather_than_end_it_whole():
    done = WorkerReply(CHUNK, _sse("[DONE]"))
    a = ClosingStream(_chunk("x", "a1"), _usage_chunk("x", 3), done)
    b = ClosingStream(_chunk("y", "b1"))  # cut: no usage, no [DONE]
    out = await _collect(run_batch([_started(a), _started(b)]))
    assert out[-1].kind == ERROR and out[-1].status == 502
    assert not any(r.kind == CHUNK and "[DONE]" in r.body for r in out)


async def test_one_prompts_error_is_the_batchs_and_aborts_the_others():
    error = WorkerReply(ERROR, {"error": {"message": "too long"}}, 400)
    good = ClosingStream(_chunk("x", "a1"), hang=True)
    bad = ClosingStream(error)
    out = await _collect(run_batch([_started(good), _started(bad)]))
    assert [r.kind for r in out] == [ERROR] and out[0].status == 400
    assert good.closed and bad.closed


async def test_an_abandoned_batch_aborts_every_prompt():
    streams = [ClosingStream(_chunk("x", "a"), hang=True), ClosingStream(_chunk("y", "b"), hang=True)]
    merged = run_batch([_started(s) for s in streams])
    first = await anext(merged)
    assert first.kind == CHUNK
    await merged.aclose()  # the client went away mid-stream
    assert all(s.closed for s in streams)


async def test_a_failing_start_fails_the_batch_and_closes_the_started():
    started = ClosingStream(WorkerReply(RESPONSE, _response("a", 3)))

    async def broken():
        raise RuntimeError("prefill refused")

    merged = run_batch([_started(started), broken()])
    try:
        await anext(merged)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failure must reach the caller")
    assert started.closed
