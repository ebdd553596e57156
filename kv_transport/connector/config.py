"""The connector's settings, read from vLLM's ``kv_connector_extra_config``.

Pure (no torch, no vLLM): the scheduler side, the worker side and the tests build one
directly. Keys vLLM's config carries that are not settings here are ignored, so a newer
control plane can add a key before every engine knows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # Threads that pull; at most pull_threads_per_peer of them wait on any one publisher,
    # so a slow or stalled peer cannot hold up pulls from the others.
    pull_threads: int = 8
    pull_threads_per_peer: int = 4
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

    @property
    def advertised_address(self) -> dict[str, Any]:
        """Where decode workers pull this engine's transfers from. The scheduler process
        has no listener of its own, so it advertises the configured one: the worker host
        hands both sides the same concrete port."""
        return {"transport": self.transport, "host": self.advertise_host or self.host, "port": self.port}
