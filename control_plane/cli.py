"""The `tandem` command line: bring the stack up and down, inspect it, prepare models."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from control_plane import model as model_prep
from control_plane import redis_server
from control_plane.paths import run_dir
from control_plane.settings import TandemSettings, load_settings

if TYPE_CHECKING:
    from routing.drain import DrainReport

app = typer.Typer(help="Tandem: disaggregated prefill/decode LLM serving on Ray Serve.", no_args_is_help=True)
model_app = typer.Typer(help="Prepare models for serving.", no_args_is_help=True)
app.add_typer(model_app, name="model")
keys_app = typer.Typer(help="API keys of the OpenAI endpoint (stored hashed in Redis).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()

STATE_FILE = "up.json"


def _state_path() -> Path:
    return run_dir() / STATE_FILE


def _read_state() -> dict[str, Any]:
    path = _state_path()
    return json.loads(path.read_text()) if path.exists() else {}


def _ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def local_ray_running() -> bool:
    result = subprocess.run(
        [*_ray_cli(), "status"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.returncode == 0


def _start_local_ray(settings: TandemSettings, dashboard: bool) -> None:
    cmd = [
        *_ray_cli(), "start", "--head",
        f"--num-cpus={settings.ray_num_cpus}",
        "--disable-usage-stats",
        f"--include-dashboard={'true' if dashboard else 'false'}",
        # The object store only carries small control messages and replies here.
        "--object-store-memory=1000000000",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        console.print(result.stdout[-4000:], result.stderr[-4000:])
        raise typer.Exit(1)


def _connect_ray(address: str) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)


def _wait_healthy(url: str, timeout_s: float, app_name: str | None = None) -> dict[str, Any]:
    """Until /health says ok; with ``app_name``, fail at once when Serve reports the app's
    deploy failed (a config deploy builds the app in Serve's controller: nothing raises here)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if app_name is not None:
            failure = _deploy_failure(app_name)
            if failure:
                raise RuntimeError(f"deploying '{app_name}' failed: {failure}")
        try:
            response = httpx.get(f"{url}/health", timeout=15)
            last = response.json()
            if response.status_code == 200 and last.get("status") == "ok":  # not just "degraded"
                return last
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            last = str(exc)
        time.sleep(1)
    raise RuntimeError(f"service did not become healthy in {timeout_s:.0f}s: {last}")


def _deploy_failure(app_name: str) -> str | None:
    from ray import serve

    try:
        status = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - unknown is not failed
        return None
    if status is not None and str(status.status).endswith("DEPLOY_FAILED"):
        return (status.message or "see Serve's controller log")[-2000:]
    return None


@app.command()
def up(
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML file."),
    prefill: int | None = typer.Option(None, help="Prefill replicas."),
    decode: int | None = typer.Option(None, help="Decode replicas."),
    colocated: int | None = typer.Option(None, help="Colocated replicas (colocated mode)."),
    mode: str | None = typer.Option(None, help="disaggregated | colocated"),
    host: str | None = typer.Option(None, help="HTTP bind address."),
    port: int | None = typer.Option(None, help="HTTP port."),
    model: str | None = typer.Option(None, help="Local HF folder or hub id (default: bundled SmolLM2)."),
    dashboard: bool = typer.Option(False, help="Start Ray's dashboard with a local Ray."),
    timeout: float = typer.Option(900, help="Seconds to wait for the app to become healthy."),
    allow_unauthenticated: bool = typer.Option(
        False, "--allow-unauthenticated", help="Serve a non-loopback address without API keys."
    ),
    block: bool = typer.Option(
        False, "--block", help="Stay in the foreground; on SIGTERM/SIGINT drain and stop (a container's main process)."
    ),
) -> None:
    """Start Redis, Ray and the Serve app; print the URL when it answers."""
    overrides: dict[str, Any] = {
        "auth": {"allow_unauthenticated": True} if allow_unauthenticated else None,
        "mode": mode,
        "host": host,
        "port": port,
        "prefill": {"replicas": prefill} if prefill is not None else None,
        "decode": {"replicas": decode} if decode is not None else None,
        "colocated": {"replicas": colocated} if colocated is not None else None,
        "model": {"path": model} if model is not None else None,
    }
    from routing.policies import check_routing_settings

    try:
        settings = load_settings(config, **overrides)
        check_routing_settings(settings.routing)
    except (ValueError, FileNotFoundError) as exc:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]invalid settings[/]: {exc}")
        raise typer.Exit(2) from None

    console.print(f"[bold]model[/]: {model_prep.prepare_model(settings.model.path)}")
    state: dict[str, Any] = {"app_name": settings.app_name, "url": settings.url}

    if settings.redis_url is None:
        url = redis_server.start_embedded()
        settings = settings.model_copy(update={"redis_url": url})
        state["embedded_redis"] = True
        console.print(f"[bold]redis[/]: embedded at {url}")
    state["redis_url"] = settings.redis_url
    _refuse_open_exposure(settings)
    if redis_server.ping(settings.redis_url, timeout=2.0):
        from routing import drain

        drain.cancel_drain(settings.redis_url, settings.app_name)  # left by an interrupted `tandem down`

    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:
        if not local_ray_running():
            _start_local_ray(settings, dashboard)
            state["started_ray"] = True
        address = "auto"
        console.print("[bold]ray[/]: local cluster")
    state["ray_address"] = address
    _state_path().write_text(json.dumps(state))
    from control_plane.app import with_kv_secret

    settings = with_kv_secret(settings, _cluster_kv_secret())
    _connect_ray(address)

    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    started = time.monotonic()
    with console.status(f"deploying {settings.mode} app '{settings.app_name}'..."):
        deploy_app(settings)
        from control_plane.app import planner_on

        health = _wait_healthy(settings.url, timeout, settings.app_name if planner_on(settings) else None)
    console.print(f"[green]ready[/] in {time.monotonic() - started:.0f}s: {health['pools']}")
    console.print(f"\nOpenAI endpoint: [bold]{settings.url}/v1[/]\n")
    example = json.dumps(
        {
            "model": settings.model.served_name,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
    )
    console.print(
        f"curl {settings.url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-d '{example}'",
        soft_wrap=True,
        highlight=False,
    )
    if block:
        _block_until_signalled()
        down(grace=None, config=config)


def deploy_app(settings: TandemSettings) -> None:
    """Deploy the app: from Python, or, with the P:D planner, as a Serve config (Serve
    applies an application-level autoscaling policy only to apps deployed from config, as
    KubeRay's serveConfigV2 does)."""
    from ray import serve

    from control_plane.app import (
        build_app_from_settings,
        config_deploy_args,
        external_scaler_on,
        planner_on,
        planner_policy,
    )

    if not planner_on(settings):
        serve.run(build_app_from_settings(settings), name=settings.app_name, route_prefix=settings.route_prefix,
                  blocking=False, external_scaler_enabled=external_scaler_on(settings))
        return
    # Serve has no public config deploy without the dashboard's REST API: its own client.
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    client = _get_global_client()
    app = ServeApplicationSchema(
        name=settings.app_name, route_prefix=settings.route_prefix, import_path="control_plane.app:build_app",
        args=config_deploy_args(settings), autoscaling_policy=planner_policy(settings),
    )
    # A config deploy replaces every app deployed from config: keep the others as they are.
    others = [
        ServeApplicationSchema(**details["deployed_app_config"])
        for name, details in (client.get_serve_details().get("applications") or {}).items()
        if name != settings.app_name and details.get("deployed_app_config")
    ]
    client.deploy_apps(ServeDeploySchema(applications=[*others, app]))


def _block_until_signalled() -> None:
    """Wait for SIGTERM or SIGINT (a container runtime stopping its main process)."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    console.print("serving in the foreground; SIGTERM or Ctrl-C drains and stops")
    while not stop.wait(1.0):
        pass


def _cluster_kv_secret() -> str:
    """This machine's KV secret for clusters `tandem up` starts: made once, kept (0600) in
    the run directory, so a redeploy does not change it under running workers."""
    from control_plane.app import KV_SECRET_FILE

    path = run_dir() / KV_SECRET_FILE
    if path.exists():
        secret = path.read_text().strip()
        if len(secret) >= 16:
            return secret
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret)
    return secret


def _refuse_open_exposure(settings: TandemSettings) -> None:
    """A non-loopback bind must have keys (in settings or Redis) or say it wants none."""
    if settings.binds_loopback or not settings.auth_required or settings.auth.api_keys:
        return
    from routing.auth import KeyStore

    if settings.redis_url and KeyStore(settings.redis_url, settings.app_name).list():
        return
    console.print(
        f"[red]refusing to serve {settings.host} without API keys[/]: create one with "
        "`tandem keys create NAME`, set auth.api_keys, or pass --allow-unauthenticated"
    )
    raise typer.Exit(2)


def _redis_url(settings: TandemSettings) -> str | None:
    """The Redis a CLI command talks to: the settings', else the one `tandem up` used."""
    return settings.redis_url or _read_state().get("redis_url") or redis_server.embedded_url()


def _key_store(config: Path | None) -> Any:
    from routing.auth import KeyStore

    settings = load_settings(config)
    url = _redis_url(settings)
    if not url or not redis_server.ping(url):
        console.print("[red]no Redis reachable[/]: start the stack (`tandem up`) or set redis_url")
        raise typer.Exit(1)
    return KeyStore(url, settings.app_name)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who the key is for."),
    requests_per_min: int | None = typer.Option(None, help="Requests per minute."),
    tokens_per_min: int | None = typer.Option(None, help="Prompt + completion tokens per minute."),
    max_concurrent: int | None = typer.Option(None, help="Requests in flight at once (per ingress replica)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML file."),
) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    from routing.auth import KeyLimits

    key, record = _key_store(config).create(name, KeyLimits(requests_per_min, tokens_per_min, max_concurrent))
    console.print(f"key for [bold]{name}[/] (id {record.digest[:12]}); it is not shown again:")
    print(key)


@keys_app.command("list")
def keys_list(config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML file.")) -> None:
    """Keys by name and id, with their limits."""
    table = Table("name", "id", "requests/min", "tokens/min", "concurrent", "created")
    for record in _key_store(config).list():
        limits = record.limits
        table.add_row(
            record.name, record.digest[:12], str(limits.requests_per_min or "-"), str(limits.tokens_per_min or "-"),
            str(limits.max_concurrent or "-"), time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)),
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    name_or_id: str = typer.Argument(..., help="A key's name, or its id (8+ characters)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML file."),
) -> None:
    """Revoke keys; ingresses stop accepting them within seconds."""
    removed = _key_store(config).revoke(name_or_id)
    console.print(f"revoked {removed} key(s)")
    if not removed:
        raise typer.Exit(1)


PROXY_FLUSH_S = 2.0


def _drain_ingresses(redis_url: str | None, grace_s: float, only: str | None = None) -> dict[str, DrainReport] | None:
    """Ask every app's ingress replicas to refuse new requests and finish the ones they
    accepted; wait up to ``grace_s`` for each live one to report nothing in flight. Returns
    each app's last report; None if the drain could not be asked for (no Redis). Needs a
    Ray connection."""
    from ray import serve

    from control_plane.replicas import replica_ids
    from routing import drain

    apps = [
        name for name, app_status in serve.status().applications.items()
        if "Ingress" in app_status.deployments and only in (None, name)
    ]
    if not apps:
        return {}
    if not redis_url or not redis_server.ping(redis_url, timeout=2.0):
        # The drain is a Redis key the replicas watch: without Redis it cannot be asked for.
        where = f"Redis {redis_server.redacted(redis_url)} unreachable" if redis_url else "no Redis configured"
        console.print(f"[yellow]{where}: {', '.join(apps)} not drained, in-flight requests may be cut[/]")
        return None
    for name in apps:
        drain.request_drain(redis_url, name, grace_s=grace_s, ttl_s=grace_s + 120)
    # The replicas end streams still running at the grace with an error event; a few more
    # seconds let them report that.
    deadline = time.monotonic() + grace_s + 5
    reports: dict[str, DrainReport] = {}
    with console.status(f"draining {', '.join(apps)} (up to {grace_s:.0f}s)..."):
        for name in apps:
            reports[name] = drain.wait_drained(redis_url, name, lambda name=name: replica_ids(name, "Ingress"),
                                               max(0.0, deadline - time.monotonic()))
    if any(report.in_flight and report.drained for report in reports.values()):
        # An ingress counts a stream done when its last chunk left the replica; Serve's
        # HTTP proxy may still be writing it to the client. A moment for it to flush (for
        # `tandem drain`, after which a pod is stopped).
        time.sleep(PROXY_FLUSH_S)
    for name, report in reports.items():
        if report.left:
            console.print(f"[yellow]{name}: {report.left} request(s) still in flight after {grace_s:.0f}s[/]")
        if report.silent:
            console.print(f"[yellow]{name}: {len(report.silent)} of {len(report.silent) + len(report.in_flight)} "
                          f"ingress replicas did not confirm the drain ({', '.join(sorted(report.silent))})[/]")
        if report.drained:
            console.print(f"{name}: drained ({len(report.in_flight)} ingress replica(s), nothing in flight)")
    return reports


def _stop_apps(names: list[str]) -> None:
    """Delete the apps while Serve's HTTP proxies still run: Serve stops each replica once
    the requests it holds are done, which for an ingress means its responses were handed
    to a proxy (the drain counts a stream done once its last chunk left the ingress). Then
    a moment for the proxies to write what they hold: `serve.shutdown()` kills them at once."""
    from ray import serve

    for name in names:
        try:
            serve.delete(name)
        except TimeoutError as exc:  # Serve's own bound (60 s): go on, the shutdown stops it
            console.print(f"[yellow]{name}: {exc}[/]")
    if names:
        time.sleep(PROXY_FLUSH_S)


@app.command("drain")
def drain_command(
    grace: float | None = typer.Option(None, help="Seconds to wait for in-flight requests (default: routing.drain_grace_s)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML file."),
) -> None:
    """Refuse new requests (503) and wait for in-flight ones to finish: before a shutdown,
    e.g. as a Kubernetes preStop hook. `tandem down` drains first by itself."""
    settings = load_settings(config)
    address = _read_state().get("ray_address") or settings.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        _connect_ray(address)
    except ConnectionError as exc:
        console.print(f"[red]no Ray cluster to drain[/]: {exc}")
        raise typer.Exit(1) from None
    reports = _drain_ingresses(_redis_url(settings), settings.routing.drain_grace_s if grace is None else grace)
    # A preStop hook or `tandem drain && ...` must not carry on as if it had drained.
    if reports is None or not all(report.drained for report in reports.values()):
        raise typer.Exit(1)


@app.command()
def down(
    grace: float | None = typer.Option(None, help="Seconds to let in-flight requests finish (default: routing.drain_grace_s)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML file (the one `tandem up` used)."),
) -> None:
    """Drain the ingresses, then stop the Serve app, and the Ray and Redis that `tandem up` started."""
    state = _read_state()
    try:
        settings = load_settings(config)
    except Exception as exc:  # noqa: BLE001 - the one command that must work in a broken setup
        console.print(f"[yellow]settings unreadable ({exc}); stopping with the defaults[/]")
        settings = TandemSettings.model_construct()
    # What `tandem up` started comes first: it recorded where.
    address = state.get("ray_address") or settings.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
    if state.get("started_ray") or address != "auto" or local_ray_running():
        try:
            _connect_ray(address)
            from ray import serve

            grace_s = settings.routing.drain_grace_s if grace is None else grace
            redis_url = state.get("redis_url") or _redis_url(settings)
            app_name = state.get("app_name")
            whole_cluster = bool(state.get("started_ray") or not app_name)
            drained = _drain_ingresses(redis_url, grace_s, only=None if whole_cluster else app_name) or {}
            _stop_apps(list(serve.status().applications) if whole_cluster else [app_name])
            if whole_cluster:
                serve.shutdown()
            console.print("serve app stopped")
            if redis_url:
                from routing import drain

                for name in drained:
                    drain.cancel_drain(redis_url, name)  # a later `tandem up` must not start drained
            import ray

            ray.shutdown()  # disconnect before `ray stop`, or the driver logs the teardown
        except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
            console.print(f"[yellow]could not stop the Serve app: {exc}[/]")
    if state.get("started_ray"):
        subprocess.run([*_ray_cli(), "stop"], capture_output=True, check=False)
        console.print("local ray stopped")
    if state.get("embedded_redis") and redis_server.stop_embedded():
        console.print("embedded redis stopped")
    _state_path().unlink(missing_ok=True)


POOL_DEPLOYMENTS = {"prefill": "PrefillWorker", "decode": "DecodeWorker", "colocated": "ColocatedWorker"}


@app.command()
def scale(
    role: str = typer.Argument(..., help="The pool: prefill, decode or colocated."),
    replicas: int = typer.Argument(..., min=1, help="Its new number of replicas."),
    app_name: str | None = typer.Option(None, "--app", help="The Serve app (default: the one `tandem up` started)."),
) -> None:
    """Resize a pool of a running app without restarting anything (Serve's external scaler).

    Added replicas start their engines; a removed prefill replica first waits for the KV it
    published to be pulled (or to expire), a removed decode replica for its streams to end.
    Apps sized by the planner or by Serve's autoscaling refuse: they size themselves."""
    deployment = POOL_DEPLOYMENTS.get(role)
    if deployment is None:
        console.print(f"[red]unknown pool {role!r}: one of {', '.join(POOL_DEPLOYMENTS)}[/]")
        raise typer.Exit(2)
    state = _read_state()
    name = app_name or state.get("app_name")
    if not name:
        console.print("[red]no app: pass --app, or start one with `tandem up`[/]")
        raise typer.Exit(1)
    _connect_ray(state.get("ray_address") or "auto")
    try:
        scale_pool(name, deployment, replicas)
    except Exception as exc:  # noqa: BLE001 - Serve's refusals, shown as they are
        console.print(f"[red]{name}/{deployment}: {getattr(exc, 'cause', None) or exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"{name}/{deployment}: scaling to {replicas} replica(s)")


def scale_pool(app_name: str, deployment: str, replicas: int) -> None:
    """Set a deployment's replica count through Serve's controller, as Serve's REST scale
    endpoint does (`POST /api/v1/applications/{app}/deployments/{name}/scale`)."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=deployment, app_name=app_name), replicas))


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    box: str | None = typer.Option(None, "--box", help="A cluster in a box's name: its nodes, links and replicas."),
) -> None:
    """Replicas, roles, health and Redis of the running stack (or of a cluster in a box)."""
    from control_plane.state import list_workers

    if box is not None:
        from control_plane.cluster.command import status_command

        status_command(as_json=as_json, name=box)
        return
    state = _read_state()
    if not state:
        console.print("tandem is not running (no `tandem up` state)")
        raise typer.Exit(1)
    report: dict[str, Any] = {"url": state["url"], "app": state["app_name"]}
    try:
        response = httpx.get(f"{state['url']}/health", timeout=15)
        report["health"] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        report["health"] = {"status": f"unreachable: {exc}"}
    redis_url = state.get("redis_url")
    report["redis"] = {"url": redis_server.redacted(redis_url), "ok": bool(redis_url and redis_server.ping(redis_url))}
    report["workers"] = list_workers(redis_url, state["app_name"]) if report["redis"]["ok"] else []
    report["deployments"] = _serve_deployments(state)
    report["planner"] = _planner_view(redis_url, state["app_name"]) if report["redis"]["ok"] else None
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    console.print(f"[bold]{report['app']}[/] at {report['url']}: {report['health'].get('status')}")
    console.print(f"redis: {report['redis']['url']} ({'ok' if report['redis']['ok'] else 'down'})")
    table = Table("deployment", "status", "replicas")
    for name, info in report["deployments"].items():
        table.add_row(name, info["status"], json.dumps(info["replica_states"]))
    console.print(table)
    workers = Table("replica", "role", "cores", "running", "waiting", "kv usage", "prefix hit", "ext KV hits")
    for entry in report["workers"]:
        stats = entry.get("stats", {})
        workers.add_row(
            entry["replica_id"],
            entry["role"],
            ",".join(map(str, entry.get("cpu_cores") or [])) or "-",
            str(stats.get("running", 0)),
            str(stats.get("waiting", 0)),
            f"{stats.get('kv_cache_usage', 0.0):.1%}",
            f"{stats.get('prefix_cache_hit_rate', 0.0):.1%}",
            str(stats.get("external_kv_hits", 0)),
        )
    console.print(workers)
    if report["planner"]:
        _print_planner(report["planner"])
    if report["health"].get("status") != "ok":
        raise typer.Exit(1)


def _planner_view(redis_url: str | None, app_name: str) -> dict[str, Any] | None:
    """The P:D planner's latest decision and its decision counts (None: no planner)."""
    import redis

    from control_plane.planner.serve_policy import read_decisions, read_plan

    client = redis.Redis.from_url(redis_url, socket_timeout=2.0) if redis_url else None
    try:
        record = read_plan(client, app_name) if client is not None else None
        if record is None:
            return None
        record["decisions"] = {f"{phase}:{reason}": n for (phase, reason), n in read_decisions(client, app_name).items()}
        return record
    except (redis.RedisError, OSError, ValueError):
        return None


def _print_planner(view: dict[str, Any]) -> None:
    plan, observed = view["plan"], view["observed"]
    age = time.time() - view["at"]
    console.print(f"[bold]planner[/] ({age:.0f}s ago): {observed['arrivals_per_s']:.2f} req/s observed, "
                  f"{plan['rate_forecast']:.2f} forecast; predicted TTFT {plan['predicted_ttft_s']:.2f}s, "
                  f"TPOT {plan['predicted_tpot_s'] * 1000:.0f}ms")
    table = Table("phase", "replicas", "starting", "needed", "correction", "target", "why", "attainment")
    slo = {"prefill": "ttft", "decode": "tpot"}
    for phase in ("prefill", "decode"):
        attained = observed.get(f"{slo[phase]}_attainment")
        table.add_row(phase, str(observed[f"{phase}_replicas"]), str(observed[f"{phase}_starting"]),
                      f"{plan[phase]['needed']:.2f}", f"{plan[phase]['correction']:.2f}", str(plan[phase]["target"]),
                      plan[phase]["reason"], "-" if attained is None else f"{slo[phase].upper()} {attained:.0%}")
    console.print(table)


def _serve_deployments(state: dict[str, Any]) -> dict[str, Any]:
    try:
        _connect_ray(state.get("ray_address") or "auto")
        from ray import serve

        app_status = serve.status().applications.get(state["app_name"])
    except Exception as exc:  # noqa: BLE001 - status must still print what it can
        return {"(ray)": {"status": f"unreachable: {exc}", "replica_states": {}}}
    if app_status is None:
        return {}
    return {
        name: {"status": str(dep.status), "replica_states": dict(dep.replica_states)}
        for name, dep in app_status.deployments.items()
    }


@model_app.command("prepare")
def model_prepare(
    model: str | None = typer.Option(None, help="Local HF folder or hub id (default: bundled SmolLM2)."),
    force: bool = typer.Option(False, help="Convert again even if prepared."),
) -> None:
    """Prepare a model for serving (the bundled GGUF becomes a bf16 safetensors folder)."""
    path = model_prep.prepare_model(model, force=force)
    console.print(f"model ready: {path}")


def _mount_profiler() -> None:
    from control_plane.profiler.command import profile_app

    app.add_typer(profile_app, name="profile", help="Profile the KV compression space for a model on this hardware.")


_mount_profiler()


def _mount_cluster() -> None:
    from control_plane.cluster.command import cluster_app

    app.add_typer(cluster_app, name="cluster")


_mount_cluster()


def _mount_optional_commands() -> None:
    """Commands whose dependencies come with extras (Locust: the dev or loadtest extra)."""
    try:
        from loadtest.cli import loadtest_command
    except ImportError:
        return
    app.command("loadtest", help="Load-test a running stack with Locust (headless).")(loadtest_command)


_mount_optional_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

