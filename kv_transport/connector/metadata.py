"""What crosses between the connector's two sides, and between engines.

- `TransferDescription` is the prefill's answer in ``kv_transfer_params[PARAMS_KEY]``: the
  ingress hands it to the decode engine as is, so the decode side reads it as input from
  the network and `TransferDescription.from_params` refuses anything malformed before a
  block is allocated for it. `to_params` writes exactly the dict earlier versions wrote.
- `TandemConnectorMetadata` is what the scheduler side hands the worker side each step
  (vLLM pickles it to the worker process): transfers to publish, pulls to run, and
  transfers to release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

_MAX_PORT = 65535


class InvalidTransferParams(ValueError):
    """A transfer description that does not hold what a prefill engine writes."""


def _int(value: Any, name: str, minimum: int) -> int:
    # bool is an int to Python, never to a prefill engine.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidTransferParams(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


@dataclass(frozen=True)
class TransferDescription:
    """One published transfer: where to pull it from, under which id, and how much of the
    prompt it holds. ``address`` is the publisher's transport address, kept as the dict its
    transport advertised (the transports dial it as is)."""

    transfer_id: str
    address: dict[str, Any]
    num_tokens: int
    num_blocks: int
    block_size: int

    def to_params(self) -> dict[str, Any]:
        # Key order as before the refactor: the params reach clients in JSON.
        return {
            "transfer_id": self.transfer_id,
            "address": dict(self.address),
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
        }

    @classmethod
    def from_params(cls, value: Any) -> TransferDescription:
        """The description in a request's ``kv_transfer_params``; raises
        `InvalidTransferParams` for what a prefill engine would not have written. Keys it
        does not know are ignored, so a newer prefill may add some."""
        if not isinstance(value, dict):
            raise InvalidTransferParams(f"a transfer description is an object, not {type(value).__name__}")
        transfer_id = value.get("transfer_id")
        if not isinstance(transfer_id, str) or not transfer_id:
            raise InvalidTransferParams(f"transfer_id must be a non-empty string, not {transfer_id!r}")
        address = value.get("address")
        if not isinstance(address, dict):
            raise InvalidTransferParams(f"address must be an object, not {address!r}")
        host = address.get("host")
        if not isinstance(host, str) or not host:
            raise InvalidTransferParams(f"address.host must be a non-empty string, not {host!r}")
        port = _int(address.get("port"), "address.port", 0)
        if port > _MAX_PORT:
            raise InvalidTransferParams(f"address.port {port} is not a port")
        return cls(
            transfer_id=transfer_id,
            address=dict(address),
            num_tokens=_int(value.get("num_tokens"), "num_tokens", 0),
            num_blocks=_int(value.get("num_blocks"), "num_blocks", 0),
            block_size=_int(value.get("block_size"), "block_size", 1),
        )


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
