"""Live load of one engine, for routing and `tandem status`.

vLLM reports scheduler state to stat loggers after every engine step; we keep the latest
values plus cumulative cache counters. The worker adds what the scheduler cannot know yet:
prompt tokens handed to the engine but not prefilled.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class _CacheCounter:
    queries: int = 0
    hits: int = 0

    def add(self, stats: Any) -> None:
        if stats is None:
            return
        self.queries += int(getattr(stats, "queries", 0))
        self.hits += int(getattr(stats, "hits", 0))

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


_PULLS_REMEMBERED = 1024


class EngineStats:
    def __init__(self, metrics: Any = None) -> None:
        # Optional workers.metrics.WorkerMetrics fed with every update.
        self.metrics = metrics
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_cache = _CacheCounter()
        # Tokens loaded through the KV connector (from a prefill worker).
        self.external_cache = _CacheCounter()
        self.in_flight_requests = 0
        self.in_flight_prompt_tokens = 0
        self.requests_total = 0
        self.prompt_tokens_total = 0
        self.cached_prompt_tokens_total = 0
        # From the KV connector's own stats (vLLM's NixlConnector reports these names).
        self.kv_transfers = 0
        self.kv_bytes_transferred = 0
        self.kv_transfer_failures = 0
        self.kv_expired_requests = 0
        # KV bytes a pull skipped because this engine's prefix cache already held them.
        self.kv_saved_bytes = 0
        # The latest pulls' durations by transfer id, for each request's timing breakdown.
        self._pull_seconds: OrderedDict[str, float] = OrderedDict()
        self.updated_at = 0.0

    # Fed by the worker's engine wrapper ------------------------------------------------

    def request_started(self, prompt_tokens: int) -> None:
        with self._lock:
            self.in_flight_requests += 1
            self.in_flight_prompt_tokens += prompt_tokens
            self.requests_total += 1
            self.prompt_tokens_total += prompt_tokens
        if self.metrics is not None:
            self.metrics.record_request()

    def request_prefilled(self, prompt_tokens: int, cached_tokens: int) -> None:
        with self._lock:
            self.in_flight_prompt_tokens -= prompt_tokens
            self.cached_prompt_tokens_total += cached_tokens

    def request_finished(self) -> None:
        with self._lock:
            self.in_flight_requests -= 1

    # Fed by vLLM's stat logger hook ----------------------------------------------------

    def record_scheduler(self, scheduler_stats: Any) -> None:
        with self._lock:
            self.running = scheduler_stats.num_running_reqs
            self.waiting = scheduler_stats.num_waiting_reqs
            self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
            self.prefix_cache.add(scheduler_stats.prefix_cache_stats)
            self.external_cache.add(scheduler_stats.connector_prefix_cache_stats)
            self._add_connector_stats(scheduler_stats.kv_connector_stats)
            self.updated_at = time.time()
            if self.metrics is not None:
                self.metrics.record_engine(self.running, self.waiting, self.kv_cache_usage)

    def _add_connector_stats(self, stats: Any) -> None:
        # A dict of per-event lists, possibly nested per connector; count by known names.
        if not isinstance(stats, dict):
            stats = getattr(stats, "data", None)
            if not isinstance(stats, dict):
                return
        for key, value in stats.items():
            if isinstance(value, dict) or hasattr(value, "data"):
                self._add_connector_stats(value)
            elif isinstance(value, list):
                if key == "transfer_duration":
                    self.kv_transfers += len(value)
                elif key == "bytes_transferred":
                    self.kv_bytes_transferred += int(sum(value))
                elif key.startswith("num_failed"):
                    self.kv_transfer_failures += len(value)
                elif key == "num_kv_expired_reqs":
                    self.kv_expired_requests += len(value)
                    if self.metrics is not None and value:
                        self.metrics.record_expired(len(value))
                elif key == "records":
                    for record in value:
                        self.kv_saved_bytes += int(record.get("saved_bytes", 0))
                        self._remember_pull(record)
                        if self.metrics is not None:
                            self.metrics.record_transfer(record)

    def _remember_pull(self, record: dict[str, Any]) -> None:
        transfer_id = record.get("transfer_id")
        if isinstance(transfer_id, str) and record.get("ok"):
            self._pull_seconds[transfer_id] = float(record.get("total_s") or 0.0)
            while len(self._pull_seconds) > _PULLS_REMEMBERED:
                self._pull_seconds.popitem(last=False)

    def pull_seconds(self, transfer_id: str) -> float | None:
        """How long this engine's pull of ``transfer_id`` took (fetch, verify, decode, write),
        if it pulled it lately."""
        with self._lock:
            return self._pull_seconds.get(transfer_id)

    def logger_factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """A vLLM StatLoggerFactory bound to this object."""
        return _StatsLogger(self)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "running": self.running,
                "waiting": self.waiting,
                "kv_cache_usage": self.kv_cache_usage,
                "prefix_cache_hit_rate": self.prefix_cache.hit_rate,
                "prefix_cache_queries": self.prefix_cache.queries,
                "prefix_cache_hits": self.prefix_cache.hits,
                "external_kv_queries": self.external_cache.queries,
                "external_kv_hits": self.external_cache.hits,
                "in_flight_requests": self.in_flight_requests,
                "in_flight_prompt_tokens": self.in_flight_prompt_tokens,
                "requests_total": self.requests_total,
                "prompt_tokens_total": self.prompt_tokens_total,
                "cached_prompt_tokens_total": self.cached_prompt_tokens_total,
                "kv_transfers": self.kv_transfers,
                "kv_bytes_transferred": self.kv_bytes_transferred,
                "kv_transfer_failures": self.kv_transfer_failures,
                "kv_expired_requests": self.kv_expired_requests,
                "kv_saved_bytes": self.kv_saved_bytes,
                "updated_at": self.updated_at,
            }


class _StatsLogger:
    """Adapter with vLLM's StatLoggerBase interface (duck-typed: vLLM only calls it)."""

    def __init__(self, stats: EngineStats):
        self._stats = stats

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._stats.record_scheduler(scheduler_stats)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
