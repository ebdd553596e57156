"""One settings model for everything: the CLI, the Serve app builder and the Helm values.

Sources, highest priority first: explicit overrides (CLI flags, app-builder args), ``TANDEM_*``
environment variables (nested with ``__``, e.g. ``TANDEM_DECODE__REPLICAS=2``), a YAML file
(``--config`` or ``TANDEM_CONFIG``), then the defaults below, which are the embedded default:
SmolLM2-135M on vLLM's CPU backend, one prefill and one decode worker, local Ray, local Redis.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_SERVED_NAME = "smollm2-135m-instruct"

Mode = Literal["disaggregated", "colocated"]
PrefillRouter = Literal["dualmap", "round_robin", "least_loaded", "power_of_two", "consistent_hash", "prefix_tree"]
DecodeRouter = Literal["kv_pressure", "round_robin", "least_loaded", "power_of_two"]
Role = Literal["prefill", "decode", "colocated"]


class _Strict(BaseModel):
    # Typos in a config file must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    # None = the bundled SmolLM2 (prepared by `tandem model prepare`); else a local HF folder
    # or a hub id.
    path: str | None = None
    served_name: str = DEFAULT_SERVED_NAME
    max_model_len: int = Field(2048, ge=16)
    # Sampling defaults for requests that don't set them (vLLM's override_generation_config).
    # None: the model's own generation_config.json, except for the bundled SmolLM2, which
    # defaults to greedy: at its usual temperatures its first token for simple questions is
    # a near coin flip, and the embedded default should answer the same way every time.
    sampling_defaults: dict[str, Any] | None = None

    def effective_sampling_defaults(self) -> dict[str, Any]:
        if self.sampling_defaults is not None:
            return dict(self.sampling_defaults)
        return {"temperature": 0.0} if self.path is None else {}


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of one pool (Serve's AutoscalingConfig fields)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    # Requests in flight per replica Serve aims for.
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class WorkerSettings(_Strict):
    """A pool of vLLM engines of one role."""

    replicas: int = Field(1, ge=0)
    # None: a fixed pool of `replicas`; else Serve scales it between the bounds (replicas
    # joining or leaving are picked up by the router without restarts).
    autoscaling: AutoscalingSettings | None = None
    # Passed to vLLM's engine arguments as is (same names as `vllm serve` flags, with
    # underscores), e.g. {"gpu_memory_utilization": 0.9, "tensor_parallel_size": 2}.
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # KV cache size per engine on CPU; vLLM's CPU default sizes from NUMA node 0 and can
    # refuse to start when several engines share a host. Ignored when engine_args sets
    # kv_cache_memory_bytes or gpu_memory_utilization.
    kv_cache_memory_bytes: int | None = 256 * 1024 * 1024
    # OpenMP threads of one engine on CPU; None = the host's cores split evenly between the
    # engines Tandem places on it, so two engines never fight over one core.
    cpu_threads: int | None = None
    num_gpus: float = Field(0, ge=0)
    # Logical CPUs Ray reserves per replica. Kept small: the engines bind their own cores.
    num_cpus: float = Field(0.5, ge=0)
    # Ray custom resources each replica needs, e.g. {"tandem_prefill": 1} so that Serve
    # places prefill replicas only on the nodes (pods) that advertise that resource.
    ray_resources: dict[str, float] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(64, ge=1)

    @property
    def min_replicas(self) -> int:
        return self.autoscaling.min_replicas if self.autoscaling is not None else self.replicas


class CompressionSettings(_Strict):
    """How KV is compressed on the wire (kv_transport/codecs; control_plane/controller)."""

    # "off": never; "static": `profile` on every link; "adaptive": the shared controller
    # picks a profile per link and SLO class from the transfers' telemetry.
    mode: Literal["off", "static", "adaptive"] = "off"
    # The static profile, and adaptive's choice until the controller has decided.
    profile: str = "identity"
    # The profile library (JSON written by `tandem profile`) with each profile's measured
    # ratio, speed and quality; None: the one in Redis, else the one in the cache dir.
    library: str | None = None
    # SLO classes -> the quality loss (next-token KL, nats) each may give up for speed.
    # Requests choose one with the `x-tandem-slo-class` header.
    slo_classes: dict[str, float] = Field(
        default_factory=lambda: {"exact": 0.0, "standard": 0.01, "relaxed": 0.05}
    )
    default_slo_class: str = "standard"
    # Decisions expire from Redis after this; connectors re-read them this often.
    decision_ttl_s: float = Field(60.0, gt=0)
    decision_cache_s: float = Field(2.0, gt=0)
    # The controller's latency model: stages in sequence (False), or the wire overlapping the
    # codec (True: tcp streams each layer as it is encoded). True suits codecs on GPUs of
    # their own; on CPU hosts shared with the engines the codecs run slower than profiled
    # and the sequential form predicts better (control_plane/controller/policy.py).
    pipelined: bool = False

    @model_validator(mode="after")
    def _default_class_exists(self) -> CompressionSettings:
        if self.default_slo_class not in self.slo_classes:
            raise ValueError(
                f"default_slo_class {self.default_slo_class!r} is not one of {sorted(self.slo_classes)}"
            )
        return self


class ConnectorSettings(_Strict):
    """The vLLM KV connector that moves KV from prefill to decode."""

    # "TandemConnector" (kv_transport/), or a vLLM connector class name (NixlConnector,
    # ExampleConnector, ...).
    name: str = "TandemConnector"
    # Tandem's connector only: how KV moves between workers,
    transport: Literal["tcp", "nixl", "nccl", "gloo"] = "tcp"
    # how long a prefill worker holds an unpulled request's KV before freeing it,
    ttl_s: float = Field(60.0, gt=0)
    # how long a decode worker waits for one pull before recomputing the prompt,
    pull_timeout_s: float = Field(30.0, gt=0)
    # and an optional per-link rate limit (bytes/s) to emulate slower networks.
    rate_limit_bytes_per_s: float | None = Field(None, gt=0)
    # Where per-transfer telemetry goes besides Prometheus: "redis" (the stream the
    # compression controller reads) and/or "log".
    telemetry_sinks: list[Literal["redis", "log"]] = Field(default_factory=lambda: ["redis"])
    # Module to load an out-of-tree connector from (vLLM's kv_connector_module_path).
    module_path: str | None = None
    # Where the connector stages KV: "cpu" on CPU engines (and for host-staged GPU transfers).
    buffer_device: Literal["cpu", "cuda"] = "cpu"
    extra_config: dict[str, Any] = Field(default_factory=dict)
    compression: CompressionSettings = Field(default_factory=CompressionSettings)
    # Tandem's connector: a secret shared by the cluster's workers; every KV request (pull,
    # release, describe, join) carries an HMAC of all it asks for, with a nonce and a time,
    # and every reply an HMAC bound to its request; unauthenticated ones are refused. None:
    # `tandem up` generates one per cluster (kept in its run directory) and the app builder
    # one per deploy; the Helm chart keeps one in a Secret. Set it (e.g. from a Kubernetes
    # Secret via TANDEM_KV_CONNECTOR__AUTH_SECRET) to share it with workers started elsewhere.
    auth_secret: str | None = Field(None, repr=False, min_length=16)
    # Where each worker's KV listener binds and what it advertises: "auto" is loopback while
    # the Ray cluster has a single node and the node's address once it has more; "node" and
    # "loopback" force one.
    listen: Literal["auto", "node", "loopback"] = "auto"
    # Connections one KV listener serves at once (a thread each); more are refused at accept.
    max_connections: int = Field(128, ge=1)


class DisaggregationSettings(_Strict):
    """Conditional disaggregation (routing/disagg.py): per request, prefill remotely and
    hand the KV over, or prefill on the decode replica."""

    # "always": every request is prefilled by a prefill worker. "threshold": on the decode
    # replica when the prompt's tokens it does not already cache are at most
    # threshold_tokens. "cost_model": the plan with the lower predicted time, from models
    # fitted online (decides as "threshold" until min_samples requests were measured).
    mode: Literal["always", "threshold", "cost_model"] = "always"
    threshold_tokens: int = Field(256, ge=0)
    # The cost model charges a local prefill this much of its time again for each stream
    # the decode replica is decoding (they wait for it).
    interference: float = Field(0.5, ge=0)
    min_samples: int = Field(8, ge=1)
    # Decode lent to the prefill pool by routing alone (every engine's connector is
    # kv_both, so no restart): while the least busy decode replica is decoding at least
    # this many streams, a prefill replica runs fewer requests than that (and under half
    # its prefill.max_ongoing_requests, kept for prefills), and the prefill
    # pool has at most lend_max_queued_tokens prompt tokens routed to it and not yet
    # prefilled (on its least loaded replica), a request runs whole (prefill and decode) on
    # a prefill replica. It bridges a shift toward long answers until the planner's new
    # decode engine is up. 0: off. Any mode.
    lend_decode_at: int = Field(0, ge=0)
    lend_max_queued_tokens: int = Field(512, ge=0)


class RoutingSettings(_Strict):
    # How long the ingress waits for a whole request before answering 504. A client can ask
    # for less with the x-tandem-timeout-s header.
    request_timeout_s: float = Field(600.0, gt=0)
    # `tandem drain` / `tandem down`: how long the ingress replicas get to finish what they
    # accepted once they refuse new requests (503), before the app is deleted.
    drain_grace_s: float = Field(60.0, ge=0)
    # If the prefill step or the KV handoff fails, decode recomputes the prompt itself.
    recompute_on_prefill_failure: bool = True
    # How the ingress picks a prefill replica (a colocated one in colocated mode):
    # "dualmap" (cache affinity on two hash rings with an SLO-aware fallback to load and
    # hotspot rebalancing), or a baseline: "round_robin", "least_loaded", "power_of_two",
    # "consistent_hash" (one ring), "prefix_tree" (SGLang's cache-aware router).
    prefill_router: PrefillRouter = "dualmap"
    # Extra arguments of the prefill router's policy (routing/policies.py, which checks
    # them when the app is built: this module imports nothing of the product), e.g. for
    # dualmap {"hot_ratio": 2.0, "hot_min_tokens": 2048, "flip_s": 30,
    # "prior_tokens_per_s": 2000}, for prefix_tree {"cache_threshold": 0.3}.
    prefill_router_options: dict[str, Any] = Field(default_factory=dict)
    # How the ingress places decode: "kv_pressure" (least KV-cache use and in-flight decode
    # tokens, a conversation's turns stay together), or "round_robin" | "least_loaded" |
    # "power_of_two".
    decode_router: DecodeRouter = "kv_pressure"
    decode_router_options: dict[str, Any] = Field(default_factory=dict)
    # The TTFT the router tries to keep each request under before giving up affinity.
    slo_ttft_s: float = Field(2.0, gt=0)
    # Where each disaggregated request's prompt is prefilled.
    disaggregation: DisaggregationSettings = Field(default_factory=DisaggregationSettings)
    # /health and /metrics reuse their last answer this long (and concurrent probes share
    # one), so that probes and scrapes cannot multiply calls to the pools and Redis. 0: never.
    status_cache_s: float = Field(1.0, ge=0, le=60)


class KeyLimitSettings(_Strict):
    requests_per_min: int | None = Field(None, ge=1)
    tokens_per_min: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)


class AuthSettings(_Strict):
    """API keys on the OpenAI endpoint (routing/auth.py)."""

    # Keys accepted as given (e.g. a Kubernetes Secret through TANDEM_AUTH__API_KEYS);
    # keys made with `tandem keys create` live hashed in Redis.
    api_keys: list[str] = Field(default_factory=list)
    # None: keys are required when api_keys are set or the service binds a non-loopback
    # address; True / False force it.
    required: bool | None = None
    # Binding a non-loopback address with keys off is refused unless this is set.
    allow_unauthenticated: bool = False
    # Limits of keys that have none of their own (and of api_keys).
    default_limits: KeyLimitSettings = Field(default_factory=KeyLimitSettings)
    # With Redis down, quotas are skipped ("open") or requests get 503 ("closed").
    quota_on_redis_failure: Literal["open", "closed"] = "open"
    # /metrics needs an API key too when keys are on (Prometheus then sends one: the Helm
    # chart's serviceMonitor.bearerTokenSecret). False: open, like vLLM's; it shows no addresses.
    metrics_require_key: bool = False
    # Who may pin a request's KV compression profile with x-tandem-kv-profile (it is
    # honoured only when kv_connector.compression.mode is not "off", and ignored when it is):
    # "permitted": with keys off, any caller; with keys on, keys created with
    # may_pin_kv_profile, and the api_keys above when api_keys_pin_kv_profile.
    # "everyone": any caller. "nobody". Callers who may not get 403.
    kv_profile_pinning: Literal["permitted", "everyone", "nobody"] = "permitted"
    api_keys_pin_kv_profile: bool = False


# Hard caps of what one request may carry, the most the admission settings below may
# allow; routing/protocol.py's request models enforce them while they parse.
MAX_MESSAGES = 2048  # messages in one chat
MAX_PROMPTS = 2048  # prompts in one batched /v1/completions body
MAX_N = 16  # choices per request
MAX_JSON_VALUES = 1 << 22  # JSON values in one body


class AdmissionSettings(_Strict):
    """What the ingress refuses at once instead of queueing (routing/admission.py)."""

    # Requests in flight per ingress replica; beyond it: 429 with Retry-After.
    max_in_flight: int = Field(512, ge=1)
    # Refuse (429) when even the best prefill replica's predicted TTFT is past this; None
    # turns the check off. Needs a router with a TTFT predictor (dualmap).
    max_predicted_ttft_s: float | None = Field(60.0, gt=0)
    retry_after_s: int = Field(1, ge=1)
    # Larger bodies get 413 before they are parsed.
    max_body_bytes: int = Field(8 << 20, ge=1024)
    # JSON values (objects, arrays, strings, numbers, ...) in one body, counted before it is
    # parsed; more: 413. Parsing costs up to ~200 bytes of ingress memory per value, so this
    # bounds what the worst body can cost (about 55 MiB at the default). Raise it for batches
    # of long token-id prompts (a value per token).
    max_json_values: int = Field(1 << 18, ge=1024, le=MAX_JSON_VALUES)
    # At most the hard caps above (MAX_MESSAGES, MAX_PROMPTS), which the request models
    # enforce while they parse.
    max_messages: int = Field(512, ge=1, le=MAX_MESSAGES)
    # Prompts in one batched /v1/completions body; disaggregated, each is its own prefill
    # and decode.
    max_prompts: int = Field(64, ge=1, le=MAX_PROMPTS)
    max_n: int = Field(16, ge=1, le=MAX_N)


class TracingSettings(_Strict):
    """OpenTelemetry spans of each request (routing/tracing.py): ingress, prefill (its
    queue and compute), KV transfer, decode; a W3C traceparent in the request is continued,
    and the response carries the request's own."""

    enabled: bool = False
    # Where spans go (OTLP over HTTP, e.g. http://otel-collector:4318/v1/traces); None: the
    # exporter's own default (OTEL_EXPORTER_OTLP_* environment variables).
    otlp_endpoint: str | None = None
    service_name: str = "tandem"


class PlannerSettings(_Strict):
    """The P:D planner (control_plane/planner/): sizes the prefill and decode pools together
    from the measured workload and the SLOs, as Ray Serve's application-level autoscaling
    policy. Off: each pool is fixed, or Serve scales it on its own queue (`autoscaling`)."""

    enabled: bool = False
    # The targets: a request attains its SLO when its TTFT and its mean TPOT both meet them.
    slo_ttft_s: float = Field(2.0, gt=0)
    slo_tpot_s: float = Field(0.1, gt=0)
    # Attainment the corrective part holds (fraction of requests meeting both SLOs).
    attainment_target: float = Field(0.95, gt=0, lt=1)
    # Bounds per phase and for both together.
    min_prefill: int = Field(1, ge=1)
    max_prefill: int = Field(8, ge=1)
    min_decode: int = Field(1, ge=1)
    max_decode: int = Field(8, ge=1)
    max_total: int = Field(12, ge=2)
    # How often the planner decides, and how far ahead it plans: a new engine serves only
    # after `engine_start_s`, so the forecast looks that far (plus one interval) ahead.
    interval_s: float = Field(10.0, gt=0)
    engine_start_s: float = Field(60.0, ge=0)
    # Capacity planned above the forecast load, for bursts no forecast sees (a new engine
    # serves only `engine_start_s` after it is asked for; until then the headroom absorbs
    # a burst). 0.1: a tenth more.
    headroom: float = Field(0.1, ge=0, le=4)
    # Utilization bounds of the predictive part: at most `max_utilization` of an engine's
    # measured throughput is planned for; less when the TTFT budget is tight.
    max_utilization: float = Field(0.85, gt=0, le=1)
    min_utilization: float = Field(0.3, gt=0, le=1)
    # Hysteresis: a pool shrinks only when it would still be needed at `down_band` of the
    # planned utilization, after that has held `downscale_delay_s`, by `max_step_down`
    # replicas at most at a time (half the excess); it grows at once, then not again for
    # `upscale_cooldown_s`.
    down_band: float = Field(0.7, gt=0, lt=1)
    downscale_delay_s: float = Field(60.0, ge=0)
    upscale_cooldown_s: float = Field(0.0, ge=0)
    max_step_down: int = Field(4, ge=1)
    # The corrective part: each interval with attainment below target (and no engine of
    # the phase still starting) multiplies a phase's plan by 1 + gain * shortfall /
    # (1 - target), at most 1.25; comfortably above target it moves `relax` of the way
    # back to 1 (never below: the model is the floor).
    gain: float = Field(0.1, ge=0)
    relax: float = Field(0.1, ge=0, lt=1)
    max_correction: float = Field(3.0, ge=1)
    # Completed requests an interval needs before its attainment corrects anything.
    min_samples: int = Field(20, ge=1)
    # Priors until the pools have been measured: prompt tokens one prefill engine computes
    # per second, and a decode step's seconds as fixed + per sequence (+ per context token).
    prior_prefill_tokens_per_s: float = Field(4000.0, gt=0)
    prior_decode_step_s: float = Field(0.03, gt=0)
    prior_decode_per_seq_s: float = Field(0.001, ge=0)
    max_num_seqs: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> PlannerSettings:
        if self.min_prefill > self.max_prefill or self.min_decode > self.max_decode:
            raise ValueError("planner: min_prefill/min_decode must not exceed max_prefill/max_decode")
        if self.min_prefill + self.min_decode > self.max_total:
            raise ValueError("planner: min_prefill + min_decode exceeds max_total")
        if self.min_utilization > self.max_utilization:
            raise ValueError("planner: min_utilization exceeds max_utilization")
        return self


class TandemSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TANDEM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    mode: Mode = "disaggregated"
    model: ModelSettings = Field(default_factory=ModelSettings)
    # Prefill admits few requests per replica: the rest wait at the router, where a hot
    # replica's queue can still be moved (inside the engine it cannot).
    prefill: WorkerSettings = Field(default_factory=lambda: WorkerSettings(max_ongoing_requests=16))
    decode: WorkerSettings = Field(default_factory=WorkerSettings)
    colocated: WorkerSettings = Field(default_factory=WorkerSettings)
    kv_connector: ConnectorSettings = Field(default_factory=ConnectorSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    # None = Tandem starts its embedded Redis on loopback.
    redis_url: str | None = None
    # None = start a local Ray (`tandem up`) or use RAY_ADDRESS when set.
    ray_address: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "tandem"
    route_prefix: str = "/"
    # Logical CPUs a local Ray advertises. Engines bind physical cores themselves, so Ray's
    # count is only an admission budget; it must exceed the cores of a small laptop.
    ray_num_cpus: int = Field(16, ge=1)
    # Ray custom resources the ingress (and the compression controller) ask for, e.g.
    # {"tandem_head": 1} to keep them on the head node; empty: anywhere.
    ingress_ray_resources: dict[str, float] = Field(default_factory=dict)

    # Set by load_settings; where the YAML came from, for `tandem status`.
    config_file: str | None = None

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix_starts_with_slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return value

    @field_validator("host")
    @classmethod
    def _host_is_an_address(cls, value: str) -> str:
        if value != "localhost":
            ipaddress.ip_address(value)
        return value

    @model_validator(mode="after")
    def _pools_not_empty(self) -> TandemSettings:
        if self.mode == "disaggregated" and (self.prefill.min_replicas < 1 or self.decode.min_replicas < 1):
            raise ValueError("disaggregated mode needs at least one prefill and one decode replica")
        if self.mode == "colocated" and self.colocated.min_replicas < 1:
            raise ValueError("colocated mode needs at least one colocated replica")
        return self

    @model_validator(mode="after")
    def _planner_owns_the_pools(self) -> TandemSettings:
        if not self.planner.enabled:
            return self
        if self.mode != "disaggregated":
            raise ValueError("planner.enabled sizes prefill and decode pools: it needs mode: disaggregated")
        if self.prefill.autoscaling is not None or self.decode.autoscaling is not None:
            raise ValueError("planner.enabled sizes the prefill and decode pools: remove "
                             "prefill.autoscaling / decode.autoscaling (the planner's bounds are planner.min_*/max_*)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file is named by load_settings through a subclass's model_config.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    # Convenience views -------------------------------------------------------------------

    def roles(self) -> list[Role]:
        return ["prefill", "decode"] if self.mode == "disaggregated" else ["colocated"]

    def worker(self, role: Role) -> WorkerSettings:
        return getattr(self, role)

    def engine_count(self) -> int:
        """Engines at start (autoscaled pools start at initial, else min, replicas)."""
        total = 0
        for role in self.roles():
            worker = self.worker(role)
            scaling = worker.autoscaling
            if scaling is None:
                total += worker.replicas
            else:
                total += scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas
        return total

    @property
    def binds_loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    @property
    def auth_required(self) -> bool:
        if self.auth.required is not None:
            return self.auth.required
        if self.auth.allow_unauthenticated and not self.auth.api_keys:
            return False
        return bool(self.auth.api_keys) or not self.binds_loopback

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        prefix = self.route_prefix.rstrip("/")
        return f"http://{host}:{self.port}{prefix}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> TandemSettings:
    """Build settings from overrides > env > YAML file > defaults.

    ``overrides`` may be nested dicts (``decode={"replicas": 2}``); they are merged over the
    file's and env's values field by field rather than replacing whole sections.
    """
    config_file = config_file or os.environ.get("TANDEM_CONFIG") or None
    path = Path(config_file).expanduser() if config_file else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")

    class _FromFile(TandemSettings):
        model_config = SettingsConfigDict(yaml_file=path)

    base = _FromFile()
    merged = _deep_merge(base.model_dump(exclude={"config_file"}), overrides)
    merged["config_file"] = str(path) if path else None
    return TandemSettings.model_validate(merged)


def settings_from_dict(data: dict[str, Any]) -> TandemSettings:
    """Rebuild settings shipped to a Ray actor: validation only, no env or file lookup."""
    return TandemSettings.model_validate(data)


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_yaml(settings: TandemSettings) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
