"""API keys on a live ingress (the `secure` app: keys required, the reference engine)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL, SECURE_APP, SECURE_KEY

MSG = [{"role": "user", "content": "Say hi."}]


@pytest.fixture()
def secure(cluster):
    with httpx.Client(base_url=cluster.secure_url, timeout=120) as client:
        yield client


def test_missing_or_wrong_keys_get_401_before_anything_else(secure):
    # Even a malformed body: the key is checked first, as OpenAI does.
    for headers in ({}, {"Authorization": "Bearer tk-wrong"}, {"Authorization": "Basic abc"}):
        response = secure.post("/v1/chat/completions", content=b'{"model": ', headers=headers)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert secure.get("/v1/models").status_code == 401
    # Probes and scrapes stay open.
    assert secure.get("/health").status_code == 200
    assert secure.get("/metrics").status_code == 200


def test_a_valid_key_is_served_through_the_sdk(cluster):
    client = openai.OpenAI(base_url=f"{cluster.secure_url}/v1", api_key=SECURE_KEY, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, stream=True))
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in chunks)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{cluster.secure_url}/v1", api_key="tk-bad", max_retries=0).models.list()


def test_a_created_key_with_a_request_limit_gets_429_with_retry_after(cluster, secure):
    from control_plane.redis_server import embedded_url
    from routing.auth import KeyLimits, KeyStore

    store = KeyStore(embedded_url(), SECURE_APP)
    key, _ = store.create("limited-test-user", KeyLimits(requests_per_min=2))
    try:
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, "messages": MSG, "max_tokens": 2}
        # Five quick requests span at most two one-minute windows: at most four pass.
        responses = [secure.post("/v1/chat/completions", json=body, headers=headers) for _ in range(5)]
        codes = [r.status_code for r in responses]
        assert codes[:2] == [200, 200] and set(codes) <= {200, 429} and 429 in codes, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        store.revoke("limited-test-user")


def test_admission_sheds_a_second_request_while_one_is_in_flight(cluster):
    """The secure app admits one request at a time: a second one gets 429 at once, with
    Retry-After, instead of queueing; the first still completes."""
    headers = {"Authorization": f"Bearer {SECURE_KEY}"}
    body = {"model": MODEL, "messages": MSG, "max_tokens": 48, "stream": True}
    with httpx.Client(base_url=cluster.secure_url, timeout=120, headers=headers) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as held:
            lines = held.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # in flight now
            shed = client.post("/v1/chat/completions", json={**body, "stream": False})
            assert shed.status_code == 429, shed.text
            assert shed.json()["error"]["code"] == "overloaded"
            assert int(shed.headers["retry-after"]) >= 1
            rest = [line for line in lines if line.startswith("data:")]
            assert rest[-1] == "data: [DONE]"
        # The slot was returned: the next request is served.
        after = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert after.status_code == 200, after.text


def test_oversized_bodies_and_too_many_messages_are_refused(cluster):
    headers = {"Authorization": f"Bearer {SECURE_KEY}"}
    with httpx.Client(base_url=cluster.secure_url, timeout=60, headers=headers) as client:
        huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}
        response = client.post("/v1/chat/completions", json=huge)
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
        many = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 600, "max_tokens": 2}
        response = client.post("/v1/chat/completions", json=many)
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
