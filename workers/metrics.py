"""Prometheus metrics of one worker replica, in a registry of its own.

The replica has no HTTP server of its own: its exposition text rides on the Redis
heartbeat, and the ingress's /metrics merges every live worker's families into one page.
Each series carries `role` and `replica` labels so replicas never collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, role: str, replica: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._base = {"role": role, "replica": replica}
        base = list(self._base)
        link = [*base, "link", "transport", "codec"]
        self.transfers = Counter(
            "tandem:kv_transfers", "KV transfers pulled by this worker, by outcome.",
            [*link, "outcome"], registry=self.registry,
        )
        self.transfer_seconds = Histogram(
            "tandem:kv_transfer_seconds", "Whole KV pull: fetch, verify, decode, write into the cache.",
            link, buckets=_SECONDS, registry=self.registry,
        )
        self.wire_seconds = Histogram(
            "tandem:kv_transfer_wire_seconds", "Time on the wire of one KV pull.",
            link, buckets=_SECONDS, registry=self.registry,
        )
        self.transfer_bytes = Counter(
            "tandem:kv_transfer_bytes", "KV bytes moved, before (raw) and after (wire) the codec.",
            [*link, "stage"], registry=self.registry,
        )
        self.saved_bytes = Counter(
            "tandem:kv_transfer_saved_bytes",
            "KV bytes not transferred because this worker's prefix cache already held them.",
            link, registry=self.registry,
        )
        self.compression_ratio = Gauge(
            "tandem:kv_transfer_compression_ratio", "Raw/wire bytes of the latest transfer.",
            link, registry=self.registry,
        )
        self.goodput = Gauge(
            "tandem:kv_transfer_goodput_bytes_per_second", "Raw KV bytes per second of the latest transfer.",
            link, registry=self.registry,
        )
        self.expired = Counter(
            "tandem:kv_transfers_expired", "Published KV never pulled, freed after the TTL.",
            base, registry=self.registry,
        )
        self.requests = Counter(
            "tandem:engine_requests",
            "Requests handed to this worker's engine (one with n samples counts once).",
            base, registry=self.registry,
        )
        self.running = Gauge("tandem:engine_running_requests", "Requests the engine is running.", base, registry=self.registry)
        self.waiting = Gauge("tandem:engine_waiting_requests", "Requests waiting in the engine.", base, registry=self.registry)
        self.kv_usage = Gauge("tandem:engine_kv_cache_usage", "Fraction of KV blocks in use.", base, registry=self.registry)

        # vLLM's own metrics (its Prometheus logger registers them in this process's
        # default registry), passed through with this replica's labels.
        self.registry.register(_VllmPassthrough(self._base))

    def record_transfer(self, record: dict[str, Any]) -> None:
        labels = {**self._base, "link": record["link"], "transport": record["transport"], "codec": record["codec"]}
        self.transfers.labels(**labels, outcome="ok" if record["ok"] else "failed").inc()
        if not record["ok"]:
            return
        self.transfer_seconds.labels(**labels).observe(record["total_s"])
        self.wire_seconds.labels(**labels).observe(record["wire_s"])
        self.transfer_bytes.labels(**labels, stage="raw").inc(record["raw_bytes"])
        self.transfer_bytes.labels(**labels, stage="wire").inc(record["wire_bytes"])
        self.saved_bytes.labels(**labels).inc(record.get("saved_bytes", 0))
        self.compression_ratio.labels(**labels).set(record["compression_ratio"])
        self.goodput.labels(**labels).set(record["goodput_bytes_per_s"])

    def record_request(self) -> None:
        self.requests.labels(**self._base).inc()

    def record_expired(self, count: int) -> None:
        self.expired.labels(**self._base).inc(count)

    def record_engine(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.labels(**self._base).set(running)
        self.waiting.labels(**self._base).set(waiting)
        self.kv_usage.labels(**self._base).set(kv_usage)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class _VllmPassthrough:
    """Re-exports the process's `vllm:*` families with role and replica labels, so the
    engines' metrics of every replica can share one scrape without colliding."""

    def __init__(self, labels: dict[str, str]):
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if not family.name.startswith("vllm:"):
                continue
            out = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                out.add_sample(sample.name, {**sample.labels, **self._labels}, sample.value, sample.timestamp)
            yield out
