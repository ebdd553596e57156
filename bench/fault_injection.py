"""Faults injected into a running local Tandem stack: the fault tests and the reliability
benchmark use the same ones.

Replicas are killed the way a crash looks to Ray (``ray.kill`` of the replica actor: its
process and the vLLM engine-core child go at once, nothing runs a shutdown hook); Serve's
controller then starts a replacement. Redis is stopped and started on the same port.
Callers hold a Ray driver connection (``ray.init(address="auto")``).
"""

from __future__ import annotations

import time

import psutil

from control_plane.replicas import replica_actor_names


def kill_replica(app_name: str, deployment: str, index: int = 0) -> str:
    """Kill one replica actor of ``deployment`` (Serve restarts it); returns its name."""
    import ray

    names = replica_actor_names(app_name, deployment)
    if not names:
        raise LookupError(f"no replica of {app_name}/{deployment}")
    name = names[index % len(names)]
    # Serve's controller, not Ray's actor restart, replaces it: as a crash would be.
    ray.kill(ray.get_actor(name, namespace="serve"))
    return name


def wait_replaced(app_name: str, deployment: str, killed: str, count: int = 1, timeout_s: float = 300) -> None:
    """Until the killed replica is gone and ``count`` replicas run again, one of them
    answering a call. Serve's status alone can still count a replica that just died as
    running, so the dead actor's name must be gone first."""
    from ray import serve

    deadline = time.monotonic() + timeout_s

    def wait_for(condition, what: str) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{app_name}/{deployment}: {what} after {timeout_s:.0f}s")
            time.sleep(0.5)

    def all_running() -> bool:
        app = serve.status().applications.get(app_name)
        states = app.deployments[deployment].replica_states if app and deployment in app.deployments else {}
        return states == {"RUNNING": count}

    wait_for(lambda: killed not in replica_actor_names(app_name, deployment), f"replica {killed} still listed")
    wait_for(all_running, f"not {count} running replicas")
    # A handle call waits at Serve's router until a live replica takes it.
    serve.get_deployment_handle(deployment, app_name=app_name).check_health.remote().result(
        timeout_s=max(1.0, deadline - time.monotonic()))


def _describe_replicas(app_name: str, deployment: str, timeout_s: float) -> dict[str, dict]:
    """Each replica's own description (`describe`), by replica id; a handle call waits until
    a starting replica serves."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    count = max(1, len(replica_actor_names(app_name, deployment)))
    seen: dict[str, dict] = {}
    for _ in range(4 * count):  # the router spreads calls: a few reach every replica
        info = handle.describe.remote().result(timeout_s=timeout_s)
        seen[info["replica_id"]] = info
        if len(seen) >= count:
            break
    return seen


def replica_pids(app_name: str, deployment: str, timeout_s: float = 180) -> set[int]:
    """Process ids of ``deployment``'s replicas, as the workers report them."""
    return {int(info["pid"]) for info in _describe_replicas(app_name, deployment, timeout_s).values()}


def replica_engine_pids(app_name: str, deployment: str, timeout_s: float = 180) -> set[int]:
    """The engine-core processes of ``deployment``'s replicas, as each replica reports them
    (the pids vLLM's process manager started), waiting (up to ``timeout_s``) for a replica
    that is still starting to have started its engine."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = _describe_replicas(app_name, deployment, timeout_s=max(1.0, deadline - time.monotonic()))
        engines = {int(pid) for info in replicas.values() for pid in info.get("engine_pids") or []}
        if engines or time.monotonic() > deadline:
            return engines
        time.sleep(1)


def running(pids: set[int]) -> set[int]:
    """Those of ``pids`` that are still running (a zombie is not)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def describe_processes(pids: set[int]) -> list[str]:
    """pid, parent, kernel name and command line of each of ``pids``: for failure messages."""
    lines = []
    for pid in sorted(pids):
        try:
            process = psutil.Process(pid)
            lines.append(f"{pid} (parent {process.ppid()}, {process.name()!r}): {' '.join(process.cmdline())[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess) as exc:
            lines.append(f"{pid}: {type(exc).__name__}")
    return lines


def stop_redis() -> int:
    """Stop the embedded Redis; returns its port, for `start_redis`."""
    from control_plane import redis_server

    url = redis_server.embedded_url()
    if url is None:
        raise LookupError("no embedded Redis is running")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    redis_server.stop_embedded()
    return port


def start_redis(port: int) -> str:
    from control_plane import redis_server

    return redis_server.start_embedded(port=port)
