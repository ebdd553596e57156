from __future__ import annotations

import json

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.state import worker_key
from kv_transport.telemetry import RedisStreamSink, TransferRecord, make_sinks, read_stream
from routing.metrics import WorkerMetricsCollector
from workers.metrics import WorkerMetrics


def _record(**kw) -> TransferRecord:
    base = dict(transfer_id="t", link="a:1->b:2", transport="tcp", codec="identity", ok=True,
                raw_bytes=4_000_000, wire_bytes=1_000_000, wire_s=0.5, total_s=1.0)
    return TransferRecord(**{**base, **kw})


def test_record_derived_numbers():
    record = _record()
    assert record.compression_ratio == 4.0
    assert record.goodput_bytes_per_s == 4_000_000
    assert _record(wire_bytes=0, total_s=0).goodput_bytes_per_s == 0.0
    assert json.loads(json.dumps(record.to_dict()))["link"] == "a:1->b:2"


def test_redis_stream_sink_round_trip(redis_url):
    sink = RedisStreamSink(redis_url)
    sink.emit(_record(transfer_id="one"))
    sink.emit(_record(transfer_id="two", ok=False, error="boom"))
    assert sink.flush(10)
    sink.close()
    records = read_stream(redis_url)
    assert [r["transfer_id"] for r in records] == ["one", "two"]
    assert records[1]["ok"] is False and records[0]["compression_ratio"] == 4.0


def test_sinks_never_fail_a_transfer_when_redis_is_down():
    sink = RedisStreamSink("redis://127.0.0.1:1/0")
    sink.emit(_record())  # logs once, raises nothing, never waits
    assert not sink.flush(0.5)  # the record waits for Redis
    sink.close()  # gives it up, promptly
    assert not sink._thread.is_alive()
    with pytest.raises(ValueError):
        make_sinks(["carrier-pigeon"], None)
    assert make_sinks(["redis"], None) == []  # no Redis configured: nothing to do


def test_records_wait_for_a_redis_that_is_away_and_arrive_in_order(redis_url):
    from control_plane import redis_server

    sink = RedisStreamSink(redis_url)
    try:
        redis_server.stop_embedded()
        for name in ("while-down-1", "while-down-2"):
            sink.emit(_record(transfer_id=name))  # returns at once
        assert not sink.flush(1.5)
        redis_server.start_embedded(port=6491)
        assert sink.flush(30)
        assert [r["transfer_id"] for r in read_stream(redis_url)][-2:] == ["while-down-1", "while-down-2"]
    finally:
        sink.close()


def test_worker_metrics_exposition():
    metrics = WorkerMetrics("decode", "r1")
    metrics.record_transfer(_record().to_dict())
    metrics.record_transfer(_record(ok=False).to_dict())
    metrics.record_engine(running=2, waiting=1, kv_usage=0.5)
    text = metrics.exposition()
    assert 'tandem:kv_transfers_total{codec="identity",link="a:1->b:2",outcome="ok",replica="r1",role="decode",transport="tcp"} 1.0' in text
    assert 'stage="raw"' in text and "tandem:kv_transfer_seconds_bucket" in text
    assert 'tandem:engine_running_requests{replica="r1",role="decode"} 2.0' in text


def test_ingress_merges_worker_families(redis_url):
    client = redis.Redis.from_url(redis_url)
    for replica in ("r1", "r2"):
        metrics = WorkerMetrics("decode", replica)
        metrics.record_transfer(_record().to_dict())
        entry = {"replica_id": replica, "role": "decode", "metrics": metrics.exposition()}
        client.set(worker_key("app", replica), json.dumps(entry))
    registry = CollectorRegistry()
    registry.register(WorkerMetricsCollector(redis_url, "app"))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert type_lines and len(type_lines) == len(set(type_lines))  # one family, not one per worker
    replicas = {s.labels["replica"] for s in families["tandem:kv_transfers"].samples}
    assert replicas == {"r1", "r2"}


def test_request_metric_labels_stay_bounded():
    from routing.metrics import endpoint_label

    assert endpoint_label("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_label("/reference/v1/completions") == "/v1/completions"  # behind a route prefix
    # Paths a client makes up all share one label.
    assert {endpoint_label(f"/random/{i}") for i in range(100)} == {"other"}
