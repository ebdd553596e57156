"""The `tcp` transport: the decode side pulls a published transfer from the prefill side.

No dependency beyond the standard library. The server sends the header and every payload
buffer with `sendmsg` straight from the published memoryviews (no staging copy); the client
receives the payload with `recv_into` one preallocated buffer. Connections are kept per peer
and reused; one listener serves all transfers of a worker process.

    request  := b"TKVQ" | len(u32) | JSON {"op": "pull", "transfer_id": str, "wait_s": float}
    response := a wire frame (kv_transport.wire)  |  b"TKVE" | len(u32) | JSON {"error", "code"}
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Sequence
from typing import Any

from kv_transport.transport.base import (
    Publication,
    PublicationStore,
    RateLimiter,
    TransferError,
    Transport,
)
from kv_transport.wire import PREFIX_SIZE, TransferHeader, WireFormatError

log = logging.getLogger(__name__)

_REQ_MAGIC = b"TKVQ"
_ERR_MAGIC = b"TKVE"
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


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
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
                request = json.loads(_recv_bytes(sock, length))
                transfer_id = str(request["transfer_id"])
                wait_s = min(float(request.get("wait_s", 0.0)), 60.0)
            except (ValueError, KeyError, TypeError, ConnectionError):
                log.warning("tcp transport: unreadable request from %s", self.client_address)
                return
            if not self._serve_pull(sock, transfer_id, wait_s):
                return

    def _serve_pull(self, sock: socket.socket, transfer_id: str, wait_s: float) -> bool:
        store = self.server.store
        publication = store.take(transfer_id, wait_s)
        if publication is None:
            sock.sendall(_small_frame(_ERR_MAGIC, {"error": "unknown or expired transfer", "code": "unknown_transfer"}))
            return True
        delivered = False
        try:
            header, buffers = publication.materialize()
            _send_buffers(sock, [header.encode(), *buffers])
            delivered = True
            return True
        except OSError as exc:
            log.warning("tcp transport: sending %s failed: %s", transfer_id, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - report the failure to the puller
            log.exception("tcp transport: preparing %s failed", transfer_id)
            try:
                sock.sendall(_small_frame(_ERR_MAGIC, {"error": str(exc), "code": "publish_failed"}))
            except OSError:
                return False
            return True
        finally:
            store.finish(publication, delivered)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    store: PublicationStore


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None):
        self.store = PublicationStore()
        self._server = _Server((host, port), _Handler)
        self._server.store = self.store
        self.host = advertise_host or host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="tandem-kv-tcp", daemon=True)
        self._thread.start()
        self._pool: dict[tuple[str, int], list[socket.socket]] = {}
        self._pool_lock = threading.Lock()

    @property
    def address(self) -> dict[str, Any]:
        return {"transport": self.name, "host": self.host, "port": self.port}

    def publish(self, publication: Publication) -> None:
        self.store.add(publication)

    def fetch(
        self,
        address: dict[str, Any],
        transfer_id: str,
        timeout_s: float = 30.0,
        wait_s: float = 5.0,
        limiter: RateLimiter | None = None,
    ) -> tuple[TransferHeader, bytearray]:
        peer = (str(address["host"]), int(address["port"]))
        sock = self._checkout(peer, timeout_s)
        ok = False
        try:
            sock.settimeout(timeout_s + wait_s)
            sock.sendall(_small_frame(_REQ_MAGIC, {"op": "pull", "transfer_id": transfer_id, "wait_s": wait_s}))
            prefix = _recv_bytes(sock, PREFIX_SIZE)
            if prefix[:4] == _ERR_MAGIC:
                (length,) = struct.unpack("<I", prefix[4:])
                error = json.loads(_recv_bytes(sock, min(length, _MAX_REQUEST)))
                ok = True
                raise TransferError(f"{peer}: {error.get('error')}", code=error.get("code", "error"))
            header_len = TransferHeader.parse_prefix(prefix)
            header = TransferHeader.decode(_recv_bytes(sock, header_len))
            payload = bytearray(header.payload_nbytes)
            _recv_exact(sock, memoryview(payload), limiter)
            ok = True
            return header, payload
        except (OSError, ConnectionError) as exc:
            raise TransferError(f"{peer}: {exc}", code="connection") from exc
        except WireFormatError:
            raise
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

