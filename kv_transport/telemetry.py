"""Per-transfer telemetry: what each KV transfer cost, handed to pluggable sinks.

Records are produced inside the vLLM worker process (decode side, which sees the whole
pull). Sinks: ``log`` and ``redis`` (a capped Redis stream the compression controller
consumes). Prometheus export happens in the Serve replica from the same records, which
travel with vLLM's connector stats.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

TELEMETRY_STREAM = "tandem:telemetry:transfers"


@dataclass
class TransferRecord:
    transfer_id: str
    link: str  # "prefill_host:port->decode_host:port"
    transport: str
    codec: str
    ok: bool
    raw_bytes: int = 0  # KV bytes before the codec
    wire_bytes: int = 0  # bytes that crossed the link
    # KV bytes not sent because the puller's own prefix cache held those blocks (e.g. the
    # earlier turns of a conversation that stays on one decode worker).
    saved_bytes: int = 0
    # The publisher's encode time (all layers, one after the other).
    encode_s: float = 0.0
    # Decoding left after the payload was in: layers are decoded as they land, so over tcp
    # most of it overlaps the wire.
    decode_s: float = 0.0
    # Time on the link. Sent whole: the fetch (request to last payload byte) less encode_s,
    # since the publisher encodes on demand, inside the fetch. Streamed (each layer sent as
    # it is encoded, over tcp): the time spent receiving the layers' bytes, so encode_s and
    # wire_s overlap and only total_s is the handoff's duration.
    wire_s: float = 0.0
    streamed: bool = False
    total_s: float = 0.0  # fetch + verify + decode + write into the paged cache
    error: str = ""
    at: float = field(default_factory=time.time)

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 1.0

    @property
    def goodput_bytes_per_s(self) -> float:
        """KV bytes delivered per second of the whole transfer."""
        return self.raw_bytes / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["compression_ratio"] = self.compression_ratio
        data["goodput_bytes_per_s"] = self.goodput_bytes_per_s
        return data


class TelemetrySink(ABC):
    @abstractmethod
    def emit(self, record: TransferRecord) -> None: ...

    def close(self) -> None:
        return None


class LogSink(TelemetrySink):
    def emit(self, record: TransferRecord) -> None:
        log.info("kv transfer %s", json.dumps(record.to_dict()))


class RedisStreamSink(TelemetrySink):
    """XADD each record to a capped stream, from a thread of its own: a transfer never waits
    on Redis, and a slow or restarting Redis delays records instead of losing them. Up to
    ``backlog`` records wait for it (then the oldest are dropped); ``flush`` waits until
    the ones emitted so far are written. At least once: a batch whose reply timed out is
    sent again, and may then be in the stream twice."""

    RETRY_S = 1.0

    def __init__(self, url: str, stream: str = TELEMETRY_STREAM, maxlen: int = 100_000, backlog: int = 10_000):
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._stream = stream
        self._maxlen = maxlen
        self._pending: deque[dict[str, str]] = deque(maxlen=backlog)
        self._wake = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="tandem-telemetry", daemon=True)
        self._thread.start()

    def emit(self, record: TransferRecord) -> None:
        fields = {k: json.dumps(v) for k, v in record.to_dict().items()}
        with self._wake:
            self._pending.append(fields)
            self._idle.clear()
            self._wake.notify()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Whether every record emitted so far was written within ``timeout_s``."""
        return self._idle.wait(timeout_s)

    def _run(self) -> None:
        import redis

        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._idle.set()
                    self._wake.wait()
                if not self._pending:
                    return  # closed, everything written
                batch = [self._pending.popleft() for _ in range(min(100, len(self._pending)))]
            try:
                with self._client.pipeline(transaction=False) as pipe:
                    for fields in batch:
                        pipe.xadd(self._stream, fields, maxlen=self._maxlen, approximate=True)
                    pipe.execute()
                self._warned = False
            except (redis.RedisError, OSError) as exc:
                if not self._warned:
                    log.warning("telemetry: Redis unavailable (%s); records wait for it", exc)
                    self._warned = True
                with self._wake:
                    self._pending.extendleft(reversed(batch))  # first out again, in order
                    if self._closed:
                        return  # closing: what Redis did not take is given up
                    self._wake.wait(self.RETRY_S)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=2 * self.RETRY_S)
        self._client.close()


class CollectingSink(TelemetrySink):
    """Keeps records in memory (benchmarks)."""

    def __init__(self) -> None:
        self.records: list[TransferRecord] = []

    def emit(self, record: TransferRecord) -> None:
        self.records.append(record)


def make_sinks(names: list[str], redis_url: str | None) -> list[TelemetrySink]:
    sinks: list[TelemetrySink] = []
    for name in names:
        if name == "log":
            sinks.append(LogSink())
        elif name == "redis":
            if redis_url:
                sinks.append(RedisStreamSink(redis_url))
        else:
            raise ValueError(f"unknown telemetry sink {name!r} (available: log, redis)")
    return sinks


def read_stream(url: str, count: int = 1000, stream: str = TELEMETRY_STREAM) -> list[dict]:
    """The newest records of the stream, oldest first (for the controller, tests, CLI)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2.0)
    entries = client.xrevrange(stream, count=count)
    return [
        {k.decode(): json.loads(v) for k, v in fields.items()} for _, fields in reversed(entries)
    ]
