"""The control channel every transport holds: a bounded TCP listener on the publisher, a
pool of connections on the puller, both speaking the contract of `control`.

What a stranger can cost a listener is bounded: at most ``max_connections`` connections
(a thread each) at a time, the rest closed at accept; each read before a request is
authenticated has ``handshake_timeout_s``; an idle connection is closed after
``idle_timeout_s``. A publisher sends with a deadline (the puller's own budget, never more
than the publication's TTL), so a puller that stops reading cannot pin KV blocks. A puller
reads a whole transfer against one deadline, however slowly the bytes trickle in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import socket
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kv_transport.transport.base import (
    RELEASED,
    Publication,
    PublicationStore,
    RateLimiter,
    TransferError,
    Transport,
)
from kv_transport.transport.control import (
    ACK_MAGIC,
    ERROR_MAGIC,
    MAC_SIZE,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    REQUEST_MAGIC,
    SMALL,
    ControlRequest,
    KVAuth,
    ProtocolError,
    ack_frame,
    error_frame,
    parse_small,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_SOCK_BUF = 8 << 20
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_BATCH = 512
_RECV_CHUNK = 4 << 20
# Error codes after which a connection is not reused: the publisher closes it.
_CLOSING_CODES = frozenset({"unauthorized", "bad_request", "version", "busy"})


@dataclass(frozen=True)
class ChannelLimits:
    max_connections: int = 128
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0
    # A puller drops a pooled connection idle for longer (before the publisher would).
    client_idle_s: float = 30.0
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not 0 < self.client_idle_s < self.idle_timeout_s:
            raise ValueError("client_idle_s must be positive and below idle_timeout_s")


class Deadline:
    """One point in time a whole exchange must end by; arms a socket's timeout with what
    is left before each blocking call."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def arm(self, sock: socket.socket) -> None:
        sock.settimeout(self.remaining())


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
    # A peer that vanished (host down, link cut) is noticed on an idle connection too.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def recv_into(sock: socket.socket, view: memoryview, deadline: Deadline, limiter: RateLimiter | None = None) -> None:
    while len(view):
        deadline.arm(sock)
        got = sock.recv_into(view[:_RECV_CHUNK])
        if got == 0:
            raise ConnectionError("peer closed the connection mid-frame")
        if limiter is not None:
            limiter.consume(got)
        view = view[got:]


def recv_exact(sock: socket.socket, n: int, deadline: Deadline) -> bytes:
    buf = bytearray(n)
    recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def send_buffers(sock: socket.socket, buffers: Sequence[memoryview | bytes], deadline: Deadline) -> None:
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        deadline.arm(sock)
        sent = sock.sendmsg(pending[:_IOV_BATCH])
        # Drop fully sent buffers; trim a partially sent one.
        while sent and pending:
            head = pending[0]
            if sent >= len(head):
                sent -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0


class Session:
    """The publisher's side of one authenticated request: where to send, by when."""

    def __init__(
        self, sock: socket.socket, request: ControlRequest, auth: KVAuth | None, deadline: Deadline, peer_host: str = ""
    ):
        self.sock = sock
        self.request = request
        self.auth = auth
        self.deadline = deadline
        self.peer_host = peer_host  # the address the request came from

    def send(self, *buffers: memoryview | bytes) -> None:
        send_buffers(self.sock, buffers, self.deadline)

    def signed(self, kind: bytes, frame: bytes, body: bytes) -> list[bytes]:
        """``frame`` (whose authenticated part is ``body``) and, with a secret, its MAC."""
        if self.auth is None:
            return [frame]
        return [frame, self.auth.reply_mac(self.request.nonce, kind, body)]

    def error(self, message: str, code: str) -> None:
        self.send(error_frame(message, code))


class Reply:
    """The puller's side of one request's answer: reads against the pull's deadline and
    checks what the publisher signed."""

    def __init__(self, sock: socket.socket, request: ControlRequest, auth: KVAuth | None, deadline: Deadline):
        self.sock = sock
        self.request = request
        self.auth = auth
        self.deadline = deadline

    def exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n, self.deadline)

    def into(self, view: memoryview, limiter: RateLimiter | None = None) -> None:
        recv_into(self.sock, view, self.deadline, limiter)

    def check(self, kind: bytes, body: bytes) -> None:
        """Read and verify the MAC the publisher sent after ``body`` (with a secret)."""
        if self.auth is not None:
            self.auth.check_reply(self.request.nonce, kind, body, self.exact(MAC_SIZE))

    def small(self, prefix: bytes) -> dict[str, Any]:
        """The JSON body of a small frame (ack, error) whose prefix was read."""
        _, length = SMALL.unpack(prefix)
        if length > MAX_REPLY_BYTES:
            raise ProtocolError(f"reply of {length} bytes is too large", "protocol")
        return parse_small(self.exact(length))


# Serves one taken publication: (session, publication) -> whether the connection may serve
# further requests.
Operation = Callable[[Session, Publication], bool]
# Serves a request about the link itself, not a publication.
LinkOperation = Callable[[Session], bool]


class ControlChannel:
    """A listener (publisher side) and a connection pool (puller side)."""

    def __init__(self, host: str, port: int, store: PublicationStore, limits: ChannelLimits | None = None):
        self.store = store
        self.limits = limits or ChannelLimits()
        self.auth: KVAuth | None = None
        self.ops: dict[str, Operation] = {}
        self.link_ops: dict[str, LinkOperation] = {}
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.settimeout(0.25)
        self.port = self._listener.getsockname()[1]
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._closed = threading.Event()
        self._pool: dict[tuple[str, int], list[tuple[socket.socket, float]]] = {}
        self._pool_lock = threading.Lock()
        self._refused_logged_at = 0.0
        self._accepter = threading.Thread(target=self._accept_loop, name="tandem-kv-listen", daemon=True)
        self._accepter.start()

    # ---- publisher -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                self._log_refusal("connection limit (%d) reached; refused %s", self.limits.max_connections, peer)
                sock.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(sock, peer), name="tandem-kv-conn", daemon=True).start()
            except RuntimeError:  # no thread to be had
                sock.close()
                self._slots.release()

    def _log_refusal(self, message: str, *args: Any) -> None:
        # One line at most per second: a flood of refusals must not become a flood of logs.
        now = time.monotonic()
        if now - self._refused_logged_at >= 1.0:
            self._refused_logged_at = now
            log.warning("kv listener: " + message, *args)

    def _serve(self, sock: socket.socket, peer: Any) -> None:
        limits = self.limits
        authenticated = False
        try:
            tune(sock)
            while not self._closed.is_set():
                # A stranger gets a short deadline on every read; a peer that proved itself
                # may keep an idle pooled connection open longer.
                wait = limits.idle_timeout_s if authenticated else limits.handshake_timeout_s
                try:
                    prefix = recv_exact(sock, SMALL.size, Deadline(wait))
                except ConnectionError:
                    return  # the puller closed its (pooled) connection
                magic, length = SMALL.unpack(prefix)
                if magic != REQUEST_MAGIC or not 0 < length <= MAX_REQUEST_BYTES:
                    self._log_refusal("refused a malformed request from %s", peer)
                    return
                body = recv_exact(sock, length, Deadline(limits.handshake_timeout_s))
                try:
                    request = ControlRequest.from_wire(body, self.auth)
                except ProtocolError as exc:
                    self._log_refusal("refused a request from %s: %s", peer, exc)
                    with contextlib.suppress(OSError):
                        send_buffers(sock, [error_frame(str(exc), exc.code)], Deadline(limits.handshake_timeout_s))
                    return
                authenticated = True
                if not self._dispatch(sock, request, str(peer[0]) if isinstance(peer, tuple) else ""):
                    return
        except (OSError, ConnectionError, TimeoutError):
            return
        except Exception:  # noqa: BLE001 - one bad exchange must not kill the listener
            log.exception("kv listener: serving %s failed", peer)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            self._slots.release()

    def _dispatch(self, sock: socket.socket, request: ControlRequest, peer_host: str) -> bool:
        session = Session(sock, request, self.auth, Deadline(request.timeout_s), peer_host)
        if request.op in self.link_ops:
            return self.link_ops[request.op](session)
        op = self.ops.get(request.op)
        if op is None:
            session.error(f"unknown operation {request.op!r}", "bad_request")
            return False
        publication = self.store.take(request.transfer_id, request.wait_s)
        if publication is None:
            session.error("unknown or expired transfer", "unknown_transfer")
            return True
        # Sending ends by the puller's deadline and never holds the blocks past their TTL.
        session.deadline = Deadline(min(request.timeout_s, publication.ttl_s))
        try:
            return op(session, publication)
        except (OSError, TimeoutError) as exc:
            log.warning("kv listener: sending %s to %s failed: %r", request.transfer_id, request.puller or "?", exc)
            return False

    # ---- puller ------------------------------------------------------------------------

    def call(
        self,
        address: dict[str, Any],
        request: ControlRequest,
        receive: Callable[[Reply, bytes], T],
        budget_s: float,
    ) -> T:
        """One request/response on a pooled connection to ``address``, all of it within
        ``budget_s``. ``receive`` reads the reply after its 8-byte prefix; error frames
        become TransferError. A pooled connection the publisher closed meanwhile is
        replaced once, with a fresh nonce."""
        try:
            peer = (str(address["host"]), int(address["port"]))
        except (KeyError, TypeError, ValueError):
            raise TransferError(f"not a KV address: {address!r}", code="protocol") from None
        deadline = Deadline(budget_s)
        for attempt in range(2):
            sock, pooled = self._checkout(peer, deadline)
            answered = reusable = False
            try:
                send_buffers(sock, [request.encode(self.auth)], deadline)
                reply = Reply(sock, request, self.auth, deadline)
                prefix = reply.exact(SMALL.size)
                answered = True
                if prefix[:4] == ERROR_MAGIC:
                    error = reply.small(prefix)
                    code = str(error.get("code", "error"))
                    reusable = code not in _CLOSING_CODES
                    raise TransferError(f"{peer}: {error.get('error')}", code=code)
                result = receive(reply, prefix)
                reusable = True
                return result
            except ProtocolError as exc:
                raise TransferError(f"{peer}: {exc}", code=exc.code) from exc
            except TimeoutError as exc:
                raise TransferError(f"{peer}: no answer within the pull's deadline", code="timeout") from exc
            except (OSError, ConnectionError) as exc:
                if pooled and not answered and attempt == 0:
                    request = dataclasses.replace(request, ts=time.time(), nonce=secrets.token_hex(16))
                    continue  # a stale pooled connection: once more on a fresh one
                raise TransferError(f"{peer}: {exc}", code="connection") from exc
            finally:
                self._checkin(peer, sock, reusable)
        raise AssertionError("unreachable")

    def _checkout(self, peer: tuple[str, int], deadline: Deadline) -> tuple[socket.socket, bool]:
        now = time.monotonic()
        with self._pool_lock:
            idle = self._pool.get(peer, [])
            while idle:
                sock, since = idle.pop()
                if now - since < self.limits.client_idle_s:
                    return sock, True
                sock.close()
        try:
            sock = socket.create_connection(peer, timeout=min(deadline.remaining(), self.limits.connect_timeout_s))
        except TimeoutError as exc:
            raise TransferError(f"cannot connect to {peer}: timed out", code="timeout") from exc
        except OSError as exc:
            raise TransferError(f"cannot connect to {peer}: {exc}", code="connection") from exc
        tune(sock)
        return sock, False

    def _checkin(self, peer: tuple[str, int], sock: socket.socket, reusable: bool) -> None:
        if not reusable or self._closed.is_set():
            sock.close()
            return
        with self._pool_lock:
            self._pool.setdefault(peer, []).append((sock, time.monotonic()))

    def close(self) -> None:
        self._closed.set()
        self._accepter.join(timeout=2)
        self._listener.close()
        with self._pool_lock:
            for socks in self._pool.values():
                for sock, _ in socks:
                    sock.close()
            self._pool.clear()


def read_ack(reply: Reply, prefix: bytes) -> dict[str, Any]:
    if prefix[:4] != ACK_MAGIC:
        raise ProtocolError(f"unexpected reply {prefix[:4]!r}", "protocol")
    return reply.small(prefix)


class ChannelTransport(Transport):
    """What every transport shares: the publications, the control channel, release."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        limits: ChannelLimits | None = None,
    ):
        self.store = PublicationStore()
        self.channel = ControlChannel(host, port, self.store, limits)
        self.channel.ops["release"] = self._serve_release
        self.host = advertise_host or host
        self.port = self.channel.port

    @property
    def address(self) -> dict[str, Any]:
        return {"transport": self.name, "host": self.host, "port": self.port}

    def set_secret(self, secret: bytes | None) -> None:
        """Authenticate every request and reply with this cluster secret (see `control`):
        a stranger who reaches the port gets nothing, and nobody without it can answer."""
        self.channel.auth = KVAuth(secret) if secret else None

    def publish(self, publication: Publication) -> None:
        self.store.add(publication)

    def release(self, address: dict[str, Any], transfer_id: str, timeout_s: float = 5.0) -> None:
        request = ControlRequest(op="release", transfer_id=transfer_id, timeout_s=timeout_s)
        self.channel.call(address, request, read_ack, timeout_s)

    def _serve_release(self, session: Session, publication: Publication) -> bool:
        self.store.finish(publication, RELEASED)
        session.send(ack_frame({"released": publication.transfer_id}))
        return True

    @abstractmethod
    def close(self) -> None: ...

    def _close_channel(self) -> None:
        self.channel.close()
        self.store.close()
