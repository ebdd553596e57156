"""The prompt's part of an answer (prompt logprobs, a completion's echo with logprobs) is
computed by the prefill and merged into decode's answer where vLLM puts it; and the
orchestrator's plan for one request, with scripted pools. The live comparison with a
colocated engine is in tests/integration/test_pd_parity.py."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

from kv_transport.contract import TransferDescription, handoff_params
from routing.merge import PromptPart
from routing.orchestrator import Orchestrator, RequestOptions, decode_body, prefill_body
from workers.engine import CHUNK, RESPONSE, WorkerReply

HANDOFF = handoff_params(TransferDescription("t" * 32, {"host": "198.18.0.10", "port": 7000}, 2, 1, 16))

# What vLLM answers for "Hi there" + " you" (two prompt tokens, one generated).
PROMPT_LOGPROBS = [None, {"1": {"logprob": -1.0, "rank": 1, "decoded_token": " there"}}]
PREFILL_ECHO = {  # completions, echo, logprobs=1, max_tokens=0: the prompt alone
    "id": "cmpl-p", "object": "text_completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "text": "Hi there", "finish_reason": "length", "prompt_logprobs": PROMPT_LOGPROBS,
                 "logprobs": {"tokens": ["Hi", " there"], "token_logprobs": [None, -1.0],
                              "top_logprobs": [None, {" there": -1.0}], "text_offset": [0, 2]}}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2},
    "kv_transfer_params": HANDOFF,
}


def _decode_choice(index: int = 0, text: str = " you") -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": "length",
            "logprobs": {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [{text: -0.5}], "text_offset": [0]}}


def test_only_prompt_logprobs_and_an_echo_with_logprobs_have_a_prompt_part():
    assert PromptPart.needed("chat", {"prompt_logprobs": 0}) is not None
    assert PromptPart.needed("completions", {"echo": True, "logprobs": 1}) is not None
    # An echo without logprobs needs nothing computed: decode echoes the text itself.
    assert PromptPart.needed("completions", {"echo": True}) is None
    assert PromptPart.needed("chat", {"echo": True, "logprobs": True}) is None  # chat's echo is text
    assert PromptPart.needed("chat", {"logprobs": True, "top_logprobs": 2}) is None


def test_the_prefill_computes_the_prompt_part_and_decode_does_not():
    body = {"model": "m", "prompt": "Hi there", "echo": True, "logprobs": 1, "prompt_logprobs": 1, "max_tokens": 5}
    part = PromptPart.needed("completions", body)
    prefill = prefill_body(body, prompt_part=part)
    assert prefill["echo"] is True and prefill["logprobs"] == 1 and prefill["prompt_logprobs"] == 1
    assert prefill["max_tokens"] == 0  # vLLM's "the prompt alone"
    from routing.orchestrator import PrefillOutcome, PrefillResult

    decode = decode_body(body, PrefillResult(PrefillOutcome.OK, kv_transfer_params=HANDOFF), part)
    assert decode["echo"] is False and "prompt_logprobs" not in decode and decode["logprobs"] == 1
    assert decode["max_tokens"] == 5 and decode["kv_transfer_params"] == HANDOFF
    # Recomputing (no handoff), decode computes the whole answer as a vLLM server would.
    assert decode_body(body, PrefillResult(PrefillOutcome.FAILED), part) == body


def test_chat_prompt_logprobs_go_on_the_response():
    part = PromptPart.needed("chat", {"prompt_logprobs": 1})
    part.take_prefill({"choices": [{"index": 0}], "prompt_logprobs": PROMPT_LOGPROBS})
    merged = part.merge({"choices": [{"index": 0, "message": {"content": "x"}}]})
    assert merged["prompt_logprobs"] == PROMPT_LOGPROBS


def test_an_echoed_completion_starts_with_the_prompt_and_its_logprobs():
    part = PromptPart.needed("completions", {"echo": True, "logprobs": 1})
    part.take_prefill(copy.deepcopy(PREFILL_ECHO))
    merged = part.merge({"choices": [_decode_choice(0), _decode_choice(1, " me")]})
    first, second = merged["choices"]
    assert first["text"] == "Hi there you" and second["text"] == "Hi there me"
    assert first["logprobs"] == {
        "tokens": ["Hi", " there", " you"],
        "token_logprobs": [None, -1.0, -0.5],
        "top_logprobs": [None, {" there": -1.0}, {" you": -0.5}],
        # Offsets run on from the prompt's tokens, as vLLM counts them.
        "text_offset": [0, 2, 8],
    }
    assert first["prompt_logprobs"] == PROMPT_LOGPROBS == second["prompt_logprobs"]


def _sse(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events)


async def _replies(*items: WorkerReply) -> AsyncIterator[WorkerReply]:
    for item in items:
        yield item


async def test_an_echoed_stream_leads_each_choice_with_the_prompt_once():
    part = PromptPart.needed("completions", {"echo": True, "logprobs": 1, "stream": True})
    part.take_prefill(copy.deepcopy(PREFILL_ECHO))

    def chunk(index: int, text: str, offset: int) -> dict[str, Any]:
        return {"id": "c", "choices": [{"index": index, "text": text, "logprobs": {
            "tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [{text: -0.5}], "text_offset": [offset]}}]}

    stream = part.merge_stream(_replies(
        WorkerReply(CHUNK, _sse(chunk(0, " you", 0))),
        WorkerReply(CHUNK, _sse(chunk(1, " me", 0))),
        WorkerReply(CHUNK, _sse(chunk(0, " too", 4))),
        WorkerReply(CHUNK, "data: [DONE]\n\n"),
    ))
    out = [reply.body async for reply in stream]
    events = [json.loads(c[len("data: "):]) for c in out[:3]]
    assert [e["choices"][0]["text"] for e in events] == ["Hi there you", "Hi there me", " too"]
    assert events[0]["choices"][0]["logprobs"]["text_offset"] == [0, 2, 8]
    assert events[2]["choices"][0]["logprobs"]["text_offset"] == [12]  # after "Hi there you"
    assert out[3] == "data: [DONE]\n\n"


# ---- the orchestrator's plan for one request ---------------------------------------------


class Pool:
    def __init__(self, *replies: WorkerReply):
        self.replies = replies
        self.bodies: list[dict[str, Any]] = []

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[WorkerReply]:
        self.bodies.append(body)
        for reply in self.replies:
            yield reply

    def separately(self) -> Pool:
        return self


async def _answer(orchestrator: Orchestrator, endpoint: str, body: dict[str, Any]) -> list[WorkerReply]:
    return [reply async for reply in await orchestrator.start(endpoint, body, RequestOptions("standard"))]


async def test_n_samples_cost_one_prefill_of_one_sample():
    prefill = Pool(WorkerReply(RESPONSE, {"kv_transfer_params": HANDOFF}))
    decode = Pool(WorkerReply(RESPONSE, {"choices": [{"index": i} for i in range(4)]}))
    orchestrator = Orchestrator("disaggregated", prefill=prefill, decode=decode)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 4, "seed": 7}
    [reply] = await _answer(orchestrator, "chat", body)
    assert len(reply.body["choices"]) == 4
    assert len(prefill.bodies) == 1 and "n" not in prefill.bodies[0]
    assert prefill.bodies[0]["kv_transfer_params"]["tandem_slo_class"] == "standard"
    # Decode gets the n samples and the seed: the engine runs them as one request's children.
    assert decode.bodies == [{**body, "kv_transfer_params": HANDOFF}]


async def test_beam_search_runs_on_decode_alone():
    prefill, decode = Pool(), Pool(WorkerReply(RESPONSE, {"choices": []}))
    orchestrator = Orchestrator("disaggregated", prefill=prefill, decode=decode)
    body = {"model": "m", "prompt": "hi", "use_beam_search": True, "n": 2}
    await _answer(orchestrator, "completions", body)
    assert prefill.bodies == [] and decode.bodies == [body]


async def test_prompt_logprobs_come_from_the_prefill():
    prefill = Pool(WorkerReply(RESPONSE, copy.deepcopy(PREFILL_ECHO)))
    decode = Pool(WorkerReply(RESPONSE, {"choices": [_decode_choice()]}))
    orchestrator = Orchestrator("disaggregated", prefill=prefill, decode=decode)
    body = {"model": "m", "prompt": "Hi there", "prompt_logprobs": 1, "max_tokens": 1}
    [reply] = await _answer(orchestrator, "completions", body)
    assert reply.body["choices"][0]["prompt_logprobs"] == PROMPT_LOGPROBS
    assert "prompt_logprobs" not in decode.bodies[0]


async def test_a_prefill_answering_a_malformed_description_means_recompute():
    bad = {"do_remote_prefill": True, "tandem": {"transfer_id": "x", "address": "not an address"}}
    prefill = Pool(WorkerReply(RESPONSE, {"kv_transfer_params": bad}))
    decode = Pool(WorkerReply(RESPONSE, {"choices": []}))
    orchestrator = Orchestrator("disaggregated", prefill=prefill, decode=decode)
    body = {"model": "m", "prompt": "hi"}
    await _answer(orchestrator, "completions", body)
    assert decode.bodies == [body]  # no handoff: decode computes the prompt
