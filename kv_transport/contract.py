"""The P/D contract: what crosses between the orchestrator (routing/orchestrator.py), the
engines and Tandem's KV connector, in ``kv_transfer_params``. One typed module imported by
all of them; pure (no torch, no vLLM), so the ingress process can import it cheaply.

1. The orchestrator asks a prefill engine for KV: `PrefillAsk` (vLLM's P/D proxy fields,
   plus the request's SLO class and a pinned compression profile).
2. The prefill's connector answers with `handoff_params`: ``do_remote_prefill`` and a
   `TransferDescription` under `PARAMS_KEY` (transfer id, the publisher's address, token
   and block counts). The orchestrator checks it (`TransferDescription.from_params`) and
   hands it to decode as is; the decode's connector checks it again, since whatever comes
   in a request is input from the network.
3. The worker host hands the connector the cluster's KV secret in `AUTH_SECRET_ENV`.

Versioned: `CONTRACT_VERSION` travels in every description; a reader accepts descriptions
without one (written before versions existed) and refuses a newer major version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONTRACT_VERSION = 1

# What vLLM's P/D proxies send to the prefill engine: "produce KV for a remote decoder".
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Tandem's transfer description inside the prefill's answer.
PARAMS_KEY = "tandem"
# The request's SLO class: picks the KV compression profile when decode pulls.
SLO_CLASS_PARAM = "tandem_slo_class"
# A profile the request pins (x-tandem-kv-profile), over the controller's choice.
KV_PROFILE_PARAM = "tandem_kv_profile"
# Where an engine's connector finds the cluster's KV secret (never in the vLLM config,
# which vLLM logs).
AUTH_SECRET_ENV = "TANDEM_KV_AUTH_SECRET"

_MAX_PORT = 65535


@dataclass(frozen=True)
class PrefillAsk:
    """What the orchestrator asks of a prefill engine, as ``kv_transfer_params``."""

    slo_class: str | None = None
    kv_profile: str | None = None

    def to_params(self) -> dict[str, Any]:
        params = dict(PREFILL_KV_PARAMS)
        if self.slo_class is not None:
            params[SLO_CLASS_PARAM] = self.slo_class
        if self.kv_profile is not None:
            params[KV_PROFILE_PARAM] = self.kv_profile
        return params

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PrefillAsk:
        """The ask in a prefill request's params (the connector's side); values that are
        not strings are ignored."""
        slo_class, profile = params.get(SLO_CLASS_PARAM), params.get(KV_PROFILE_PARAM)
        return cls(slo_class if isinstance(slo_class, str) and slo_class else None,
                   profile if isinstance(profile, str) and profile else None)


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
        return {
            "transfer_id": self.transfer_id,
            "address": dict(self.address),
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "version": CONTRACT_VERSION,
        }

    @classmethod
    def from_params(cls, value: Any) -> TransferDescription:
        """The description in a request's ``kv_transfer_params``; raises
        `InvalidTransferParams` for what a prefill engine would not have written. Keys it
        does not know are ignored, so a newer prefill may add some."""
        if not isinstance(value, dict):
            raise InvalidTransferParams(f"a transfer description is an object, not {type(value).__name__}")
        version = value.get("version", CONTRACT_VERSION)
        if _int(version, "version", 1) > CONTRACT_VERSION:
            raise InvalidTransferParams(f"contract version {version} is newer than this reader's {CONTRACT_VERSION}")
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


def handoff_params(transfer: TransferDescription) -> dict[str, Any]:
    """The prefill's answer, which the decode request carries: "pull this"."""
    return {"do_remote_prefill": True, "do_remote_decode": False, PARAMS_KEY: transfer.to_params()}


def handed_off(params: Any) -> TransferDescription:
    """The transfer in a prefill's answer; raises `InvalidTransferParams` if it holds none."""
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        raise InvalidTransferParams("the prefill's answer asks for no remote prefill")
    return TransferDescription.from_params(params.get(PARAMS_KEY))
