"""What crosses between the connector's two sides, and between engines.

- `TransferDescription` (defined in the P/D contract, `kv_transport.contract`) is the
  prefill's answer in ``kv_transfer_params[PARAMS_KEY]``: the orchestrator hands it to the
  decode engine as is, so the decode side reads it as input from the network and
  `TransferDescription.from_params` refuses anything malformed before a block is
  allocated for it.
- `TandemConnectorMetadata` is what the scheduler side hands the worker side each step
  (vLLM pickles it to the worker process): transfers to publish, pulls to run, and
  transfers to release.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kv_transport.contract import InvalidTransferParams, TransferDescription

__all__ = ["InvalidTransferParams", "RecvSpec", "SendSpec", "TandemConnectorMetadata", "TransferDescription"]

@dataclass
class SendSpec:
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    slo_class: str = ""  # the request's class: picks the compression profile (adaptive)
    profile: str = ""  # a profile the request pinned (x-tandem-kv-profile), over any choice


@dataclass
class RecvSpec:
    transfer: TransferDescription  # the prefill's kv_transfer_params[PARAMS_KEY]
    block_ids: list[int]  # local blocks to fill
    first_block: int  # remote block index of block_ids[0] (skips a local prefix hit)


@dataclass
class TandemConnectorMetadata(KVConnectorMetadata):
    sends: dict[str, SendSpec] = field(default_factory=dict)
    recvs: dict[str, RecvSpec] = field(default_factory=dict)
    # Transfers this engine will never pull (request aborted, or nothing left to load):
    # the publisher is told to free them now instead of holding blocks until the TTL.
    releases: list[TransferDescription] = field(default_factory=list)
