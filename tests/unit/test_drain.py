"""The drain handshake between `tandem drain`/`down` and the ingress replicas, on a real
Redis (the ingress side is the same DrainWatcher the replicas run)."""

from __future__ import annotations

import threading

import redis

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
    report = drain.wait_drained(redis_url, "app", lambda: {"a", "b"}, grace_s=0.2)
    assert report == drain.DrainReport({"a": 2, "b": 0}) and report.left == 2 and not report.drained
    in_flight["a"] = 0
    done = threading.Event()
    result: list[drain.DrainReport] = []

    def wait() -> None:
        result.append(drain.wait_drained(redis_url, "app", lambda: {"a", "b"}, grace_s=10))
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    await watchers["a"].poll()
    assert done.wait(5) and result == [drain.DrainReport({"a": 0, "b": 0})] and result[0].drained

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
    report = drain.wait_drained(redis_url, "app", lambda: {"a"}, grace_s=0.3)
    assert report == drain.DrainReport({}, frozenset({"a"})) and not report.drained


async def test_only_reports_of_the_live_replicas_count(redis_url):
    """A report from a replica that is not one of the app's live ingress replicas (one gone
    since, or another app's ingress under the same key) can neither stand in for a live
    replica that has not answered nor hold the drain up."""
    busy = drain.DrainWatcher(redis_url, "app", "live", lambda: 1)
    stranger = drain.DrainWatcher(redis_url, "app", "gone", lambda: 0)
    for watcher in (busy, stranger):
        await watcher.poll()
    drain.request_drain(redis_url, "app", grace_s=30, ttl_s=60)
    await stranger.poll()
    # Only the stranger answered: the live replica still counts as silent.
    report = drain.wait_drained(redis_url, "app", lambda: {"live"}, grace_s=0.2)
    assert report == drain.DrainReport({}, frozenset({"live"})) and not report.drained
    await busy.poll()
    assert drain.wait_drained(redis_url, "app", lambda: {"live"}, grace_s=0.2).left == 1
    # The busy replica died (Ray no longer lists it): nothing is left to wait for.
    assert drain.wait_drained(redis_url, "app", lambda: set(), grace_s=5).drained
    # What is not a count (Redis is shared) is no answer.
    redis.Redis.from_url(redis_url).hset(drain.in_flight_key("app"), "live", b"many")
    assert drain.wait_drained(redis_url, "app", lambda: {"live"}, grace_s=0.2).silent == {"live"}


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
