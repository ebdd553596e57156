"""The `tcp` transport: the decode side pulls a published transfer from the prefill side.

No dependency beyond the standard library. The payload goes on the control channel's own
connection (kv_transport.transport.channel): the publisher sends the header and every
payload buffer with `sendmsg` straight from the published memoryviews (no staging copy);
the puller receives with `recv_into` one preallocated buffer (or the destination blocks).

    request  := ControlRequest {"op": "pull", ...}   (kv_transport.transport.control)
    response := a wire frame (kv_transport.wire), its header followed by a MAC with a
                secret  |  an error frame

A compressed transfer goes out as a streamed frame: each layer is sent as soon as it is
encoded, so encoding, the wire and the puller's decoding of earlier layers overlap; the
trailer (sizes' checksum, encode time) is followed by a MAC too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import xxhash

from kv_transport.transport.base import (
    PULLED,
    SEND_FAILED,
    Destination,
    Landed,
    Publication,
    PublicationStore,
    RateLimiter,
    TransferError,
    receive_buffers,
    timed,
)
from kv_transport.transport.channel import ChannelLimits, ChannelTransport, Reply, Session
from kv_transport.transport.control import ERROR_MAGIC, SMALL, FetchRequest, error_frame
from kv_transport.wire import (
    ABORT_CHUNK,
    CHUNK_PREFIX,
    MAX_PAYLOAD_BYTES,
    StreamTrailer,
    TransferHeader,
    WireFormatError,
)

log = logging.getLogger(__name__)

HEADER_MAC = b"header"
TRAILER_MAC = b"trailer"


def serve_pull(session: Session, publication: Publication, store: PublicationStore) -> bool:
    """Send one publication's frame; False if the connection is unusable."""
    outcome = SEND_FAILED
    try:
        try:
            header, buffers = publication.materialize(session.request.context)
            head = header.encode()
            if not header.streamed:
                buffers = [memoryview(b).cast("B") for b in buffers]
        except Exception as exc:  # noqa: BLE001 - report the failure to the puller
            log.exception("tcp transport: preparing %s failed", publication.transfer_id)
            session.error(str(exc), "publish_failed")
            return True
        signed_head = session.signed(HEADER_MAC, head, head[SMALL.size :])
        if header.streamed:
            _send_stream(session, signed_head, header, buffers)
        else:
            session.send(*signed_head, *buffers)
        outcome = PULLED
        return True
    except _StreamAborted:
        return True  # the puller was told; the connection is still in step
    finally:
        store.finish(publication, outcome)


class _StreamAborted(Exception):
    pass


def _send_stream(session: Session, head: list[bytes], header: TransferHeader, buffers: Iterable[memoryview]) -> None:
    """A streamed frame: the header, then each buffer as soon as it is made (the next layer
    is encoded while this one drains from the socket buffer), then the trailer."""
    session.send(*head)
    digest, encode_s = xxhash.xxh64(), 0.0
    made = timed(buffers)
    try:
        # Exactly the announced count: the puller reads the trailer after the last one.
        for index in range(len(header.buffers)):
            try:
                made_buffer, seconds = next(made)
            except StopIteration:
                raise ValueError(f"made {index} buffers, the header announced {len(header.buffers)}") from None
            buffer = memoryview(made_buffer).cast("B")  # sizes on the wire are in bytes
            encode_s += seconds
            digest.update(buffer)
            session.send(CHUNK_PREFIX.pack(len(buffer)), buffer)
    except (OSError, TimeoutError):
        raise
    except Exception as exc:  # noqa: BLE001 - the header is out: abort in-band
        log.exception("tcp transport: encoding %s failed mid-stream", header.transfer_id)
        session.send(CHUNK_PREFIX.pack(ABORT_CHUNK) + error_frame(str(exc), "publish_failed"))
        raise _StreamAborted from exc
    finally:
        made.close()
    trailer = StreamTrailer(digest.hexdigest(), encode_s).encode()
    session.send(*session.signed(TRAILER_MAC, trailer, trailer[SMALL.size :]))


def read_header(reply: Reply, prefix: bytes) -> TransferHeader:
    """The transfer header whose prefix was read, its MAC checked before it is parsed."""
    body = reply.exact(TransferHeader.parse_prefix(prefix))
    reply.check(HEADER_MAC, body)
    return TransferHeader.decode(body)


def _receive_stream(
    reply: Reply, header: TransferHeader, limiter: RateLimiter | None, landed: Landed | None
) -> list[memoryview]:
    """The chunks and trailer of a streamed frame, one buffer per chunk; fills in the
    header's sizes, checksum and encode time, and the time spent receiving chunk bodies."""
    views: list[memoryview] = []
    wire_s, total = 0.0, 0
    for index in range(len(header.buffers)):
        (size,) = CHUNK_PREFIX.unpack(reply.exact(CHUNK_PREFIX.size))
        if size == ABORT_CHUNK:
            prefix = reply.exact(SMALL.size)
            if prefix[:4] != ERROR_MAGIC:
                raise WireFormatError("stream aborted without an error frame")
            error = reply.small(prefix)
            raise TransferError(f"publisher failed mid-stream: {error.get('error')}", code=str(error.get("code", "error")))
        total += size
        if size > header.chunk_limit(index) or total > MAX_PAYLOAD_BYTES:
            raise WireFormatError(f"chunk {index} of {size} bytes exceeds what its layer can encode to")
        buffer = memoryview(bytearray(size))
        # Only the body: waiting for the size is waiting for the publisher's encode.
        started = time.perf_counter()
        reply.into(buffer, limiter)
        wire_s += time.perf_counter() - started
        views.append(buffer)
        header.buffers[index].nbytes = size  # known now; the trailer confirms all of them
        if landed is not None:
            landed(header, index, buffer)
    body = reply.exact(StreamTrailer.parse_prefix(reply.exact(SMALL.size)))
    reply.check(TRAILER_MAC, body)
    header.complete_stream([len(v) for v in views], StreamTrailer.decode(body))
    header.measured_wire_s = wire_s
    return views


class TcpTransport(ChannelTransport):
    name = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        limits: ChannelLimits | None = None,
    ):
        super().__init__(host, port, advertise_host, limits)
        self.channel.ops["pull"] = lambda session, publication: serve_pull(session, publication, self.store)

    def fetch(
        self,
        address: dict[str, Any],
        request: FetchRequest,
        *,
        limiter: RateLimiter | None = None,
        into: Destination | None = None,
        landed: Landed | None = None,
    ) -> tuple[TransferHeader, list[memoryview]]:
        def receive(reply: Reply, prefix: bytes) -> tuple[TransferHeader, list[memoryview]]:
            header = read_header(reply, prefix)
            if header.streamed:
                if into is not None:
                    into(header)  # lets the puller refuse the header before anything is allocated
                return header, _receive_stream(reply, header, limiter, landed)
            views = receive_buffers(header, into)
            if landed is not None and len(views) == 1:
                # Buffer by buffer, so each is handed on while the next is on the wire.
                offset = 0
                for index, info in enumerate(header.buffers):
                    buffer = views[0][offset : offset + info.nbytes]
                    reply.into(buffer, limiter)
                    landed(header, index, buffer)
                    offset += info.nbytes
            else:
                for view in views:
                    reply.into(view, limiter)
            return header, views

        return self.channel.call(address, request.control("pull"), receive, request.budget_s)

    def close(self) -> None:
        self._close_channel()
