"""The Serve application builder: one function from settings to a Ray Serve app.

`tandem up`, `serve run control_plane.app:build_app` and KubeRay's `serveConfigV2`
(`import_path: control_plane.app:build_app`, `args: {...settings...}`) all come through here,
so every way of starting Tandem runs the same app.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlsplit

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from control_plane.redis_server import embedded_url
from control_plane.settings import Role, TandemSettings, load_settings
from routing.ingress import Ingress
from routing.policies import check_routing_settings
from routing.serve_router import TandemRequestRouter
from workers.deployments import WORKER_DEPLOYMENTS


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve app builder: ``args`` are settings fields (nested dicts) plus an optional
    ``config`` naming a YAML file; env vars ``TANDEM_*`` apply too. Without a KV secret in
    them, the one `tandem up` keeps on this machine (if any) is used."""
    args = dict(args or {})
    config = args.pop("config", None)
    settings = load_settings(config, **args)
    return build_app_from_settings(with_kv_secret(settings, local_kv_secret()))


KV_SECRET_FILE = "kv-secret"


def local_kv_secret() -> str | None:
    """The KV secret `tandem up` keeps in this machine's run directory, if there is one."""
    from control_plane.paths import run_dir

    path = run_dir() / KV_SECRET_FILE
    try:
        secret = path.read_text().strip()
    except OSError:
        return None
    return secret if len(secret) >= 16 else None


def config_deploy_args(settings: TandemSettings) -> dict[str, Any]:
    """The settings as a Serve config's `args` for build_app, without their secrets: Serve
    keeps a config's args in its checkpoint and shows them (`serve status`, the dashboard).
    The builder gets the secrets back from the settings YAML (``config``), the nodes'
    environment, and the KV secret file of `tandem up`."""
    args = settings.model_dump(mode="json", exclude={"config_file"})
    args["kv_connector"].pop("auth_secret", None)
    args["auth"].pop("api_keys", None)
    if settings.redis_url and urlsplit(settings.redis_url).password is not None:
        args.pop("redis_url", None)
    if settings.config_file:
        args["config"] = settings.config_file
    return args


def router_config(settings: TandemSettings, role: Role) -> RequestRouterConfig:
    """Tandem's router for a pool; it runs in every process that calls the pool (the
    ingress), fed by the replicas' `record_routing_stats`."""
    routing = settings.routing
    if role == "decode":
        kwargs = {"pool": "decode", "policy": routing.decode_router, "policy_kwargs": routing.decode_router_options}
    else:
        options = dict(routing.prefill_router_options)
        if routing.prefill_router == "dualmap":
            options.setdefault("slo_ttft_s", routing.slo_ttft_s)
        kwargs = {
            "pool": role,
            "policy": routing.prefill_router,
            "policy_kwargs": options,
            # A prefill call ends at the first token: its duration is the prefill TTFT.
            "observe_ttft": role == "prefill",
        }
    return RequestRouterConfig(
        request_router_class=TandemRequestRouter,
        request_router_kwargs=kwargs,
        # Stats feed the load view between the router's own accounting updates.
        request_routing_stats_period_s=2,
    )


def planner_on(settings: TandemSettings) -> bool:
    return settings.planner.enabled and settings.mode == "disaggregated"


def external_scaler_on(settings: TandemSettings) -> bool:
    """Whether the app takes pool sizes from outside (`tandem scale`, Serve's REST scale API):
    only when nothing autoscales it. Serve refuses both at once, and a size set by hand
    would fight the planner's."""
    if planner_on(settings):
        return False
    roles: tuple[Role, ...] = ("prefill", "decode") if settings.mode == "disaggregated" else ("colocated",)
    return all(settings.worker(role).autoscaling is None for role in roles)


def planner_autoscaling(settings: TandemSettings, role: Role) -> dict[str, Any]:
    """Serve's autoscaling config of a pool the planner sizes: its bounds, no delays of
    Serve's own (the planner has its hysteresis), metrics over one planner interval."""
    planner = settings.planner
    low, high = (planner.min_prefill, planner.max_prefill) if role == "prefill" else (planner.min_decode, planner.max_decode)
    return {
        "min_replicas": low,
        "max_replicas": high,
        "initial_replicas": min(high, max(low, settings.worker(role).replicas)),
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": _look_back_s(settings),
    }


def _look_back_s(settings: TandemSettings) -> float:
    """Serve averages what replicas report over this: one planner interval, and more than
    Serve's metrics push interval (10 s), which it must exceed."""
    return max(settings.planner.interval_s, 10.0) + 5.0


def planner_policy(settings: TandemSettings) -> dict[str, Any]:
    """The application-level autoscaling policy of a Serve config (serveConfigV2, or the
    config `tandem up` deploys) when the planner is on. A Redis URL with a password stays
    out (Serve logs the policy's arguments): the policy then reads TANDEM_REDIS_URL."""
    url = settings.redis_url
    return {
        "policy_function": "control_plane.planner.serve_policy:PlannerPolicy",
        "policy_kwargs": {
            "planner": settings.planner.model_dump(mode="json"),
            "app_name": settings.app_name,
            "redis_url": url if url and urlsplit(url).password is None else "",
        },
    }


def with_kv_secret(settings: TandemSettings, secret: str | None = None) -> TandemSettings:
    """Settings whose KV connector has a cluster secret: the configured one, else ``secret``,
    else a fresh one. Tandem's KV port is never left unauthenticated."""
    connector = settings.kv_connector
    if connector.auth_secret or settings.mode != "disaggregated" or connector.name != "TandemConnector":
        return settings
    connector = connector.model_copy(update={"auth_secret": secret or secrets.token_urlsafe(32)})
    return settings.model_copy(update={"kv_connector": connector})


def build_app_from_settings(settings: TandemSettings) -> Application:
    check_routing_settings(settings.routing)
    if settings.redis_url is None:
        settings = settings.model_copy(update={"redis_url": embedded_url()})
    # Every worker of this app gets the same secret with its settings.
    settings = with_kv_secret(settings)
    data = settings.model_dump(mode="json")

    planned = planner_on(settings)

    def pool(role: Role) -> Application:
        worker = settings.worker(role)
        scaling: dict[str, Any]
        if planned and role in ("prefill", "decode"):
            scaling = {"autoscaling_config": planner_autoscaling(settings, role)}
        elif worker.autoscaling is not None:
            scaling = {"autoscaling_config": worker.autoscaling.model_dump(exclude_none=True)}
        else:
            scaling = {"num_replicas": worker.replicas}
        # A worker outlives the requests on it: longer than the ingress's drain, and with
        # the planner scaling decode down, as long as a stream may last.
        grace = settings.routing.drain_grace_s + 30
        if planned and role == "decode":
            grace = max(grace, settings.routing.request_timeout_s)
        if role == "prefill":
            # After its calls return, a prefill replica waits for its published KV to be
            # pulled (at most the KV TTL): Serve's grace must cover both.
            grace += settings.kv_connector.ttl_s + 5
        return (
            WORKER_DEPLOYMENTS[role]
            .options(
                **scaling,
                max_ongoing_requests=worker.max_ongoing_requests,
                ray_actor_options={
                    "num_cpus": worker.num_cpus,
                    "num_gpus": worker.num_gpus,
                    **({"resources": dict(worker.ray_resources)} if worker.ray_resources else {}),
                },
                graceful_shutdown_timeout_s=grace,
                request_router_config=router_config(settings, role),
            )
            .bind(data)
        )

    # Serve waits this long for a stopping ingress replica's requests (when no drain ran).
    ingress = Ingress.options(
        graceful_shutdown_timeout_s=settings.routing.drain_grace_s + 10,
        # Serve collects a replica's custom metrics only under an autoscaling config: the
        # planner reads the workload from the ingress's.
        **({"autoscaling_config": {"min_replicas": 1, "max_replicas": 1,
                                   "look_back_period_s": _look_back_s(settings)}} if planned else {}),
        **({"ray_actor_options": {"resources": dict(settings.ingress_ray_resources)}} if settings.ingress_ray_resources else {}),
    )
    if settings.mode == "disaggregated":
        extra: dict[str, Any] = {}
        if settings.kv_connector.compression.mode == "adaptive":
            from control_plane.controller.service import CompressionControllerDeployment

            controller = CompressionControllerDeployment
            if settings.ingress_ray_resources:
                controller = controller.options(
                    ray_actor_options={**(controller.ray_actor_options or {}), "resources": dict(settings.ingress_ray_resources)}
                )
            extra["controller"] = controller.bind(data)
        return ingress.bind(data, prefill=pool("prefill"), decode=pool("decode"), **extra)
    return ingress.bind(data, colocated=pool("colocated"))
