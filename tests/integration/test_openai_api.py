"""The official `openai` client against Tandem's endpoint."""

from __future__ import annotations

import asyncio

from openai import AsyncOpenAI

from tests.conftest import MODEL


def test_models_list(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 2048


def test_chat_answers_paris(openai_client):
    reply = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in reply.choices[0].message.content
    assert len(reply.choices) == 1  # n defaults to 1
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completions(openai_client):
    reply = openai_client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4
    )
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 4


def test_streaming_chat_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert "Paris" in text
    assert finish and finish[-1] in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_raw_sse_ends_with_done(http):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_streaming_completions(openai_client):
    stream = openai_client.completions.create(
        model=MODEL, prompt="One, two, three,", temperature=0, max_tokens=8, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text.strip()


def test_stop_sequence(openai_client):
    reply = openai_client.completions.create(
        model=MODEL, prompt="The capital of France is Paris. The capital of Italy is",
        temperature=0, max_tokens=32, stop=["."],
    )
    choice = reply.choices[0]
    assert "." not in choice.text
    assert choice.finish_reason == "stop"


def test_concurrent_requests_all_answered(cluster):
    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=cluster.base_url, api_key="unused", timeout=600, max_retries=0)
        async def one(i: int) -> str:
            reply = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
                max_tokens=16,
                temperature=0,
            )
            return reply.choices[0].finish_reason
        try:
            return await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            await client.close()

    finishes = asyncio.run(run())
    assert len(finishes) == 20
    assert all(f in ("stop", "length") for f in finishes)


def test_prometheus_metrics_count_requests(http, openai_client):
    openai_client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    for _ in openai_client.completions.create(model=MODEL, prompt="Count: 1, 2,", max_tokens=4, stream=True):
        pass
    text = http.get("/metrics").text
    assert 'tandem:time_per_output_token_seconds_count{endpoint="completions",mode="disaggregated"}' in text
    assert 'tandem:generation_tokens_total{endpoint="completions"}' in text
    # The engines' own vLLM metrics pass through, labelled by role and replica.
    assert "vllm:num_requests_running{" in text and 'role="decode"' in text
    assert 'tandem:requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "tandem:e2e_request_latency_seconds_bucket" in text
    assert "tandem:prefill_step_seconds_count" in text
    # One prefill replica: DualMap's first candidate is it (an affinity decision).
    assert 'tandem:router_decisions_total{pool="prefill",reason="affinity"}' in text
    assert 'tandem:router_decisions_total{pool="decode",reason="least_pressure"}' in text
    assert 'tandem:router_in_flight_requests{pool="decode"' in text


def test_bundled_model_answers_the_readme_example_deterministically(openai_client):
    # The README's curl example sets no sampling: the bundled model answers greedily.
    replies = [
        openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}]
        ).choices[0].message.content
        for _ in range(2)
    ]
    assert replies[0] == replies[1]
    assert "Paris" in replies[0]


def test_each_response_says_where_its_ttft_went(openai_client, http):
    """The Server-Timing breakdown comes from the engines' own per-request stats and the
    KV pull's record: every part of a disaggregated request is there, and they add up to
    no more than what the client waited."""
    import time

    started = time.perf_counter()
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4, temperature=0)
    waited_ms = (time.perf_counter() - started) * 1000
    parts = {name: float(ms) for name, ms in
             (item.split(";dur=") for item in raw.headers["server-timing"].split(", "))}
    assert set(parts) >= {"router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_queue",
                          "first_decode_step"}
    assert parts["prefill"] > 0 and parts["kv_transfer"] > 0 and parts["first_decode_step"] > 0
    assert sum(parts.values()) <= waited_ms
    text = http.get("/metrics").text
    for name in ("prefill_time", "kv_handoff_time", "first_decode_step_time"):
        assert f'tandem:{name}_seconds_count{{mode="disaggregated"}}' in text
    assert 'tandem:prefill_decisions_total{reason="always",where="remote"}' in text
