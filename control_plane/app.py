"""The Serve application builder: one function from settings to a Ray Serve app.

`tandem up`, `serve run control_plane.app:build_app` and KubeRay's `serveConfigV2`
(`import_path: control_plane.app:build_app`, `args: {...settings...}`) all come through here,
so every way of starting Tandem runs the same app.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from control_plane.redis_server import embedded_url
from control_plane.settings import Role, TandemSettings, load_settings
from routing.ingress import Ingress
from routing.serve_router import DualMapRequestRouter
from workers.deployments import WORKER_DEPLOYMENTS


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve app builder: ``args`` are settings fields (nested dicts) plus an optional
    ``config`` naming a YAML file; env vars ``TANDEM_*`` apply too."""
    args = dict(args or {})
    config = args.pop("config", None)
    return build_app_from_settings(load_settings(config, **args))


def build_app_from_settings(settings: TandemSettings) -> Application:
    if settings.redis_url is None:
        settings = settings.model_copy(update={"redis_url": embedded_url()})
    data = settings.model_dump(mode="json")

    def pool(role: Role) -> Application:
        worker = settings.worker(role)
        options: dict[str, Any] = {}
        if role == "prefill" and settings.routing.prefill_router == "dualmap":
            options["request_router_config"] = RequestRouterConfig(
                request_router_class=DualMapRequestRouter,
                request_router_kwargs={"slo_ttft_s": settings.routing.slo_ttft_s},
            )
        return (
            WORKER_DEPLOYMENTS[role]
            .options(
                num_replicas=worker.replicas,
                max_ongoing_requests=worker.max_ongoing_requests,
                ray_actor_options={"num_cpus": worker.num_cpus, "num_gpus": worker.num_gpus},
                graceful_shutdown_timeout_s=30,
                **options,
            )
            .bind(data)
        )

    if settings.mode == "disaggregated":
        return Ingress.bind(data, prefill=pool("prefill"), decode=pool("decode"))
    return Ingress.bind(data, colocated=pool("colocated"))
