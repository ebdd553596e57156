"""The live ingress's front door: hostile bodies bounded before they are parsed (the
ingress replica's own peak memory measured around them), /metrics without KV listener
addresses, probes answered under load, and the KV-profile header ignored while
compression is off."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, metric_samples
from tests.unit.test_body_bounds import LIMITS, RSS_BOUND, WORST_BODIES

APP = "tandem"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
# What the ingress replica may add to its peak RSS while it refuses or validates the worst
# bodies: the validation path's bound (tests/unit/test_body_bounds.py) plus the body's own
# copies on its way in (the proxy's message, the ASGI chunks, the joined body).
INGRESS_RSS_BOUND = RSS_BOUND + 4 * LIMITS.max_body_bytes


def _ingress_pid() -> int:
    """The ingress replica's process (on this host: the test cluster is local). From the GCS's
    actor table: the state API needs the dashboard, which the test cluster runs without."""
    import ray
    from ray._private import state

    from control_plane.replicas import replica_actor_names

    (name,) = replica_actor_names(APP, "Ingress")
    actor_id = ray.get_actor(name, namespace="serve")._actor_id.hex()
    return int(state.actors(actor_id)["Pid"])


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def test_the_worst_bodies_cost_the_ingress_little_memory_and_it_keeps_serving(cluster, http, openai_client):
    pid = _ingress_pid()
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # its peak RSS restarts from now
    except OSError as exc:
        pytest.skip(f"cannot reset the ingress's peak RSS: {exc}")
    before = _status_kib(pid, "VmRSS")
    answers = {}
    for name in ("tiny-messages", "empty-arrays", "content-parts", "objects-with-strings", "distinct-keys"):
        # An unknown model: the body is parsed whole, then refused before any engine work.
        raw = WORST_BODIES[name]().replace(b'"model":"m"', b'"model":"not-served"', 1)
        response = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
        answers[name] = response.status_code
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    growth = (_status_kib(pid, "VmHWM") - before) * 1024
    assert answers == {"tiny-messages": 413, "empty-arrays": 413, "content-parts": 404,
                       "objects-with-strings": 404, "distinct-keys": 404}
    assert growth <= INGRESS_RSS_BOUND, f"{growth / 2**20:.0f} MiB"
    assert http.get("/health").json()["status"] == "ok"
    reply = openai_client.chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=8)
    assert "Paris" in reply.choices[0].message.content


def test_body_limits_answer_like_openai(http):
    many_values = {"model": MODEL, "messages": [{"role": "user"}] * (LIMITS.max_json_values // 2 + 1)}
    response = http.post(CHAT, json=many_values)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = http.post(CHAT, content=b'{"model": "x"}', headers={"content-type": "text/plain"})
    assert response.status_code == 400 and "application/json" in response.json()["error"]["message"]
    with_bom = b"\xef\xbb\xbf" + json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 2}).encode()
    assert http.post(CHAT, content=with_bom, headers={"content-type": "application/json"}).status_code == 200


def test_metrics_show_no_kv_listener_address(cluster, http, openai_client):
    openai_client.chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=2)
    pseudonym = re.compile(r"kv-[0-9a-f]{12}->kv-[0-9a-f]{12}")
    deadline = time.monotonic() + 30  # the workers publish their metrics every 5 s
    while True:
        text = http.get("/metrics").text
        links = {s.labels["link"] for s in metric_samples(text, "tandem:kv_transfers_total")}
        if links or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert links, "no KV transfer in /metrics"
    assert all(pseudonym.fullmatch(link) for link in links), links
    assert not re.search(r"\d+\.\d+\.\d+\.\d+:\d+", text)


def test_probes_and_scrapes_all_answer_under_a_burst(cluster):
    def get(path: str) -> int:
        return httpx.get(f"{cluster.url}{path}", timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(get, ["/health", "/metrics"] * 50))
    assert set(statuses) == {200}


def test_kv_profile_is_ignored_while_compression_is_off(http):
    # The default app sends KV raw: the header has nothing to choose, even a malformed name.
    for profile in ("zstd3", "../etc"):
        response = http.post(CHAT, json={"model": MODEL, "messages": MSG, "max_tokens": 2},
                             headers={"x-tandem-kv-profile": profile})
        assert response.status_code == 200, response.text
