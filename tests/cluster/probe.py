"""Ray-side questions the box tests ask, run on the head node (a Ray driver must sit on a
Ray node): `python probe.py OP ARGS...`; the last stdout line is the JSON answer."""

from __future__ import annotations

import json
import sys
import time

import ray
from ray import serve


def blocks_free(app: str, deployment: str, timeout_s: str) -> bool:
    """Until the deployment's worker holds no KV block (its prefix cache can be reset)."""
    handle = serve.get_deployment_handle(deployment, app_name=app)
    deadline = time.monotonic() + float(timeout_s)
    while not handle.reset_prefix_cache.remote().result():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def replicas(app: str) -> dict:
    status = serve.status().applications[app]
    return {name: dict(dep.replica_states) for name, dep in status.deployments.items()}


def main() -> None:
    op, *args = sys.argv[1:]
    ray.init(logging_level="ERROR", log_to_driver=False)  # RAY_ADDRESS: the box's head
    answer = {"blocks_free": blocks_free, "replicas": replicas}[op](*args)
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
