"""Ray Serve deployments that host vLLM engines: prefill, decode and colocated workers.

Thin adapters over `workers.engine.EngineHost`: Serve gives them replicas, health checks and
routing-stats broadcasts; the engine host does the vLLM work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import ray
from ray import serve

from control_plane.settings import Role, settings_from_dict
from control_plane.state import WorkerRegistry
from workers.engine import EngineHost, WorkerReply
from workers.metrics import WorkerMetrics

log = logging.getLogger("ray.serve")

HEARTBEAT_PERIOD_S = 5.0


def kv_listen_host(listen: str, node: str) -> str:
    """Where this worker's KV listeners bind: loopback unless KV has to cross nodes."""
    if listen == "loopback":
        return "127.0.0.1"
    if listen == "node":
        return node
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return "127.0.0.1" if len(alive) <= 1 else node


class EngineWorker:
    role: Role

    async def __init__(self, settings: dict[str, Any]):
        self._settings = settings_from_dict(settings)
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = WorkerMetrics(self.role, self._replica_id)
        node = ray.util.get_node_ip_address()
        self._host = EngineHost(
            self._settings, self.role, node_host=node, metrics=self.metrics,
            kv_host=kv_listen_host(self._settings.kv_connector.listen, node),
        )
        await self._host.start()
        self._started_at = time.time()
        self._registry = WorkerRegistry(self._settings.redis_url, self._settings.app_name)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())

    async def generate(self, endpoint: str, body: dict[str, Any]) -> AsyncGenerator[WorkerReply, None]:
        async for reply in self._host.serve(endpoint, body):
            yield reply

    async def models(self) -> dict[str, Any]:
        return await self._host.models()

    async def check_health(self) -> None:
        await self._host.check_health()

    def record_routing_stats(self) -> dict[str, Any]:
        return self._host.routing_stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the P:D planner reads of this engine (Serve's custom autoscaling metrics)."""
        return self._host.stats.planner_stats()

    def metrics_text(self) -> str:
        return self.metrics.exposition()

    def describe(self) -> dict[str, Any]:
        info = self._host.info
        return {
            "replica_id": self._replica_id,
            "role": self.role,
            "model": info.served_name if info else None,
            "kv_connector": info.kv_connector if info else None,
            "cpu_cores": info.cpu_cores if info else [],
            "pid": info.pid if info else None,
            "engine_pids": info.engine_pids if info else [],
            "node": self._host.node_host,
            # Where this worker's KV listener is reached (loopback on a single node).
            "kv_listener": self._host.kv_listener,
            "started_at": self._started_at,
            "stats": self._host.routing_stats(),
        }

    async def reset_prefix_cache(self) -> bool:
        return await self._host.reset_prefix_cache()

    async def _heartbeat_loop(self) -> None:
        while True:
            entry = self.describe()
            entry["heartbeat_at"] = time.time()
            entry["metrics"] = self.metrics.exposition()
            await self._registry.publish(self._replica_id, entry)
            await asyncio.sleep(HEARTBEAT_PERIOD_S)

    async def __del__(self) -> None:
        self._heartbeat.cancel()
        await self._registry.remove(self._replica_id)
        if self.role == "prefill":
            # Serve has stopped routing here and its calls have returned; KV they published
            # is still in this engine until decode pulls it (or its TTL frees it).
            await self._host.wait_published(timeout_s=self._settings.kv_connector.ttl_s + 5)
        await self._host.shutdown()


@serve.deployment(name="PrefillWorker", health_check_period_s=10, health_check_timeout_s=30)
class PrefillWorker(EngineWorker):
    role: Role = "prefill"


@serve.deployment(name="DecodeWorker", health_check_period_s=10, health_check_timeout_s=30)
class DecodeWorker(EngineWorker):
    role: Role = "decode"


@serve.deployment(name="ColocatedWorker", health_check_period_s=10, health_check_timeout_s=30)
class ColocatedWorker(EngineWorker):
    role: Role = "colocated"


WORKER_DEPLOYMENTS = {
    "prefill": PrefillWorker,
    "decode": DecodeWorker,
    "colocated": ColocatedWorker,
}
