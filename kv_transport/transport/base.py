"""What every transport shares: published transfers, the pull interface, a link rate limiter.

A transport moves one transfer (a wire header plus payload buffers) from the worker that
published it to the worker that pulls it. Publications are single-use and expire: the
prefill side learns, through `on_done`, when it may free the request's KV blocks, and why.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kv_transport.wire import StreamTrailer, TransferHeader, checksum

if TYPE_CHECKING:
    from kv_transport.transport.control import FetchRequest

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PullContext:
    """What a pull request tells the publisher: the leading blocks the puller already
    holds (a local prefix hit) and who it is (``host:port``, which names the link and so
    the codec the controller chose for it)."""

    skip_blocks: int = 0
    puller: str = ""


# Builds a publication's header and buffers when it is pulled, for that puller. For a
# streamed header (header.streamed) the buffers are an iterable that makes each one as it is
# asked for (encodes a layer), so a transport can send one while the next is made.
Materialize = Callable[[PullContext], tuple[TransferHeader, Iterable[memoryview]]]
# Chooses where a pulled payload lands, once its header is known and before anything is
# allocated for it: writable views whose sizes add up to header.payload_nbytes (e.g. the
# destination KV blocks: a zero-copy receive), or None to let the transport allocate. It may
# raise to refuse a header (a size the puller does not expect). For a streamed header it is
# only that check: the chunks land in buffers of their own.
Destination = Callable[[TransferHeader], Sequence[memoryview] | None]


# Told each payload buffer (header.buffers[index]) as soon as all of its bytes are in, in
# order, so the puller can start on it (decode a layer) while the rest is still arriving.
# Only for payloads that land in the transport's own buffer (`into` returned None).
Landed = Callable[[TransferHeader, int, memoryview], None]


def report_landed(header: TransferHeader, views: Sequence[memoryview], landed: Landed | None) -> None:
    """For transports that only learn the whole payload at once: every buffer, after it."""
    if landed is None or len(views) != 1:
        return
    offset = 0
    for index, info in enumerate(header.buffers):
        landed(header, index, views[0][offset : offset + info.nbytes])
        offset += info.nbytes


def receive_buffers(header: TransferHeader, into: Destination | None) -> list[memoryview]:
    views = into(header) if into is not None else None
    if views is None:
        return [memoryview(bytearray(header.payload_nbytes))]
    views = [memoryview(v).cast("B") for v in views]
    if sum(len(v) for v in views) != header.payload_nbytes:
        raise TransferError("destination buffers do not match the payload size", code="protocol")
    return views


# How a publication ended: pulled by its puller, failed while being sent, never pulled before
# its TTL, released by a puller that no longer needs it, or dropped at shutdown.
PULLED, SEND_FAILED, EXPIRED, RELEASED, SHUTDOWN = "pulled", "send_failed", "expired", "released", "shutdown"


class TransferError(RuntimeError):
    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


@dataclass
class Publication:
    transfer_id: str
    # Builds the header and buffers when the transfer is pulled, so encoding can wait
    # until the puller (and so the link, and what it already holds) is known.
    materialize: Materialize
    # Called once: (transfer_id, outcome), outcome one of OUTCOMES.
    on_done: Callable[[str, str], None]
    ttl_s: float = 60.0
    created_at: float = field(default_factory=time.monotonic)

    @property
    def expires_at(self) -> float:
        return self.created_at + self.ttl_s

    def whole(self, context: PullContext) -> tuple[TransferHeader, list[memoryview]]:
        """Header and every buffer up front, for transports that must know all sizes before
        they send (one registration, one collective): a streamed publication is made whole."""
        header, buffers = self.materialize(context)
        if not header.streamed:
            return header, list(buffers)
        made, encode_s = [], 0.0
        for buffer, seconds in timed(buffers):
            made.append(memoryview(buffer).cast("B"))
            encode_s += seconds
        header.complete_stream([len(b) for b in made], StreamTrailer(checksum(made), encode_s))
        header.streamed = False
        return header, made


def timed(buffers: Iterable[memoryview]) -> Iterator[tuple[memoryview, float]]:
    """Each buffer of a (lazy) iterable, with the seconds it took to make."""
    iterator = iter(buffers)
    while True:
        started = time.perf_counter()
        try:
            buffer = next(iterator)
        except StopIteration:
            return
        yield buffer, time.perf_counter() - started


class PublicationStore:
    """Thread-safe map of live publications with a TTL reaper."""

    def __init__(self, reap_interval_s: float = 0.5):
        self._items: dict[str, Publication] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._reaper = threading.Thread(
            target=self._reap_loop, args=(reap_interval_s,), name="tandem-kv-reaper", daemon=True
        )
        self._reaper.start()

    def add(self, publication: Publication) -> None:
        with self._cond:
            self._items[publication.transfer_id] = publication
            self._cond.notify_all()

    def take(self, transfer_id: str, wait_s: float = 0.0) -> Publication | None:
        """Remove and return a publication, waiting up to wait_s for it to appear (the
        puller may race the publisher by a scheduler step)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while transfer_id not in self._items:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(remaining)
            return self._items.pop(transfer_id)

    def finish(self, publication: Publication, outcome: str) -> None:
        _notify(publication, outcome)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _reap_loop(self, interval_s: float) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(interval_s)
                now = time.monotonic()
                expired = [p for p in self._items.values() if p.expires_at <= now]
                for publication in expired:
                    del self._items[publication.transfer_id]
            for publication in expired:
                log.warning("KV transfer %s expired unpulled after %.0fs", publication.transfer_id, publication.ttl_s)
                _notify(publication, EXPIRED)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            leftovers = list(self._items.values())
            self._items.clear()
            self._cond.notify_all()
        for publication in leftovers:
            _notify(publication, SHUTDOWN)


def _notify(publication: Publication, outcome: str) -> None:
    try:
        publication.on_done(publication.transfer_id, outcome)
    except Exception:  # noqa: BLE001 - a callback must not kill a transport thread
        log.exception("on_done callback failed for %s", publication.transfer_id)


class RateLimiter:
    """Token bucket in bytes/s, to emulate a slower link between two workers."""

    def __init__(self, bytes_per_s: float, burst_bytes: float | None = None):
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        self.rate = float(bytes_per_s)
        # A link that sat idle (the sender encoding the next layer) has not banked capacity
        # to send the next burst faster: only a small burst, or a streamed transfer's layers
        # would cross in no time and the link would be measured as faster than it is.
        self.burst = float(burst_bytes if burst_bytes is not None else 64 << 10)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            deficit = -self._tokens
        if deficit > 0:
            time.sleep(deficit / self.rate)


class Transport(ABC):
    """Publish/fetch of a list of buffers. Pull is what the connector uses; a push mode
    would add `push(address, header, buffers)` on the same publications."""

    name: str

    @property
    @abstractmethod
    def address(self) -> dict[str, Any]:
        """Where pullers reach this worker (goes into kv_transfer_params)."""

    @abstractmethod
    def publish(self, publication: Publication) -> None: ...

    @abstractmethod
    def fetch(
        self,
        address: dict[str, Any],
        request: FetchRequest,
        *,
        limiter: RateLimiter | None = None,
        into: Destination | None = None,
        landed: Landed | None = None,
    ) -> tuple[TransferHeader, list[memoryview]]:
        """Pull one transfer as ``request`` asks (without the blocks the puller holds,
        within its deadline); ``limiter`` paces the link, ``into`` chooses where the
        payload lands, ``landed`` hears of each buffer as it is complete. Returns the header
        and the views the payload landed in."""

    @abstractmethod
    def release(self, address: dict[str, Any], transfer_id: str, timeout_s: float = 5.0) -> None:
        """Tell the publisher a transfer will never be pulled, so it frees it now."""

    @abstractmethod
    def close(self) -> None: ...
