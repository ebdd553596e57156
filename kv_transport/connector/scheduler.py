"""The connector's scheduler side: which requests hand their KV over, which pull it, and
how many tokens and blocks that is.

It runs in vLLM's scheduler process, which holds no KV cache: no tensors and no transports
here, only block arithmetic over the requests vLLM hands in. What it decides reaches the
worker side as `TandemConnectorMetadata`, built once per engine step.

- Prefill: a finished request asked for with ``do_remote_decode`` keeps its prompt's blocks
  (vLLM delays their free) and answers with a fresh `TransferDescription`.
- Decode: a request carrying a description reports the prompt's tokens beyond any local
  prefix hit as an asynchronous external hit, and pulls them into the blocks vLLM
  allocated. A transfer it will never pull is released, so the publisher frees its blocks
  before the TTL.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from kv_transport.connector.config import ConnectorConfig
from kv_transport.connector.metadata import (
    InvalidTransferParams,
    RecvSpec,
    SendSpec,
    TandemConnectorMetadata,
    TransferDescription,
)
from kv_transport.contract import KV_PROFILE_PARAM, PARAMS_KEY, SLO_CLASS_PARAM

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

log = init_logger("vllm.tandem.kv")

# Only a request that ran to its end has the whole prompt's KV to hand over.
_HANDED_OVER = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class TandemConnectorScheduler:
    def __init__(self, block_size: int, config: ConnectorConfig, address: dict[str, Any]):
        self.block_size = block_size
        self.config = config
        self.address = address  # where decode workers pull this engine's transfers from
        self._sends: dict[str, SendSpec] = {}
        self._recvs: dict[str, RecvSpec] = {}
        self._releases: list[TransferDescription] = []

    @staticmethod
    def _incoming(request: Request) -> TransferDescription | None:
        """The transfer a decode request still has to pull, if any."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or PARAMS_KEY not in params:
            return None
        try:
            return TransferDescription.from_params(params[PARAMS_KEY])
        except InvalidTransferParams as exc:
            # From the ingress, not from a prefill engine: nothing can be pulled or released
            # with it, so the request computes its prompt itself. Consumed, so that this is
            # said once.
            log.warning("request %s: ignoring its KV transfer (%s)", request.request_id, exc)
            params["do_remote_prefill"] = False
            return None

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        transfer = self._incoming(request)
        if transfer is None:
            return 0, False
        available = min(transfer.num_tokens, request.num_prompt_tokens)
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
        num_tokens = min(transfer.num_tokens, request.num_prompt_tokens)
        needed = _blocks_for(num_tokens, self.block_size)
        # Tokens not loaded externally were a local prefix-cache hit (whole blocks): pull
        # only the blocks after them.
        first_block = (num_tokens - num_external_tokens) // self.block_size
        self._recvs[request.request_id] = RecvSpec(
            transfer=transfer, block_ids=block_ids[first_block:needed], first_block=first_block
        )
        # Consumed: a retry of this request must not pull again.
        request.kv_transfer_params["do_remote_prefill"] = False

    def _release(self, request: Request, transfer: TransferDescription) -> None:
        self._releases.append(transfer)
        request.kv_transfer_params["do_remote_prefill"] = False

    def build_connector_meta(self) -> TandemConnectorMetadata:
        meta = TandemConnectorMetadata(sends=self._sends, recvs=self._recvs, releases=self._releases)
        self._sends, self._recvs, self._releases = {}, {}, []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        transfer = self._incoming(request)
        if transfer is not None:
            # A decode request that ended before its KV was pulled (e.g. aborted while
            # queued): free the prefill worker's copy now.
            self._release(request, transfer)
            return False, None
        if not params or not params.get("do_remote_decode"):
            return False, None
        if request.status not in _HANDED_OVER:
            return False, None  # aborted: nothing to hand over
        # One list of block ids, or (hybrid allocators) one per KV cache group.
        groups = block_ids if block_ids and isinstance(block_ids[0], (list, tuple)) else [block_ids]
        blocks = list(groups[0]) if groups else []
        num_tokens = len(request.prompt_token_ids or [])
        # Blocks past the prompt hold generated tokens: decode computes those itself.
        blocks = blocks[: _blocks_for(num_tokens, self.block_size)]
        if not blocks:
            return False, None
        transfer_id = secrets.token_hex(16)  # 128-bit, unguessable, single use
        slo_class = str(params.get(SLO_CLASS_PARAM) or self.config.default_slo_class)
        pinned = params.get(KV_PROFILE_PARAM)
        self._sends[request.request_id] = SendSpec(
            transfer_id, blocks, num_tokens, slo_class, pinned if isinstance(pinned, str) else ""
        )
        transfer = TransferDescription(
            transfer_id=transfer_id,
            address=self.address,
            num_tokens=num_tokens,
            num_blocks=len(blocks),
            block_size=self.block_size,
        )
        return True, {"do_remote_prefill": True, "do_remote_decode": False, PARAMS_KEY: transfer.to_params()}
