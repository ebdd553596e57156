"""Deploy Tandem apps on a cluster in a box.

`box_settings` (root namespace) turns a user's settings into the box's: its Redis, its KV
secret, engines placed by role resource, listeners on the node addresses. `main` runs
inside the head node's namespace (a Ray driver has to sit on a Ray node) and deploys the
apps it is given, then waits until each answers /health.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from control_plane.cluster.box import HTTP_PORT, BoxError, BoxState, box_dir, load, python_in, save
from control_plane.settings import TandemSettings, load_settings


def box_settings(state: BoxState, config: str | Path | None = None, **overrides: Any) -> TandemSettings:
    """The settings of an app on the box: the user's (file, env, overrides), then what the
    box decides. The HTTP port listens on every node (Serve runs a proxy per node); the box
    network is private to this machine, so no API key is required unless the user set some."""
    settings = load_settings(config, **overrides)
    roles = ("prefill", "decode") if settings.mode == "disaggregated" else ("colocated",)
    update: dict[str, Any] = {
        "redis_url": state.redis_url,
        "ray_address": state.ray_address,
        "host": "0.0.0.0",
        "port": HTTP_PORT,
        "ingress_ray_resources": {"tandem_head": 1},
        "kv_connector": settings.kv_connector.model_copy(update={"listen": "node", "auth_secret": state.kv_secret}),
        "auth": settings.auth if settings.auth.api_keys else settings.auth.model_copy(update={"allow_unauthenticated": True}),
    }
    for role in roles:
        worker = settings.worker(role)
        # A colocated engine runs where decode does.
        resource = "tandem_decode" if role == "colocated" else f"tandem_{role}"
        update[role] = worker.model_copy(update={"ray_resources": {resource: 1, **worker.ray_resources}})
    return TandemSettings.model_validate(settings.model_copy(update=update).model_dump())


def deploy(name: str, apps: list[TandemSettings], timeout_s: float = 900) -> list[str]:
    """Deploy ``apps`` (box settings) on box ``name``; their URLs once healthy."""
    state = load(name)
    path = box_dir(name) / "apps.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the apps carry secrets
    with os.fdopen(fd, "w") as out:
        json.dump([app.model_dump(mode="json") for app in apps], out)
    result = python_in(state, state.head, "control_plane.cluster.deploy", str(path), str(timeout_s), timeout=timeout_s + 120)
    if result.returncode != 0:
        raise BoxError(f"deploy failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    state.apps.update({app.app_name: app.route_prefix for app in apps})
    save(state)
    return [_root_url(state, app) for app in apps]


def _root_url(state: BoxState, settings: TandemSettings) -> str:
    return f"http://{state.head.address}:{settings.port}{settings.route_prefix.rstrip('/')}"


def main(argv: list[str]) -> int:
    import ray
    from ray import serve

    from control_plane.cli import _wait_healthy, deploy_app
    from control_plane.model import prepare_model

    apps = [TandemSettings.model_validate(data) for data in json.loads(Path(argv[0]).read_text())]
    timeout_s = float(argv[1])
    ray.init(address=apps[0].ray_address, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "0.0.0.0", "port": apps[0].port})
    started = time.monotonic()
    for settings in apps:
        prepare_model(settings.model.path)
        deploy_app(settings)  # as `tandem up` deploys: from a Serve config when the planner is on
    host = ray.util.get_node_ip_address()  # the head's address in the box
    for settings in apps:
        url = f"http://{host}:{settings.port}{settings.route_prefix.rstrip('/')}"
        health = _wait_healthy(url, max(10.0, timeout_s - (time.monotonic() - started)))
        print(json.dumps({"app": settings.app_name, "url": url, "pools": health.get("pools")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
