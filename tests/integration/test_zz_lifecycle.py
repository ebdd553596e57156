"""Last in the session: `tandem status`, then `tandem down` tears everything down."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import httpx

from tests.conftest import BIN, MODEL, ROOT, TEST_PORT, tandem


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


def _stream_in_background(url: str, events: list[str]) -> threading.Thread:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}

    def run() -> None:
        try:
            with httpx.Client(timeout=300) as client, client.stream("POST", f"{url}/v1/chat/completions",
                                                                  json=body) as r:
                events.extend(line for line in r.iter_lines() if line)
        except httpx.HTTPError as exc:  # the connection cut: said in the test's failure
            events.append(f"<{type(exc).__name__}: {exc}>")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _check_drain_while_streaming(cluster, streaming: threading.Thread, down: subprocess.Popen) -> str:
    """While the stream runs, `tandem down` drains: new requests get 503; returns its output."""
    # Draining: the ingress refuses new requests at once (503, Retry-After) and says so on
    # /health, while the stream it accepted goes on.
    deadline = time.monotonic() + 60
    while httpx.get(f"{cluster.url}/health", timeout=30).status_code != 503:
        assert time.monotonic() < deadline, "the ingress never started draining"
        time.sleep(0.2)
    refused = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=30,
                         json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert "Retry-After" in refused.headers
    assert streaming.is_alive(), "the stream ended before the drain began; make it longer"
    output, _ = down.communicate(timeout=300)
    print(f"tandem down:\n{output}")  # whole in the report of a failure (a message is cut short)
    assert down.returncode == 0, output
    return output


def test_down_drains_then_stops_everything(cluster, cluster_env):
    import ray

    redis_url = json.loads(tandem("status", "--json", env=cluster_env).stdout)["redis"]["url"]
    ray.shutdown()  # this test process's own driver connection
    events: list[str] = []
    streaming = _stream_in_background(cluster.url, events)
    started = time.monotonic()
    while not events:
        assert streaming.is_alive() and time.monotonic() - started < 300, "the stream never started"
        time.sleep(0.2)
    # A grace long enough for the stream on this loaded machine (streams still running at
    # the end of a grace get a 503 error event instead).
    down = subprocess.Popen([str(BIN / "tandem"), "down", "--grace", "300"], cwd=ROOT, env=cluster_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = _check_drain_while_streaming(cluster, streaming, down)
    finally:
        if down.poll() is None:  # a failed check: do not leave it racing the fixture's own down
            down.kill()
            down.wait()
    streaming.join(timeout=30)
    # The accepted stream was finished, not cut: every token, the finish reason, [DONE].
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), (len(events), events[-3:], output)
    assert any('"finish_reason":"length"' in e for e in events)
    # The default app's one ingress replica, by its id, answered the drain (no other
    # replica's report stood in for it).
    assert "tandem: drained (1 ingress replica(s), nothing in flight)" in output, output
    try:
        httpx.get(f"http://127.0.0.1:{TEST_PORT}/health", timeout=5)
        raise AssertionError("the endpoint still answers after `tandem down`")
    except httpx.TransportError:
        pass
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "embedded Redis still running"
    assert tandem("status", env=cluster_env).returncode != 0
