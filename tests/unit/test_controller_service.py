"""The controller loop on a real (embedded) Redis: telemetry in through the stream,
decisions out with a TTL, connectors reading them through the decision cache, and the
cache keeping the last decision when Redis goes away."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import redis.asyncio as aioredis

from control_plane import redis_server
from control_plane.controller.library import store_library
from control_plane.controller.service import ControllerLoop, observation_from_fields
from control_plane.settings import load_settings
from kv_transport.decisions import DecisionCache, decision_key
from kv_transport.telemetry import RedisStreamSink, TransferRecord

MB = 1 << 20
LIBRARY = {
    "model": "smollm2-135m-instruct",
    "hardware": "synthetic",
    "profiles": [
        {"name": "int8", "ratio": 2.0, "encode_bytes_per_s": 1500 * MB, "decode_bytes_per_s": 2000 * MB,
         "fixed_s": 0.0005, "quality_loss": 0.002, "pareto": True},
        {"name": "int4", "ratio": 4.0, "encode_bytes_per_s": 1200 * MB, "decode_bytes_per_s": 1500 * MB,
         "fixed_s": 0.0005, "quality_loss": 0.008, "pareto": True},
        {"name": "dominated", "ratio": 1.1, "encode_bytes_per_s": 10 * MB, "decode_bytes_per_s": 10 * MB,
         "quality_loss": 0.5, "pareto": False},
    ],
}


def _record(link: str, codec: str, raw: int, bandwidth: float) -> TransferRecord:
    ratio = {"identity": 1.0, "int8": 2.0, "int4": 4.0}[codec]
    wire = int(raw / ratio)
    return TransferRecord(transfer_id="t", link=link, transport="tcp", codec=codec, ok=True,
                          raw_bytes=raw, wire_bytes=wire, wire_s=wire / bandwidth, total_s=wire / bandwidth)


async def _steps(loop: ControllerLoop, url: str, n: int = 1) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(n):
            await loop.step(client, block_ms=200)
    finally:
        await client.aclose()


def test_slow_link_gets_compression_and_connectors_read_it(redis_url):
    store_library(LIBRARY, "smollm2-135m-instruct", redis_url)
    settings = load_settings(None, redis_url=redis_url, kv_connector={"compression": {"mode": "adaptive"}})
    # Seeded: the published decision is a Thompson draw, int4 about 9 times in 10 here.
    loop = ControllerLoop(settings.model_dump(mode="json"), seed=0)
    assert sorted(c.name for c in loop.costs) == ["int4", "int8"]  # dominated ones are left out
    asyncio.run(_steps(loop, redis_url))  # positions the stream reader at the end
    sink = RedisStreamSink(redis_url)
    for _ in range(8):  # a 0.5 Gbps link carrying 64 MiB transfers uncompressed
        sink.emit(_record("p:1->d:2", "identity", 64 * MB, 0.5e9 / 8))
    assert sink.flush(10)
    asyncio.run(_steps(loop, redis_url, 2))
    stored = json.loads(redis.Redis.from_url(redis_url).get(decision_key("tandem", "p:1->d:2", "standard")))
    assert stored["profile"] == "int4"
    assert stored["best"] == "int4"  # the choice without exploration's draw
    assert redis.Redis.from_url(redis_url).ttl(decision_key("tandem", "p:1->d:2", "standard")) > 0
    exact = json.loads(redis.Redis.from_url(redis_url).get(decision_key("tandem", "p:1->d:2", "exact")))
    assert exact["profile"] == "identity"  # lossy profiles are outside the exact budget
    exposition = loop.metrics.exposition()
    assert 'tandem:compression_decision{link="p:1->d:2",profile="int4",slo_class="standard"} 1.0' in exposition
    assert 'tandem:link_bandwidth_bytes_per_second{link="p:1->d:2"}' in exposition

    cache = DecisionCache(redis_url, "tandem", cache_s=0.0)
    assert cache.profile("p:1->d:2", "standard") == "int4"
    assert cache.profile("unknown->link", "standard") == "identity"  # the safe default


def test_decision_cache_keeps_the_last_decision_when_redis_is_gone(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.set(decision_key("tandem", "a->b", "standard"), json.dumps({"profile": "int8"}))
    cache = DecisionCache(redis_url, "tandem", cache_s=0.0)
    assert cache.profile("a->b", "standard") == "int8"
    redis_server.stop_embedded()
    assert cache.profile("a->b", "standard") == "int8"
    assert cache.profile("c->d", "standard") == "identity"


def test_failed_or_malformed_telemetry_is_ignored():
    assert observation_from_fields({b"ok": b"false", b"link": b'"x"'}) is None
    assert observation_from_fields({b"ok": b"true"}) is None
    fields = {k.encode(): json.dumps(v).encode() for k, v in _record("l", "int8", MB, 1e9).to_dict().items()}
    observation = observation_from_fields(fields)
    assert observation is not None and observation.profile == "int8" and observation.raw_bytes == MB


def test_settings_reject_an_unknown_default_class():
    with pytest.raises(ValueError, match="default_slo_class"):
        load_settings(None, kv_connector={"compression": {"default_slo_class": "gold"}})
