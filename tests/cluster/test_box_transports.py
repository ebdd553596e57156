"""Every transport that runs on CPU, publisher on the prefill node and puller on the decode
node, authenticated with the box's KV secret: the bytes arrive whole and cross the link."""

from __future__ import annotations

import pytest

from bench.kv_link import measure_across
from tests.cluster.helpers import BoxCluster

MIB = 1 << 20
SIZES = [1 * MIB, 8 * MIB]


@pytest.mark.parametrize("kind", ["tcp", "nixl", "gloo"])
def test_transport_moves_kv_between_nodes_over_the_link(cluster: BoxCluster, kind: str):
    before = cluster.link_bytes(cluster.decode_node)
    # Each size is pulled twice (a warm-up, then the measured pull); every byte is checked.
    timings = measure_across(cluster.state, kind, SIZES, repeats=1, verify=True)
    assert set(timings) == set(SIZES)
    received = cluster.link_bytes(cluster.decode_node)["to_node"] - before["to_node"]
    assert received >= 2 * sum(SIZES), f"{kind}: only {received} bytes reached the decode node's link"
