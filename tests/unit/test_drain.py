"""The drain handshake between `tandem drain`/`down` and the ingress replicas, on a real
Redis (the ingress side is the same DrainWatcher the replicas run)."""

from __future__ import annotations

import threading

from routing import drain


async def test_replicas_drain_and_report_until_nothing_is_in_flight(redis_url):
    in_flight = {"a": 2, "b": 0}
    watchers = {rid: drain.DrainWatcher(redis_url, "app", rid, lambda rid=rid: in_flight[rid]) for rid in in_flight}
    other_app = drain.DrainWatcher(redis_url, "other", "c", lambda: 5)
    for watcher in [*watchers.values(), other_app]:
        await watcher.poll()
        assert not watcher.draining

    drain.request_drain(redis_url, "app", grace_s=30, ttl_s=60)
    for watcher in watchers.values():
        await watcher.poll()
        assert watcher.draining and not watcher.expired()
    await other_app.poll()
    assert not other_app.draining  # a drain is per app

    # Replica "a" still has two requests: the wait runs out with them reported.
    assert drain.wait_drained(redis_url, "app", replicas=2, grace_s=0.2) == {"a": 2, "b": 0}
    in_flight["a"] = 0
    done = threading.Event()
    result: dict = {}

    def wait() -> None:
        result.update(drain.wait_drained(redis_url, "app", replicas=2, grace_s=10))
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    await watchers["a"].poll()
    assert done.wait(5) and result == {"a": 0, "b": 0}

    drain.cancel_drain(redis_url, "app")
    await watchers["a"].poll()
    assert not watchers["a"].draining


async def test_streams_are_ended_once_the_grace_is_over(redis_url):
    watcher = drain.DrainWatcher(redis_url, "app", "a", lambda: 1)
    await watcher.poll()
    drain.request_drain(redis_url, "app", grace_s=0, ttl_s=60)
    await watcher.poll()
    assert watcher.draining and watcher.expired()


def test_waiting_counts_replicas_that_have_not_reported(redis_url):
    drain.request_drain(redis_url, "app", grace_s=30, ttl_s=60)
    # No replica has seen the request yet: not drained, however long the (short) wait.
    assert drain.wait_drained(redis_url, "app", replicas=1, grace_s=0.3) == {}


async def test_a_drain_left_from_before_the_replica_started_is_ignored(redis_url):
    """A key left by an earlier cluster or deploy (within its TTL) must not make a fresh
    replica refuse everything; a drain asked for after it started still counts."""
    drain.request_drain(redis_url, "app", grace_s=30, ttl_s=60)
    fresh = drain.DrainWatcher(redis_url, "app", "new", lambda: 0)
    await fresh.poll()
    await fresh.poll()
    assert not fresh.draining
    drain.request_drain(redis_url, "app", grace_s=30, ttl_s=60)
    await fresh.poll()
    assert fresh.draining and not fresh.expired()
