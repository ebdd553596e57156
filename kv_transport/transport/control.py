"""The control channel's wire contract: what a puller asks a publisher, and how both prove
they hold the cluster's KV secret.

Every transport talks to a publisher over one small request/response protocol on TCP (tcp
sends the payload on the same connection; nixl and gloo/nccl only their metadata):

    request := b"TKVQ" | len(u32) | JSON ControlRequest   (at most MAX_REQUEST_BYTES)
    reply   := a frame the operation defines, or b"TKVE" | len(u32) | JSON {"error", "code"}

With a secret (`KVAuth`), a request carries ``auth``: an HMAC-SHA256 over the canonical JSON
of *every* other field, a fresh ``nonce`` and its send time ``ts``; the publisher refuses a
request outside the replay window or whose nonce it has seen. What the publisher answers
with (a transfer header, a stream trailer, NIXL descriptors) is followed by a 32-byte HMAC
bound to the request's nonce, so nobody who can answer on a publisher's address can inject
KV, and no recorded answer can be replayed. The payload itself is not encrypted and its
checksum (xxh64) is not cryptographic: on an untrusted network, encrypt the link.

Everything read from a socket is hostile until `ControlRequest.from_wire` accepted it:
unknown fields, wrong types, non-finite or out-of-range numbers are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import struct
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kv_transport.transport.base import PullContext

PROTOCOL_VERSION = 2
REQUEST_MAGIC = b"TKVQ"
ERROR_MAGIC = b"TKVE"
ACK_MAGIC = b"TKVA"
SMALL = struct.Struct("<4sI")
MAX_REQUEST_BYTES = 4 << 10
MAX_REPLY_BYTES = 64 << 10
MAC_SIZE = 32

# Bounds on what a request may ask for.
MAX_WAIT_S = 60.0
MAX_TIMEOUT_S = 600.0
MAX_SKIP_BLOCKS = 1 << 31
_MAX_ID = 128
_MAX_PULLER = 256
_MAX_HOST = 255


class ProtocolError(ValueError):
    """A request or reply that breaks the contract (malformed, out of range, forged)."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FetchRequest:
    """One pull, as the puller asks for it: which transfer, the leading blocks it already
    holds, who it is, and its budget: ``wait_s`` for the publication to appear, then
    ``timeout_s`` for the whole transfer (not per read: a trickling peer cannot stretch it)."""

    transfer_id: str
    timeout_s: float = 30.0
    wait_s: float = 5.0
    skip_blocks: int = 0
    puller: str = ""

    def __post_init__(self) -> None:
        _check_str("transfer_id", self.transfer_id, _MAX_ID, allow_empty=False)
        _check_seconds("timeout_s", self.timeout_s, MAX_TIMEOUT_S, positive=True)
        _check_seconds("wait_s", self.wait_s, MAX_WAIT_S)
        _check_int("skip_blocks", self.skip_blocks, 0, MAX_SKIP_BLOCKS)
        _check_str("puller", self.puller, _MAX_PULLER)

    @property
    def context(self) -> PullContext:
        return PullContext(self.skip_blocks, self.puller)

    @property
    def budget_s(self) -> float:
        """The most the whole pull may take, waiting for the publication included."""
        return self.wait_s + self.timeout_s

    def control(self, op: str, **extra: Any) -> ControlRequest:
        return ControlRequest(op=op, transfer_id=self.transfer_id, wait_s=self.wait_s, timeout_s=self.timeout_s,
                              skip_blocks=self.skip_blocks, puller=self.puller, **extra)


@dataclass(frozen=True)
class ControlRequest:
    """A request on the control channel. Every field changes what the publisher does, so
    every field is under the MAC."""

    op: str
    transfer_id: str = ""
    wait_s: float = 0.0
    timeout_s: float = 30.0
    skip_blocks: int = 0
    puller: str = ""
    group: str = ""  # gloo/nccl: the process group a pull or join names
    store_host: str = ""  # gloo/nccl join: the puller's rendezvous store
    store_port: int = 0
    v: int = PROTOCOL_VERSION
    ts: float = field(default_factory=time.time)
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        _check_str("op", self.op, 32, allow_empty=False)
        _check_str("transfer_id", self.transfer_id, _MAX_ID)
        _check_seconds("wait_s", self.wait_s, MAX_WAIT_S)
        _check_seconds("timeout_s", self.timeout_s, MAX_TIMEOUT_S, positive=True)
        _check_int("skip_blocks", self.skip_blocks, 0, MAX_SKIP_BLOCKS)
        _check_str("puller", self.puller, _MAX_PULLER)
        _check_str("group", self.group, 64)
        _check_str("store_host", self.store_host, _MAX_HOST)
        _check_int("store_port", self.store_port, 0, 65535)
        _check_int("v", self.v, 0, 1 << 16)
        if self.v != PROTOCOL_VERSION:
            raise ProtocolError(f"control protocol version {self.v} is not {PROTOCOL_VERSION}", "version")
        if isinstance(self.ts, bool) or not isinstance(self.ts, (int, float)) or not math.isfinite(self.ts):
            raise ProtocolError("ts must be a finite number")
        _check_str("nonce", self.nonce, 64, allow_empty=False)

    @property
    def context(self) -> PullContext:
        return PullContext(self.skip_blocks, self.puller)

    def fields(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self, auth: KVAuth | None) -> bytes:
        body = self.fields()
        if auth is not None:
            body["auth"] = auth.request_mac(body)
        raw = json.dumps(body, separators=(",", ":")).encode()
        if len(raw) > MAX_REQUEST_BYTES:
            raise ProtocolError(f"request of {len(raw)} bytes is too large")
        return SMALL.pack(REQUEST_MAGIC, len(raw)) + raw

    @classmethod
    def from_wire(cls, raw: bytes, auth: KVAuth | None) -> ControlRequest:
        """The request in ``raw`` (the JSON after its prefix), checked and authenticated.
        Raises ProtocolError (code "unauthorized" for a missing, wrong or replayed MAC)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("request is not JSON") from None
        if not isinstance(body, dict):
            raise ProtocolError("request is not a JSON object")
        presented = body.pop("auth", None)
        known = {f.name for f in fields(cls)}
        unknown = set(body) - known
        if unknown:
            raise ProtocolError(f"unknown request fields: {sorted(unknown)[:4]}")
        if body.get("v") != PROTOCOL_VERSION:
            # A puller from before this contract (no version, nonce or time) is told so.
            raise ProtocolError(f"control protocol version {body.get('v')!r} is not {PROTOCOL_VERSION}", "version")
        if "ts" not in body or "nonce" not in body or "op" not in body:
            raise ProtocolError("a request carries op, ts and nonce")
        if auth is not None:
            # Authenticate before reading any field's meaning: a stranger learns nothing.
            if not isinstance(presented, str) or not hmac.compare_digest(presented, auth.request_mac(body)):
                raise ProtocolError("request not authenticated", "unauthorized")
        try:
            request = cls(**body)
        except TypeError as exc:
            raise ProtocolError(f"malformed request: {exc}") from None
        if auth is not None:
            auth.check_fresh(request.ts, request.nonce)
        return request


class KVAuth:
    """The cluster's KV secret: MACs requests and replies, and remembers the nonces it has
    seen within the replay window (a captured request cannot be sent again)."""

    def __init__(self, secret: bytes, window_s: float = 30.0, max_nonces: int = 1 << 18):
        if not secret:
            raise ValueError("the KV secret must not be empty")
        self._key = hashlib.sha256(b"tandem-kv-v2:" + secret).digest()
        self.window_s = window_s
        self._max_nonces = max_nonces
        self._seen: dict[str, float] = {}  # nonce -> when it leaves the window
        self._lock = threading.Lock()

    def request_mac(self, body: dict[str, Any]) -> str:
        canonical = json.dumps({k: v for k, v in body.items() if k != "auth"}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._key, b"req:" + canonical.encode(), hashlib.sha256).hexdigest()

    def reply_mac(self, nonce: str, kind: bytes, body: bytes) -> bytes:
        """The MAC following a reply part (``kind``: header, trailer, descriptors), bound
        to the request it answers."""
        return hmac.new(self._key, b"rep:" + kind + b":" + nonce.encode() + b":" + body, hashlib.sha256).digest()

    def check_reply(self, nonce: str, kind: bytes, body: bytes, presented: bytes) -> None:
        if not hmac.compare_digest(presented, self.reply_mac(nonce, kind, body)):
            raise ProtocolError(f"the publisher's {kind.decode()} is not authenticated", "unauthorized")

    def check_fresh(self, ts: float, nonce: str) -> None:
        now = time.time()
        if abs(now - ts) > self.window_s:
            raise ProtocolError("request outside the replay window (clock skew?)", "unauthorized")
        with self._lock:
            if nonce in self._seen:
                raise ProtocolError("replayed request", "unauthorized")
            if len(self._seen) >= self._max_nonces:
                self._seen = {n: until for n, until in self._seen.items() if until > now}
                if len(self._seen) >= self._max_nonces:
                    raise ProtocolError("too many requests in the replay window", "busy")
            self._seen[nonce] = now + self.window_s
            if len(self._seen) % 1024 == 0:
                self._seen = {n: until for n, until in self._seen.items() if until > now}


def small_frame(magic: bytes, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return SMALL.pack(magic, len(body)) + body


def ack_frame(payload: dict[str, Any]) -> bytes:
    return small_frame(ACK_MAGIC, payload)


def error_frame(message: str, code: str) -> bytes:
    return small_frame(ERROR_MAGIC, {"error": message[:500], "code": code[:32]})


def parse_small(body: bytes) -> dict[str, Any]:
    """The JSON object of a small reply frame (an error, an ack, descriptors)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("reply is not JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("reply is not a JSON object")
    return value


def _check_str(name: str, value: Any, limit: int, allow_empty: bool = True) -> None:
    if not isinstance(value, str) or len(value) > limit or (not allow_empty and not value):
        raise ProtocolError(f"{name} must be a string of at most {limit} characters")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_seconds(name: str, value: Any, high: float, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or value > high or (positive and value == 0):
        raise ProtocolError(f"{name} must be in {'(' if positive else '['}0, {high:g}], got {value!r}")
