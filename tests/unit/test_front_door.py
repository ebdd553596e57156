"""The ingress's front door, driven in-process through its real FastAPI app (middlewares,
exception handlers, body parsing, admission, orchestration) with fake worker pools in place
of Serve handles: bodies bounded before parsing, worker failures as 502/503, the KV-profile
header's gate, and /health and /metrics cached so probes cannot multiply work."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import ray.serve
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from control_plane.settings import TandemSettings
from routing import admission, auth, metrics
from routing import ingress as ingress_module
from routing.orchestrator import KV_PROFILE_PARAM
from workers.engine import CHUNK, ERROR, RESPONSE, WorkerReply

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
ANSWER = {"id": "c1", "object": "chat.completion", "created": 1, "model": MODEL,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
PREFILLED = {"id": "p1", "object": "chat.completion", "created": 1, "model": MODEL, "choices": [],
             "kv_transfer_params": {"do_remote_prefill": True}}


class FakeStream:
    """What a streaming Serve handle call returns: an async iterator with cancel()."""

    def __init__(self, replies: list[WorkerReply], error: BaseException | None, stalls: bool = False,
                 on_cancel: BaseException | None = None):
        self._replies = list(replies)
        self._error = error
        self._stalls = stalls
        self._on_cancel = on_cancel
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> WorkerReply:
        await asyncio.sleep(0)
        if self._replies:
            return self._replies.pop(0)
        if self._stalls:
            # A worker that sends nothing more; cancelled, it raises ``on_cancel`` (as Serve's
            # RequestCancelledError) or, without one, swallows the cancellation and ends.
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if self._on_cancel is not None:
                    raise self._on_cancel from None
                raise StopAsyncIteration from None
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeHandle:
    """A worker deployment's handle: generate (streaming), check_health, models."""

    replies: list[WorkerReply] = field(default_factory=list)
    error: BaseException | None = None  # raised after the replies
    stalls: bool = False  # after the replies, nothing more until cancelled (see FakeStream)
    on_cancel: BaseException | None = None
    health_error: BaseException | None = None
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    health_checks: int = 0

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> SimpleNamespace:
        def remote(endpoint: str, body: dict[str, Any]) -> FakeStream:
            self.calls.append((endpoint, body))
            return FakeStream(self.replies, self.error, self.stalls, self.on_cancel)

        return SimpleNamespace(remote=remote)

    @property
    def check_health(self) -> SimpleNamespace:
        async def remote() -> None:
            self.health_checks += 1
            await asyncio.sleep(0.01)  # long enough for concurrent probes to overlap
            if self.health_error is not None:
                raise self.health_error

        return SimpleNamespace(remote=remote)


@pytest.fixture()
def front_door(monkeypatch):
    """make(settings, **handles) -> an httpx client on the ingress app, backed by an
    Ingress replica built by its own __init__ around the fake handles."""
    made: list[Any] = []

    async def make(settings: dict[str, Any] | None = None, **handles: FakeHandle) -> httpx.AsyncClient:
        context = SimpleNamespace(app_name="tandem", replica_id=SimpleNamespace(unique_id="ingress-1"), servable_object=None)
        monkeypatch.setattr(ray.serve, "get_replica_context", lambda: context)
        # Serve wraps the class in its ASGI wrapper; the replica here is Tandem's own class,
        # and the app is driven directly below.
        wrapper = ingress_module.Ingress.func_or_class
        cls = next(base for base in wrapper.__mro__[1:] if base.__name__ == "Ingress")
        replica = cls(TandemSettings.model_validate(settings or {}).model_dump(mode="json"), **handles)
        context.servable_object = replica
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress_module.app), base_url="http://t")
        made.append(client)
        return client

    yield make
    auth.install(None)
    admission.install_body_limit(None)


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MSG, "max_tokens": 4, **extra}


def _error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---- bodies ---------------------------------------------------------------------------------


async def test_a_body_with_too_many_json_values_is_refused_before_it_is_parsed(front_door, monkeypatch):
    colocated = FakeHandle([WorkerReply(RESPONSE, ANSWER)])
    client = await front_door({"mode": "colocated", "admission": {"max_json_values": 1024}}, colocated=colocated)
    parsed = []
    monkeypatch.setattr(ingress_module.ChatCompletionRequest, "model_validate_json",
                        classmethod(lambda cls, raw: parsed.append(raw)))
    body = _chat(messages=[{"role": "user"}] * 600)  # 1,201+ values
    response = await client.post(CHAT, json=body)
    assert response.status_code == 413, response.text
    assert _error(response)["type"] == "invalid_request_error"
    assert "1024 JSON values" in _error(response)["message"]
    assert not parsed and not colocated.calls


@pytest.mark.parametrize(
    ("content", "headers", "param", "words"),
    [
        (b'{"model": ', {}, None, "could not parse the JSON body"),
        (b'[1, 2, 3]', {}, None, "object"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, None, "could not parse"),
        (b'{"model": "m", "messages": [{"role": "user"}], "chat_template_kwargs": {"a": '
         + b"[" * 300 + b"]" * 300 + b"}}", {}, None, "recursion limit"),
        (json.dumps(_chat(temperature="hot")).encode(), {}, "temperature", "temperature"),
        (json.dumps(_chat(foo=1)).encode(), {}, "foo", "Unrecognized request argument"),
        (json.dumps(_chat(messages=[{"role": "user"}] * 2049)).encode(), {}, "messages", "at most 2048"),
        (json.dumps(_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}] * 1025}])).encode(),
         {}, "messages.0.content", "at most 1024 content parts"),
        (json.dumps(_chat(stop=list("abcde"))).encode(), {}, "stop", "at most 4 stop sequences"),
        (json.dumps(_chat(tools=[{"type": "function"}] * 129)).encode(), {}, "tools", "at most 128"),
        (json.dumps(_chat()).encode(), {"content-type": "text/plain"}, None, "Content-Type: application/json"),
    ],
    ids=["malformed", "not-an-object", "lone-surrogate", "too-deep", "wrong-type", "unknown-field",
         "too-many-messages", "too-many-content-parts", "too-many-stops", "too-many-tools", "not-json"],
)
async def test_bad_bodies_get_openai_shaped_400s(front_door, content, headers, param, words):
    colocated = FakeHandle([WorkerReply(RESPONSE, ANSWER)])
    client = await front_door({"mode": "colocated"}, colocated=colocated)
    response = await client.post(CHAT, content=content, headers={"content-type": "application/json", **headers})
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]
    assert not colocated.calls


async def test_good_bodies_reach_the_worker_as_the_client_set_them(front_door):
    colocated = FakeHandle([WorkerReply(RESPONSE, ANSWER)])
    client = await front_door({"mode": "colocated"}, colocated=colocated)
    body = _chat(temperature=0, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}], "x": [1]}])
    # A UTF-8 byte order mark, which Python's json accepted, still is.
    response = await client.post(CHAT, content=b"\xef\xbb\xbf" + json.dumps(body).encode(),
                                 headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Paris"
    ((endpoint, forwarded),) = colocated.calls
    assert endpoint == "chat" and forwarded == {**body, "temperature": 0.0}


async def test_a_large_body_is_parsed_off_the_event_loop(front_door, monkeypatch):
    colocated = FakeHandle([WorkerReply(RESPONSE, ANSWER)])
    client = await front_door({"mode": "colocated"}, colocated=colocated)
    threads = []
    real = ingress_module.admission.protocol.parse_body

    def parse_body(*args):
        import threading

        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(ingress_module.admission.protocol, "parse_body", parse_body)
    small = await client.post(CHAT, json=_chat())
    large = await client.post(CHAT, json=_chat(messages=[{"role": "user", "content": "x" * (128 << 10)}]))
    assert small.status_code == large.status_code == 200
    assert threads[0] == "MainThread" and threads[1].startswith("tandem-parse")


# ---- worker failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ActorDiedError(), 502),
        (RayTaskError("generate", "Traceback ...", RuntimeError("engine dead")), 502),
        (BackPressureError(num_queued_requests=10, max_queued_requests=10), 503),
    ],
    ids=["replica-died", "replica-raised", "no-replica-free"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_decode_replica_failing_before_its_first_chunk_is_a_502_or_503(front_door, error, status, stream):
    prefill = FakeHandle([WorkerReply(RESPONSE, PREFILLED)])
    decode = FakeHandle(error=error)
    client = await front_door({}, prefill=prefill, decode=decode)
    response = await client.post(CHAT, json=_chat(stream=stream))
    assert response.status_code == status, response.text
    error_body = _error(response)
    assert error_body["type"] == ("server_error" if status == 502 else "service_unavailable")
    assert type(error).__name__ in error_body["message"]
    if status == 503:
        assert response.headers["retry-after"] == "1"
    assert len(decode.calls) == 1


async def test_a_colocated_replica_failing_and_models_failing_are_502(front_door):
    colocated = FakeHandle(error=ActorDiedError())

    async def models() -> None:
        raise ActorDiedError()

    client = await front_door({"mode": "colocated"}, colocated=colocated)
    assert (await client.post(CHAT, json=_chat())).status_code == 502
    colocated.__dict__["models"] = SimpleNamespace(remote=models)
    response = await client.get("/v1/models")
    assert response.status_code == 502 and "ActorDiedError" in _error(response)["message"]


async def test_a_decode_replica_failing_mid_stream_ends_the_stream_with_an_error_event(front_door):
    prefill = FakeHandle([WorkerReply(RESPONSE, PREFILLED)])
    decode = FakeHandle([WorkerReply(CHUNK, 'data: {"choices": []}\n\n')], error=ActorDiedError())
    client = await front_door({}, prefill=prefill, decode=decode)
    response = await client.post(CHAT, json=_chat(stream=True))
    assert response.status_code == 200
    assert "decode worker failed: ActorDiedError" in response.text and response.text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("on_cancel", [RequestCancelledError("r1"), None], ids=["serve_error", "swallowed"])
async def test_the_deadline_ends_a_stalled_stream_with_a_504_event_however_the_worker_takes_the_cancellation(
        front_door, on_cancel):
    prefill = FakeHandle([WorkerReply(RESPONSE, PREFILLED)])
    decode = FakeHandle([WorkerReply(CHUNK, 'data: {"choices": []}\n\n')], stalls=True, on_cancel=on_cancel)
    client = await front_door({}, prefill=prefill, decode=decode)
    response = await client.post(CHAT, json=_chat(stream=True), headers={ingress_module.TIMEOUT_HEADER: "0.3"})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "timeout_error" and error["message"] == "request timed out", error


@pytest.mark.parametrize("on_cancel", [RequestCancelledError("r1"), None], ids=["serve_error", "swallowed"])
async def test_the_deadline_before_the_first_chunk_is_a_504_however_the_worker_takes_the_cancellation(
        front_door, on_cancel):
    colocated = FakeHandle(stalls=True, on_cancel=on_cancel)
    client = await front_door({"mode": "colocated"}, colocated=colocated)
    response = await client.post(CHAT, json=_chat(), headers={ingress_module.TIMEOUT_HEADER: "0.3"})
    assert response.status_code == 504, response.text
    assert _error(response)["type"] == "timeout_error" and "timed out after 0.3s" in _error(response)["message"]


async def test_a_decode_stream_ending_before_done_ends_with_an_error_event_not_as_a_whole_answer(front_door):
    prefill = FakeHandle([WorkerReply(RESPONSE, PREFILLED)])
    decode = FakeHandle([WorkerReply(CHUNK, 'data: {"choices": [{"index": 0, "delta": {"content": "Pa"}}]}\n\n')])
    client = await front_door({}, prefill=prefill, decode=decode)
    response = await client.post(CHAT, json=_chat(stream=True))
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[0].startswith('data: {"choices"') and events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == "incomplete_stream" and "ended before" in error["message"]


async def test_engine_errors_keep_their_status(front_door):
    error = {"error": {"message": "This model's maximum context length is 2048 tokens.", "code": 400}}
    colocated = FakeHandle([WorkerReply(ERROR, error, 400)])
    client = await front_door({"mode": "colocated"}, colocated=colocated)
    response = await client.post(CHAT, json=_chat())
    assert response.status_code == 400 and _error(response)["code"] == "context_length_exceeded"


# ---- x-tandem-kv-profile ----------------------------------------------------------------------

PINNED = {"x-tandem-kv-profile": "zstd3"}
COMPRESSED = {"kv_connector": {"compression": {"mode": "static", "profile": "int8-kivi"}}}
KEY = "tk-unit-test-key"


def _pinned_profile(prefill: FakeHandle) -> str | None:
    ((_, body),) = prefill.calls
    return body["kv_transfer_params"].get(KV_PROFILE_PARAM)


async def _pin(front_door, settings: dict[str, Any], headers: dict[str, str]) -> tuple[httpx.Response, FakeHandle]:
    prefill = FakeHandle([WorkerReply(RESPONSE, PREFILLED)])
    decode = FakeHandle([WorkerReply(RESPONSE, ANSWER)])
    client = await front_door(settings, prefill=prefill, decode=decode)
    return await client.post(CHAT, json=_chat(), headers={**PINNED, **headers}), prefill


async def test_kv_profile_is_ignored_while_compression_is_off(front_door):
    response, prefill = await _pin(front_door, {}, {"x-tandem-kv-profile": "../not-even-a-name"})
    assert response.status_code == 200
    assert _pinned_profile(prefill) is None


async def test_kv_profile_is_honoured_for_anyone_when_keys_are_off(front_door):
    response, prefill = await _pin(front_door, COMPRESSED, {})
    assert response.status_code == 200 and _pinned_profile(prefill) == "zstd3"
    malformed, _ = await _pin(front_door, COMPRESSED, {"x-tandem-kv-profile": "../etc"})
    assert malformed.status_code == 400 and _error(malformed)["param"] == "x-tandem-kv-profile"


@pytest.mark.parametrize(
    ("auth_settings", "status"),
    [
        ({}, 403),  # keys on: only keys allowed to pin
        ({"api_keys_pin_kv_profile": True}, 200),
        ({"kv_profile_pinning": "everyone"}, 200),
        ({"kv_profile_pinning": "nobody", "api_keys_pin_kv_profile": True}, 403),
    ],
    ids=["key-not-allowed", "settings-keys-allowed", "everyone", "nobody"],
)
async def test_kv_profile_needs_a_key_allowed_to_pin(front_door, auth_settings, status):
    settings = {**COMPRESSED, "auth": {"api_keys": [KEY], **auth_settings}}
    response, prefill = await _pin(front_door, settings, {"authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    if status == 403:
        error = _error(response)
        assert error["type"] == "permission_error" and error["code"] == "kv_profile_not_permitted"
        assert not prefill.calls  # refused before any work
    else:
        assert _pinned_profile(prefill) == "zstd3"


async def test_kv_profile_nobody_refuses_it_even_with_keys_off(front_door):
    response, _ = await _pin(front_door, {**COMPRESSED, "auth": {"kv_profile_pinning": "nobody"}}, {})
    assert response.status_code == 403


def test_keys_created_with_the_permission_may_pin():
    settings = TandemSettings.model_validate({"auth": {"api_keys": [KEY]}})
    allowed = auth.KeyRecord(name="bench", digest="d", may_pin_kv_profile=True)
    assert ingress_module.may_pin_kv_profile(allowed, settings)
    assert not ingress_module.may_pin_kv_profile(auth.KeyRecord(name="app", digest="d"), settings)
    assert auth.KeyRecord.from_json(allowed.to_json()).may_pin_kv_profile
    # Records stored before the permission existed may not.
    assert not auth.KeyRecord.from_json(json.dumps({"name": "old", "digest": "d"})).may_pin_kv_profile


# ---- /health and /metrics ---------------------------------------------------------------------


async def test_health_checks_the_pools_once_for_many_probes(front_door):
    prefill, decode = FakeHandle(), FakeHandle()
    client = await front_door({"routing": {"status_cache_s": 60}}, prefill=prefill, decode=decode)
    answers = await asyncio.gather(*(client.get("/health") for _ in range(20)))
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["status"] for a in answers} == {"ok"}
    assert prefill.health_checks == decode.health_checks == 1
    await client.get("/health")
    assert decode.health_checks == 1  # within status_cache_s: the cached answer


async def test_health_without_a_cache_checks_every_time_and_reports_degraded(front_door):
    prefill, decode = FakeHandle(health_error=ActorDiedError()), FakeHandle()
    client = await front_door({"routing": {"status_cache_s": 0}}, prefill=prefill, decode=decode)
    for _ in range(3):
        answer = await client.get("/health")
        assert answer.status_code == 200 and answer.json()["status"] == "degraded"
    assert prefill.health_checks == decode.health_checks == 3


async def test_metrics_are_collected_once_for_many_scrapes_off_the_default_executor(front_door, monkeypatch):
    threads = []

    def exposition() -> bytes:
        import threading

        threads.append(threading.current_thread().name)
        return b"# metrics\n"

    monkeypatch.setattr(metrics, "exposition", exposition)
    client = await front_door({"mode": "colocated", "routing": {"status_cache_s": 60}}, colocated=FakeHandle())
    answers = await asyncio.gather(*(client.get("/metrics") for _ in range(20)))
    assert {a.text for a in answers} == {"# metrics\n"}
    assert len(threads) == 1 and threads[0].startswith("tandem-metrics")


async def test_metrics_need_a_key_only_when_asked(front_door):
    settings = {"mode": "colocated", "auth": {"api_keys": [KEY]}}
    client = await front_door(settings, colocated=FakeHandle())
    assert (await client.get("/metrics")).status_code == 200
    assert (await client.get("/health")).status_code == 200
    client = await front_door({**settings, "auth": {"api_keys": [KEY], "metrics_require_key": True}},
                              colocated=FakeHandle())
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})).status_code == 200
    assert (await client.get("/health")).status_code == 200  # probes never need one


def test_metrics_never_show_kv_listener_addresses(redis_url):
    """Every end of a `link` label becomes a keyed digest: one series per link as before,
    the same on every ingress replica of the cluster (same KV secret), no address."""
    import redis
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from control_plane.state import worker_key
    from kv_transport.telemetry import TransferRecord
    from workers.metrics import WorkerMetrics

    links = ["10.0.0.5:41234->10.0.0.6:40001", "10.0.0.7:41000->10.0.0.6:40001"]
    worker = WorkerMetrics("decode", "r1")
    for link in links:
        worker.record_transfer(TransferRecord(transfer_id="t", link=link, transport="tcp", codec="identity", ok=True,
                                              raw_bytes=10, wire_bytes=10, wire_s=0.1, total_s=0.1).to_dict())
    redis.Redis.from_url(redis_url).set(worker_key("app", "r1"), json.dumps(
        {"replica_id": "r1", "role": "decode", "metrics": worker.exposition()}))
    key = metrics.link_key("cluster-kv-secret-0123456789")
    assert key == metrics.link_key("cluster-kv-secret-0123456789") != metrics.link_key("another-secret-0123456789")
    registry = CollectorRegistry()
    registry.register(metrics.WorkerMetricsCollector(redis_url, "app", key))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # Label values only: a sample's value (a `_created` timestamp) may contain any digits.
    labels = [value for family in families.values() for sample in family.samples for value in sample.labels.values()]
    assert labels and not any("10.0.0." in value or "41234" in value or "40001" in value for value in labels)
    shown = {s.labels["link"] for s in families["tandem:kv_transfers"].samples}
    assert shown == {metrics.link_pseudonym(link, key) for link in links}
    first, second = sorted(metrics.link_pseudonym(link, key) for link in links)
    assert first.split("->")[1] == second.split("->")[1]  # the same decode listener, the same name
    assert all(end.startswith("kv-") and len(end) == 15 for end in first.split("->"))


async def test_cached_values_are_shared_and_expire():
    now = [0.0]
    cache: metrics.Cached[int] = metrics.Cached(1.0, clock=lambda: now[0])
    computed = []

    async def compute() -> int:
        computed.append(now[0])
        await asyncio.sleep(0.01)
        return len(computed)

    assert await asyncio.gather(*(cache.get(compute) for _ in range(10))) == [1] * 10
    now[0] = 0.5
    assert await cache.get(compute) == 1
    now[0] = 1.5
    assert await cache.get(compute) == 2
    assert computed == [0.0, 1.5]

    async def fail() -> int:
        raise RuntimeError("redis down")

    now[0] = 3.0
    with pytest.raises(RuntimeError):
        await cache.get(fail)
    assert await cache.get(compute) == 3  # a failure is not kept


# ---- batched prompts ------------------------------------------------------------------------


@dataclass
class EchoHandle(FakeHandle):
    """A pool whose replies depend on the call: prefill names a transfer after its prompt,
    decode answers with the transfer it was handed. Records the Serve request context each
    call was made in."""

    role: str = "prefill"
    contexts: list[Any] = field(default_factory=list)

    @property
    def generate(self) -> SimpleNamespace:
        def remote(endpoint: str, body: dict[str, Any]) -> FakeStream:
            from ray.serve import context as serve_context

            self.contexts.append(serve_context._serve_request_context.get())
            self.calls.append((endpoint, body))
            if self.role == "prefill":
                from kv_transport.contract import TransferDescription, handoff_params

                params = handoff_params(TransferDescription(body["prompt"], {"host": "198.18.0.1", "port": 9}, 2, 1, 16))
                return FakeStream([WorkerReply(RESPONSE, {"kv_transfer_params": params})], None)
            text = body["kv_transfer_params"]["tandem"]["transfer_id"].upper()
            answer = {"id": f"cmpl-{text}", "object": "text_completion", "created": 1, "model": MODEL,
                      "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
            return FakeStream([WorkerReply(RESPONSE, answer)], None)

        return SimpleNamespace(remote=remote)


async def test_each_prompt_of_a_batch_is_its_own_prefill_decode_and_serve_call(front_door):
    from ray.serve import context as serve_context

    prefill, decode = EchoHandle(role="prefill"), EchoHandle(role="decode")
    client = await front_door({}, prefill=prefill, decode=decode)
    # As in a replica: the HTTP request's Serve context, which calls inherit.
    serve_context._serve_request_context.set(serve_context._RequestContext(_internal_request_id="http-1"))
    try:
        response = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["ab", "cd", "ef"],
                                                                "max_tokens": 1})
        single = await client.post("/v1/completions", json={"model": MODEL, "prompt": "gh", "max_tokens": 1})
    finally:
        serve_context._serve_request_context.set(None)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "AB"), (1, "CD"), (2, "EF")]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    assert single.json()["choices"][0]["text"] == "GH"
    # The batch's calls were made outside the HTTP request's Serve context (each gets an
    # id of its own from Serve); a single prompt's calls inside it.
    assert [c is None for c in prefill.contexts] == [True, True, True, False]
    assert [c is None for c in decode.contexts] == [True, True, True, False]


# ---- where the time went: Server-Timing and OpenTelemetry ----------------------------------


async def test_a_response_carries_its_ttft_breakdown_and_continues_the_callers_trace(front_door, monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kv_transport.contract import TransferDescription, handoff_params
    from workers.engine import EngineTiming

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr("routing.tracing.make_tracer", lambda *_: provider.get_tracer("test"))
    handoff = handoff_params(TransferDescription("t" * 32, {"host": "198.18.0.10", "port": 9}, 3, 1, 16))
    prefill = FakeHandle([WorkerReply(RESPONSE, {**PREFILLED, "kv_transfer_params": handoff},
                                      timing={EngineTiming.QUEUE: 0.002, EngineTiming.COMPUTE: 0.03})])
    decode = FakeHandle([WorkerReply(CHUNK, 'data: {"choices": []}\n\n',
                                     timing={EngineTiming.QUEUE: 0.02, EngineTiming.COMPUTE: 0.01,
                                             EngineTiming.KV_TRANSFER: 0.015}),
                         WorkerReply(CHUNK, "data: [DONE]\n\n")])
    client = await front_door({"tracing": {"enabled": True}}, prefill=prefill, decode=decode)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await client.post(CHAT, json=_chat(stream=True),
                                 headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code == 200, response.text
    parts = dict(item.split(";dur=") for item in response.headers["server-timing"].split(", "))
    assert list(parts) == ["router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_queue",
                           "first_decode_step"]
    assert (parts["prefill_queue"], parts["prefill"], parts["kv_transfer"]) == ("2.0", "30.0", "15.0")
    # The trace goes on from the caller's, and the response says where.
    assert response.headers["traceparent"].split("-")[1] == trace_id
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) >= {f"POST {CHAT}", "prefill", "router_queue", "prefill_queue", "prefill_compute",
                          "kv_transfer", "decode", "decode_queue", "first_decode_step"}
    root = spans[f"POST {CHAT}"]
    assert format(root.context.trace_id, "032x") == trace_id
    assert spans["prefill"].parent.span_id == root.context.span_id
    assert spans["prefill_compute"].parent.span_id == spans["prefill"].context.span_id
    assert spans["kv_transfer"].end_time - spans["kv_transfer"].start_time == 15_000_000
    # Back to back: the transfer starts where the prefill ended.
    assert spans["kv_transfer"].start_time == spans["prefill"].end_time
    assert root.attributes["http.response.status_code"] == 200


async def test_a_timeout_raised_by_the_worker_mid_stream_is_a_worker_failure_not_the_deadline(front_door):
    # A RayTaskError wrapping a worker's TimeoutError is an instance of TimeoutError too.
    colocated = FakeHandle([WorkerReply(CHUNK, 'data: {"choices": []}\n\n')], error=TimeoutError("inside the worker"))
    client = await front_door({"mode": "colocated"}, colocated=colocated)
    response = await client.post(CHAT, json=_chat(stream=True))
    events = [line for line in response.text.splitlines() if line.startswith("data: {\"error\"")]
    assert len(events) == 1
    assert json.loads(events[0][len("data: "):])["error"]["message"] == "worker failed: TimeoutError"
