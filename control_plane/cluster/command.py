"""`tandem cluster ...`: the cluster in a box from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

from control_plane.cluster import box
from control_plane.cluster.netns import LinkSpec, NetError

cluster_app = typer.Typer(
    help="A multi-node Ray cluster on this machine: one network namespace per node, shaped links (needs root).",
    no_args_is_help=True,
)
node_app = typer.Typer(help="Kill or restart a node of the box.", no_args_is_help=True)
cluster_app.add_typer(node_app, name="node")
console = Console()

NAME = typer.Option("box", "--name", help="Which box (1-6 lowercase letters/digits).")


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]{exc}[/]")
    return typer.Exit(1)


def _link(text: str) -> LinkSpec:
    try:
        return LinkSpec.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@cluster_app.command("up")
def up_command(
    nodes: int = typer.Option(3, help="Ray nodes: head, prefill, decode, then more decode/prefill nodes."),
    roles: str | None = typer.Option(None, help="Roles per node, e.g. head,prefill,decode,decode or head+prefill,decode."),
    link: str = typer.Option("10gbit", help="Every node's link: rate[,delay[,jitter]][,loss%] or unshaped."),
    subnet: str = typer.Option("198.18.0.0/24", help="Addresses of the box (inside 198.18.0.0/15)."),
    num_cpus: int = typer.Option(4, help="Logical CPUs each Ray node advertises."),
    deploy: bool = typer.Option(True, help="Deploy Tandem (prefill on prefill nodes, decode on decode nodes)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML of the app."),
    timeout: float = typer.Option(900, help="Seconds to wait for the app to become healthy."),
    name: str = NAME,
) -> None:
    """Create the namespaces, links, Redis and Ray nodes, then deploy Tandem on them."""
    try:
        node_roles = box.parse_roles(roles) if roles else box.default_roles(nodes)
        spec = _link(link)
        with console.status(f"starting {len(node_roles)} Ray nodes..."):
            state = box.up(name, node_roles, spec, subnet, num_cpus)
        console.print(f"[green]box {name}[/]: {len(state.nodes)} nodes on {state.subnet}, links {spec}")
        if deploy:
            _deploy(name, config, timeout)
    except (box.BoxError, NetError, ValueError) as exc:
        raise _fail(exc) from None


@cluster_app.command("deploy")
def deploy_command(
    config: Path | None = typer.Option(None, "--config", "-c", help="Settings YAML of the app."),
    timeout: float = typer.Option(900, help="Seconds to wait for the app to become healthy."),
    name: str = NAME,
) -> None:
    """Deploy (or redeploy) Tandem on a running box."""
    try:
        _deploy(name, config, timeout)
    except (box.BoxError, NetError, ValueError) as exc:
        raise _fail(exc) from None


def _deploy(name: str, config: Path | None, timeout: float) -> None:
    from control_plane.cluster.deploy import box_settings, deploy
    from control_plane.model import prepare_model

    settings = box_settings(box.load(name), config)
    prepare_model(settings.model.path)
    with console.status("deploying Tandem (engines start in a minute or two)..."):
        (url,) = deploy(name, [settings], timeout_s=timeout)
    console.print(f"\nOpenAI endpoint: [bold]{url}/v1[/]  (from this machine's root namespace)")
    example = json.dumps({"model": settings.model.served_name,
                          "messages": [{"role": "user", "content": "What is the capital of France?"}]})  # fmt: skip
    console.print(f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{example}'",
                  soft_wrap=True, highlight=False)  # fmt: skip


@cluster_app.command("down")
def down_command(name: str = NAME) -> None:
    """Stop every process of the box and remove its namespaces, veths and bridge."""
    try:
        removed = box.down(name)
    except (box.BoxError, NetError, ValueError) as exc:
        raise _fail(exc) from None
    console.print(f"removed {len(removed)} namespace(s) and link(s)" if removed else "nothing to remove")


@cluster_app.command("link")
def link_command(
    node: str = typer.Argument(..., help="Node name (n1), namespace or address."),
    rate: str | None = typer.Option(None, help="New rate, e.g. 500mbit (unshaped: none)."),
    delay: str | None = typer.Option(None, help="New delay, e.g. 5ms."),
    jitter: str | None = typer.Option(None, help="New jitter, e.g. 1ms."),
    loss: float | None = typer.Option(None, help="New loss in percent."),
    state_: str | None = typer.Option(None, "--state", help="up | down: cable in or out."),
    name: str = NAME,
) -> None:
    """Change a node's link while the cluster runs (both directions)."""
    from control_plane.cluster.netns import time_ms

    try:
        current = box.load(name).node(node).link
        changes: dict[str, object] = {}
        if rate is not None:
            changes["rate"] = None if rate.lower() in ("none", "unshaped") else rate
        if delay is not None:
            changes["delay_ms"] = time_ms(delay)
        if jitter is not None:
            changes["jitter_ms"] = time_ms(jitter)
        if loss is not None:
            changes["loss_pct"] = loss
        spec = LinkSpec.model_validate(current.model_dump() | changes)
        if state_ not in (None, "up", "down"):
            raise typer.BadParameter("--state is up or down")
        updated = box.set_link(name, node, spec, None if state_ is None else state_ == "up")
    except (box.BoxError, NetError, ValueError) as exc:
        raise _fail(exc) from None
    console.print(f"{updated.name}: {updated.link} ({'up' if updated.link_up else 'down'})")


@node_app.command("kill")
def node_kill(node: str = typer.Argument(...), name: str = NAME) -> None:
    """Kill every process of a node at once (raylet, replicas, engines)."""
    try:
        killed = box.kill_node(name, node)
    except (box.BoxError, NetError) as exc:
        raise _fail(exc) from None
    console.print(f"{node}: killed {killed} process(es)")


@node_app.command("start")
def node_start(node: str = typer.Argument(...), name: str = NAME) -> None:
    """Start a killed node's Ray again; Serve places replicas on it as they are needed."""
    try:
        box.start_node(name, node)
    except (box.BoxError, NetError) as exc:
        raise _fail(exc) from None
    console.print(f"{node}: started")


@cluster_app.command("redis")
def redis_command(action: str = typer.Argument(..., help="stop | start"), name: str = NAME) -> None:
    """Stop or start the box's Redis (on the head node)."""
    if action not in ("stop", "start"):
        raise typer.BadParameter("stop or start")
    try:
        box.redis(name, action)  # type: ignore[arg-type]
    except (box.BoxError, NetError) as exc:
        raise _fail(exc) from None
    console.print(f"redis {action}ped" if action == "stop" else "redis started")


@cluster_app.command("status")
def status_command(as_json: bool = typer.Option(False, "--json"), name: str = NAME) -> None:
    """Nodes, their links and traffic, and which replica runs where."""
    try:
        report = status_report(name)
    except (box.BoxError, NetError) as exc:
        raise _fail(exc) from None
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    console.print(f"[bold]box {name}[/]: {report['url']} ({report['health'].get('status')})")
    nodes = Table("node", "address", "roles", "link", "state", "processes", "MiB to node", "MiB from node", "replicas")
    for node in report["nodes"]:
        nodes.add_row(
            node["node"], node["address"], "+".join(node["roles"]), node["link"], "up" if node["link_up"] else "cut",
            str(node["processes"]), f"{node['bytes_to_node'] / 2**20:.1f}", f"{node['bytes_from_node'] / 2**20:.1f}",
            ", ".join(f"{w['app']}/{w['role']}:{w['replica_id']}" for w in node["workers"]) or "-",
        )  # fmt: skip
    console.print(nodes)
    console.print(f"redis: {'ok' if report['redis_ok'] else 'down'}")


def status_report(name: str) -> dict:
    from control_plane import redis_server
    from control_plane.state import list_workers

    state = box.load(name)
    report: dict = {"name": name, "url": state.url, "apps": state.apps, "ray_address": state.ray_address}
    try:
        report["health"] = httpx.get(f"{state.url}/health", timeout=10, trust_env=False).json()
    except (httpx.HTTPError, ValueError) as exc:
        report["health"] = {"status": f"unreachable: {type(exc).__name__}"}
    report["redis_ok"] = redis_server.ping(state.redis_url, timeout=2.0)
    workers = []
    if report["redis_ok"]:
        for app_name in state.apps:
            workers += [{**w, "app": app_name} for w in list_workers(state.redis_url, app_name)]
    report["nodes"] = []
    for node in box.node_report(state):
        node["workers"] = [
            {"app": w["app"], "role": w.get("role"), "replica_id": w.get("replica_id"), "kv_listener": w.get("kv_listener")}
            for w in workers if w.get("node") == node["address"]
        ]  # fmt: skip
        report["nodes"].append(node)
    return report

