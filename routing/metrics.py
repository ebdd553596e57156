"""Prometheus metrics of the ingress, named the way vLLM users expect (``tandem:`` prefix).

`/metrics` is open (Prometheus scrapes it without credentials, as vLLM's and Ray's) unless
`auth.metrics_require_key`; it never shows where the KV listeners are: every `host:port` in
a `link` label is replaced by a keyed digest (`link_pseudonym`). A scrape is collected at most
once per `routing.status_cache_s`, on a thread of its own, with one Redis client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import redis
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from control_plane.state import worker_key

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
# Where each request's TTFT went (routing/timing.py), one histogram per component.
_PART_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


def _part(name: str, documentation: str) -> Histogram:
    return Histogram(name, documentation, ["mode"], buckets=_PART_BUCKETS)


FAILED_PREFILL_TIME = _part("tandem:failed_prefill_time_seconds",
                            "Time lost to a prefill step that failed (decode recomputed the prompt).")
ROUTER_QUEUE_TIME = _part("tandem:router_queue_time_seconds",
                          "From the prefill call to its engine's queue: routing, replica queue, tokenization, RPC.")
PREFILL_QUEUE_TIME = _part("tandem:prefill_queue_time_seconds", "Waiting in the prefill engine's scheduler.")
PREFILL_TIME = _part("tandem:prefill_time_seconds", "Prefill compute, to its first token.")
KV_HANDOFF_TIME = _part("tandem:kv_handoff_time_seconds", "Decode's pull of a request's KV, codec included.")
DECODE_QUEUE_TIME = _part("tandem:decode_queue_time_seconds",
                          "From the decode call to its first step, less the KV pull: routing, RPC, scheduler queue.")
FIRST_DECODE_STEP_TIME = _part("tandem:first_decode_step_time_seconds", "The decode engine's first step.")
TTFT_PARTS = {
    "failed_prefill": FAILED_PREFILL_TIME,
    "router_queue": ROUTER_QUEUE_TIME,
    "prefill_queue": PREFILL_QUEUE_TIME,
    "prefill": PREFILL_TIME,
    "kv_transfer": KV_HANDOFF_TIME,
    "decode_queue": DECODE_QUEUE_TIME,
    "first_decode_step": FIRST_DECODE_STEP_TIME,
}
PREFILL_DECISIONS = Counter(
    "tandem:prefill_decisions",
    "Where each disaggregated request's prompt was prefilled (remote: a prefill worker, then a "
    "KV transfer; local: on its decode worker; lent: the whole request on a prefill worker, "
    "decode lent to the prefill pool), and why.",
    ["where", "reason"],
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


def link_key(secret: str | None) -> bytes:
    """The key of the link pseudonyms: derived from the cluster's KV secret (the same
    pseudonyms on every ingress replica and across restarts), else random per process."""
    if not secret:
        return os.urandom(32)
    return hmac.new(secret.encode(), b"tandem metrics link pseudonyms", hashlib.sha256).digest()


def link_pseudonym(link: str, key: bytes) -> str:
    """``prefill host:port->decode host:port`` with each end replaced by ``kv-`` and a keyed
    digest of it: one series per link as before, no address anyone scraping can read."""
    return "->".join(
        "kv-" + hmac.new(key, end.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]
        for end in link.split("->")
    )


class WorkerMetricsCollector:
    """Merges the metric families every live worker publishes on its Redis heartbeat, so
    one scrape of the ingress sees the whole app (workers have no HTTP server). One Redis
    client for the collector's life; `link` labels pseudonymized when given a key."""

    def __init__(self, redis_url: str | None, app_name: str, link_key: bytes | None = None):
        self._app_name = app_name
        self._link_key = link_key
        self._client = (redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
                        if redis_url else None)

    def _entries(self) -> list[dict[str, Any]]:
        assert self._client is not None
        keys = list(self._client.scan_iter(match=worker_key(self._app_name, "*"), count=500))
        if not keys:
            return []
        return [json.loads(raw) for raw in self._client.mget(keys) if raw]

    def collect(self) -> Iterator[Metric]:
        if self._client is None:
            return
        try:
            entries = self._entries()
        except (redis.RedisError, OSError, ValueError):
            return  # Redis down: the ingress's own metrics still export
        families: dict[str, Metric] = {}
        for entry in entries:
            for family in text_string_to_metric_families(entry.get("metrics", "")):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                if self._link_key is None:
                    merged.samples.extend(family.samples)
                    continue
                for sample in family.samples:
                    if "link" in sample.labels:
                        labels = {**sample.labels, "link": link_pseudonym(sample.labels["link"], self._link_key)}
                        sample = sample._replace(labels=labels)
                    merged.samples.append(sample)
        yield from families.values()


_included: set[tuple[str | None, str]] = set()


def include_workers(redis_url: str | None, app_name: str, link_key: bytes | None = None) -> None:
    """Serve the workers' metrics and the P:D planner's view from this process's registry
    (once per app)."""
    if (redis_url, app_name) not in _included:
        from control_plane.planner.metrics import PlannerMetricsCollector

        REGISTRY.register(WorkerMetricsCollector(redis_url, app_name, link_key))
        REGISTRY.register(PlannerMetricsCollector(redis_url, app_name))
        _included.add((redis_url, app_name))


def exposition() -> bytes:
    return generate_latest(REGISTRY)


_collector_thread: ThreadPoolExecutor | None = None


async def exposition_off_loop() -> bytes:
    """`exposition` on a thread of its own: collecting reads Redis, and must neither block
    the event loop nor queue behind (or hold up) API-key checks in the default executor."""
    global _collector_thread
    if _collector_thread is None:
        _collector_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-metrics")
    return await asyncio.get_running_loop().run_in_executor(_collector_thread, exposition)


_T = TypeVar("_T")


class Cached(Generic[_T]):
    """One value, recomputed at most once per ``ttl_s``: callers within it get the last
    value, callers during a recomputation share it (N concurrent probes, one computation).
    A computation that fails is not kept; its callers get the error."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._value: _T | None = None
        self._at: float | None = None
        self._pending: asyncio.Future[_T] | None = None

    async def get(self, compute: Callable[[], Awaitable[_T]]) -> _T:
        if self._pending is None:
            if self._at is not None and self._clock() - self._at < self.ttl_s:
                return self._value  # type: ignore[return-value]
            self._pending = asyncio.ensure_future(compute())
            self._pending.add_done_callback(self._done)
        # Shielded: a caller that goes away does not cancel the others' computation.
        return await asyncio.shield(self._pending)

    def _done(self, task: asyncio.Future[_T]) -> None:
        self._pending = None
        if not task.cancelled() and task.exception() is None:
            self._value, self._at = task.result(), self._clock()
