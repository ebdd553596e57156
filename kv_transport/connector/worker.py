"""The connector's worker side: publishes finished prefills' blocks, pulls transfers into
a decode's allocated blocks, releases transfers that will never be pulled, and reports
each pull to vLLM and to the telemetry sinks.

It runs in each vLLM worker process, next to the KV cache. The engine's step loop only
hands it the step's `TandemConnectorMetadata` (`start`) and collects what finished
(`transfer_results`); the transfers themselves run on thread pools, so a slow peer never
stalls a forward pass:

- pulls on ``pull_threads`` threads, each one a `_Pull` while its payload lands;
- compressed layers decoded on one decode thread as they land, overlapping the wire;
- releases on a thread of their own: an unreachable publisher must not hold up pulls.

A pull writes only blocks the engine cannot see until the pull reports success, and every
pull reports, failed or not: a request left waiting for its KV would hang forever, and a
failed one is recomputed by vLLM (kv_load_failure_policy "recompute").
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.logger import init_logger

from kv_transport.codecs import CodecError
from kv_transport.compression import IDENTITY, CodecChooser, decode_layer_into_blocks, encode_blocks
from kv_transport.connector.config import ConnectorConfig
from kv_transport.connector.metadata import (
    RecvSpec,
    SendSpec,
    TandemConnectorMetadata,
    TransferDescription,
)
from kv_transport.connector.stats import TandemKVStats
from kv_transport.contract import AUTH_SECRET_ENV
from kv_transport.layout import KVLayout, bytes_view
from kv_transport.telemetry import TransferRecord, make_sinks
from kv_transport.transport.base import (
    EXPIRED,
    Publication,
    PullContext,
    RateLimiter,
    TransferError,
    Transport,
)
from kv_transport.transport.channel import ChannelLimits
from kv_transport.transport.control import FetchRequest
from kv_transport.wire import (
    BufferInfo,
    TransferHeader,
    WireFormatError,
    checksum,
    split_payload,
    verify,
)

if TYPE_CHECKING:
    import torch

log = init_logger("vllm.tandem.kv")


class PerPeerLimit:
    """Runs tasks on an executor, at most ``per_peer`` at a time for any one peer; the rest
    of that peer's tasks wait in its own queue, not in the executor's, so they never hold a
    thread that another peer's task could use."""

    def __init__(self, executor: Executor, per_peer: int):
        self._executor = executor
        self._per_peer = per_peer
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._waiting: dict[str, collections.deque[tuple[Callable[..., None], tuple[Any, ...]]]] = {}

    def submit(self, peer: str, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._running.get(peer, 0) >= self._per_peer:
                self._waiting.setdefault(peer, collections.deque()).append((fn, args))
                return
            self._running[peer] = self._running.get(peer, 0) + 1
        self._executor.submit(self._run, peer, fn, args)

    def _run(self, peer: str, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        finally:
            with self._lock:
                queue = self._waiting.get(peer)
                following = queue.popleft() if queue else None
                if queue is not None and not queue:
                    del self._waiting[peer]
                if following is None:
                    self._running[peer] -= 1
                    if not self._running[peer]:
                        del self._running[peer]
            if following is not None:
                try:
                    self._executor.submit(self._run, peer, *following)
                except RuntimeError:  # shut down
                    pass

    def in_flight(self, peer: str) -> int:
        with self._lock:
            return self._running.get(peer, 0)


class TandemConnectorWorker:
    def __init__(self, config: ConnectorConfig, *, block_size: int, model: str, num_blocks: int):
        self.cfg = config
        self.block_size = block_size
        self.model = model  # part of the layout's fingerprint: KV of another model is refused
        self.num_blocks = num_blocks
        self.layout: KVLayout | None = None
        self.transport: Transport = make_transport(self.cfg)
        # One token bucket per link (source worker), as a real network path would have.
        self._limiters: dict[str, RateLimiter] = {}
        self._pool = ThreadPoolExecutor(self.cfg.pull_threads, thread_name_prefix="tandem-kv-pull")
        self._pulls = PerPeerLimit(self._pool, max(1, min(self.cfg.pull_threads_per_peer, self.cfg.pull_threads)))
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="tandem-kv-release")
        # Decodes compressed layers while the pulls receive the next ones.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="tandem-kv-decode")
        self._lock = threading.Lock()
        self._finished_sending: set[str] = set()
        self._finished_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._stats = TandemKVStats()
        self.sinks = make_sinks(self.cfg.telemetry_sinks, self.cfg.redis_url)
        self.local_address = f"{self.cfg.advertise_host or self.cfg.host}:{self.transport.address['port']}"
        self.codecs = CodecChooser(
            self.cfg.compression_mode, self.cfg.compression_profile, self.cfg.redis_url,
            self.cfg.app_name, self.cfg.decision_cache_s,
        )

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout = KVLayout(kv_caches, self.num_blocks, self.block_size, self.model)
        log.info(
            "TandemConnector: %d layers, %d B/block, fingerprint %s, %s listening on %s",
            len(self.layout.layers), self.layout.block_nbytes, self.layout.fingerprint,
            self.transport.name, self.transport.address,
        )

    def start(self, meta: TandemConnectorMetadata) -> None:
        for request_id, send in meta.sends.items():
            self._publish(request_id, send)
        for request_id, recv in meta.recvs.items():
            address = recv.transfer.address
            self._pulls.submit(f"{address.get('host')}:{address.get('port')}", self._pull, request_id, recv)
        for transfer in meta.releases:
            # Not on the pull threads: a slow or unreachable publisher must not hold up pulls.
            self._releaser.submit(self._release, transfer)

    def _release(self, transfer: TransferDescription) -> None:
        try:
            self.transport.release(transfer.address, transfer.transfer_id, timeout_s=self.cfg.release_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the publisher's TTL frees it anyway
            log.info("releasing KV transfer %s failed (%r); its TTL will free it", transfer.transfer_id, exc)

    # -- prefill side: publish held blocks until pulled or expired --

    def _publish(self, request_id: str, send: SendSpec) -> None:
        assert self.layout is not None
        sender = _Send(send, self.layout, self.codecs, self.local_address)
        self.transport.publish(
            Publication(send.transfer_id, sender.materialize, functools.partial(self._sent, request_id),
                        self.cfg.ttl_s)
        )

    def _sent(self, request_id: str, transfer_id: str, outcome: str) -> None:
        """A publication is over (pulled, released or expired): vLLM may free its blocks."""
        with self._lock:
            self._finished_sending.add(request_id)
            if outcome == EXPIRED:
                self._stats.data["num_kv_expired_reqs"].append(1)

    # -- decode side: pull, verify, write into the allocated blocks --

    def _pull(self, request_id: str, recv: RecvSpec) -> None:
        transfer = recv.transfer
        source = transfer.address
        record = TransferRecord(
            transfer_id=transfer.transfer_id,
            link=f"{source.get('host')}:{source.get('port')}->{self.local_address}",
            transport=self.transport.name,
            codec="identity",
            ok=False,
        )
        started = time.perf_counter()
        try:
            self._pull_into_blocks(recv, record)
            record.ok = True
        except Exception as exc:  # noqa: BLE001 - every failure must release the request
            expected = isinstance(exc, (TransferError, WireFormatError, CodecError, OSError))
            log.warning(
                "KV pull for %s failed (%r); decode recomputes the prompt",
                request_id, exc, exc_info=not expected,
            )
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            record.total_s = time.perf_counter() - started
            # Always report: a request left waiting for its KV would hang forever.
            with self._lock:
                if record.ok:
                    self._stats.data["transfer_duration"].append(record.total_s)
                    self._stats.data["bytes_transferred"].append(record.wire_bytes)
                else:
                    self._stats.data["num_failed_transfers"].append(1)
                    self._failed_recving.add(request_id)
                self._stats.data["records"].append(record.to_dict())
                self._finished_recving.add(request_id)
            for sink in self.sinks:
                sink.emit(record)

    def _limiter(self, link: str) -> RateLimiter | None:
        if not self.cfg.rate_limit_bytes_per_s:
            return None
        with self._lock:
            if link not in self._limiters:
                self._limiters[link] = RateLimiter(self.cfg.rate_limit_bytes_per_s)
            return self._limiters[link]

    def _pull_into_blocks(self, recv: RecvSpec, record: TransferRecord) -> None:
        layout = self.layout
        if layout is None:
            raise RuntimeError("KV caches not registered")
        pull = _Pull(layout, recv, self._decoder)
        try:
            fetch_started = time.perf_counter()
            request = FetchRequest(
                recv.transfer.transfer_id, timeout_s=self.cfg.pull_timeout_s,
                wait_s=self.cfg.wait_for_publication_s, skip_blocks=recv.first_block, puller=self.local_address,
            )
            header, received = self.transport.fetch(
                recv.transfer.address, request,
                limiter=self._limiter(record.link), into=pull.into, landed=pull.landed,
            )
            _record_fetch(record, header, time.perf_counter() - fetch_started)
            pull.complete(header, received, record)
        finally:
            # Never report (and so hand the blocks back to the engine) while a decode may
            # still write into them.
            pull.wait_for_decodes()

    def transfer_results(self) -> KVConnectorTransferResults:
        with self._lock:
            results = KVConnectorTransferResults(
                finished_sending=self._finished_sending,
                finished_recving=self._finished_recving,
                failed_recving=self._failed_recving,
            )
            self._finished_sending, self._finished_recving, self._failed_recving = set(), set(), set()
        return results

    def take_stats(self) -> KVConnectorStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, TandemKVStats()
        return stats

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._releaser.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.codecs.close()
        self.transport.close()
        for sink in self.sinks:
            sink.close()


def _record_fetch(record: TransferRecord, header: TransferHeader, fetch_s: float) -> None:
    """What the fetch tells the telemetry, before the payload is verified (a payload that
    fails verification still moved its bytes)."""
    record.wire_bytes = header.payload_nbytes
    record.raw_bytes = header.raw_nbytes
    record.codec = header.codec.id
    encode_s = header.codec.params.get("encode_s", 0.0)
    record.encode_s = min(max(float(encode_s), 0.0), fetch_s) if isinstance(encode_s, (int, float)) else 0.0
    # The publisher encodes when the pull arrives, inside this fetch: counting its
    # encode as wire time, the controller would read a compressed transfer's link as
    # slower than it is and favour compression more the more it compresses. Streamed,
    # encode overlaps the wire, and the transport measured the wire itself.
    if header.measured_wire_s is not None:
        record.wire_s = min(header.measured_wire_s, fetch_s)
    else:
        record.wire_s = fetch_s - record.encode_s
    record.streamed = header.streamed


class _Send:
    """One publication's payload, made when a puller asks for it (and only then: what it
    sends depends on the blocks the puller already holds and on the link it pulls over)."""

    def __init__(self, send: SendSpec, layout: KVLayout, codecs: CodecChooser, local_address: str):
        self.send = send
        self.layout = layout
        self.codecs = codecs
        self.local_address = local_address

    def materialize(self, context: PullContext) -> tuple[TransferHeader, Iterable[memoryview]]:
        send, layout = self.send, self.layout
        skip_blocks = context.skip_blocks
        if skip_blocks > len(send.block_ids):
            raise ValueError(f"puller skips {skip_blocks} of {len(send.block_ids)} blocks")
        # The puller already holds the leading blocks (a local prefix hit): send the rest.
        block_ids = send.block_ids[skip_blocks:]
        link = f"{self.local_address}->{context.puller}"
        profile = self.codecs.pinned(send.profile) if send.profile else self.codecs.choose(link, send.slo_class)
        if profile is not None and block_ids:
            try:
                carried_tokens = send.num_tokens - skip_blocks * layout.block_size
                blobs, infos, codec = encode_blocks(profile, layout, block_ids, carried_tokens)
            except CodecError as exc:
                log.warning("compression with %s failed (%s): sending uncompressed", profile.name, exc)
            else:
                # Streamed: each layer goes out as it is encoded (sizes and checksum follow
                # in the trailer). The blocks stay held until the send is over. What the
                # codec refuses up front is sent uncompressed (above); a layer failing
                # to encode later aborts the pull, and decode recomputes the prompt.
                header = TransferHeader(
                    transfer_id=send.transfer_id, fingerprint=layout.fingerprint, dtype=layout.dtype,
                    block_size=layout.block_size, num_tokens=send.num_tokens, num_blocks=len(block_ids),
                    first_block=skip_blocks, buffers=infos, codec=codec, streamed=True,
                )
                return header, blobs
        if layout.device.type == "cpu":
            per_layer = layout.block_views(block_ids)
        else:
            per_layer = [[bytes_view(t)] for t in layout.gather_blocks(block_ids)]
        flat = [view for views in per_layer for view in views]
        header = TransferHeader(
            transfer_id=send.transfer_id,
            fingerprint=layout.fingerprint,
            dtype=layout.dtype,
            block_size=layout.block_size,
            num_tokens=send.num_tokens,
            num_blocks=len(block_ids),
            first_block=skip_blocks,
            buffers=[
                BufferInfo(layer.name, nbytes, nbytes, [len(block_ids)])
                for layer, nbytes in zip(
                    layout.layers, (sum(len(v) for v in views) for views in per_layer), strict=True
                )
            ],
            checksum=checksum(flat),
        )
        return header, flat


class _Pull:
    """One pull while its payload lands: checks each header against what this pull asked
    for, picks where the payload lands, decodes compressed layers as they arrive, and
    writes the wanted blocks once the payload is verified.

    The transport calls `into` (once the header is read) and `landed` (per complete buffer)
    from the pull's thread."""

    def __init__(self, layout: KVLayout, recv: RecvSpec, decoder: Executor):
        self.layout = layout
        self.recv = recv
        self._decoder = decoder
        self.landed_in_blocks = False
        # Compressed layers are decoded as they land, on the decode thread, while the rest
        # of the payload is still on the wire. Like a straight receive, they write blocks
        # the engine cannot see until this pull reports success.
        self.decodes: dict[int, Future[float]] = {}

    def wanted_start(self, header: TransferHeader) -> int:
        """The first carried block this pull wants; raises if the transfer cannot fill
        this cache's blocks."""
        layout, recv = self.layout, self.recv
        if header.fingerprint != layout.fingerprint:
            raise WireFormatError(f"KV layout fingerprint {header.fingerprint} != local {layout.fingerprint}")
        if header.block_size != layout.block_size or header.dtype != layout.dtype:
            raise WireFormatError("block size or dtype differs from the local cache")
        if header.codec.id != IDENTITY and len(header.buffers) != len(layout.layers):
            raise WireFormatError(f"{len(header.buffers)} layer buffers for {len(layout.layers)} layers")
        # Blocks carried: [header.first_block, header.first_block + num_blocks); wanted: ours.
        start = recv.first_block - header.first_block
        if start < 0 or start + len(recv.block_ids) > header.num_blocks or header.num_blocks == 0:
            raise WireFormatError(
                f"needs blocks {recv.first_block}..{recv.first_block + len(recv.block_ids)}, transfer carries "
                f"{header.first_block}..{header.first_block + header.num_blocks}"
            )
        return start

    def expect(self, header: TransferHeader) -> None:
        """Refuse a header this pull did not ask for, or whose sizes exceed what the
        blocks it names can hold: a hostile size must never be allocated."""
        self.wanted_start(header)
        published = self.recv.transfer.num_blocks
        if header.first_block + header.num_blocks > published:
            raise WireFormatError(f"{header.num_blocks} blocks from {header.first_block}: {published} were published")
        if header.raw_nbytes > header.num_blocks * self.layout.block_nbytes:
            raise WireFormatError(f"{header.raw_nbytes} raw bytes for {header.num_blocks} blocks")
        if header.codec.id == IDENTITY and not header.streamed and header.payload_nbytes != header.raw_nbytes:
            raise WireFormatError("an uncompressed payload must be its raw size")
        if not header.streamed and any(
            info.nbytes > header.chunk_limit(index) for index, info in enumerate(header.buffers)
        ):
            # A compressed layer is never much larger than its raw bytes (as a streamed
            # chunk is bounded on arrival).
            raise WireFormatError("a compressed layer larger than its raw size can encode to")

    def into(self, header: TransferHeader) -> list[memoryview] | None:
        """Where the payload lands: the allocated blocks themselves, or (None) a staging
        buffer of the transport's."""
        layout, recv = self.layout, self.recv
        self.expect(header)  # before anything is allocated for it
        # The common case (no local prefix hit, identity codec, CPU cache): receive
        # straight into the allocated blocks. They are invisible to the engine until
        # this pull reports success, so a payload that fails verification is harmless.
        if (
            layout.device.type == "cpu"
            and not header.streamed
            and header.first_block == recv.first_block
            and header.num_blocks == len(recv.block_ids)
            and header.fingerprint == layout.fingerprint
            and header.codec.id == "identity"
        ):
            self.landed_in_blocks = True
            return [v for views in layout.block_views(recv.block_ids) for v in views]
        return None

    def landed(self, header: TransferHeader, position: int, blob: memoryview) -> None:
        if header.codec.id != IDENTITY:
            self.decodes[position] = self._decoder.submit(
                decode_layer_into_blocks, self.layout, header.codec, position, blob, self.recv.block_ids,
                self.wanted_start(header),
            )

    def complete(self, header: TransferHeader, received: list[memoryview], record: TransferRecord) -> None:
        """Verify the payload, then see the wanted blocks written: decoded (wait for the
        decodes) or copied over from the staging buffer."""
        verify(header, received)
        start = self.wanted_start(header)
        # Bytes the local prefix hit kept off the link.
        record.saved_bytes = header.first_block * (header.raw_nbytes // header.num_blocks)
        if header.codec.id != IDENTITY:
            if len(self.decodes) != len(header.buffers):  # every transport reports each buffer
                raise WireFormatError(f"{len(self.decodes)} of {len(header.buffers)} layers reported landed")
            tail_started = time.perf_counter()
            for decode in self.decodes.values():
                decode.result()
            # What decoding added after the payload was in (the rest overlapped the wire).
            record.decode_s = time.perf_counter() - tail_started
        elif not self.landed_in_blocks:
            # Landed in one staging buffer: copy the wanted blocks of each layer over.
            stop = start + len(self.recv.block_ids)
            wanted = []
            for view in split_payload(header, received[0]):
                per_block = len(view) // header.num_blocks
                wanted.append(view[start * per_block : stop * per_block])
            self.layout.scatter_blocks(self.recv.block_ids, wanted)

    def wait_for_decodes(self) -> None:
        wait(self.decodes.values())


def make_transport(cfg: ConnectorConfig) -> Transport:
    transport = _new_transport(cfg, ChannelLimits(max_connections=cfg.max_connections))
    secret = cfg.auth_secret or os.environ.get(AUTH_SECRET_ENV)
    if secret:
        transport.set_secret(secret.encode())  # type: ignore[attr-defined]
    else:
        log.warning("TandemConnector: no KV secret; requests to %s are not authenticated", transport.address)
    return transport


def _new_transport(cfg: ConnectorConfig, limits: ChannelLimits) -> Transport:
    if cfg.transport == "tcp":
        from kv_transport.transport.tcp import TcpTransport

        return TcpTransport(cfg.host, cfg.port, advertise_host=cfg.advertise_host, limits=limits)
    if cfg.transport == "nixl":
        from kv_transport.transport.nixl import NixlTransport

        return NixlTransport(cfg.host, cfg.port, advertise_host=cfg.advertise_host, limits=limits)
    if cfg.transport in ("nccl", "gloo"):
        from kv_transport.transport.collective import CollectiveTransport

        return CollectiveTransport(cfg.host, cfg.port, advertise_host=cfg.advertise_host, backend=cfg.transport,
                                   limits=limits)
    raise ValueError(f"unknown KV transport {cfg.transport!r} (available: tcp, nixl, nccl, gloo)")
