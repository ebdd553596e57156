"""The `nixl` transport: the decode side READs the published buffers through NIXL (UCX:
shared memory or TCP on one host, RDMA/GPUDirect across a real cluster).

Metadata goes over the control channel (kv_transport.transport.channel): the puller asks
for a transfer, the publisher registers the buffers with its NIXL agent and answers with
the wire header, its agent metadata and the buffers' descriptors (followed by a MAC with a
secret); the puller checks every descriptor, registers one receive buffer, READs every
descriptor into it and posts a completion notification, on which the publisher deregisters
and reports the transfer delivered.

Progress threads are off: NIXL's default progress thread busy-polls (no delay) for the
life of the agent, which on a small CPU host steals a whole core from the engines (one
cause of vLLM's NixlConnector decoding at ~0.5 tokens/s on 2 cores). Here each side drives
progress only while one of its transfers is in flight.
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from kv_transport.transport.base import (
    PULLED,
    SEND_FAILED,
    Destination,
    Landed,
    Publication,
    RateLimiter,
    TransferError,
    receive_buffers,
    report_landed,
)
from kv_transport.transport.channel import ChannelLimits, ChannelTransport, Reply, Session
from kv_transport.transport.control import FetchRequest, ProtocolError, parse_small
from kv_transport.wire import MAX_PAYLOAD_BYTES, TransferHeader

log = logging.getLogger(__name__)

_DESC_MAGIC = b"TKVN"
_DESC_MAC = b"nixl-describe"
# A describe reply: the header (at most 1 MiB, base64), agent metadata, descriptors.
_MAX_DESCRIBE_BYTES = 16 << 20
_MAX_REGIONS = 1 << 16
_POLL_S = 50e-6


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:  # noqa: BLE001 - missing package or backend libraries
        return False
    return True


def _address_of(view: memoryview | bytes) -> tuple[int, int]:
    array = np.frombuffer(view, dtype=np.uint8)
    return array.ctypes.data, array.nbytes


def _coalesce(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge regions that follow each other in memory (consecutive KV blocks)."""
    merged: list[list[int]] = []
    for addr, length in regions:
        if length == 0:
            continue
        if merged and merged[-1][0] + merged[-1][1] == addr:
            merged[-1][1] += length
        else:
            merged.append([addr, length])
    return [(a, n) for a, n in merged]


class NixlTransport(ChannelTransport):
    name = "nixl"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        limits: ChannelLimits | None = None,
    ):
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        super().__init__(host, port, advertise_host, limits)
        config = nixl_agent_config(
            enable_prog_thread=False,
            backends=["UCX"],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self.agent = nixl_agent(f"tandem-{uuid.uuid4().hex}", config)
        self._known_agents: set[str] = set()
        self._notif_lock = threading.Lock()
        self._notifs: set[bytes] = set()
        self.channel.ops["nixl_describe"] = self._serve_describe

    # ---- publisher -------------------------------------------------------------------

    def _serve_describe(self, session: Session, publication: Publication) -> bool:
        outcome = SEND_FAILED
        registered = None
        try:
            try:
                header, buffers = publication.whole(session.request.context)
                regions = _coalesce([_address_of(b) for b in buffers])
                if regions:
                    registered = self.agent.register_memory([(a, n, 0, "") for a, n in regions], "DRAM")
                body = json.dumps(
                    {
                        "header": base64.b64encode(header.encode()).decode(),
                        "agent": base64.b64encode(self.agent.get_agent_metadata()).decode(),
                        "regions": regions,
                    }
                ).encode()
            except Exception as exc:  # noqa: BLE001 - report the failure to the puller
                log.exception("nixl transport: preparing %s failed", publication.transfer_id)
                session.error(str(exc), "publish_failed")
                return True
            frame = struct.pack("<4sI", _DESC_MAGIC, len(body)) + body
            session.send(*session.signed(_DESC_MAC, frame, body))
            # The READ must be done by the puller's deadline (the session's), and never
            # holds the buffers past their TTL.
            if not regions or self._await_notif(_notif_for(publication.transfer_id), session.deadline.at):
                outcome = PULLED
            else:
                log.warning("nixl transport: %s was never read", publication.transfer_id)
            return True
        finally:
            if registered is not None:
                self.agent.deregister_memory(registered)
            self.store.finish(publication, outcome)

    def _await_notif(self, message: bytes, deadline: float) -> bool:
        # Polling the agent drives UCX progress for the reader's RMA, so it doubles as the
        # transfer's progress loop.
        while time.monotonic() < deadline:
            with self._notif_lock:
                for messages in self.agent.get_new_notifs().values():
                    self._notifs.update(messages)
                if message in self._notifs:
                    self._notifs.discard(message)
                    return True
            time.sleep(_POLL_S)
        return False

    # ---- puller ----------------------------------------------------------------------

    def fetch(
        self,
        address: dict[str, Any],
        request: FetchRequest,
        *,
        limiter: RateLimiter | None = None,
        into: Destination | None = None,
        landed: Landed | None = None,
    ) -> tuple[TransferHeader, list[memoryview]]:
        def receive(reply: Reply, prefix: bytes) -> tuple[TransferHeader, bytes, list[tuple[int, int]]]:
            magic, length = struct.unpack("<4sI", prefix)
            if magic != _DESC_MAGIC:
                raise TransferError(f"unexpected reply {magic!r} to a nixl describe", code="protocol")
            if length > _MAX_DESCRIBE_BYTES:
                raise TransferError(f"describe reply of {length} bytes is too large", code="protocol")
            body = reply.exact(length)
            reply.check(_DESC_MAC, body)
            return _parse_describe(body)

        started = time.monotonic()
        header, agent_metadata, regions = self.channel.call(
            address, request.control("nixl_describe"), receive, request.budget_s
        )
        views = receive_buffers(header, into)
        if regions:
            remaining = request.budget_s - (time.monotonic() - started)
            self._read(request.transfer_id, agent_metadata, regions, views, remaining)
        if limiter is not None:
            limiter.consume(header.payload_nbytes)
        # One READ brings the whole payload: every buffer lands at once.
        report_landed(header, views, landed)
        return header, views

    def _read(
        self,
        transfer_id: str,
        agent_metadata: bytes,
        regions: list[tuple[int, int]],
        views: list[memoryview],
        timeout_s: float,
    ) -> None:
        if timeout_s <= 0:
            raise TransferError(f"no time left to READ {transfer_id}", code="timeout")
        remote_agent = self.agent.add_remote_agent(agent_metadata)
        if isinstance(remote_agent, bytes):
            remote_agent = remote_agent.decode()
        self._known_agents.add(remote_agent)
        local_regions = [_address_of(v) for v in views if len(v)]
        registered = self.agent.register_memory(
            [(a, n, 0, "") for a, n in _coalesce(local_regions)], "DRAM"
        )
        handle = None
        try:
            # Both sides' descriptor lists must pair up one to one: cut them at every
            # boundary of either side.
            local, remote = _pair_descriptors(local_regions, regions)
            handle = self.agent.initialize_xfer(
                "READ",
                self.agent.get_xfer_descs(local, "DRAM"),
                self.agent.get_xfer_descs(remote, "DRAM"),
                remote_agent,
                _notif_for(transfer_id),
            )
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"nixl READ of {transfer_id} timed out", code="timeout")
                time.sleep(_POLL_S)
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"nixl READ of {transfer_id} failed ({state})", code="nixl")
        finally:
            if handle is not None:
                self.agent.release_xfer_handle(handle)
            self.agent.deregister_memory(registered)

    def close(self) -> None:
        self._close_channel()
        if self.agent is None:
            return
        for name in self._known_agents:
            try:
                self.agent.remove_remote_agent(name)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        # Destroy the agent (and its UCX threads) now: left to the interpreter's exit, a
        # thread of it can wake up during finalisation and abort the process.
        self.agent = None
        gc.collect()


def _parse_describe(body: bytes) -> tuple[TransferHeader, bytes, list[tuple[int, int]]]:
    """A describe reply, every field checked before any descriptor or buffer is made: the
    regions must be (address, length) pairs of non-negative integers that cover exactly the
    header's payload."""
    try:
        described = parse_small(body)
        frame = base64.b64decode(described["header"], validate=True)
        agent = base64.b64decode(described["agent"], validate=True)
        raw_regions = described["regions"]
    except (ProtocolError, KeyError, TypeError, ValueError) as exc:
        raise TransferError(f"malformed nixl describe reply: {exc}", code="protocol") from None
    header = TransferHeader.decode(frame[8 : 8 + TransferHeader.parse_prefix(frame[:8])])
    if not isinstance(raw_regions, list) or len(raw_regions) > _MAX_REGIONS:
        raise TransferError("descriptors must be a bounded list", code="protocol")
    regions = []
    for region in raw_regions:
        if (
            not isinstance(region, list)
            or len(region) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in region)
            or not 0 <= region[0] < (1 << 64)
            or not 0 < region[1] <= MAX_PAYLOAD_BYTES
        ):
            raise TransferError(f"malformed descriptor {region!r}", code="protocol")
        regions.append((region[0], region[1]))
    if sum(n for _, n in regions) != header.payload_nbytes:
        raise TransferError("descriptors do not cover the announced payload", code="protocol")
    return header, agent, regions


def _pair_descriptors(
    local: list[tuple[int, int]], remote: list[tuple[int, int]]
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Split two region lists of equal total size into pairwise equal-length pieces."""
    out_local, out_remote = [], []
    li = ri = 0
    l_off = r_off = 0
    while li < len(local) and ri < len(remote):
        l_addr, l_len = local[li]
        r_addr, r_len = remote[ri]
        take = min(l_len - l_off, r_len - r_off)
        out_local.append((l_addr + l_off, take, 0))
        out_remote.append((r_addr + r_off, take, 0))
        l_off += take
        r_off += take
        if l_off == l_len:
            li, l_off = li + 1, 0
        if r_off == r_len:
            ri, r_off = ri + 1, 0
    return out_local, out_remote


def _notif_for(transfer_id: str) -> bytes:
    return f"tandem:{transfer_id}".encode()

