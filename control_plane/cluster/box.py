"""The cluster in a box: a real multi-node Ray cluster on one Linux machine.

Each Ray node runs in its own network namespace, cabled by a veth to a bridge in the root
namespace and shaped with `tc`, so KV between prefill and decode crosses a real (if
virtual) network link with a rate, a delay and losses, and a node can be killed or cut off
without touching the others. The head node also runs Redis (password-protected, on its own
address); Ray's nodes authenticate to each other with a token. Every name made here starts
with the box's prefix, so `down` removes exactly what `up` made, also after a crash.

State (addresses, secrets, links) is a JSON file in the run directory, readable only by its
owner; the Ray nodes' temp dirs sit under the system temp dir (Unix socket paths must stay
short).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane.cluster import netns
from control_plane.cluster.netns import LinkSpec
from control_plane.paths import run_dir

BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544: never routed anywhere
RAY_PORT = 6379
REDIS_PORT = 6390
HTTP_PORT = 8000
NodeRole = Literal["head", "prefill", "decode"]
# What one role's node advertises to Ray: engines ask for one unit each (settings'
# `ray_resources`), so a node takes this many engines of its role at most.
ROLE_UNITS = 8


class BoxError(RuntimeError):
    """The box cannot do what was asked (no root, not up, unknown node, ...)."""


class NodeState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # n0, n1, ...
    roles: list[NodeRole]
    namespace: str
    address: str
    host_end: str  # the veth end on the bridge
    num_cpus: int
    link: LinkSpec = Field(default_factory=LinkSpec)
    link_up: bool = True

    @property
    def is_head(self) -> bool:
        return "head" in self.roles

    @property
    def resources(self) -> dict[str, float]:
        return {f"tandem_{role}": float(ROLE_UNITS) for role in self.roles}


class BoxState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    subnet: str
    bridge: str
    bridge_address: str
    nodes: list[NodeState]
    ray_token: str
    redis_password: str
    kv_secret: str
    redis_pid: int | None = None
    # Serve apps deployed on the box (name -> route prefix).
    apps: dict[str, str] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)

    @field_validator("name")
    @classmethod
    def _short(cls, value: str) -> str:
        return check_name(value)

    @property
    def head(self) -> NodeState:
        return next(node for node in self.nodes if node.is_head)

    @property
    def ray_address(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@{self.head.address}:{REDIS_PORT}/0"

    @property
    def url(self) -> str:
        return f"http://{self.head.address}:{HTTP_PORT}"

    def node(self, name: str) -> NodeState:
        for node in self.nodes:
            if node.name == name or node.namespace == name or node.address == name:
                return node
        raise BoxError(f"no node {name!r} in box {self.name!r}: {', '.join(n.name for n in self.nodes)}")

    def nodes_with(self, role: NodeRole) -> list[NodeState]:
        return [node for node in self.nodes if role in node.roles]


def check_name(value: str) -> str:
    # Interface names have 15 characters: "tdm-" + name + "-" + two digits.
    if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", value):
        raise ValueError(f"box name {value!r}: 1-6 lowercase letters and digits, a letter first")
    return value


def default_roles(nodes: int) -> list[list[NodeRole]]:
    """head, prefill, decode, then alternating decode and prefill nodes."""
    if nodes < 2:
        raise BoxError("a box has at least 2 nodes (with 2: head+prefill, decode)")
    if nodes == 2:
        return [["head", "prefill"], ["decode"]]
    extra: list[list[NodeRole]] = [["decode"] if i % 2 == 0 else ["prefill"] for i in range(nodes - 3)]
    return [["head"], ["prefill"], ["decode"], *extra]


def parse_roles(text: str) -> list[list[NodeRole]]:
    """``head,prefill,decode`` / ``head+prefill,decode,decode``: one entry per node."""
    out: list[list[NodeRole]] = []
    for entry in text.split(","):
        roles = [role.strip() for role in entry.split("+") if role.strip()]
        for role in roles:
            if role not in ("head", "prefill", "decode"):
                raise BoxError(f"unknown role {role!r} (head, prefill, decode)")
        out.append(roles)  # type: ignore[arg-type]
    if sum("head" in roles for roles in out) != 1:
        raise BoxError("exactly one node must be the head")
    for role in ("prefill", "decode"):
        if not any(role in roles for roles in out):
            raise BoxError(f"no {role} node")
    return out


def box_dir(name: str) -> Path:
    path = run_dir() / "cluster" / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def ray_temp_dir(name: str, node: str) -> Path:
    return Path(tempfile.gettempdir()) / f"tandem-{name}" / node


def _state_file(name: str) -> Path:
    return box_dir(name) / "state.json"


def load(name: str = "box") -> BoxState:
    path = _state_file(check_name(name))
    if not path.exists():
        raise BoxError(f"no cluster box {name!r} is up (`tandem cluster up`)")
    return BoxState.model_validate_json(path.read_text())


def save(state: BoxState) -> None:
    path = _state_file(state.name)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(state.model_dump_json(indent=2))
    path.with_suffix(".tmp").replace(path)


def require_root() -> None:
    if os.geteuid() != 0:
        raise BoxError("the cluster in a box needs root (network namespaces and tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise BoxError(f"`{tool}` not found: install iproute2")


def _prefix(name: str) -> tuple[str, str]:
    """(namespace prefix, interface prefix) of a box."""
    return f"tandem-{name}-", f"tdm-{name}-"


# Processes -----------------------------------------------------------------------------


def node_env(state: BoxState, node: NodeState) -> dict[str, str]:
    """The environment of every process on a node: Ray's token auth, no proxies (nodes
    talk to each other's addresses directly), the node's temp dir."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=state.ray_token,
        RAY_ADDRESS=state.ray_address,
        NO_PROXY="*",
        no_proxy="*",
        RAY_TMPDIR=str(ray_temp_dir(state.name, node.name)),
        # The nodes share a kernel, so UCX (NIXL's backend) would move bytes through shared
        # memory and never touch the link; on separate hosts it could not. TCP it is.
        UCX_TLS="tcp",
        # The app's secrets, as a Kubernetes Secret gives them to the pods: a config deploy
        # (the planner's) carries none in its args, and its builder and policy read these.
        TANDEM_KV_CONNECTOR__AUTH_SECRET=state.kv_secret,
        TANDEM_REDIS_URL=state.redis_url,
    )
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def exec_in(
    state: BoxState, node: NodeState, cmd: list[str], env_extra: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside ``node``'s namespace with the node's environment."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(["ip", "netns", "exec", node.namespace, *cmd], env=node_env(state, node) | (env_extra or {}),
                          check=False, **kwargs)  # fmt: skip


def python_in(state: BoxState, node: NodeState, module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return exec_in(state, node, [sys.executable, "-m", module, *args], timeout=timeout)


def start_ray(state: BoxState, node: NodeState) -> None:
    temp = ray_temp_dir(state.name, node.name)
    temp.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start",
        f"--node-ip-address={node.address}",
        f"--num-cpus={node.num_cpus}",
        f"--resources={json.dumps(node.resources)}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        # KV and requests go over Tandem's own channels; the object store carries replies.
        "--object-store-memory=300000000",
    ]  # fmt: skip
    if node.is_head:
        cmd += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={state.ray_address}"]
    result = exec_in(state, node, cmd, timeout=300)
    if result.returncode != 0:
        raise BoxError(f"ray start on {node.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def start_redis(state: BoxState) -> int:
    from control_plane.redis_server import redis_server_binary

    head = state.head
    data = box_dir(state.name) / "redis"
    data.mkdir(exist_ok=True)
    log = open(box_dir(state.name) / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
    # The password on the command line would show in `ps`: it comes through a config on stdin.
    process = subprocess.Popen(
        ["ip", "netns", "exec", head.namespace, redis_server_binary(), "-"],
        stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=data, start_new_session=True,
    )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(
        (
            f"bind {head.address}\nport {REDIS_PORT}\nrequirepass {state.redis_password}\n"
            "save \"\"\nappendonly no\nprotected-mode yes\n"
        ).encode()
    )
    process.stdin.close()
    state.redis_pid = process.pid
    from control_plane.redis_server import ping

    deadline = time.monotonic() + 30
    while not ping(state.redis_url, timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            raise BoxError(f"redis did not start on {head.name}; see {box_dir(state.name) / 'redis.log'}")
        time.sleep(0.2)
    return process.pid


def stop_redis(state: BoxState) -> bool:
    if state.redis_pid is None:
        return False
    try:
        os.kill(state.redis_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    state.redis_pid = None
    return True


def kill_namespace_processes(namespace: str, timeout_s: float = 10.0) -> int:
    """SIGKILL everything running in ``namespace``: a node dying at once, as a power cut."""
    killed = 0
    deadline = time.monotonic() + timeout_s
    while True:
        pids = netns.namespace_pids(namespace)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise BoxError(f"processes survive in {namespace}: {pids}")
        time.sleep(0.1)


# The box -------------------------------------------------------------------------------


def up(
    name: str = "box",
    roles: list[list[NodeRole]] | None = None,
    link: LinkSpec | None = None,
    subnet: str = "198.18.0.0/24",
    num_cpus: int = 4,
    start_services: bool = True,
) -> BoxState:
    """Namespaces, bridge, shaped links, then (``start_services``) Redis and Ray on every
    node; without them, only the network (for tools that run their own processes)."""
    require_root()
    check_name(name)
    network = ipaddress.ip_network(subnet)
    if not network.subnet_of(BENCHMARK_RANGE):  # type: ignore[arg-type]
        raise BoxError(f"subnet {subnet} is outside 198.18.0.0/15 (the only range the box uses)")
    roles = roles or default_roles(3)
    hosts = list(network.hosts())
    if len(hosts) < 10 + len(roles):
        raise BoxError(f"subnet {subnet} is too small for {len(roles)} nodes")
    if _state_file(name).exists() or _leftovers(name):
        raise BoxError(f"box {name!r} exists: `tandem cluster down --name {name}` first")
    ns_prefix, if_prefix = _prefix(name)
    state = BoxState(
        name=name,
        subnet=str(network),
        bridge=f"{if_prefix}br",
        bridge_address=f"{hosts[0]}/{network.prefixlen}",
        nodes=[
            NodeState(
                name=f"n{i}", roles=node_roles, namespace=f"{ns_prefix}n{i}", address=str(hosts[9 + i]),
                host_end=f"{if_prefix}{i}", num_cpus=num_cpus, link=link or LinkSpec(),
            )
            for i, node_roles in enumerate(roles)
        ],
        ray_token=secrets.token_hex(32),
        redis_password=secrets.token_urlsafe(24),
        kv_secret=secrets.token_urlsafe(32),
    )
    save(state)
    try:
        netns.create_bridge(state.bridge, state.bridge_address)
        for node in state.nodes:
            netns.create_node_namespace(node.namespace, node.host_end, state.bridge,
                                        f"{node.address}/{network.prefixlen}")
            apply_link(state, node)
        if not start_services:
            return state
        start_redis(state)
        save(state)
        start_ray(state, state.head)
        for node in state.nodes:
            if not node.is_head:
                start_ray(state, node)
    except BaseException:
        down(name)
        raise
    return state


def _leftovers(name: str) -> bool:
    ns_prefix, if_prefix = _prefix(name)
    return any(ns.startswith(ns_prefix) for ns in netns.namespaces()) or bool(netns.links(if_prefix))


def down(name: str = "box") -> list[str]:
    """Remove everything box ``name`` made, whatever state it is in. What was removed."""
    require_root()
    check_name(name)
    ns_prefix, if_prefix = _prefix(name)
    removed: list[str] = []
    try:
        stop_redis(load(name))
    except (BoxError, ValueError):
        pass
    for namespace in netns.namespaces():
        if namespace.startswith(ns_prefix):
            kill_namespace_processes(namespace)
            netns.run(["ip", "netns", "del", namespace], check=False)
            removed.append(namespace)
    for device in netns.links(if_prefix):
        netns.run(["ip", "link", "del", device], check=False)
        removed.append(device)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"tandem-{name}", ignore_errors=True)
    _state_file(name).unlink(missing_ok=True)
    return removed


def apply_link(state: BoxState, node: NodeState) -> None:
    """Shape both directions of ``node``'s link as its state says."""
    netns.shape("eth0", node.link, namespace=node.namespace)
    netns.shape(node.host_end, node.link)
    netns.set_up(node.host_end, node.link_up)


def set_link(name: str, node_name: str, spec: LinkSpec | None = None, up: bool | None = None) -> NodeState:
    """Change a node's link while the cluster runs."""
    require_root()
    state = load(name)
    node = state.node(node_name)
    if spec is not None:
        node.link = spec
    if up is not None:
        node.link_up = up
    apply_link(state, node)
    save(state)
    return node


def kill_node(name: str, node_name: str) -> int:
    """Kill every process of a node at once (its raylet, its workers and their engines)."""
    require_root()
    state = load(name)
    node = state.node(node_name)
    killed = kill_namespace_processes(node.namespace)
    if node.is_head:
        state.redis_pid = None
        save(state)
    return killed


def start_node(name: str, node_name: str) -> None:
    """(Re)start a node's Ray (and, on the head, Redis) after `kill_node`."""
    require_root()
    state = load(name)
    node = state.node(node_name)
    if netns.namespace_pids(node.namespace):
        raise BoxError(f"{node.name} is running: kill it first")
    shutil.rmtree(ray_temp_dir(name, node.name), ignore_errors=True)
    if node.is_head:
        start_redis(state)
        save(state)
    start_ray(state, node)


def redis(name: str, action: Literal["stop", "start"]) -> None:
    state = load(name)
    if action == "stop":
        stop_redis(state)
    elif state.redis_pid is None:
        start_redis(state)
    save(state)


def node_report(state: BoxState) -> Iterator[dict[str, Any]]:
    for node in state.nodes:
        try:
            stats = netns.counters(node.host_end)
        except netns.NetError:
            stats = {}
        yield {
            "node": node.name, "namespace": node.namespace, "address": node.address, "roles": node.roles,
            "link": str(node.link), "link_up": node.link_up, "processes": len(netns.namespace_pids(node.namespace)),
            # The bridge end's counters: what it sent went to the node.
            "bytes_to_node": stats.get("tx_bytes", 0), "bytes_from_node": stats.get("rx_bytes", 0),
        }  # fmt: skip
