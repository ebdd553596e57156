"""Tandem's vLLM KV connector, as a package: engines load it with
``kv_connector_module_path="kv_transport.connector"`` and vLLM takes `TandemConnector` from
here."""

from kv_transport.connector.connector import (
    ConnectorConfig,
    RecvSpec,
    SendSpec,
    TandemConnector,
    TandemConnectorMetadata,
    TandemKVStats,
)

__all__ = [
    "ConnectorConfig",
    "RecvSpec",
    "SendSpec",
    "TandemConnector",
    "TandemConnectorMetadata",
    "TandemKVStats",
]
