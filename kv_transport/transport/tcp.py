"""The `tcp` transport: the decode side pulls a published transfer from the prefill side.

No dependency beyond the standard library. The server sends the header and every payload
buffer with `sendmsg` straight from the published memoryviews (no staging copy); the client
receives the payload with `recv_into` one preallocated buffer. Connections are kept per peer
and reused; one listener serves all transfers of a worker process.

    request  := b"TKVQ" | len(u32) | JSON {"op": "pull", "transfer_id": str, "wait_s": float}
    response := a wire frame (kv_transport.wire)  |  b"TKVE" | len(u32) | JSON {"error", "code"}

A compressed transfer goes out as a streamed frame: each layer is sent as soon as it is
encoded, so encoding, the wire and the puller's decoding of earlier layers overlap.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import xxhash

from kv_transport.transport.base import (
    PULLED,
    RELEASED,
    SEND_FAILED,
    Destination,
    Landed,
    Publication,
    PublicationStore,
    PullContext,
    RateLimiter,
    TransferError,
    Transport,
    pull_context,
    receive_buffers,
    timed,
)
from kv_transport.wire import (
    ABORT_CHUNK,
    CHUNK_PREFIX,
    MAX_PAYLOAD_BYTES,
    PREFIX_SIZE,
    StreamTrailer,
    TransferHeader,
    WireFormatError,
)

log = logging.getLogger(__name__)

_REQ_MAGIC = b"TKVQ"
_ERR_MAGIC = b"TKVE"
_ACK_MAGIC = b"TKVA"
_SMALL = struct.Struct("<4sI")
_MAX_REQUEST = 64 << 10
_SOCK_BUF = 8 << 20
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_BATCH = 512
_RECV_CHUNK = 4 << 20


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)


def _recv_exact(sock: socket.socket, view: memoryview, limiter: RateLimiter | None = None) -> None:
    while len(view):
        chunk = view[:_RECV_CHUNK]
        got = sock.recv_into(chunk)
        if got == 0:
            raise ConnectionError("peer closed the connection mid-frame")
        if limiter is not None:
            limiter.consume(got)
        view = view[got:]


def recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def _send_buffers(sock: socket.socket, buffers: Sequence[memoryview | bytes]) -> None:
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        batch = pending[:_IOV_BATCH]
        sent = sock.sendmsg(batch)
        # Drop fully sent buffers; trim a partially sent one.
        while sent and pending:
            head = pending[0]
            if sent >= len(head):
                sent -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0


def _small_frame(magic: bytes, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return _SMALL.pack(magic, len(body)) + body


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        _tune(sock)
        while True:
            try:
                prefix = sock.recv(_SMALL.size, socket.MSG_WAITALL)
            except OSError:
                return
            if len(prefix) < _SMALL.size:
                return  # client closed the (reused) connection
            magic, length = _SMALL.unpack(prefix)
            if magic != _REQ_MAGIC or length > _MAX_REQUEST:
                log.warning("tcp transport: rejected a malformed request from %s", self.client_address)
                return
            try:
                request = json.loads(recv_bytes(sock, length))
                name = str(request.get("op", "pull"))
                if not authentic(self.server.secret, request):
                    log.warning("tcp transport: unauthenticated %s request from %s refused", name, self.client_address)
                    sock.sendall(error_frame("request not authenticated", "unauthorized"))
                    continue
                if name in self.server.link_ops:
                    if not self.server.link_ops[name](sock, request):
                        return
                    continue
                op = self.server.ops[name]
                transfer_id = str(request["transfer_id"])
                wait_s = min(float(request.get("wait_s", 0.0)), 60.0)
                pull_context(request)  # a bad one is refused before the publication is taken
            except (ValueError, KeyError, TypeError, ConnectionError):
                log.warning("tcp transport: unreadable request from %s", self.client_address)
                return
            publication = self.server.store.take(transfer_id, wait_s)
            if publication is None:
                sock.sendall(error_frame("unknown or expired transfer", "unknown_transfer"))
                continue
            try:
                if not op(sock, publication, request):
                    return
            except Exception as exc:  # noqa: BLE001 - one bad transfer must not kill the listener
                log.warning("tcp transport: serving %s failed: %r", transfer_id, exc)
                return


def serve_pull(
    sock: socket.socket, publication: Publication, store: PublicationStore, context: PullContext | None = None
) -> bool:
    """Send one publication's frame on ``sock``; False if the connection is unusable."""
    outcome = SEND_FAILED
    try:
        try:
            header, buffers = publication.materialize(context or PullContext())
            head = header.encode()
            if not header.streamed:
                buffers = [memoryview(b).cast("B") for b in buffers]
        except Exception as exc:  # noqa: BLE001 - report the failure to the puller
            log.exception("tcp transport: preparing %s failed", publication.transfer_id)
            sock.sendall(error_frame(str(exc), "publish_failed"))
            return True
        if header.streamed:
            _send_stream(sock, head, header, buffers)
        else:
            _send_buffers(sock, [head, *buffers])
        outcome = PULLED
        return True
    except _StreamAborted:
        return True  # the puller was told; the connection is still in step
    finally:
        store.finish(publication, outcome)


class _StreamAborted(Exception):
    pass


def _send_stream(sock: socket.socket, head: bytes, header: TransferHeader, buffers: Iterable[memoryview]) -> None:
    """A streamed frame: the header, then each buffer as soon as it is made (the next layer
    is encoded while this one drains from the socket buffer), then the trailer."""
    _send_buffers(sock, [head])
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
            _send_buffers(sock, [CHUNK_PREFIX.pack(len(buffer)), buffer])
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - the header is out: abort in-band
        log.exception("tcp transport: encoding %s failed mid-stream", header.transfer_id)
        sock.sendall(CHUNK_PREFIX.pack(ABORT_CHUNK) + error_frame(str(exc), "publish_failed"))
        raise _StreamAborted from exc
    finally:
        made.close()
    _send_buffers(sock, [StreamTrailer(digest.hexdigest(), encode_s).encode()])


def _receive_stream(
    sock: socket.socket, header: TransferHeader, limiter: RateLimiter | None, landed: Landed | None
) -> list[memoryview]:
    """The chunks and trailer of a streamed frame, one buffer per chunk; fills in the
    header's sizes, checksum and encode time, and the time spent receiving chunk bodies."""
    views: list[memoryview] = []
    wire_s, total = 0.0, 0
    for index in range(len(header.buffers)):
        (size,) = CHUNK_PREFIX.unpack(recv_bytes(sock, CHUNK_PREFIX.size))
        if size == ABORT_CHUNK:
            prefix = recv_bytes(sock, _SMALL.size)
            if prefix[:4] != _ERR_MAGIC:
                raise WireFormatError("stream aborted without an error frame")
            error = read_small_frame(sock, prefix)
            raise TransferError(f"publisher failed mid-stream: {error.get('error')}", code=error.get("code", "error"))
        total += size
        if size > header.chunk_limit(index) or total > MAX_PAYLOAD_BYTES:
            raise WireFormatError(f"chunk {index} of {size} bytes exceeds what its layer can encode to")
        buffer = memoryview(bytearray(size))
        # Only the body: waiting for the size is waiting for the publisher's encode.
        started = time.perf_counter()
        _recv_exact(sock, buffer, limiter)
        wire_s += time.perf_counter() - started
        views.append(buffer)
        header.buffers[index].nbytes = size  # known now; the trailer confirms all of them
        if landed is not None:
            landed(header, index, buffer)
    length = StreamTrailer.parse_prefix(recv_bytes(sock, _SMALL.size))
    header.complete_stream([len(v) for v in views], StreamTrailer.decode(recv_bytes(sock, length)))
    header.measured_wire_s = wire_s
    return views


def read_small_frame(sock: socket.socket, prefix: bytes) -> dict[str, Any]:
    """The JSON body of a small frame (ack or descriptor reply) whose prefix was read."""
    (length,) = struct.unpack("<I", prefix[4:])
    if length > _MAX_REQUEST:
        raise TransferError(f"reply of {length} bytes is too large", code="protocol")
    return json.loads(recv_bytes(sock, length))


def ack_frame(payload: dict[str, Any]) -> bytes:
    return _small_frame(_ACK_MAGIC, payload)


def error_frame(message: str, code: str) -> bytes:
    return _small_frame(_ERR_MAGIC, {"error": message, "code": code})


# An operation serves one taken publication on a connection: (sock, publication, request)
# -> whether the connection may serve further requests.
Operation = Callable[[socket.socket, Publication, dict[str, Any]], bool]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    store: PublicationStore
    secret: bytes | None
    ops: dict[str, Operation]
    # Operations about the link itself, not a publication: (sock, request) -> keep going.
    link_ops: dict[str, Callable[[socket.socket, dict[str, Any]], bool]]


def request_mac(secret: bytes, request: dict[str, Any]) -> str:
    """HMAC-SHA256 over what a request names (op and transfer id or group): proves the
    caller holds the cluster's KV secret without sending it."""
    subject = f"{request.get('op', 'pull')}:{request.get('transfer_id') or request.get('group') or ''}"
    return hmac.new(secret, subject.encode(), hashlib.sha256).hexdigest()


def authentic(secret: bytes | None, request: dict[str, Any]) -> bool:
    if secret is None:
        return True
    presented = request.get("auth")
    return isinstance(presented, str) and hmac.compare_digest(presented, request_mac(secret, request))


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None):
        self.store = PublicationStore()
        self._server = _Server((host, port), _Handler)
        self._server.store = self.store
        self._server.ops = {
            "pull": lambda sock, pub, req: serve_pull(sock, pub, self.store, pull_context(req)),
            "release": self._serve_release,
        }
        self._server.link_ops = {}
        self._server.secret = None
        self._secret: bytes | None = None
        self.host = advertise_host or host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="tandem-kv-tcp", daemon=True)
        self._thread.start()
        self._pool: dict[tuple[str, int], list[socket.socket]] = {}
        self._pool_lock = threading.Lock()

    @property
    def address(self) -> dict[str, Any]:
        return {"transport": self.name, "host": self.host, "port": self.port}

    def set_secret(self, secret: bytes | None) -> None:
        """Authenticate every request with this cluster secret, both ways: this worker's
        pulls carry an HMAC of what they ask for, and requests to it without one are
        refused (a stranger who reaches the port gets nothing)."""
        self._secret = secret
        self._server.secret = secret

    def publish(self, publication: Publication) -> None:
        self.store.add(publication)

    def fetch(
        self,
        address: dict[str, Any],
        transfer_id: str,
        timeout_s: float = 30.0,
        wait_s: float = 5.0,
        limiter: RateLimiter | None = None,
        into: Destination | None = None,
        skip_blocks: int = 0,
        puller: str = "",
        landed: Landed | None = None,
    ) -> tuple[TransferHeader, list[memoryview]]:
        def receive(sock: socket.socket, prefix: bytes) -> tuple[TransferHeader, list[memoryview]]:
            header = TransferHeader.decode(recv_bytes(sock, TransferHeader.parse_prefix(prefix)))
            if header.streamed:
                return header, _receive_stream(sock, header, limiter, landed)
            views = receive_buffers(header, into)
            if landed is not None and len(views) == 1:
                # Buffer by buffer, so each is handed on while the next is on the wire.
                offset = 0
                for index, info in enumerate(header.buffers):
                    buffer = views[0][offset : offset + info.nbytes]
                    _recv_exact(sock, buffer, limiter)
                    landed(header, index, buffer)
                    offset += info.nbytes
            else:
                for view in views:
                    _recv_exact(sock, view, limiter)
            return header, views

        request = {"op": "pull", "transfer_id": transfer_id, "wait_s": wait_s,
                   "skip_blocks": skip_blocks, "puller": puller}
        return self.request(address, request, receive, timeout_s + wait_s)

    def release(self, address: dict[str, Any], transfer_id: str, timeout_s: float = 5.0) -> None:
        """Tell the publisher its transfer will never be pulled, so it frees it now."""

        self.request(address, {"op": "release", "transfer_id": transfer_id}, read_small_frame, timeout_s)

    def _serve_release(self, sock: socket.socket, publication: Publication, _request: dict[str, Any]) -> bool:
        self.store.finish(publication, RELEASED)
        sock.sendall(ack_frame({"released": publication.transfer_id}))
        return True

    def request(
        self,
        address: dict[str, Any],
        request: dict[str, Any],
        receive: Callable[[socket.socket, bytes], Any],
        timeout_s: float,
    ) -> Any:
        """One request/response on a pooled connection to ``address``. ``receive`` reads
        the response after its 8-byte prefix; error frames become TransferError."""
        peer = (str(address["host"]), int(address["port"]))
        sock = self._checkout(peer, timeout_s)
        ok = False
        try:
            sock.settimeout(timeout_s)
            if self._secret is not None:
                request = {**request, "auth": request_mac(self._secret, request)}
            sock.sendall(_small_frame(_REQ_MAGIC, request))
            prefix = recv_bytes(sock, PREFIX_SIZE)
            if prefix[:4] == _ERR_MAGIC:
                (length,) = struct.unpack("<I", prefix[4:])
                error = json.loads(recv_bytes(sock, min(length, _MAX_REQUEST)))
                ok = True
                raise TransferError(f"{peer}: {error.get('error')}", code=error.get("code", "error"))
            result = receive(sock, prefix)
            ok = True
            return result
        except (OSError, ConnectionError) as exc:
            raise TransferError(f"{peer}: {exc}", code="connection") from exc
        finally:
            self._checkin(peer, sock, reusable=ok)

    def _checkout(self, peer: tuple[str, int], timeout_s: float) -> socket.socket:
        with self._pool_lock:
            idle = self._pool.get(peer)
            if idle:
                return idle.pop()
        try:
            sock = socket.create_connection(peer, timeout=min(timeout_s, 10.0))
        except OSError as exc:
            raise TransferError(f"cannot connect to {peer}: {exc}", code="connection") from exc
        _tune(sock)
        return sock

    def _checkin(self, peer: tuple[str, int], sock: socket.socket, reusable: bool) -> None:
        if not reusable:
            sock.close()
            return
        with self._pool_lock:
            self._pool.setdefault(peer, []).append(sock)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._pool_lock:
            for socks in self._pool.values():
                for sock in socks:
                    sock.close()
            self._pool.clear()
        self.store.close()

