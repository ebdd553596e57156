"""The cluster-in-a-box tests share ONE box for the whole run: three Ray nodes in their own
network namespaces (head, prefill, decode), a 10 Gbit link each, Redis on the head, and
two float32 apps: P/D (prefill on n1, decode on n2, KV over tcp with HMAC) and a colocated
reference on the decode node for token-exact comparisons.

These tests need root (network namespaces, tc) and run in their own pytest session after
the single-node suite (`make test` runs both): two clusters at once would not fit two cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from control_plane.cluster import box as boxlib
from tests.cluster.helpers import (
    BOX,
    FLOAT32_WORKER,
    LINK,
    PULL_TIMEOUT_S,
    REFERENCE_APP,
    SUBNET,
    TTL_S,
    BoxCluster,
    require_box_support,
    tandem_cli,
)


def pytest_collection_modifyitems(items):
    for item in items:
        if "/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


def _profile_library(out: Path) -> Path:
    """The compression profile library of this model on this machine, from the real
    profiler's quick run (kept out of the user's cache: --no-store, --out)."""
    done = tandem_cli("profile", "--quick", "--no-store", "--no-results", "--out", str(out), timeout=900)
    assert done.returncode == 0, f"tandem profile failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (library,) = out.glob("*.json")
    return library


@pytest.fixture(scope="session")
def box_cluster(tmp_path_factory):
    require_box_support()
    from control_plane.cluster.deploy import box_settings, deploy

    boxlib.down(BOX)  # whatever an interrupted run left
    started = time.monotonic()
    library = _profile_library(tmp_path_factory.mktemp("profiles"))
    state = boxlib.up(BOX, roles=[["head"], ["prefill"], ["decode"]], link=LINK, subnet=SUBNET, num_cpus=4)
    try:
        # Adaptive compression, lossless by default (every answer stays token-exact); the
        # adaptive test asks for the "relaxed" class.
        kv = {"ttl_s": TTL_S, "pull_timeout_s": PULL_TIMEOUT_S,
              "compression": {"mode": "adaptive", "default_slo_class": "exact", "library": str(library)}}
        main = box_settings(state, prefill=FLOAT32_WORKER, decode=FLOAT32_WORKER, kv_connector=kv)
        reference = box_settings(state, mode="colocated", app_name=REFERENCE_APP, route_prefix=f"/{REFERENCE_APP}",
                                 colocated=FLOAT32_WORKER)  # fmt: skip
        url, reference_url = deploy(BOX, [main, reference], timeout_s=900)
        print(f"box {BOX} up and deployed in {time.monotonic() - started:.0f}s")
        yield BoxCluster(boxlib.load(BOX), url, reference_url, library)
    finally:
        removed = boxlib.down(BOX)
        assert not boxlib._leftovers(BOX), f"box {BOX} left namespaces or links behind: {removed}"


@pytest.fixture(scope="session")
def cluster(box_cluster: BoxCluster) -> BoxCluster:
    """The name the OpenAI suite (tests/integration/test_openai_api.py) asks for."""
    return box_cluster


@pytest.fixture(scope="session")
def openai_client(box_cluster: BoxCluster):
    from openai import OpenAI

    return OpenAI(base_url=box_cluster.base_url, api_key="unused", timeout=300, max_retries=0,
                  http_client=httpx.Client(trust_env=False, timeout=300))  # fmt: skip


@pytest.fixture(scope="session")
def reference_client(box_cluster: BoxCluster):
    from openai import OpenAI

    return OpenAI(base_url=box_cluster.reference_base_url, api_key="unused", timeout=300, max_retries=0,
                  http_client=httpx.Client(trust_env=False, timeout=300))  # fmt: skip


@pytest.fixture()
def http(box_cluster: BoxCluster):
    with httpx.Client(base_url=box_cluster.url, timeout=300, trust_env=False) as client:
        yield client
