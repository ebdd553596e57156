"""KV compression end to end: the nixl app's connectors encode every transfer with an 8-bit
profile; the decode side decodes it into its paged cache, and greedy output stays identical
to a colocated engine's (tests/integration/test_pd_token_exact.py runs the same prompts
through this app). Here: the transfers really were compressed, and the controller view."""

from __future__ import annotations

import time

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, NIXL_PROFILE

LONG = "Summarise this in one sentence. " + " ".join(
    f"Paragraph {i}: the committee met on a rainy Tuesday to discuss budget item {i}." for i in range(30)
)


def _samples(text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_transfers_are_compressed_and_answers_stay_greedy_identical(cluster, reference_client):
    client = OpenAI(base_url=f"{cluster.nixl_url}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": LONG}]
    compressed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    colocated = reference_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    assert compressed.choices[0].message.content == colocated.choices[0].message.content

    # The decode worker's metrics (merged into the ingress's /metrics) by codec.
    deadline = time.monotonic() + 20  # workers publish metrics with their 5 s heartbeat
    while time.monotonic() < deadline:
        text = httpx.get(f"{cluster.nixl_url}/metrics", timeout=30).text
        ratios = [s for s in _samples(text, "tandem:kv_transfer_compression_ratio")
                  if s.labels.get("codec") == NIXL_PROFILE]
        if ratios:
            break
        time.sleep(1)
    assert ratios, "no transfer with the int8 profile was reported"
    assert all(s.value > 1.5 for s in ratios)  # int8 + scales: about 1.9x fewer bytes
    raw = sum(s.value for s in _samples(text, "tandem:kv_transfer_bytes_total")
              if s.labels.get("codec") == NIXL_PROFILE and s.labels.get("stage") == "raw")
    wire = sum(s.value for s in _samples(text, "tandem:kv_transfer_bytes_total")
               if s.labels.get("codec") == NIXL_PROFILE and s.labels.get("stage") == "wire")
    assert raw > 1.5 * wire > 0


def test_compression_endpoint_reports_the_mode(cluster):
    static = httpx.get(f"{cluster.nixl_url}/admin/compression", timeout=30).json()
    assert static == {"mode": "static", "profile": NIXL_PROFILE}
    off = httpx.get(f"{cluster.url}/admin/compression", timeout=30).json()
    assert off["mode"] == "off"
