"""Tandem's vLLM KV connector: moves each request's KV from a prefill engine to a decode engine.

Load it out of tree:
    kv_transfer_config = {"kv_connector": "TandemConnector",
                          "kv_connector_module_path": "kv_transport.connector",
                          "kv_role": "kv_both",
                          "kv_connector_extra_config": {"transport": "tcp", "port": 0, ...}}

Protocol (pull):
1. Prefill request carries ``kv_transfer_params.do_remote_decode``. When it finishes,
   `request_finished` keeps its blocks (delayed free) and returns
   ``{"do_remote_prefill": true, "tandem": {transfer_id, address, num_tokens, ...}}``; the
   worker publishes the blocks under a fresh 128-bit transfer id.
2. Decode request carries those params. The scheduler side reports the prompt's tokens as an
   asynchronous external hit; the worker pulls, verifies (size, checksum, fingerprint) and
   writes them into the freshly allocated blocks, off the engine's step loop.
3. The prefill worker reports the transfer finished (pulled, or expired after a TTL) and
   vLLM frees the blocks. A failed pull is reported as failed: vLLM recomputes the prompt
   (kv_load_failure_policy "recompute"), so the client still gets a correct answer.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.logger import init_logger

from kv_transport.codecs import CodecError
from kv_transport.compression import IDENTITY, CodecChooser, decode_layer_into_blocks, encode_blocks
from kv_transport.contract import AUTH_SECRET_ENV, KV_PROFILE_PARAM, PARAMS_KEY, SLO_CLASS_PARAM
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
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = init_logger("vllm.tandem.kv")


@dataclass
class SendSpec:
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    slo_class: str = ""  # the request's class: picks the compression profile (adaptive)
    profile: str = ""  # a profile the request pinned (x-tandem-kv-profile), over any choice


@dataclass
class RecvSpec:
    transfer: dict[str, Any]  # the prefill's kv_transfer_params["tandem"]
    block_ids: list[int]  # local blocks to fill
    first_block: int  # remote block index of block_ids[0] (skips a local prefix hit)


@dataclass
class TandemConnectorMetadata(KVConnectorMetadata):
    sends: dict[str, SendSpec] = field(default_factory=dict)
    recvs: dict[str, RecvSpec] = field(default_factory=dict)
    # Transfers this engine will never pull (request aborted, or nothing left to load):
    # the publisher is told to free them now instead of holding blocks until the TTL.
    releases: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ConnectorConfig:
    transport: str = "tcp"
    host: str = "127.0.0.1"  # bind address of this worker's KV listener
    advertise_host: str | None = None  # address peers dial (default: host)
    port: int = 0
    ttl_s: float = 60.0  # an unpulled transfer is dropped (and its blocks freed) after this
    # A whole pull's deadline once the publication is there (not per read).
    pull_timeout_s: float = 30.0
    wait_for_publication_s: float = 10.0
    release_timeout_s: float = 2.0
    # Concurrent connections this worker's KV listener serves; more are refused at accept.
    max_connections: int = 128
    rate_limit_bytes_per_s: float | None = None  # emulate a slower link (tests, benchmarks)
    pull_threads: int = 4
    telemetry_sinks: list[str] = field(default_factory=lambda: ["redis"])
    redis_url: str | None = None
    # KV compression (kv_transport.compression): off | static | adaptive.
    compression_mode: str = "off"
    compression_profile: str = "identity"
    default_slo_class: str = "standard"
    decision_cache_s: float = 2.0
    app_name: str = "tandem"
    # Shared by the cluster's workers: every KV request and reply is HMAC-authenticated with
    # it. Unset here, it is read from the environment (AUTH_SECRET_ENV), where the worker
    # host puts it so that it never shows in vLLM's logged config.
    auth_secret: str | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> ConnectorConfig:
        known = {k: v for k, v in extra.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class TandemKVStats(KVConnectorStats):
    """Per-interval transfer telemetry, in the event-list form vLLM aggregates."""

    _KEYS = (
        "transfer_duration",
        "bytes_transferred",
        "num_failed_transfers",
        "num_kv_expired_reqs",
        "records",  # one TransferRecord dict per pull, for Prometheus in the Serve replica
    )

    def __post_init__(self) -> None:
        for key in self._KEYS:
            self.data.setdefault(key, [])

    def reset(self) -> None:
        self.data = {key: [] for key in self._KEYS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, values in other.data.items():
            self.data.setdefault(key, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        durations = self.data["transfer_duration"]
        nbytes = self.data["bytes_transferred"]
        return {
            "Num successful transfers": len(durations),
            "Avg xfer time (ms)": round(1000 * sum(durations) / len(durations), 3) if durations else 0.0,
            "Total MB transferred": round(sum(nbytes) / 2**20, 3),
            "Num failed transfers": len(self.data["num_failed_transfers"]),
            "Num KV expired reqs": len(self.data["num_kv_expired_reqs"]),
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(key) for key in self._KEYS)


class TandemConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = ConnectorConfig.from_extra(extra)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("TandemConnector supports tensor_parallel_size=1 for now")
        self._block_size = vllm_config.cache_config.block_size
        self._model = str(vllm_config.model_config.model)
        self._scheduler = _SchedulerSide(self) if role == KVConnectorRole.SCHEDULER else None
        self._worker = _WorkerSide(self, kv_cache_config) if role == KVConnectorRole.WORKER else None

    # ---- scheduler side ------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    # ---- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, TandemConnectorMetadata)
        self._worker.start(metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the request is scheduled (async external hit)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # nothing is copied during the forward: blocks are published when it ends

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        return self._worker.transfer_results()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return TandemKVStats(data=data) if data is not None else TandemKVStats()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()


class _SchedulerSide:
    def __init__(self, connector: TandemConnector):
        self.c = connector
        cfg = connector.config
        self.address = {"transport": cfg.transport, "host": cfg.advertise_host or cfg.host, "port": cfg.port}
        self._sends: dict[str, SendSpec] = {}
        self._recvs: dict[str, RecvSpec] = {}
        self._releases: list[dict[str, Any]] = []

    @staticmethod
    def _incoming(request: Request) -> dict[str, Any] | None:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill") and isinstance(params.get(PARAMS_KEY), dict):
            return params[PARAMS_KEY]
        return None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        transfer = self._incoming(request)
        if transfer is None:
            return 0, False
        available = min(int(transfer.get("num_tokens", 0)), request.num_prompt_tokens)
        count = available - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        transfer = self._incoming(request)
        if transfer is None:
            return
        if num_external_tokens == 0:
            self._release(request, transfer)
            return
        block_ids = list(blocks.get_block_ids()[0])
        num_tokens = min(int(transfer["num_tokens"]), request.num_prompt_tokens)
        needed = -(-num_tokens // self.c._block_size)
        # Tokens not loaded externally were a local prefix-cache hit (whole blocks): pull
        # only the blocks after them.
        first_block = (num_tokens - num_external_tokens) // self.c._block_size
        self._recvs[request.request_id] = RecvSpec(
            transfer=transfer, block_ids=block_ids[first_block:needed], first_block=first_block
        )
        # Consumed: a retry of this request must not pull again.
        request.kv_transfer_params["do_remote_prefill"] = False

    def _release(self, request: Request, transfer: dict[str, Any]) -> None:
        self._releases.append(transfer)
        request.kv_transfer_params["do_remote_prefill"] = False

    def build_connector_meta(self) -> TandemConnectorMetadata:
        meta = TandemConnectorMetadata(sends=self._sends, recvs=self._recvs, releases=self._releases)
        self._sends, self._recvs, self._releases = {}, {}, []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        transfer = self._incoming(request)
        if transfer is not None:
            # A decode request that ended before its KV was pulled (e.g. aborted while
            # queued): free the prefill worker's copy now.
            self._release(request, transfer)
            return False, None
        if not params or not params.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: nothing to hand over
        groups = block_ids if block_ids and isinstance(block_ids[0], (list, tuple)) else [block_ids]
        blocks = list(groups[0]) if groups else []
        num_tokens = len(request.prompt_token_ids or [])
        blocks = blocks[: -(-num_tokens // self.c._block_size)]
        if not blocks:
            return False, None
        transfer_id = secrets.token_hex(16)  # 128-bit, unguessable, single use
        slo_class = str(params.get(SLO_CLASS_PARAM) or self.c.config.default_slo_class)
        pinned = params.get(KV_PROFILE_PARAM)
        self._sends[request.request_id] = SendSpec(
            transfer_id, blocks, num_tokens, slo_class, pinned if isinstance(pinned, str) else ""
        )
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            PARAMS_KEY: {
                "transfer_id": transfer_id,
                "address": self.address,
                "num_tokens": num_tokens,
                "num_blocks": len(blocks),
                "block_size": self.c._block_size,
            },
        }


class _WorkerSide:
    def __init__(self, connector: TandemConnector, kv_cache_config: KVCacheConfig):
        self.c = connector
        self.cfg = connector.config
        self.num_blocks = kv_cache_config.num_blocks
        self.layout: KVLayout | None = None
        self.transport: Transport = _make_transport(self.cfg)
        # One token bucket per link (source worker), as a real network path would have.
        self._limiters: dict[str, RateLimiter] = {}
        self._pool = ThreadPoolExecutor(self.cfg.pull_threads, thread_name_prefix="tandem-kv-pull")
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
        self.layout = KVLayout(kv_caches, self.num_blocks, self.c._block_size, self.c._model)
        log.info(
            "TandemConnector: %d layers, %d B/block, fingerprint %s, %s listening on %s",
            len(self.layout.layers), self.layout.block_nbytes, self.layout.fingerprint,
            self.transport.name, self.transport.address,
        )

    def start(self, meta: TandemConnectorMetadata) -> None:
        for request_id, send in meta.sends.items():
            self._publish(request_id, send)
        for request_id, recv in meta.recvs.items():
            self._pool.submit(self._pull, request_id, recv)
        for transfer in meta.releases:
            # Not on the pull threads: a slow or unreachable publisher must not hold up pulls.
            self._releaser.submit(self._release, transfer)

    def _release(self, transfer: dict[str, Any]) -> None:
        try:
            self.transport.release(transfer["address"], str(transfer["transfer_id"]), timeout_s=self.cfg.release_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the publisher's TTL frees it anyway
            log.info("releasing KV transfer %s failed (%r); its TTL will free it", transfer.get("transfer_id"), exc)

    # -- prefill side: publish held blocks until pulled or expired --

    def _publish(self, request_id: str, send: SendSpec) -> None:
        assert self.layout is not None
        layout = self.layout

        def materialize(context: PullContext) -> tuple[TransferHeader, Iterable[memoryview]]:
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

        def on_done(transfer_id: str, outcome: str) -> None:
            with self._lock:
                self._finished_sending.add(request_id)
                if outcome == EXPIRED:
                    self._stats.data["num_kv_expired_reqs"].append(1)

        self.transport.publish(Publication(send.transfer_id, materialize, on_done, self.cfg.ttl_s))

    # -- decode side: pull, verify, write into the allocated blocks --

    def _pull(self, request_id: str, recv: RecvSpec) -> None:
        transfer = recv.transfer
        source = transfer.get("address", {})
        record = TransferRecord(
            transfer_id=str(transfer.get("transfer_id")),
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
        transfer = recv.transfer
        landed_in_blocks = False

        def straight_into_blocks(header: TransferHeader) -> list[memoryview] | None:
            nonlocal landed_in_blocks
            expect(header)  # before anything is allocated for it
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
                landed_in_blocks = True
                return [v for views in layout.block_views(recv.block_ids) for v in views]
            return None

        def wanted_start(header: TransferHeader) -> int:
            """The first carried block this pull wants; raises if the transfer cannot fill
            this cache's blocks."""
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

        def expect(header: TransferHeader) -> None:
            """Refuse a header this pull did not ask for, or whose sizes exceed what the
            blocks it names can hold: a hostile size must never be allocated."""
            wanted_start(header)
            published = int(transfer.get("num_blocks") or 0)
            if header.first_block + header.num_blocks > published:
                raise WireFormatError(f"{header.num_blocks} blocks from {header.first_block}: {published} were published")
            if header.raw_nbytes > header.num_blocks * layout.block_nbytes:
                raise WireFormatError(f"{header.raw_nbytes} raw bytes for {header.num_blocks} blocks")
            if header.codec.id == IDENTITY and not header.streamed and header.payload_nbytes != header.raw_nbytes:
                raise WireFormatError("an uncompressed payload must be its raw size")

        # Compressed layers are decoded as they land, on the decode thread, while the rest of
        # the payload is still on the wire. Like a straight receive, they write blocks the
        # engine cannot see until this pull reports success.
        decodes: dict[int, Future[float]] = {}

        def decode_as_it_lands(header: TransferHeader, position: int, blob: memoryview) -> None:
            if header.codec.id != IDENTITY:
                decodes[position] = self._decoder.submit(
                    decode_layer_into_blocks, layout, header.codec, position, blob, recv.block_ids,
                    wanted_start(header),
                )

        try:
            fetch_started = time.perf_counter()
            request = FetchRequest(
                str(transfer["transfer_id"]), timeout_s=self.cfg.pull_timeout_s,
                wait_s=self.cfg.wait_for_publication_s, skip_blocks=recv.first_block, puller=self.local_address,
            )
            header, received = self.transport.fetch(
                transfer["address"], request,
                limiter=self._limiter(record.link), into=straight_into_blocks, landed=decode_as_it_lands,
            )
            fetch_s = time.perf_counter() - fetch_started
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
            verify(header, received)
            start = wanted_start(header)
            # Bytes the local prefix hit kept off the link.
            record.saved_bytes = header.first_block * (header.raw_nbytes // header.num_blocks)
            if header.codec.id != IDENTITY:
                if len(decodes) != len(header.buffers):  # every transport reports each buffer
                    raise WireFormatError(f"{len(decodes)} of {len(header.buffers)} layers reported landed")
                tail_started = time.perf_counter()
                for decode in decodes.values():
                    decode.result()
                # What decoding added after the payload was in (the rest overlapped the wire).
                record.decode_s = time.perf_counter() - tail_started
            elif not landed_in_blocks:
                # Landed in one staging buffer: copy the wanted blocks of each layer over.
                stop = start + len(recv.block_ids)
                wanted = []
                for view in split_payload(header, received[0]):
                    per_block = len(view) // header.num_blocks
                    wanted.append(view[start * per_block : stop * per_block])
                layout.scatter_blocks(recv.block_ids, wanted)
        finally:
            # Never report (and so hand the blocks back to the engine) while a decode may
            # still write into them.
            wait(decodes.values())

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


def _make_transport(cfg: ConnectorConfig) -> Transport:
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
