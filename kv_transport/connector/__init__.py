"""Tandem's vLLM KV connector, as a package: engines load it with
``kv_connector_module_path="kv_transport.connector"`` and vLLM takes `TandemConnector` from
here.

- `connector`: the facade vLLM instantiates, once per role; it only delegates.
- `scheduler`: the scheduler side (which requests hand over or pull KV, in blocks).
- `worker`: the worker side (publish, pull, release; transports and telemetry).
- `metadata`: what crosses between them, and the transfer description engines exchange.
- `config`, `stats`: the connector's settings and its per-interval telemetry for vLLM.
"""

from kv_transport.connector.config import ConnectorConfig
from kv_transport.connector.connector import TandemConnector
from kv_transport.connector.metadata import (
    InvalidTransferParams,
    RecvSpec,
    SendSpec,
    TandemConnectorMetadata,
    TransferDescription,
)
from kv_transport.connector.scheduler import TandemConnectorScheduler
from kv_transport.connector.stats import TandemKVStats
from kv_transport.connector.worker import TandemConnectorWorker

__all__ = [
    "ConnectorConfig",
    "InvalidTransferParams",
    "RecvSpec",
    "SendSpec",
    "TandemConnector",
    "TandemConnectorMetadata",
    "TandemConnectorScheduler",
    "TandemConnectorWorker",
    "TandemKVStats",
    "TransferDescription",
]
