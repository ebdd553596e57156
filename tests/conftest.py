"""Shared fixtures. Integration tests share ONE local cluster for the whole session: it is
started with the README's own command (`make run`), and a colocated reference app is added
to the same Serve instance for token-exact comparisons."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEST_PORT = int(os.environ.get("TANDEM_TEST_PORT", "8123"))
MODEL = "smollm2-135m-instruct"
REFERENCE_APP = "reference"
# A second disaggregated app whose workers move KV over NIXL instead of tcp, compressed
# with an 8-bit profile, with two prefill replicas so that routing between replicas is
# exercised end to end.
NIXL_APP = "nixl"
NIXL_PREFILL_REPLICAS = 2
NIXL_PROFILE = "int8-token-g32-recent32"
# Its published KV lives longer than the default app's: the scale-down test holds some
# unpulled across a pool resize (test_zz_drain_scale_down).
NIXL_TTL_S = 60
# An ingress with API keys on and tight admission limits, in front of the reference app's
# engine (no engine of its own).
SECURE_APP = "secure"
SECURE_KEY = "tk-test-secure-key"
# A short KV hold time, so the tests can watch unpulled transfers expire.
TTL_S = 10


@dataclass
class Cluster:
    url: str  # the disaggregated app (what `make run` starts)
    reference_url: str  # a colocated app on the same model, for token-exact comparisons
    nixl_url: str  # a disaggregated app using the nixl transport
    secure_url: str  # an ingress with API keys required
    app_name: str = "tandem"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def reference_base_url(self) -> str:
        return f"{self.reference_url}/v1"

    def handle(self, deployment: str, app_name: str | None = None):
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=app_name or self.app_name)

    def worker_stats(self, deployment: str, app_name: str | None = None) -> dict:
        return self.handle(deployment, app_name).record_routing_stats.remote().result()

    def wait_blocks_free(self, deployment: str, timeout_s: float, app_name: str | None = None) -> bool:
        """Until the worker holds no KV block for a request (its prefix cache can be reset,
        which also empties it); False if it still does after ``timeout_s``."""
        handle = self.handle(deployment, app_name)
        deadline = time.monotonic() + timeout_s
        while not handle.reset_prefix_cache.remote().result():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True


async def post_chats(url: str, bodies: list[dict], timeout_s: float = 300) -> list[httpx.Response]:
    """POST the chat bodies to the app at ``url`` all at once; their responses, in order."""
    import asyncio

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))


def metric_samples(metrics_text: str, name: str) -> list:
    """The samples named ``name`` in a Prometheus text page (an ingress's /metrics, with
    its workers' metrics merged in)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s for family in text_string_to_metric_families(metrics_text) for s in family.samples if s.name == name]


def calibration_messages() -> list[tuple[str, list[dict]]]:
    """The profiler's bundled calibration prompts: (id, chat messages)."""
    from control_plane.profiler.calibration import load_prompts

    return [(p.id, list(p.messages)) for p in load_prompts()]


def tandem(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "tandem"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def extra_app_settings(name: str, **overrides):
    """Settings of an app deployed next to the default one in the test cluster, under /name."""
    from control_plane.redis_server import embedded_url
    from control_plane.settings import load_settings

    return load_settings(None, app_name=name, route_prefix=f"/{name}", port=TEST_PORT,
                         redis_url=embedded_url(), **overrides)


def deploy_extra_app(settings) -> None:
    from ray import serve

    from control_plane.app import build_app_from_settings, external_scaler_on

    # As `tandem up` deploys a fixed-size app: its pools can be resized (`tandem scale`).
    serve.run(build_app_from_settings(settings), name=settings.app_name, route_prefix=settings.route_prefix,
              blocking=False, external_scaler_enabled=external_scaler_on(settings))


@pytest.fixture(scope="session")
def cluster_env() -> dict:
    # The default app's KV requests are HMAC-authenticated, as a real cluster's should be.
    # Its /health and /metrics are computed afresh on every read (status_cache_s 0; the
    # default caches them for a second): a test that reads a counter just after a request
    # sees that request.
    return {**os.environ, "TANDEM_PORT": str(TEST_PORT), "TANDEM_KV_CONNECTOR__TTL_S": str(TTL_S),
            "TANDEM_KV_CONNECTOR__AUTH_SECRET": "test-cluster-kv-secret", "TANDEM_ROUTING__STATUS_CACHE_S": "0"}


@pytest.fixture(scope="session")
def cluster(cluster_env: dict):
    from control_plane.cli import local_ray_running

    if local_ray_running():
        pytest.fail("a local Ray cluster is already running: stop it (`tandem down`) before the tests")
    started = subprocess.run(
        ["make", "run"], cwd=ROOT, env=cluster_env, capture_output=True, text=True, timeout=1500
    )
    assert started.returncode == 0, f"make run failed:\n{started.stdout[-5000:]}\n{started.stderr[-5000:]}"
    url = f"http://127.0.0.1:{TEST_PORT}"
    assert f"{url}/v1" in started.stdout, started.stdout  # make run prints the URL...
    assert "curl " in started.stdout  # ...and a curl example

    import ray
    from ray import serve

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    reference = extra_app_settings(REFERENCE_APP, mode="colocated", colocated={"replicas": 1, "cpu_threads": 1})
    nixl = extra_app_settings(
        NIXL_APP,
        prefill={"replicas": NIXL_PREFILL_REPLICAS, "cpu_threads": 1},
        decode={"replicas": 1, "cpu_threads": 1},
        # KV travels int8-compressed here: its greedy output must still match colocated.
        kv_connector={"transport": "nixl", "ttl_s": NIXL_TTL_S,
                      "compression": {"mode": "static", "profile": NIXL_PROFILE}},
    )
    for extra in (reference, nixl):
        deploy_extra_app(extra)
    from routing.ingress import Ingress

    secure = reference.model_copy(
        update={"app_name": SECURE_APP, "route_prefix": f"/{SECURE_APP}",
                "auth": reference.auth.model_copy(update={"api_keys": [SECURE_KEY]}),
                # One request at a time and small bodies: admission control is easy to hit.
                "admission": reference.admission.model_copy(update={"max_in_flight": 1, "max_body_bytes": 65536})}
    )
    engine = serve.get_deployment_handle("ColocatedWorker", app_name=REFERENCE_APP)
    serve.run(Ingress.bind(secure.model_dump(mode="json"), colocated=engine), name=SECURE_APP,
              route_prefix=secure.route_prefix, blocking=False)
    try:
        yield Cluster(url=url, reference_url=f"{url}/{REFERENCE_APP}", nixl_url=f"{url}/{NIXL_APP}",
                      secure_url=f"{url}/{SECURE_APP}")
    finally:
        ray.shutdown()
        tandem("down", env=cluster_env)


@pytest.fixture(scope="session")
def openai_client(cluster: Cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.base_url, api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="session")
def reference_client(cluster: Cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.reference_base_url, api_key="unused", timeout=300, max_retries=0)


@pytest.fixture()
def http(cluster: Cluster):
    with httpx.Client(base_url=cluster.url, timeout=300) as client:
        yield client
