"""8-bit KV compression keeps greedy output identical, measured where greedy output is
well defined: float32 engines.

In bf16 the 135M model's logits are rounded to bf16 (steps of 0.125 at their magnitude),
so several calibration prompts have exact ties on their greedy path, and which token wins
is decided by rounding: flipping the last bit of 1% of the bf16 KV values changes 8 of the
10 answers, more than any 8-bit profile does (docs/compression.md). With float32 engines
the same 8-bit profile reproduces every calibration prompt's 32 greedy tokens, which is
what this test holds it to.

A P/D app of its own (float32 prefill and decode, tcp, a static 8-bit profile) lives only
for this module. Each prompt is answered twice on it: with the app's 8-bit profile and with
the identity profile pinned (uncompressed KV through the same connector). The decode
worker's prefix cache is emptied before each answer, so neither reuses the other's blocks.
"""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from tests.conftest import (
    MODEL,
    NIXL_PROFILE,
    TTL_S,
    calibration_messages,
    deploy_extra_app,
    extra_app_settings,
    metric_samples,
)

FP32_APP = "fp32"
# 128 MiB of KV holds a whole 2,048-token context in float32; the suite's peak memory is
# while these two engines run next to the other six.
FLOAT32_WORKER = {"replicas": 1, "cpu_threads": 1, "engine_args": {"dtype": "float32"},
                  "kv_cache_memory_bytes": 128 * 1024 * 1024}
GENERATED_TOKENS = 32


@pytest.fixture(scope="module")
def fp32_url(cluster):
    from ray import serve

    from bench.live_routers import wait_http_ok

    settings = extra_app_settings(
        FP32_APP, prefill=FLOAT32_WORKER, decode=FLOAT32_WORKER,
        kv_connector={"ttl_s": TTL_S, "compression": {"mode": "static", "profile": NIXL_PROFILE}},
    )
    deploy_extra_app(settings)
    url = f"{cluster.url}/{FP32_APP}"
    try:
        wait_http_ok(f"{url}/health", 600)
        yield url
    finally:
        # Its two engines are not needed by the rest of the suite, whatever happened here.
        serve.delete(FP32_APP)


def _transfers_by_codec(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for sample in metric_samples(httpx.get(f"{url}/metrics", timeout=30).text, "tandem:kv_transfers_total"):
        if sample.labels.get("outcome", "ok") == "ok":
            codec = sample.labels.get("codec", "")
            counts[codec] = counts.get(codec, 0.0) + sample.value
    return counts


def test_8bit_kv_keeps_32_greedy_tokens_identical_on_every_calibration_prompt(cluster, fp32_url):
    compressed_client = OpenAI(base_url=f"{fp32_url}/v1", api_key="unused", max_retries=0, timeout=300)
    uncompressed_client = OpenAI(base_url=f"{fp32_url}/v1", api_key="unused", max_retries=0, timeout=300,
                                 default_headers={"x-tandem-kv-profile": "identity"})
    prompts = calibration_messages()
    differing = []
    for prompt_id, messages in prompts:
        answers = []
        for client in (compressed_client, uncompressed_client):
            # Neither answer may reuse the other's blocks.
            assert cluster.wait_blocks_free("DecodeWorker", 60, FP32_APP), "the decode worker kept blocks in use"
            reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                   max_tokens=GENERATED_TOKENS)
            answers.append((reply.choices[0].message.content, reply.usage.completion_tokens))
        if answers[0] != answers[1]:
            differing.append((prompt_id, answers))
    assert not differing, differing

    # Both kinds of transfer really happened, one per prompt each (metrics come with the
    # workers' 5 s heartbeat).
    deadline = time.monotonic() + 30
    while True:
        counts = _transfers_by_codec(fp32_url)
        if counts.get(NIXL_PROFILE, 0) >= len(prompts) and counts.get("identity", 0) >= len(prompts):
            break
        assert time.monotonic() < deadline, counts
        time.sleep(1)

    # Over tcp the compressed transfers were streamed, a layer on the wire as soon as it was
    # encoded: the stages overlapped, so none took longer than the handoff, and the sizes
    # and checksum came in the trailer.
    from control_plane.redis_server import embedded_url
    from kv_transport.telemetry import read_stream

    # Telemetry reaches the stream from the worker sink's own thread, possibly after the
    # answer: the counts came from the metrics above; here, every compressed transfer that
    # reached the stream was streamed.
    records = [r for r in read_stream(embedded_url(), count=200)
               if r["codec"] == NIXL_PROFILE and r["ok"] and r.get("transport") == "tcp"]
    assert len(records) >= len(prompts) // 2, len(records)
    for record in records:
        assert record.get("streamed"), record
        assert record["raw_bytes"] > record["wire_bytes"] > 0, record
        assert record["encode_s"] > 0 and record["wire_s"] > 0, record
        assert max(record["encode_s"], record["wire_s"]) + record["decode_s"] <= record["total_s"] + 1e-6, record


# Prompts of the same shape: the reproduction of the batched-prompt bug, where every decode
# landed the first prompt's KV (its sizes, checksum and fingerprint all matched). Each
# variant has prompts of its own: a prompt the decode worker has cached is not pulled.
# Float32, where greedy output does not hang on bf16 ties: the prompts run as one batch in
# the engines, one by one they do not, and in bf16 that alone flipped near-tied tokens.
def _batch(variant: str) -> list[str]:
    return [f"My favourite {variant} thing in the whole world is the {thing}. What is my favourite thing? "
            "The answer is:" for thing in ("stone", "apple", "river", "cloud", "piano", "tiger")]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_batched_prompts_each_get_their_own_prefill(cluster, fp32_url, stream):
    client = OpenAI(base_url=f"{fp32_url}/v1", api_key="unused", max_retries=0, timeout=300,
                    default_headers={"x-tandem-kv-profile": "identity"})
    kwargs = dict(model=MODEL, temperature=0, max_tokens=8)
    prompts = _batch("streamed" if stream else "whole")
    before = cluster.worker_stats("DecodeWorker", FP32_APP)
    if stream:
        texts = [""] * len(prompts)
        usage = None
        for chunk in client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True},
                                               **kwargs):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
            usage = chunk.usage or usage
    else:
        batch = client.completions.create(prompt=prompts, **kwargs)
        assert [c.index for c in batch.choices] == list(range(len(prompts)))
        texts, usage = [c.text for c in batch.choices], batch.usage
    after = cluster.worker_stats("DecodeWorker", FP32_APP)

    one_by_one = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    assert texts == [r.choices[0].text for r in one_by_one]
    assert usage.prompt_tokens == sum(r.usage.prompt_tokens for r in one_by_one)
    assert usage.completion_tokens == sum(r.usage.completion_tokens for r in one_by_one)
    # Every prompt's own transfer was pulled and landed: none failed, none is left pinned.
    assert after["kv_transfers"] == before["kv_transfers"] + len(prompts)
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"]
    assert after["external_kv_hits"] - before["external_kv_hits"] == usage.prompt_tokens
