"""Last in the session: `tandem status`, then `tandem down` tears everything down."""

from __future__ import annotations

import json
import socket

import httpx

from tests.conftest import TEST_PORT, tandem


def test_status_reports_roles_and_redis(cluster, cluster_env):
    result = tandem("status", "--json", env=cluster_env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["health"]["status"] == "ok"
    assert report["redis"]["ok"] is True
    roles = sorted(w["role"] for w in report["workers"])
    assert roles.count("prefill") == 1 and roles.count("decode") == 1
    assert report["deployments"]["PrefillWorker"]["replica_states"] == {"RUNNING": 1}
    human = tandem("status", env=cluster_env)
    assert human.returncode == 0 and "prefill" in human.stdout and "decode" in human.stdout


def test_down_stops_everything(cluster, cluster_env):
    import ray

    redis_url = json.loads(tandem("status", "--json", env=cluster_env).stdout)["redis"]["url"]
    ray.shutdown()  # this test process's own driver connection
    result = tandem("down", env=cluster_env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        httpx.get(f"http://127.0.0.1:{TEST_PORT}/health", timeout=5)
        raise AssertionError("the endpoint still answers after `tandem down`")
    except httpx.TransportError:
        pass
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "embedded Redis still running"
    assert tandem("status", env=cluster_env).returncode != 0
