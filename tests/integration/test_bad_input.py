"""Every kind of bad input gets its OpenAI-shaped error and status; nothing crashes."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "word " * 3000  # > 2048 tokens of context

CASES = [
    # (id, path, raw body or json, status, param)
    ("malformed-json", CHAT, b'{"model": ', 400, None),
    ("not-an-object", CHAT, [1, 2, 3], 400, None),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("negative-max-tokens", CHAT, {"model": MODEL, "messages": MSG, "max_tokens": -5}, 400, "max_tokens"),
    ("huge-max-tokens", CHAT, {"model": MODEL, "messages": MSG, "max_tokens": 10**9}, 400, "max_tokens"),
    ("unknown-field", CHAT, {"model": MODEL, "messages": MSG, "foo": 1}, 400, "foo"),
    ("wrong-type", CHAT, {"model": MODEL, "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("empty-messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad-role", CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("missing-model", CHAT, {"messages": MSG}, 400, "model"),
    ("too-many-stops", CHAT, {"model": MODEL, "messages": MSG, "stop": list("abcde")}, 400, "stop"),
    ("prompt-too-long", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 4}, 400, None),
    ("prompt-too-long-stream", CHAT, {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 4}, 400, None),
    ("completion-too-long", "/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 4}, 400, None),
    ("completion-empty-prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("n-over-the-cap", CHAT, {"model": MODEL, "messages": MSG, "n": 17}, 400, "n"),
    # Bounded before parsing (admission.max_json_values, 262,144 by default): 413.
    ("too-many-json-values", CHAT, {"model": MODEL, "messages": [{"role": "user"}] * 140_000}, 413, None),
    # admission.max_messages (512), then the request model's hard cap (2048).
    ("over-max-messages", CHAT, {"model": MODEL, "messages": MSG * 513}, 400, "messages"),
    ("past-messages-hard-cap", CHAT, {"model": MODEL, "messages": MSG * 2049}, 400, "messages"),
    ("too-many-content-parts", CHAT, {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x"}] * 1025}]}, 400, "messages.0.content"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(http, case):
    _, path, body, status, param = case
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_unknown_slo_class_is_rejected_and_known_ones_served(http):
    body = {"model": MODEL, "messages": MSG, "max_tokens": 2}
    response = http.post(CHAT, json=body, headers={"x-tandem-slo-class": "platinum"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "x-tandem-slo-class"
    assert http.post(CHAT, json=body, headers={"x-tandem-slo-class": "exact"}).status_code == 200


def test_context_length_error_is_coded(http):
    response = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]})
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_typed_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=-1)


def test_cluster_healthy_after_bad_input(http, openai_client):
    for _, path, body, _, _ in CASES:
        if isinstance(body, bytes):
            http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            http.post(path, json=body)
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16,
    )
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.parametrize("value", ["soon", "-1", "0", "inf", "nan"])
def test_malformed_deadline_header_is_a_400(http, value):
    response = http.post(CHAT, json={"model": MODEL, "messages": MSG, "max_tokens": 2},
                         headers={"x-tandem-timeout-s": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "x-tandem-timeout-s"
