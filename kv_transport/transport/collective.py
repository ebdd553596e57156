"""The `nccl` transport (and its CPU twin `gloo`): KV over torch.distributed point-to-point
send/recv on a two-rank process group per link.

The control channel (kv_transport.transport.channel) carries the requests, the wire header
and the rendezvous: on a link's first pull the puller hosts a TCPStore and asks the
publisher to join a two-rank group; the group is reused for every later transfer on that
link. The payload goes through the group: NCCL between GPUs, gloo on CPU. A publisher joins
only a store on the host the (authenticated) join request came from: nobody can make it
connect anywhere else.

What is tested where: `gloo` runs in the unit tests on CPU, through the same code path as
`nccl`. `nccl` itself needs two GPUs (NCCL refuses two ranks on one device) and is not
exercised by the test suite. GPU caches are staged through host memory by the connector
today, so NCCL currently moves a device copy of host bytes; device-side buffers are next.
"""

from __future__ import annotations

import datetime
import logging
import threading
import uuid
from typing import Any

import torch
import torch.distributed as dist

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
from kv_transport.transport.channel import ChannelLimits, ChannelTransport, Reply, Session, read_ack
from kv_transport.transport.control import ControlRequest, FetchRequest, ack_frame
from kv_transport.transport.tcp import HEADER_MAC, read_header
from kv_transport.wire import TransferHeader

log = logging.getLogger(__name__)

_PUBLISHER, _PULLER = 0, 1


class CollectiveTransport(ChannelTransport):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        backend: str = "gloo",
        timeout_s: float = 60.0,
        limits: ChannelLimits | None = None,
    ):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown collective backend {backend!r}")
        super().__init__(host, port, advertise_host, limits)
        self.name = backend
        self.backend = backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._lock = threading.Lock()
        self._groups: dict[str, Any] = {}  # group id -> process group (both sides)
        self._links: dict[tuple[str, int], tuple[str, threading.Lock]] = {}  # puller side
        self._stores: list[Any] = []  # stores this side hosts, kept alive with their groups
        # Rendezvous threads of this side's joins: a failed join leaves one waiting until its
        # store times out, and close() waits for them rather than leave C++ threads running
        # into interpreter exit (which aborts the process).
        self._joiners: list[threading.Thread] = []
        self.channel.ops["collective_pull"] = self._serve_pull
        self.channel.link_ops["collective_join"] = self._serve_join

    def _make_group(self, group_id: str, store: Any, rank: int, timeout: datetime.timedelta | None = None) -> Any:
        prefixed = dist.PrefixStore(group_id, store)
        if self.backend == "nccl":
            group = dist.ProcessGroupNCCL(prefixed, rank, 2)
        else:
            # Gloo's default device is the host name's address, which on a host with several
            # interfaces (or a node in a network namespace) need not be the one the peer
            # reaches: use the address this transport advertises.
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
            options._timeout = timeout or self._timeout
            group = dist.ProcessGroupGloo(prefixed, rank, 2, options)
        with self._lock:
            self._groups[group_id] = group
        return group

    # ---- publisher -------------------------------------------------------------------

    def _serve_join(self, session: Session) -> bool:
        request = session.request
        if not request.group or not request.store_port:
            session.error("a join names a group and a store", "bad_request")
            return False
        if request.store_host != session.peer_host:
            log.warning("%s transport: refused to join a store at %s asked for from %s",
                        self.name, request.store_host, session.peer_host)
            session.error("the store must be on the host that asks to join", "bad_request")
            return False
        store = dist.TCPStore(request.store_host, request.store_port, 2, False, timeout=self._timeout)
        self._make_group(request.group, store, _PUBLISHER)  # blocks until the puller joins too
        session.send(ack_frame({"joined": request.group}))
        return True

    def _serve_pull(self, session: Session, publication: Publication) -> bool:
        outcome = SEND_FAILED
        group_id = session.request.group
        try:
            with self._lock:
                group = self._groups.get(group_id)
            header, buffers = publication.whole(session.request.context)
            head = header.encode()
            session.send(*session.signed(HEADER_MAC, head, head[8:]))
            if group is None:
                return False  # the puller sees the connection drop and fails the pull
            if header.payload_nbytes:
                payload = torch.cat([torch.frombuffer(b, dtype=torch.uint8) for b in buffers if len(b)])
                try:
                    group.send([payload.to(self.device)], _PULLER, 0).wait()
                except RuntimeError:
                    with self._lock:  # the puller is gone: it re-joins on its next pull
                        self._groups.pop(group_id, None)
                    raise
            outcome = PULLED
            return True
        finally:
            self.store.finish(publication, outcome)

    # ---- puller ----------------------------------------------------------------------

    def _link(self, address: dict[str, Any], timeout_s: float) -> tuple[str, threading.Lock]:
        peer = (str(address["host"]), int(address["port"]))
        with self._lock:
            if peer in self._links:
                return self._links[peer]
        group_id = uuid.uuid4().hex
        # The rendezvous waits no longer than the pull would: a publisher that never joins
        # (gone, or not a collective peer) frees the waiting thread when the pull gives up.
        join_timeout = datetime.timedelta(seconds=min(timeout_s, self._timeout.total_seconds()))
        store = dist.TCPStore(self.host, 0, 2, True, timeout=join_timeout, wait_for_workers=False)
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["group"] = self._make_group(group_id, store, _PULLER, join_timeout)
            except Exception as exc:  # noqa: BLE001 - reported below
                joined["error"] = exc

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        with self._lock:
            self._joiners = [t for t in self._joiners if t.is_alive()] + [joiner]

        join = ControlRequest(op="collective_join", group=group_id, store_host=self.host, store_port=store.port,
                              timeout_s=timeout_s)
        self.channel.call(address, join, read_ack, timeout_s)
        joiner.join(timeout_s)
        if "group" not in joined:
            raise TransferError(f"no {self.name} group with {peer}: {joined.get('error')}", code="rendezvous")
        with self._lock:
            self._stores.append(store)
            self._links[peer] = (group_id, threading.Lock())
            return self._links[peer]

    def fetch(
        self,
        address: dict[str, Any],
        request: FetchRequest,
        *,
        limiter: RateLimiter | None = None,
        into: Destination | None = None,
        landed: Landed | None = None,
    ) -> tuple[TransferHeader, list[memoryview]]:
        group_id, link_lock = self._link(address, request.timeout_s)
        group = self._groups[group_id]

        def receive(reply: Reply, prefix: bytes) -> tuple[TransferHeader, list[memoryview]]:
            header = read_header(reply, prefix)
            views = receive_buffers(header, into)
            if header.payload_nbytes:
                staging = torch.empty(header.payload_nbytes, dtype=torch.uint8, device=self.device)
                group.recv([staging], _PUBLISHER, 0).wait()
                host = staging.cpu() if staging.is_cuda else staging
                offset = 0
                for view in views:
                    view[:] = memoryview(host[offset : offset + len(view)].numpy()).cast("B")
                    offset += len(view)
            if limiter is not None:
                limiter.consume(header.payload_nbytes)
            # One recv brings the whole payload: every buffer lands at once.
            report_landed(header, views, landed)
            return header, views

        # One transfer at a time per link: sends and receives pair up in order.
        with link_lock:
            try:
                return self.channel.call(address, request.control("collective_pull", group=group_id), receive,
                                         request.budget_s)
            except TransferError as exc:
                if exc.code in ("connection", "timeout"):  # the peer is gone or stuck: re-join next time
                    self._forget(address, group_id)
                raise
            except RuntimeError as exc:  # the process group broke: re-join next time
                self._forget(address, group_id)
                raise TransferError(f"{self.name} transfer {request.transfer_id} failed: {exc}", code=self.name) from exc

    def close(self) -> None:
        self._close_channel()
        with self._lock:
            joiners, self._joiners = self._joiners, []
        for joiner in joiners:
            joiner.join(self._timeout.total_seconds())
        with self._lock:  # the groups go now, in this thread, not during interpreter exit
            self._groups.clear()
            self._links.clear()
            self._stores.clear()

    def _forget(self, address: dict[str, Any], group_id: str) -> None:
        with self._lock:
            self._links.pop((str(address["host"]), int(address["port"])), None)
            self._groups.pop(group_id, None)
