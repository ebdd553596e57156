"""Cluster state kept in Redis: which workers are alive, in which role, under what load.

Workers refresh their entry every few seconds with a TTL, so a dead replica disappears by
itself. Redis being down never stops serving: writers log and carry on.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger(__name__)

WORKER_TTL_S = 30


def worker_key(app_name: str, replica_id: str) -> str:
    return f"tandem:{app_name}:worker:{replica_id}"


class WorkerRegistry:
    """Async writer used inside worker replicas."""

    def __init__(self, url: str | None, app_name: str):
        self._client = aioredis.Redis.from_url(url, socket_timeout=1.0) if url else None
        self._app = app_name
        self._warned = False

    async def publish(self, replica_id: str, entry: dict[str, Any]) -> None:
        if self._client is None:
            return
        try:
            await self._client.set(
                worker_key(self._app, replica_id), json.dumps(entry), ex=WORKER_TTL_S
            )
            self._warned = False
        except (redis.RedisError, OSError) as exc:
            if not self._warned:
                log.warning("cannot publish worker state to Redis: %s", exc)
                self._warned = True

    async def remove(self, replica_id: str) -> None:
        if self._client is None:
            return
        try:
            await self._client.delete(worker_key(self._app, replica_id))
        except (redis.RedisError, OSError):
            pass


def list_workers(url: str, app_name: str) -> list[dict[str, Any]]:
    """Synchronous reader for the CLI."""
    client = redis.Redis.from_url(url, socket_timeout=2.0)
    entries = []
    for key in client.scan_iter(match=worker_key(app_name, "*")):
        raw = client.get(key)
        if raw:
            entries.append(json.loads(raw))
    return sorted(entries, key=lambda e: (e.get("role", ""), e.get("replica_id", "")))
