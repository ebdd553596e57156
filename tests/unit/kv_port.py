"""A hand-made client of a KV listener: what a stranger on the network can send."""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from kv_transport.transport.control import SMALL


def frame(body: Any, magic: bytes = b"TKVQ") -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack("<4sI", magic, len(raw)) + raw


def read_reply(sock: socket.socket) -> dict[str, Any] | None:
    """The JSON of the small frame the listener answers with; None if it closed instead."""
    try:
        prefix = sock.recv(SMALL.size, socket.MSG_WAITALL)
    except ConnectionResetError:
        return None
    if len(prefix) < SMALL.size:
        return None
    _, length = SMALL.unpack(prefix)
    return json.loads(sock.recv(length, socket.MSG_WAITALL))


def raw_request(address: dict[str, Any], body: Any, timeout_s: float = 10.0) -> dict[str, Any] | None:
    with socket.create_connection((address["host"], address["port"]), timeout=timeout_s) as sock:
        sock.sendall(body if isinstance(body, bytes) and body[:4] == b"TKVQ" else frame(body))
        return read_reply(sock)


def eventually(predicate, timeout_s: float = 15.0) -> bool:
    """Whether ``predicate`` becomes true within ``timeout_s`` (a bound on a wait, never a
    claim about speed)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
