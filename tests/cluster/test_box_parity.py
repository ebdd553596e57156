"""Everything a vLLM client sends works under P/D: each parameter of chat and completions
that vLLM 0.32's server accepts, sent with the official OpenAI client through prefill and
decode on different nodes, gives what a colocated engine gives for the same body (float32
engines on both sides, so greedy and seeded answers are well defined), or the same error.

n > 1 costs one prefill and one KV transfer (the engines' own counters); prompt logprobs
and an echo's logprobs come from the prefill. docs/parameters.md lists each parameter and
the case here that covers it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import openai
import pytest

from tests.cluster.helpers import BoxCluster
from tests.conftest import MODEL
from workers.deployments import HEARTBEAT_PERIOD_S

TOKENS = 8
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROMPT = "The three most populous cities in Europe are"
# Fields that differ by design: ids and timestamps; cached_tokens counts the KV the decode
# engine received (the colocated engine computed it); decode answers for a handoff.
_VOLATILE = {"id", "created", "kv_transfer_params", "metrics", "system_fingerprint"}


def _normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()
                if k not in _VOLATILE and k != "prompt_tokens_details" and v is not None}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def _assert_same(pd: Any, ref: Any, path: str = "") -> None:
    """Equal, floats to 1e-3 (float32 logits computed by two engines in different batch
    shapes: the same tokens, logprobs equal to a few ulps of their sum)."""
    if isinstance(ref, dict):
        assert isinstance(pd, dict) and set(pd) == set(ref), (path, sorted(pd), sorted(ref))
        for key in ref:
            _assert_same(pd[key], ref[key], f"{path}.{key}")
    elif isinstance(ref, list):
        assert isinstance(pd, list) and len(pd) == len(ref), (path, pd, ref)
        for i, (a, b) in enumerate(zip(pd, ref, strict=True)):
            _assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float) and not isinstance(ref, bool):
        assert isinstance(pd, (int, float)) and (math.isclose(pd, ref, abs_tol=1e-3) or pd == ref), (path, pd, ref)
    else:
        assert pd == ref, (path, pd, ref)


def _call(client: openai.OpenAI, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, the answer as JSON: a response, or the stream's chunks)."""
    body = {"model": MODEL, **body}
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    first = {k: body.pop(k) for k in ("model", "messages", "prompt", "stream") if k in body}
    try:
        answer = create(**first, extra_body=body)
    except openai.APIStatusError as exc:
        return exc.status_code, None
    if first.get("stream"):
        return 200, [chunk.model_dump() for chunk in answer]
    return 200, answer.model_dump()


def _stream_by_choice(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream as what a client reads from it: per choice index, its text, logprobs,
    finish reason and (continuous usage stats) each chunk's usage; the final usage chunk.
    Not the order in which choices interleave: under P/D one sample pulls the KV and the
    others start a step after it."""
    choices: dict[int, dict[str, Any]] = {}
    usage = []
    for chunk in chunks:
        if chunk.get("usage") and not chunk.get("choices"):
            usage.append(_normalized(chunk["usage"]))
        for choice in chunk.get("choices") or []:
            joined = choices.setdefault(choice["index"], {"text": "", "logprobs": [], "finish_reason": None,
                                                          "usage": []})
            if chunk.get("usage"):
                joined["usage"].append(_normalized(chunk["usage"]).get("completion_tokens"))
            delta = choice.get("delta") or {}
            joined["text"] += (delta.get("content") or "") if "delta" in choice else (choice.get("text") or "")
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                joined["logprobs"].append(_normalized(logprobs))
            joined["finish_reason"] = choice.get("finish_reason") or joined["finish_reason"]
    return {"choices": dict(sorted(choices.items())), "usage": usage}


def _same_outcome(openai_client, reference_client, endpoint: str, body: dict[str, Any]) -> Any:
    pd_status, pd = _call(openai_client, endpoint, dict(body))
    ref_status, ref = _call(reference_client, endpoint, dict(body))
    assert pd_status == ref_status, (body, pd_status, ref_status)
    if ref is None:
        return None
    if body.get("stream"):
        _assert_same(_stream_by_choice(pd), _stream_by_choice(ref))
    else:
        _assert_same(_normalized(pd), _normalized(ref))
    return pd


# ---- n > 1: one prefill, one transfer --------------------------------------------------


def _counters(cluster: BoxCluster) -> tuple[int, int, int]:
    """(prefill engine requests, decode engine requests, decode's KV pulls) from the
    workers' heartbeats, once they have settled."""

    def read() -> tuple[int, int, int]:
        prefill, decode = cluster.worker("prefill")["stats"], cluster.worker("decode")["stats"]
        return prefill["requests_total"], decode["requests_total"], decode["kv_transfers"]

    last = read()
    while True:
        time.sleep(HEARTBEAT_PERIOD_S + 1)
        now = read()
        if now == last:
            return now
        last = now


@pytest.mark.parametrize("n", [2, 4])
def test_n_samples_cost_one_prefill_and_one_transfer_and_equal_colocated(
    cluster: BoxCluster, openai_client, reference_client, n
):
    before = _counters(cluster)
    body = {"prompt": f"{PROMPT} (sample {n})", "max_tokens": 16, "n": n, "temperature": 1.0, "seed": 1234}
    answer = _same_outcome(openai_client, reference_client, "completions", body)
    after = _counters(cluster)
    assert [c["index"] for c in answer["choices"]] == list(range(n))
    assert len({c["text"] for c in answer["choices"]}) > 1  # n samples, not one n times
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 1, 1)
    assert cluster.blocks_free("DecodeWorker") and cluster.blocks_free("PrefillWorker")


def test_n_seeded_chat_samples_are_the_colocated_answers(openai_client, reference_client):
    answer = _same_outcome(openai_client, reference_client, "chat",
                           {"messages": QUESTION, "max_tokens": TOKENS, "n": 3, "temperature": 1.0, "seed": 9})
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]


def test_n_with_greedy_sampling_is_refused_as_vllm_refuses_it(openai_client, reference_client):
    # vLLM: "n must be 1 when using greedy sampling"; the same 400 through P/D.
    assert _call(openai_client, "chat", {"messages": QUESTION, "n": 2, "temperature": 0})[0] == 400
    _same_outcome(openai_client, reference_client, "chat", {"messages": QUESTION, "n": 2, "temperature": 0})


def test_n_streamed_with_usage_and_logprobs(openai_client, reference_client):
    _same_outcome(openai_client, reference_client, "chat", {
        "messages": QUESTION, "max_tokens": TOKENS, "n": 2, "temperature": 0.8, "seed": 5, "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
    })
    _same_outcome(openai_client, reference_client, "completions", {
        "prompt": PROMPT, "max_tokens": TOKENS, "n": 3, "temperature": 0.8, "seed": 6, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "logprobs": 2,
    })


def test_a_batch_with_n_samples_each(openai_client, reference_client):
    answer = _same_outcome(openai_client, reference_client, "completions", {
        "prompt": ["Apples, pears and", "Once upon a time"], "max_tokens": TOKENS, "n": 2, "temperature": 0.9,
        "seed": 3,
    })
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]


# ---- the prompt's part, from the prefill ------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_prompt_logprobs_equal_colocated(openai_client, reference_client, endpoint):
    prompt = {"messages": QUESTION} if endpoint == "chat" else {"prompt": PROMPT}
    answer = _same_outcome(openai_client, reference_client, endpoint,
                           {**prompt, "max_tokens": TOKENS, "temperature": 0, "prompt_logprobs": 2})
    found = answer["prompt_logprobs"] if endpoint == "chat" else answer["choices"][0]["prompt_logprobs"]
    assert found and found[0] is None and len(found) == answer["usage"]["prompt_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_equals_colocated(openai_client, reference_client, stream):
    answer = _same_outcome(openai_client, reference_client, "completions", {
        "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0.8, "seed": 4, "echo": True, "logprobs": 2, "n": 2,
        "stream": stream,
    })
    if not stream:
        assert answer["choices"][0]["text"].startswith(PROMPT)


# ---- every other parameter ---------------------------------------------------------------

CHAT = {"messages": QUESTION, "max_tokens": TOKENS, "temperature": 0}
COMPLETION = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
SAMPLED = {"temperature": 0.9, "seed": 42}
JSON_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": JSON_SCHEMA}}
# (id, endpoint, fields over the base body). docs/parameters.md names these ids.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat-max_completion_tokens", "chat", {"max_completion_tokens": 5}),
    ("chat-sampling", "chat", {**SAMPLED, "top_p": 0.9, "top_k": 20, "min_p": 0.05}),
    ("chat-penalties", "chat", {"frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}),
    ("chat-logit_bias", "chat", {"logit_bias": {"3575": -100, "12": 5}}),
    ("chat-stop", "chat", {"stop": [" Paris", "."], "include_stop_str_in_output": True}),
    ("chat-stop_token_ids", "chat", {"stop_token_ids": [30]}),
    ("chat-min_tokens-ignore_eos", "chat", {"min_tokens": 6, "ignore_eos": True}),
    ("chat-logprobs", "chat", {"logprobs": True, "top_logprobs": 3}),
    ("chat-logprob_token_ids", "chat", {"logprobs": True, "logprob_token_ids": [30, 3575]}),
    ("chat-allowed_token_ids", "chat", {"allowed_token_ids": list(range(256, 2256))}),
    ("chat-bad_words", "chat", {"bad_words": ["Paris", " capital"]}),
    ("chat-special_tokens", "chat", {"skip_special_tokens": False, "spaces_between_special_tokens": False,
                                     "add_special_tokens": True}),
    ("chat-token_ids", "chat", {"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": True}),
    ("chat-token_offsets-prompt_text", "chat", {"return_token_offsets": True, "return_prompt_text": True}),
    ("chat-continue_final_message", "chat", {
        "messages": [*QUESTION, {"role": "assistant", "content": "The capital of France is"}],
        "add_generation_prompt": False, "continue_final_message": True, "echo": True}),
    ("chat-documents-template_kwargs", "chat", {"documents": [{"title": "Note", "text": "Paris is in France."}],
                                                "chat_template_kwargs": {"enable_thinking": False}}),
    ("chat-chat_template", "chat", {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}),
    ("chat-reasoning", "chat", {"include_reasoning": False, "reasoning_effort": "low", "thinking_token_budget": 4}),
    ("chat-truncation", "chat", {"truncate_prompt_tokens": 12, "truncation_side": "left"}),
    ("chat-structured_outputs", "chat", {"structured_outputs": {"choice": ["yes", "no"]}}),
    ("chat-response_format", "chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "city", "schema": JSON_SCHEMA}}, "max_tokens": 16}),
    ("chat-tools", "chat", {"tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": False}),
    ("chat-stream_interval", "chat", {"stream": True, "stream_interval": 3}),
    ("chat-beam_search", "chat", {"use_beam_search": True, "n": 2, "length_penalty": 0.8}),
    ("chat-ids-and-tags", "chat", {"user": "u-1", "request_id": "req-parity-1", "session_id": "s-1",
                                   "cache_salt": "salt-1", "priority": 0, "seed": 7}),
    ("chat-engine-extras", "chat", {"vllm_xargs": {"note": "x"}, "repetition_detection": None,
                                    "watermarking": None, "routed_experts_prompt_start": 0}),
    ("chat-multimodal-kwargs", "chat", {"mm_processor_kwargs": {}, "media_io_kwargs": {}, "mm_payload": "none",
                                        "return_mm_kwargs": False}),
    ("completions-logprobs", "completions", {"logprobs": 3}),
    ("completions-echo", "completions", {"echo": True}),
    ("completions-suffix", "completions", {"suffix": " and that is all."}),
    ("completions-best_of", "completions", {"best_of": 2}),
    ("completions-token_prompt", "completions", {"prompt": [504, 1729, 2641, 1079, 281, 4092]}),
    ("completions-sampling", "completions", {**SAMPLED, "top_k": 10, "presence_penalty": 0.3}),
    ("completions-stop", "completions", {"stop": [","], "include_stop_str_in_output": False}),
    ("completions-structured_outputs", "completions", {"structured_outputs": {"regex": "[A-Z][a-z]+, [A-Z][a-z]+"}}),
    ("completions-response_format", "completions", {"response_format": {"type": "json_object"}, "max_tokens": 12}),
    ("completions-prompt_embeds", "completions", {"prompt_embeds": "AAAA"}),
    ("completions-token_ids", "completions", {"return_token_ids": True, "return_token_offsets": True}),
    ("completions-beam_search", "completions", {"use_beam_search": True, "n": 2}),
    ("completions-truncation", "completions", {"truncate_prompt_tokens": 4}),
    ("completions-stream", "completions", {"stream": True, "stream_options": {"include_usage": True},
                                           "logprobs": 1}),
]


@pytest.mark.parametrize(("endpoint", "fields"), [(e, f) for _, e, f in CASES], ids=[c[0] for c in CASES])
def test_every_parameter_gives_what_colocated_gives(openai_client, reference_client, endpoint, fields):
    base = CHAT if endpoint == "chat" else COMPLETION
    body = {k: v for k, v in {**base, **fields}.items() if v is not None}
    _same_outcome(openai_client, reference_client, endpoint, body)
