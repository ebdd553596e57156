"""Live load of one engine, for routing, the P:D planner and `tandem status`.

vLLM reports scheduler state to stat loggers after every engine step; we keep the latest
values plus cumulative cache counters. The worker adds what the scheduler cannot know yet:
prompt tokens handed to the engine but not prefilled. For the planner, a sliding window of
the last seconds: prompt tokens computed per busy second, prefix hits, decode steps (batch,
KV held, inter-token latency).
"""

from __future__ import annotations

import logging
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


log = logging.getLogger(__name__)

_PULLS_REMEMBERED = 1024


class WindowedSums:
    """Sums of named quantities over the last ``window_s`` seconds (one bucket a second)."""

    def __init__(self, window_s: float = 10.0, clock: Any = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._buckets: OrderedDict[int, dict[str, float]] = OrderedDict()
        # Added to from vLLM's output handler, read from Serve's metrics thread.
        self._lock = threading.Lock()

    def add(self, **values: float) -> None:
        now = int(self._clock())
        with self._lock:
            bucket = self._buckets.get(now)
            if bucket is None:
                bucket = self._buckets[now] = {}
                self._trim(now)
            for name, value in values.items():
                bucket[name] = bucket.get(name, 0.0) + value

    def sums(self) -> dict[str, float]:
        with self._lock:
            self._trim(int(self._clock()))
            out: dict[str, float] = {}
            for bucket in self._buckets.values():
                for name, value in bucket.items():
                    out[name] = out.get(name, 0.0) + value
        return out

    def _trim(self, now: int) -> None:
        while self._buckets and next(iter(self._buckets)) <= now - self.window_s:
            self._buckets.popitem(last=False)


# What a replica reports to the P:D planner (Serve's record_autoscaling_stats): always the
# same keys, numbers only (Serve disables a replica's stats at the first other value).
PLANNER_STATS = ("prefill_tokens_per_s", "busy_s", "computed_tokens", "prompt_tokens", "cached_tokens",
                 "queued_tokens", "running", "waiting", "kv_usage", "context_tokens", "step_s", "steps")


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
        # The planner's window, and what is needed to fill it.
        self.window = WindowedSums()
        self.kv_capacity_tokens = 0  # the engine's KV cache, in tokens (set at engine start)
        self.kv_blocks = 0
        self._busy_until = 0.0  # end of the prefill time already counted

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

    def record_iteration(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """Never raises: vLLM's output handler treats an exception from a stat logger as
        the engine's death."""
        try:
            self._record_iteration(scheduler_stats, iteration_stats)
        except Exception:  # noqa: BLE001
            log.exception("planner stats of an engine step failed")

    def _record_iteration(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """One engine step's output: the prompt tokens it finished prefilling and the time
        the engine spent prefilling (the union of the finished requests' prefill intervals,
        each ending now), inter-token latencies, the batch and its KV."""
        now = time.monotonic()
        values: dict[str, float] = {}
        finished = getattr(iteration_stats, "finished_requests", None) or []
        longest = max((float(getattr(f, "prefill_time", 0.0) or 0.0) for f in finished), default=0.0)
        if longest > 0:
            start = max(self._busy_until, now - longest)
            values["busy_s"] = max(0.0, now - start)
            self._busy_until = now
        tokens = getattr(iteration_stats, "prompt_token_stats", None)
        if tokens is not None:
            values["computed_tokens"] = float(getattr(tokens, "computed", 0))
            values["prompt_tokens"] = float(getattr(tokens, "total", 0))
            values["cached_tokens"] = float(getattr(tokens, "local_cache_hit", 0))
        running = int(getattr(scheduler_stats, "num_running_reqs", 0) or 0) if scheduler_stats else 0
        itls = getattr(iteration_stats, "inter_token_latencies_iter", None) or []
        if itls and running:
            waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0) or 0)
            usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)
            values.update(steps=1.0, step_s=sum(itls) / len(itls), running=float(running),
                          waiting=float(waiting), kv_usage=usage,
                          context_tokens=usage * self.kv_capacity_tokens)
        if values:
            self.window.add(**values)

    def planner_stats(self) -> dict[str, float]:
        """The last seconds as the planner reads them (PLANNER_STATS, all numbers)."""
        sums = self.window.sums()
        steps = sums.get("steps", 0.0)
        busy = sums.get("busy_s", 0.0)
        with self._lock:
            queued = float(self.in_flight_prompt_tokens)
        out = {
            "prefill_tokens_per_s": sums.get("computed_tokens", 0.0) / busy if busy > 0.5 else 0.0,
            "busy_s": busy,
            "computed_tokens": sums.get("computed_tokens", 0.0),
            "prompt_tokens": sums.get("prompt_tokens", 0.0),
            "cached_tokens": sums.get("cached_tokens", 0.0),
            "queued_tokens": queued,
            "steps": steps,
        }
        for name in ("running", "waiting", "kv_usage", "context_tokens", "step_s"):
            out[name] = sums.get(name, 0.0) / steps if steps else 0.0
        return out

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
        self.set_kv_capacity(vllm_config)
        return _StatsLogger(self, vllm_config)

    def set_kv_capacity(self, vllm_config: Any) -> None:
        cache = getattr(vllm_config, "cache_config", None)
        blocks = getattr(cache, "num_gpu_blocks", None) or 0
        if blocks:
            self.kv_blocks = int(blocks)
            self.kv_capacity_tokens = int(blocks) * int(getattr(cache, "block_size", 16) or 16)

    def kv_empty(self) -> bool:
        """Whether the engine's KV cache holds no request's blocks (vLLM counts its one
        reserved null block as used)."""
        with self._lock:
            usage = self.kv_cache_usage
        if self.kv_blocks:
            return usage * self.kv_blocks <= 1.5
        return usage < 0.005

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

    def __init__(self, stats: EngineStats, vllm_config: Any = None):
        self._stats = stats
        self._config = vllm_config

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._stats.record_scheduler(scheduler_stats)
        if iteration_stats is not None:
            self._stats.record_iteration(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        self._stats.set_kv_capacity(self._config)

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass
