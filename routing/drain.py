"""Graceful drain of the ingress replicas before a shutdown (`tandem drain`, `tandem down`).

A Serve handle reaches one replica, not all of them, so the drain request is a Redis key
that every ingress replica watches: once it is set, a replica answers new requests with 503
and `Retry-After` (and /health with 503, so load balancers stop sending), finishes what it
has accepted, and reports its in-flight count back under its replica id. The caller waits
until every live ingress replica of the app (named by the caller, from Ray: a count of
replicas could be met by reports from the wrong ones) reports zero or the grace period ends,
then deletes the app: nothing accepted is cut off while its prefill or decode replica is
being torn down under it. The keys are named by the Serve application, which is what the
caller drains.

If Redis is unreachable the drain is not signalled; Serve's own graceful shutdown still
lets each replica finish its requests (up to its graceful_shutdown_timeout_s).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

log = logging.getLogger("ray.serve")

POLL_S = 0.5


def drain_key(app_name: str) -> str:
    return f"tandem:{app_name}:drain"


def in_flight_key(app_name: str) -> str:
    return f"tandem:{app_name}:drain:in_flight"


class DrainWatcher:
    """Inside an ingress replica: notices a drain request and reports the in-flight count.

    A drain already set when the replica first reads Redis is ignored: it was meant for the
    replicas before this one (a previous cluster or deploy sharing Redis and the app name,
    within the key's TTL), and honouring it would refuse all traffic on a fresh replica."""

    def __init__(self, redis_url: str | None, app_name: str, replica_id: str, in_flight: Any):
        self._client = aioredis.Redis.from_url(redis_url, socket_timeout=1.0) if redis_url else None
        self._app = app_name
        self._replica = replica_id
        self._in_flight = in_flight  # () -> int
        self._seen_redis = False
        self._stale_drain: str | None = None
        self._drain_id: str | None = None
        self.draining = False
        # Monotonic time this replica's grace ends (from when it saw the drain): streams
        # still running then are ended with an error event rather than cut by the app's
        # deletion. Local, so no clock has to agree with the caller's.
        self.deadline: float | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._client is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.poll()
            except (redis.RedisError, OSError):
                pass  # Redis down: no drain can be asked for; serving goes on
            await asyncio.sleep(POLL_S)

    async def poll(self) -> None:
        assert self._client is not None
        drain_id, grace_s = _parse(await self._client.get(drain_key(self._app)))
        if not self._seen_redis:
            self._seen_redis = True
            self._stale_drain = drain_id
            if drain_id is not None:
                log.warning("ignoring a drain requested before this replica started (%s)", drain_id)
        if drain_id is None or drain_id == self._stale_drain:
            self.draining, self.deadline, self._drain_id = False, None, None
            return
        if drain_id != self._drain_id:
            log.info("drain requested: refusing new requests, finishing %d in flight", self._in_flight())
            self._drain_id = drain_id
            self.deadline = time.monotonic() + grace_s
        self.draining = True
        key = in_flight_key(self._app)
        async with self._client.pipeline(transaction=False) as pipe:
            await pipe.hset(key, self._replica, self._in_flight()).expire(key, 600).execute()

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def _parse(raw: bytes | None) -> tuple[str | None, float]:
    """(drain id, grace seconds) of a drain key's value, (None, 0) if there is none."""
    if not raw:
        return None, 0.0
    drain_id, _, grace = raw.decode(errors="replace").partition(" ")
    try:
        return drain_id, max(0.0, float(grace))
    except ValueError:
        return drain_id, 0.0


def request_drain(redis_url: str, app_name: str, grace_s: float, ttl_s: float) -> None:
    """Ask the app's ingress replicas to drain, finishing their streams within ``grace_s``."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    client.delete(in_flight_key(app_name))
    client.set(drain_key(app_name), f"{uuid.uuid4().hex} {grace_s}", ex=max(1, int(ttl_s)))


def cancel_drain(redis_url: str, app_name: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    client.delete(drain_key(app_name), in_flight_key(app_name))


@dataclass(frozen=True)
class DrainReport:
    """Where a drain stands: the live ingress replicas that answered, with their requests
    in flight, and those that have not answered yet."""

    in_flight: dict[str, int]
    silent: frozenset[str] = frozenset()

    @property
    def left(self) -> int:
        return sum(self.in_flight.values())

    @property
    def drained(self) -> bool:
        return not self.silent and not self.left


def read_report(client: redis.Redis, app_name: str, live: Iterable[str]) -> DrainReport:
    """The drain's state for the ``live`` replica ids; reports of others (replicas gone since,
    or another app sharing the key) are ignored."""
    raw = client.hgetall(in_flight_key(app_name))
    reported = {k.decode(errors="replace"): v for k, v in raw.items()}
    in_flight: dict[str, int] = {}
    silent = set()
    for replica in live:
        try:
            in_flight[replica] = max(0, int(reported[replica]))
        except (KeyError, ValueError):
            silent.add(replica)
    return DrainReport(in_flight, frozenset(silent))


def wait_drained(
    redis_url: str, app_name: str, live_replicas: Callable[[], Iterable[str]], grace_s: float
) -> DrainReport:
    """Wait until every live ingress replica (``live_replicas()``: their ids, asked afresh at
    each poll, so a replica that dies is no longer waited for) reports nothing in flight, at
    most ``grace_s``; returns the last report."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    deadline = time.monotonic() + grace_s
    while True:
        report = read_report(client, app_name, live_replicas())
        if report.drained or time.monotonic() > deadline:
            return report
        time.sleep(POLL_S)
