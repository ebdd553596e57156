"""What the cluster-in-a-box tests share: the box's layout and a handle on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from control_plane.cluster import box as boxlib
from control_plane.cluster.netns import LinkSpec

BOX = "ci"
SUBNET = "198.18.4.0/24"
LINK = LinkSpec(rate="10gbit")
REFERENCE_APP = "reference"
TTL_S = 10
PULL_TIMEOUT_S = 8
FLOAT32_WORKER = {"replicas": 1, "cpu_threads": 1, "engine_args": {"dtype": "float32"},
                  "kv_cache_memory_bytes": 128 * 1024 * 1024}
PROBE = Path(__file__).with_name("probe.py")


@dataclass
class BoxCluster:
    state: boxlib.BoxState
    url: str
    reference_url: str
    library: Path  # the compression profile library the app's controller uses

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def reference_base_url(self) -> str:
        return f"{self.reference_url}/v1"

    @property
    def prefill_node(self) -> boxlib.NodeState:
        return self.state.nodes_with("prefill")[0]

    @property
    def decode_node(self) -> boxlib.NodeState:
        return self.state.nodes_with("decode")[0]

    def refresh(self) -> None:
        self.state = boxlib.load(BOX)

    def probe(self, *args: str, timeout: float = 300) -> object:
        """Run tests/cluster/probe.py on the head node (a Ray driver must sit on a node)."""
        result = boxlib.exec_in(self.state, self.state.head, [sys.executable, str(PROBE), *args], timeout=timeout)
        assert result.returncode == 0, f"probe {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def blocks_free(self, deployment: str, timeout_s: float = 60, app: str = "tandem") -> bool:
        return bool(self.probe("blocks_free", app, deployment, str(timeout_s)))

    def workers(self, app: str = "tandem") -> list[dict]:
        """The registry's entries (engines, and the compression controller's heartbeat)."""
        from control_plane.state import list_workers

        return list_workers(self.state.redis_url, app)

    def worker(self, role: str, app: str = "tandem") -> dict:
        """The registry entry of the app's (one) engine of ``role``."""
        (entry,) = [w for w in self.workers(app) if w.get("role") == role]
        return entry

    def link_bytes(self, node: boxlib.NodeState) -> dict[str, int]:
        from control_plane.cluster.netns import counters

        stats = counters(node.host_end)
        # The bridge end: what it transmits goes to the node.
        return {"to_node": stats["tx_bytes"], "from_node": stats["rx_bytes"]}


def require_box_support() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, tc)"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "needs iproute2 (ip, tc)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the cluster-in-a-box tests {reason}; CI must provide it")
        pytest.skip(reason)


def wait_until(predicate, timeout_s: float, interval_s: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout_s:.0f}s")
        time.sleep(interval_s)


def wait_healthy(url: str, timeout_s: float = 600) -> None:
    def ok() -> bool:
        try:
            response = httpx.get(f"{url}/health", timeout=10, trust_env=False)
            return response.status_code == 200 and response.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    wait_until(ok, timeout_s, what=f"{url} healthy")



def tandem_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "tandem"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
