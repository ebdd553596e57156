"""The decode side's pull threads: a stalled publisher holds at most its share of them."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from kv_transport.connector.worker import PerPeerLimit


def test_a_stalled_peer_cannot_starve_pulls_from_the_others():
    pool = ThreadPoolExecutor(4)
    limit = PerPeerLimit(pool, per_peer=2)
    stalled = threading.Event()
    started: list[str] = []
    other_done = threading.Event()
    try:
        for i in range(10):  # a publisher that never answers: ten pulls queue up for it
            limit.submit("slow:1", lambda i=i: (started.append(f"slow{i}"), stalled.wait(30)))
        limit.submit("fast:2", other_done.set)
        assert other_done.wait(10)  # served although the slow peer has ten pulls waiting
        assert limit.in_flight("slow:1") == 2
        assert sum(s.startswith("slow") for s in started) <= 2
        stalled.set()
        deadline = time.monotonic() + 30
        while limit.in_flight("slow:1") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(started) == 10  # every queued pull ran once the peer answered
        assert limit.in_flight("slow:1") == 0
    finally:
        stalled.set()
        pool.shutdown(wait=True)
