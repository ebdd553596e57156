"""The live workers' KV ports, as a stranger on the network meets them: every app's
listeners (the default app's configured secret, the nixl app's generated one) refuse
unauthenticated requests, and on this single-node cluster they listen on loopback only."""

from __future__ import annotations

import time

from tests.conftest import NIXL_APP
from tests.unit.kv_port import raw_request


def _listeners(app_name: str, timeout_s: float = 30.0) -> list[dict]:
    from control_plane.redis_server import embedded_url
    from control_plane.state import list_workers

    deadline = time.monotonic() + timeout_s
    while True:
        found = [w["kv_listener"] for w in list_workers(embedded_url(), app_name) if w.get("kv_listener")]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)  # heartbeats every 5 s


def test_every_apps_kv_port_is_authenticated_and_on_loopback(cluster, openai_client):
    from kv_transport.transport.control import ControlRequest

    for app_name in (cluster.app_name, NIXL_APP):
        listeners = _listeners(app_name)
        assert len(listeners) >= 2, app_name  # its prefill and decode workers
        for listener in listeners:
            assert listener["host"] == "127.0.0.1", listener  # one node: KV stays on loopback
            stranger = ControlRequest(op="pull", transfer_id="0" * 32).fields()
            reply = raw_request(listener, stranger)
            assert reply is not None and reply["code"] == "unauthorized", (app_name, reply)
    # And the service still answers through those authenticated ports.
    answer = openai_client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert answer.choices[0].message.content
