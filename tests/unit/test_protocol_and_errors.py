from __future__ import annotations

import pytest
from pydantic import ValidationError

from routing.errors import error_body, from_engine_error
from routing.protocol import ChatCompletionRequest, CompletionRequest, forwarded_body

MSG = [{"role": "user", "content": "hi"}]


def test_forwarded_body_keeps_only_what_the_client_set():
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "temperature": 0})
    assert forwarded_body(request) == {"model": "m", "messages": MSG, "temperature": 0.0}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": MSG, "unknown": 1},
        {"model": "m", "messages": MSG, "max_tokens": 0},
        {"model": "m", "messages": MSG, "temperature": 3},
        {"model": "m", "messages": MSG, "top_p": 0},
        {"model": "m", "messages": MSG, "n": 0},
        {"model": "m", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]},
        {"model": "m", "messages": MSG, "stream_options": {"bogus": True}},
        {"model": "", "messages": MSG},
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        # The P/D handoff is Tandem's to set, never a client's: neither as a field...
        {"model": "m", "messages": MSG, "kv_transfer_params": {"do_remote_prefill": True}},
        {"model": "m", "messages": MSG, "ec_transfer_params": {}},
        # ...nor through the extra args vLLM copies next to it.
        {"model": "m", "messages": MSG, "vllm_xargs": {"kv_transfer_params": "x"}},
        {"model": "m", "messages": MSG, "truncation_side": "middle"},
    ],
)
def test_chat_rejects(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_chat_accepts_content_parts_and_tool_messages():
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "tool", "content": "42", "tool_call_id": "t1"},
            ],
            "max_completion_tokens": 5,
        }
    )
    assert request.output_budget() == 5


@pytest.mark.parametrize("prompt", ["", []])
def test_completion_rejects_empty_prompt(prompt):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})


def test_completion_accepts_token_ids():
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]


def test_error_shape():
    assert error_body(429, "slow down") == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}
    }


def test_engine_errors_are_normalised():
    vllm_error = {"error": {"message": "This model's maximum context length is 2048 tokens.",
                            "type": "BadRequestError", "param": "input_tokens", "code": 400}}
    err = from_engine_error(vllm_error, 400)
    assert err.status == 400
    assert err.body()["error"] == {
        "message": "This model's maximum context length is 2048 tokens.",
        "type": "invalid_request_error",
        "param": "input_tokens",
        "code": "context_length_exceeded",
    }


def _vllm_request_models():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion

    return [(VllmChat, ChatCompletionRequest), (VllmCompletion, CompletionRequest)]


@pytest.mark.parametrize("pair", _vllm_request_models(), ids=["chat", "completions"])
def test_every_field_vllm_accepts_is_accepted_but_the_handoff(pair):
    """Parity with the installed vLLM's server: a field it takes and Tandem refused would
    be a 400 that a vLLM client never sees (the README's parameter table lists each)."""
    vllm_model, ours = pair
    missing = set(vllm_model.model_fields) - set(ours.model_fields)
    assert missing == {"kv_transfer_params", "ec_transfer_params"}
    # best_of: accepted and ignored, as vLLM ignores it (it has no such field any more).
    assert set(ours.model_fields) - set(vllm_model.model_fields) <= {"best_of"}


def test_the_readme_table_lists_every_parameter():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("### Every request parameter under P/D"):]
    table = table[:table.index("\n## ")]
    for vllm_model, _ in _vllm_request_models():
        for name in vllm_model.model_fields:
            assert f"`{name}`" in table, name
