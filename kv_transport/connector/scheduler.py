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
- Shared transfers: vLLM runs a request with ``n > 1`` as n child requests that all carry
  the parent's ``kv_transfer_params``. One of them pulls; the others wait (an unknown
  match, which vLLM's scheduler retries each step) until its blocks have landed and been
  cached, then take them from the local prefix cache. So the prompt crosses the link once
  for all n samples; if the pull fails or nothing is pulled, each computes its own.
"""

from __future__ import annotations

import enum
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
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
from kv_transport.contract import PARAMS_KEY, PrefillAsk, handoff_params

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = init_logger("vllm.tandem.kv")

# Transfers this engine is done with, remembered so that a late sibling does not pull (or
# release) again: a few steps' worth is enough, this bounds the memory.
_DONE_REMEMBERED = 4096

# Only a request that ran to its end has the whole prompt's KV to hand over.
_HANDED_OVER = (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Phase(enum.Enum):
    OPEN = "open"  # nobody pulls it yet
    PULLING = "pulling"  # one member pulls; the others wait
    LANDED = "landed"  # pulled and cached: the others hit it in the local prefix cache
    NOT_PULLED = "not_pulled"  # failed or never pulled: each member computes its own prompt


@dataclass
class SharedTransfer:
    """The decode requests of this engine that carry one transfer (the n children of one
    request), and which of them pulls it."""

    transfer: TransferDescription
    members: set[str] = field(default_factory=set)
    puller: str | None = None
    phase: Phase = Phase.OPEN


class TandemConnectorScheduler:
    def __init__(self, block_size: int, config: ConnectorConfig, address: dict[str, Any]):
        self.block_size = block_size
        self.config = config
        self.address = address  # where decode workers pull this engine's transfers from
        self._sends: dict[str, SendSpec] = {}
        self._recvs: dict[str, RecvSpec] = {}
        self._releases: list[TransferDescription] = []
        self._shared: dict[str, SharedTransfer] = {}  # by transfer id
        self._pulling: dict[str, str] = {}  # request id -> the transfer id it pulls
        self._done: OrderedDict[str, Phase] = OrderedDict()  # transfer id -> how it ended

    @staticmethod
    def _incoming(request: Request) -> TransferDescription | None:
        """The transfer a decode request still has to pull, if any."""
        params = request.kv_transfer_params
        # Whatever a request carries is input: vLLM also takes it from a client's vllm_xargs.
        if not isinstance(params, dict) or not params.get("do_remote_prefill") or PARAMS_KEY not in params:
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

    def _join(self, request: Request, transfer: TransferDescription) -> SharedTransfer:
        shared = self._shared.get(transfer.transfer_id)
        if shared is None:
            phase = self._done.get(transfer.transfer_id, Phase.OPEN)
            shared = self._shared[transfer.transfer_id] = SharedTransfer(transfer, phase=phase)
        shared.members.add(request.request_id)
        return shared

    def _leave(self, request: Request, shared: SharedTransfer | None) -> None:
        """``request`` no longer waits on the transfer (consumed, or finished); a transfer
        nobody pulled or will pull is released to its publisher."""
        request.kv_transfer_params["do_remote_prefill"] = False
        if shared is None:
            return
        shared.members.discard(request.request_id)
        if shared.puller == request.request_id and shared.phase is Phase.OPEN:
            shared.puller = None  # another member may pull it
        if not shared.members and shared.phase is not Phase.PULLING:
            self._forget(shared)
            if shared.phase is Phase.OPEN:
                self._releases.append(shared.transfer)

    def _forget(self, shared: SharedTransfer) -> None:
        transfer_id = shared.transfer.transfer_id
        del self._shared[transfer_id]
        self._done[transfer_id] = Phase.NOT_PULLED if shared.phase is Phase.OPEN else shared.phase
        while len(self._done) > _DONE_REMEMBERED:
            self._done.popitem(last=False)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        transfer = self._incoming(request)
        if transfer is None:
            return 0, False
        shared = self._join(request, transfer)
        if shared.phase in (Phase.LANDED, Phase.NOT_PULLED):
            # A sibling's pull is over: its blocks (if it landed) are in the prefix cache,
            # which vLLM's scheduler has just looked up for this request.
            self._leave(request, shared)
            return 0, False
        if shared.puller is None:
            shared.puller = request.request_id
        if shared.puller != request.request_id:
            return None, False  # a sibling pulls it: ask again next step
        available = min(transfer.num_tokens, request.num_prompt_tokens)
        count = available - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        transfer = self._incoming(request)
        if transfer is None:
            return
        shared = self._join(request, transfer)
        if num_external_tokens == 0:
            # Nothing to load (a local hit covers it, or the request skips cached KV):
            # when it was this request's to pull, nobody pulls it.
            if shared.phase is Phase.OPEN and shared.puller in (None, request.request_id):
                shared.phase = Phase.NOT_PULLED
                self._releases.append(transfer)
            self._leave(request, shared)
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
        if shared.phase is Phase.OPEN:
            shared.puller, shared.phase = request.request_id, Phase.PULLING
        self._pulling[request.request_id] = transfer.transfer_id
        # Consumed: a retry of this request must not pull again. It stays a member until
        # its pull is reported.
        request.kv_transfer_params["do_remote_prefill"] = False

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        """The worker side reports finished pulls: the siblings waiting on one may go."""
        failed = output.failed_recving or set()
        for request_id in output.finished_recving or ():
            transfer_id = self._pulling.pop(request_id, None)
            shared = self._shared.get(transfer_id) if transfer_id is not None else None
            if shared is None:
                continue
            if shared.puller == request_id and shared.phase is Phase.PULLING:
                shared.phase = Phase.NOT_PULLED if request_id in failed else Phase.LANDED
            shared.members.discard(request_id)
            if not shared.members:
                self._forget(shared)

    def build_connector_meta(self) -> TandemConnectorMetadata:
        meta = TandemConnectorMetadata(sends=self._sends, recvs=self._recvs, releases=self._releases)
        self._sends, self._recvs, self._releases = {}, {}, []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        transfer = self._incoming(request)
        if transfer is not None:
            # A decode request that ended before its KV was pulled (e.g. aborted while
            # queued): the prefill worker's copy is freed now, unless a sibling pulls it.
            shared = self._shared.get(transfer.transfer_id)
            if shared is None:
                self._releases.append(transfer)
            self._leave(request, shared)
            return False, None
        if not isinstance(params, dict) or not params.get("do_remote_decode"):
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
        ask = PrefillAsk.from_params(params)
        self._sends[request.request_id] = SendSpec(
            transfer_id, blocks, num_tokens, ask.slo_class or self.config.default_slo_class, ask.kv_profile or ""
        )
        transfer = TransferDescription(
            transfer_id=transfer_id,
            address=self.address,
            num_tokens=num_tokens,
            num_blocks=len(blocks),
            block_size=self.block_size,
        )
        return True, handoff_params(transfer)
