"""The shared compression controller: a Ray Serve deployment (one replica) that reads the
connectors' transfer telemetry from the Redis stream, keeps the policy's per-link state,
and publishes a decision per link and SLO class to Redis with a TTL. Connectors read them
with a short local cache (`kv_transport.decisions`); if this deployment or Redis is down
they keep their last decision and transfers go on."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ray import serve

from control_plane.controller.library import costs_from_library, load_library, specs_from_library
from control_plane.controller.policy import CompressionController, SLOClass, TransferObservation
from control_plane.settings import settings_from_dict
from control_plane.state import WorkerRegistry
from kv_transport.decisions import decision_key
from kv_transport.telemetry import TELEMETRY_STREAM

log = logging.getLogger("ray.serve")

# Telemetry records a (re)started controller learns from before reading new ones.
WARM_START_RECORDS = 1000


def observation_from_fields(fields: dict[bytes | str, bytes | str]) -> TransferObservation | None:
    """A telemetry stream entry (JSON-encoded values) as an observation; None if it is a
    failed transfer or unreadable."""
    try:
        data = {
            (k.decode() if isinstance(k, bytes) else k): json.loads(v)
            for k, v in fields.items()
        }
        if not data.get("ok"):
            return None
        return TransferObservation(
            link=str(data["link"]),
            profile=str(data["codec"]),
            raw_bytes=int(data["raw_bytes"]),
            wire_bytes=int(data["wire_bytes"]),
            wire_s=float(data["wire_s"]),
            encode_s=float(data.get("encode_s", 0.0)),
            decode_s=float(data.get("decode_s", 0.0)),
            handoff_s=float(data["total_s"]) if "total_s" in data else None,
            streamed=bool(data.get("streamed", False)),
        )
    except (ValueError, KeyError, TypeError):
        return None


class ControllerLoop:
    """The controller's work, separate from Serve so tests can drive it directly."""

    def __init__(self, settings: dict[str, Any], seed: int | None = None):
        self.settings = settings_from_dict(settings)
        compression = self.settings.kv_connector.compression
        classes = {name: SLOClass(name, loss) for name, loss in compression.slo_classes.items()}
        library = load_library(self.settings)
        self.costs = costs_from_library(library)
        self.specs = specs_from_library(library)
        # ``seed``: the bandit's exploration draws, for a reproducible run.
        self.policy = CompressionController(self.costs, classes, pipelined=compression.pipelined, seed=seed)
        # link -> EWMA of raw bytes per transfer (the size decisions are made for)
        self.typical_bytes: dict[str, float] = {}
        self.decisions: dict[str, dict[str, Any]] = {}
        self.observed = 0
        self.metrics = ControllerMetrics()
        self._last_id: Any = None  # stream position; None until the first step

    def observe(self, observation: TransferObservation) -> None:
        self.policy.observe(observation)
        old = self.typical_bytes.get(observation.link)
        raw = float(observation.raw_bytes)
        self.typical_bytes[observation.link] = raw if old is None else 0.8 * old + 0.2 * raw
        self.observed += 1

    def decide(self) -> dict[str, dict[str, Any]]:
        for link, raw in self.typical_bytes.items():
            self.metrics.bandwidth.labels(link).set(self.policy.bandwidth.bandwidth(link))
            for slo_class in self.policy.classes:
                choice = self.policy.choose(link, slo_class, raw)
                previous = self.decisions.get(f"{link}|{slo_class}")
                if previous is None or previous["profile"] != choice.profile:
                    self.metrics.changed(link, slo_class, previous and previous["profile"], choice.profile)
                self.decisions[f"{link}|{slo_class}"] = {
                    "link": link,
                    "slo_class": slo_class,
                    "profile": choice.profile,
                    # What the model and the bandit's mean residuals rank first: the choice
                    # without exploration's draw (`profile` is a Thompson draw among the
                    # candidates, so near ties alternate).
                    "best": self.policy.choose(link, slo_class, raw, explore=False).profile,
                    "spec": self.specs.get(choice.profile),
                    "predicted_s": choice.predicted_s,
                    "bandwidth_bytes_per_s": choice.bandwidth_bytes_per_s,
                    "typical_bytes": raw,
                    "at": time.time(),
                }
        return self.decisions

    async def step(self, client: Any, block_ms: int = 1000) -> int:
        """Read new telemetry, update, publish. Returns how many records were read."""
        if self._last_id is None:
            # Warm start from the stream's recent history (a restarted controller).
            recent = await client.xrevrange(TELEMETRY_STREAM, count=WARM_START_RECORDS)
            items = list(reversed(recent))
            self._last_id = items[-1][0] if items else "0-0"
        else:
            entries = await client.xread({TELEMETRY_STREAM: self._last_id}, count=1000, block=block_ms)
            items = [item for _stream, stream_items in entries or [] for item in stream_items]
        count = 0
        for entry_id, fields in items:
            self._last_id = entry_id
            count += 1
            observation = observation_from_fields(fields)
            if observation is not None:
                self.observe(observation)
        if count or not self.decisions:
            ttl = int(self.settings.kv_connector.compression.decision_ttl_s)
            pipe = client.pipeline(transaction=False)
            for decision in self.decide().values():
                key = decision_key(self.settings.app_name, decision["link"], decision["slo_class"])
                pipe.set(key, json.dumps(decision), ex=ttl)
            await pipe.execute()
        return count


class ControllerMetrics:
    """The controller's Prometheus families (published on its Redis heartbeat, merged into
    the ingress's /metrics like a worker's)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry(auto_describe=True)
        self.decision = Gauge(
            "tandem:compression_decision", "1 for the profile the controller chose per link and SLO class.",
            ["link", "slo_class", "profile"], registry=self.registry,
        )
        self.changes = Counter(
            "tandem:compression_decision_changes", "Times the chosen profile of a link and SLO class changed.",
            ["link", "slo_class"], registry=self.registry,
        )
        self.bandwidth = Gauge(
            "tandem:link_bandwidth_bytes_per_second", "The controller's bandwidth estimate per link.",
            ["link"], registry=self.registry,
        )

    def changed(self, link: str, slo_class: str, old: str | None, new: str) -> None:
        if old is not None:
            self.decision.remove(link, slo_class, old)
            self.changes.labels(link, slo_class).inc()
        self.decision.labels(link, slo_class, new).set(1)

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


@serve.deployment(name="CompressionController", num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class CompressionControllerDeployment:
    def __init__(self, settings: dict[str, Any]):
        import redis.asyncio as aioredis

        self.loop = ControllerLoop(settings)
        # Longer than the XREAD block, so only a Redis that hangs trips it.
        self._client = aioredis.Redis.from_url(self.loop.settings.redis_url, socket_timeout=5.0,
                                               socket_connect_timeout=2.0)
        self._registry = WorkerRegistry(self.loop.settings.redis_url, self.loop.settings.app_name)
        self._task = asyncio.create_task(self._run())
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        log.info("compression controller: %d profiles known", len(self.loop.costs))

    async def _run(self) -> None:
        import redis

        while True:
            try:
                await self.loop.step(self._client)
            except (redis.RedisError, OSError) as exc:
                log.warning("compression controller: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _heartbeat_loop(self) -> None:
        # Like a worker's: `tandem status` lists it and /metrics merges its families.
        while True:
            entry = {
                "replica_id": "compression-controller",
                "role": "controller",
                "heartbeat_at": time.time(),
                "stats": {"observed": self.loop.observed, "links": len(self.loop.typical_bytes)},
                "metrics": self.loop.metrics.exposition(),
            }
            await self._registry.publish("compression-controller", entry)
            await asyncio.sleep(5.0)

    async def status(self) -> dict[str, Any]:
        return {
            "profiles": [c.name for c in self.loop.costs],
            "observed": self.loop.observed,
            "links": {link: self.loop.policy.bandwidth.bandwidth(link) for link in self.loop.typical_bytes},
            "decisions": list(self.loop.decisions.values()),
        }

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError(f"controller loop stopped: {self._task.exception()!r}")
