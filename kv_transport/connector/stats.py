"""The connector's per-interval transfer telemetry, as vLLM carries connector stats: each
worker hands its `TandemKVStats` to the engine, which aggregates them and passes them to
the stats loggers (Tandem's worker host reads the ``records`` for Prometheus)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


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
