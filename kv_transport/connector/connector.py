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

vLLM builds one connector per role. This class is the facade it talks to, and only
delegates: the scheduler side (`scheduler.TandemConnectorScheduler`: block arithmetic, in
the scheduler process) and the worker side (`worker.TandemConnectorWorker`: transports and
the KV cache, in each worker process) share nothing but the `TandemConnectorMetadata` vLLM
carries from one to the other each step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kv_transport.connector.config import ConnectorConfig
from kv_transport.connector.metadata import TandemConnectorMetadata
from kv_transport.connector.scheduler import TandemConnectorScheduler
from kv_transport.connector.stats import TandemKVStats
from kv_transport.connector.worker import TandemConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class TandemConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = ConnectorConfig.from_extra(extra)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("TandemConnector supports tensor_parallel_size=1 for now")
        block_size = vllm_config.cache_config.block_size
        self.connector_scheduler: TandemConnectorScheduler | None = None
        self.connector_worker: TandemConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = TandemConnectorScheduler(
                block_size, self.config, self.config.advertised_address
            )
        elif role == KVConnectorRole.WORKER:
            self.connector_worker = TandemConnectorWorker(
                self.config, block_size=block_size, model=str(vllm_config.model_config.model),
                num_blocks=kv_cache_config.num_blocks,
            )

    # ---- scheduler side ------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.build_connector_meta()

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request, block_ids)

    # ---- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.connector_worker is not None
        self.connector_worker.register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.connector_worker is not None
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, TandemConnectorMetadata)
        self.connector_worker.start(metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete before the request is scheduled (async external hit)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # nothing is copied during the forward: blocks are published when it ends

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self.connector_worker is not None
        return self.connector_worker.transfer_results()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.connector_worker.take_stats() if self.connector_worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return TandemKVStats(data=data) if data is not None else TandemKVStats()

    def shutdown(self) -> None:
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
