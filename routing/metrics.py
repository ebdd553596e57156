"""Prometheus metrics of the ingress, named the way vLLM users expect (``tandem:`` prefix)."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from control_plane.state import list_workers

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)

REQUESTS = Counter(
    "tandem:requests",
    "Requests answered by the ingress, by endpoint and HTTP status.",
    ["endpoint", "status"],
)
# The endpoint label takes these values and "other": a label per path a client makes up
# would grow the registry without bound.
KNOWN_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                   "/admin/compression", "/openapi.json", "/docs")


def endpoint_label(path: str) -> str:
    """The known endpoint a request path names (behind any route prefix), else "other"."""
    for endpoint in KNOWN_ENDPOINTS:
        if path.endswith(endpoint):
            return endpoint
    return "other"


def count_request(path: str, status: int | str) -> None:
    REQUESTS.labels(endpoint_label(path), str(status)).inc()
TTFT = Histogram(
    "tandem:time_to_first_token_seconds",
    "Time from request arrival to the first streamed content chunk.",
    ["endpoint", "mode"],
    buckets=_LATENCY_BUCKETS,
)
TPOT = Histogram(
    "tandem:time_per_output_token_seconds",
    "Mean time between streamed content chunks of one request (after the first).",
    ["endpoint", "mode"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5),
)
GENERATION_TOKENS = Counter(
    "tandem:generation_tokens",
    "Output tokens sent to clients (usage when known, else one per streamed chunk).",
    ["endpoint"],
)
E2E = Histogram(
    "tandem:e2e_request_latency_seconds",
    "Time from request arrival to the last byte of the answer.",
    ["endpoint", "mode"],
    buckets=_LATENCY_BUCKETS,
)
PREFILL_SECONDS = Histogram(
    "tandem:prefill_step_seconds",
    "Duration of the prefill step of a disaggregated request (incl. KV publication).",
    buckets=_LATENCY_BUCKETS,
)
RECOMPUTES = Counter(
    "tandem:prefill_recomputes",
    "Requests whose prefill step failed and whose decode worker recomputed the prompt.",
    ["reason"],
)
ROUTER_DECISIONS = Counter(
    "tandem:router_decisions",
    "Routing decisions by pool and reason: dualmap's affinity (a cache-affinity hit), "
    "second_choice, fallback (SLO-aware, to the pool's best) and rebalance; the baselines' "
    "own reasons; decode placement's session and least_pressure.",
    ["pool", "reason"],
)
ROUTER_REBALANCES = Counter(
    "tandem:router_rebalances",
    "Requests waiting at the router for a hot replica that were moved to a cooler one.",
    ["pool"],
)
ROUTER_QUEUED_TOKENS = Gauge(
    "tandem:router_queued_prefill_tokens",
    "Uncached prompt tokens the router has sent to a replica and not seen complete.",
    ["pool", "replica"],
)
ROUTER_IN_FLIGHT = Gauge(
    "tandem:router_in_flight_requests",
    "Requests the router has sent to a replica and not seen complete.",
    ["pool", "replica"],
)
SHED = Counter(
    "tandem:requests_shed",
    "Requests refused by admission control before any work (429 overload, 503 no replica).",
    ["status"],
)
CLIENT_DISCONNECTS = Counter(
    "tandem:client_disconnects",
    "Streaming requests aborted because the client went away.",
)


class WorkerMetricsCollector:
    """Merges the metric families every live worker publishes on its Redis heartbeat, so
    one scrape of the ingress sees the whole app (workers have no HTTP server)."""

    def __init__(self, redis_url: str | None, app_name: str):
        self._redis_url = redis_url
        self._app_name = app_name

    def collect(self) -> Iterator[Metric]:
        if not self._redis_url:
            return
        try:
            entries = list_workers(self._redis_url, self._app_name)
        except (redis.RedisError, OSError, ValueError):
            return  # Redis down: the ingress's own metrics still export
        families: dict[str, Metric] = {}
        for entry in entries:
            for family in text_string_to_metric_families(entry.get("metrics", "")):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                merged.samples.extend(family.samples)
        yield from families.values()


_included: set[tuple[str | None, str]] = set()


def include_workers(redis_url: str | None, app_name: str) -> None:
    """Serve the workers' metrics from this process's registry (once per app)."""
    if (redis_url, app_name) not in _included:
        REGISTRY.register(WorkerMetricsCollector(redis_url, app_name))
        _included.add((redis_url, app_name))


def exposition() -> bytes:
    return generate_latest(REGISTRY)
