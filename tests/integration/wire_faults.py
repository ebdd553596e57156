"""A man-in-the-middle on a real KV transfer: a TCP proxy between a decode worker and the
prefill worker's listener that damages the stream in a chosen way."""

from __future__ import annotations

import json
import socket
import struct
import threading


class FaultyProxy:
    MODES = ("flip_byte", "truncate", "kill_mid_transfer", "wrong_fingerprint")

    def __init__(self, upstream: tuple[str, int], mode: str):
        assert mode in self.MODES
        self.upstream = upstream
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> dict:
        return {"transport": "tcp", "host": "127.0.0.1", "port": self.port}

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        self.connections += 1
        with client, socket.create_connection(self.upstream, timeout=30) as server:
            request = _read_frame(client)
            server.sendall(request)
            prefix = _recv(server, 8)
            magic, header_len = struct.unpack("<4sI", prefix)
            header = _recv(server, header_len)
            if magic != b"TKV1":
                client.sendall(prefix + header)
                return
            meta = json.loads(header)
            payload_len = sum(b["nbytes"] for b in meta["buffers"])
            if self.mode == "wrong_fingerprint":
                meta["fingerprint"] = "0" * 32
                header = json.dumps(meta).encode()
                prefix = struct.pack("<4sI", magic, len(header))
            client.sendall(prefix + header)
            sent = 0
            while sent < payload_len:
                chunk = server.recv(min(1 << 20, payload_len - sent))
                if not chunk:
                    return
                if self.mode == "flip_byte" and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                if self.mode in ("truncate", "kill_mid_transfer") and sent + len(chunk) > payload_len // 2:
                    if self.mode == "truncate":
                        client.sendall(chunk[: payload_len // 2 - sent])
                    else:
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return  # closing (or resetting) the connection mid-payload
                client.sendall(chunk)
                sent += len(chunk)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_frame(sock: socket.socket) -> bytes:
    prefix = _recv(sock, 8)
    (length,) = struct.unpack("<I", prefix[4:])
    return prefix + _recv(sock, length)
