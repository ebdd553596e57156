"""Greedy output through prefill -> KV handoff -> decode equals a colocated engine's output.

Equality alone could hide a decode worker that silently recomputed the prompt, so the decode
engine's own counters must also show the prompt's KV arrived through the connector.
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.conftest import MODEL, NIXL_APP, REFERENCE_APP

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    # Long enough to span several KV blocks.
    "Summarise the following text in one sentence. " + " ".join(
        f"Sentence {i}: the quick brown fox jumps over the lazy dog near river {i}." for i in range(40)
    ),
]


def _greedy_chat(client, prompt: str):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=32,
    )


@pytest.fixture(scope="module", params=["tcp", "nixl"])
def transport_app(request, cluster):
    """(app name, client) of a disaggregated app per KV transport."""
    if request.param == "tcp":
        return cluster.app_name, OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    # The nixl app compresses by default; this test is about the transport: pin identity.
    return NIXL_APP, OpenAI(base_url=f"{cluster.nixl_url}/v1", api_key="unused", max_retries=0,
                            default_headers={"x-tandem-kv-profile": "identity"})


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: p[:24])
def test_chat_output_matches_colocated(cluster, transport_app, reference_client, prompt):
    app_name, client = transport_app
    before = cluster.worker_stats("DecodeWorker", app_name)
    disaggregated = _greedy_chat(client, prompt)
    after = cluster.worker_stats("DecodeWorker", app_name)
    colocated = _greedy_chat(reference_client, prompt)

    assert disaggregated.choices[0].message.content == colocated.choices[0].message.content
    assert disaggregated.choices[0].finish_reason == colocated.choices[0].finish_reason
    prompt_tokens = disaggregated.usage.prompt_tokens
    assert prompt_tokens == colocated.usage.prompt_tokens
    # The decode engine loaded (nearly) the whole prompt's KV from the prefill worker.
    external_hits = after["external_kv_hits"] - before["external_kv_hits"]
    assert external_hits == prompt_tokens, (external_hits, prompt_tokens)
    assert after["kv_transfers"] == before["kv_transfers"] + 1
    assert after["kv_transfer_failures"] == before["kv_transfer_failures"]


def test_completions_output_matches_colocated(cluster, openai_client, reference_client):
    prompt = "The three most populous cities in Europe are"
    kwargs = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
    before = cluster.worker_stats("DecodeWorker")
    disaggregated = openai_client.completions.create(**kwargs)
    after = cluster.worker_stats("DecodeWorker")
    colocated = reference_client.completions.create(**kwargs)
    assert disaggregated.choices[0].text == colocated.choices[0].text
    assert after["external_kv_hits"] > before["external_kv_hits"]


def test_reference_app_is_colocated(cluster):
    # Guards the comparison itself: the reference must not go through a KV connector.
    stats = cluster.worker_stats("ColocatedWorker", app_name=REFERENCE_APP)
    assert stats["external_kv_hits"] == 0

