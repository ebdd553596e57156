"""Decode lent to the prefill pool on the live engines: a second ingress in front of the
default app's prefill and decode replicas, with `lend_decode_at: 2`. While streams run on
the decode replica (and the prefill replica is idle), the next request runs whole on the
prefill replica: its answer is whole, the prefill engine served it, the decode engine never
saw it, and no KV was handed over for it."""

from __future__ import annotations

import threading

import httpx

from tests.conftest import MODEL, extra_app_settings, metric_samples

APP = "tandem"  # the default app, whose workers the lending ingress fronts
LEND_APP = "lend-ingress"
PREFIX = "/lend"


def _lent(url: str) -> float:
    text = httpx.get(f"{url}{PREFIX}/metrics", timeout=30).text
    return sum(s.value for s in metric_samples(text, "tandem:prefill_decisions_total") if s.labels["where"] == "lent")


def test_a_request_runs_whole_on_the_prefill_replica_while_decode_is_busy(cluster):
    from ray import serve

    from bench.live_routers import wait_http_ok
    from routing.ingress import Ingress

    base = extra_app_settings(APP)
    # The queued-prompt-tokens condition is the unit tests' (tests/unit/test_disagg.py); here
    # it is opened wide, so what earlier tests left queued on the prefill engine cannot
    # decide this one.
    # status_cache_s 0: the ingress's /metrics is collected afresh on every read (by default
    # it is cached for a second, and a read just after a request could miss its decision).
    routing = base.routing.model_copy(update={"status_cache_s": 0, "disaggregation": base.routing.disaggregation.model_copy(
        update={"lend_decode_at": 2, "lend_max_queued_tokens": 1 << 30})})
    settings = base.model_copy(update={"routing": routing, "route_prefix": PREFIX})
    prefill = serve.get_deployment_handle("PrefillWorker", app_name=APP)
    decode = serve.get_deployment_handle("DecodeWorker", app_name=APP)
    serve.run(Ingress.bind(settings.model_dump(mode="json"), prefill=prefill, decode=decode), name=LEND_APP,
              route_prefix=PREFIX, blocking=False)
    streams: list[list[str]] = [[], []]
    started = [threading.Event(), threading.Event()]

    def stream(events: list[str], first: threading.Event) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=300) as client, client.stream("POST", f"{cluster.url}{PREFIX}/v1/chat/completions",
                                                                json=body) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    first.set()

    try:
        wait_http_ok(f"{cluster.url}{PREFIX}/health", 300)
        # Two streams on decode, one after the other (the second finds decode below the
        # mark): the rule then lends while a prefill replica runs fewer than two requests,
        # which holds even if Serve reports a stream's prefill call done a moment late.
        running = [threading.Thread(target=stream, args=(streams[i], started[i]), daemon=True) for i in (0, 1)]
        for thread, first in zip(running, started, strict=True):
            thread.start()
            assert first.wait(300), "a stream never started"
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "ignore_eos": True,
                "temperature": 0}
        # The ingress learns the stream's placement when Serve reports the prefill call
        # done: a request or two may go the usual way first.
        for _ in range(5):
            prefill_before = cluster.worker_stats("PrefillWorker")
            decode_before = cluster.worker_stats("DecodeWorker")
            lent_before = _lent(cluster.url)
            response = httpx.post(f"{cluster.url}{PREFIX}/v1/completions", json=body, timeout=300)
            prefill_after = cluster.worker_stats("PrefillWorker")
            decode_after = cluster.worker_stats("DecodeWorker")
            assert response.status_code == 200, response.text
            if _lent(cluster.url) == lent_before + 1:
                break
        else:
            page = httpx.get(f"{cluster.url}{PREFIX}/metrics", timeout=30).text
            names = ("tandem:router_in_flight_requests", "tandem:router_queued_prefill_tokens",
                     "tandem:prefill_decisions_total")
            views = [(s.name, s.labels, s.value) for name in names for s in metric_samples(page, name)]
            raise AssertionError(f"no request was lent while the stream ran: {views}")
        assert all(t.is_alive() for t in running), "a stream ended before the lent request was decided"
        answer = response.json()
        assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 12
        # The prefill engine ran it, and the decode engine never saw it: all 12 tokens came
        # from the prefill engine (a remote prefill runs one, then decode the rest).
        assert prefill_after["requests_total"] == prefill_before["requests_total"] + 1
        assert decode_after["requests_total"] == decode_before["requests_total"]
        assert decode_after["kv_transfers"] == decode_before["kv_transfers"]
        for thread, events in zip(running, streams, strict=True):
            thread.join(timeout=300)
            assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events[-3:]
    finally:
        serve.delete(LEND_APP)
