"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve).

Validates requests, runs the P/D orchestration of each one against the worker pools and
streams the answer back as SSE. Every error a client can cause comes back OpenAI-shaped.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from control_plane.settings import TandemSettings, settings_from_dict
from routing import admission, auth, drain, metrics, serve_router, tracing
from routing.disagg import PrefillDecider, PrefillPlanInput
from routing.errors import OpenAIError, error_body, from_engine_error
from routing.orchestrator import Orchestrator, RequestOptions
from routing.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    TooManyValues,
    forwarded_body,
)
from routing.timing import HEADER as TIMING_HEADER
from routing.timing import Timing
from routing.workload import Arrival, WorkloadWindow
from workers.engine import CHUNK, ERROR, RESPONSE, WorkerReply

log = logging.getLogger("ray.serve")

SLO_CLASS_HEADER = "x-tandem-slo-class"
KV_PROFILE_HEADER = "x-tandem-kv-profile"
# A client's own deadline for the whole request, in seconds (at most routing.request_timeout_s).
TIMEOUT_HEADER = "x-tandem-timeout-s"
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9.+:_-]{0,79}")

def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tandem")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "0+unknown"


app = FastAPI(title="Tandem", summary="OpenAI-compatible disaggregated prefill/decode serving",
              version=_package_version())


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request: " + str(first.get("msg"))
        param = None
    else:
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
    log.info("rejected %s %s: %s", request.method, request.url.path, message)
    metrics.count_request(request.url.path, "400")
    return JSONResponse(error_body(400, message, param), status_code=400)


def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    metrics.count_request(request.url.path, exc.status)
    return exc.response()


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (an unknown path, a wrong method, a body that is not UTF-8
    JSON) in OpenAI's error shape too."""
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, message)
    metrics.count_request(request.url.path, exc.status_code)
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)


# Ray and Serve errors that mean "no replica can take this now" (503, retry) rather than
# "the replica failed" (502).
_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, ActorUnavailableError)
# What a call to a worker replica raises when the replica (or its node) fails: never a 500,
# which would say the ingress itself is broken.
WORKER_ERRORS = (RayError, RayServeException)


def _worker_error(exc: BaseException, what: str = "worker") -> OpenAIError:
    """A failed call to a worker as OpenAI's 503 (no replica available now: retry) or 502
    (the replica failed)."""
    if isinstance(exc, _UNAVAILABLE):
        return OpenAIError(503, f"No {what} replica is available; retry shortly ({type(exc).__name__}).",
                           code="service_unavailable", headers={"Retry-After": "1"})
    return OpenAIError(502, f"{what} failed: {type(exc).__name__}")


def _worker_failure(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: a worker call failed: %r", request.method, request.url.path, exc)
    return _openai_error(request, _worker_error(exc))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    metrics.count_request(request.url.path, "500")
    return JSONResponse(error_body(500, "internal error"), status_code=500)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


# What a generation endpoint can answer besides 200: bad input (400), a missing or invalid
# API key (401), an unknown model (404), a body too large (413), shed load or a quota (429),
# a failed worker (502), no worker or a drain (503), the deadline (504).
_GENERATION_ERRORS = _errors(400, 401, 404, 413, 429, 502, 503, 504)
_SSE = {"text/event-stream": {"schema": {"type": "string", "description": "data: <chunk JSON> events, then data: [DONE]"}}}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The request body of an endpoint that reads and validates its body itself
    (`_read_body`), for the OpenAPI document: what FastAPI writes for a body parameter."""
    return {"requestBody": {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
                            "required": True}}


_REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest)


def _openapi() -> dict[str, Any]:
    """FastAPI's document without its 422 responses: validation errors here are OpenAI's 400;
    with the request models of the endpoints that parse their own bodies."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(_request_schemas())
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schema["components"]["schemas"] = dict(sorted(schemas.items()))
        app.openapi_schema = schema
    return app.openapi_schema


def _request_schemas() -> dict[str, Any]:
    """The request models' schemas exactly as FastAPI writes them for a body parameter."""
    from fastapi.openapi.utils import get_openapi

    document = FastAPI()
    for model in _REQUEST_MODELS:
        async def endpoint(body):
            return None

        endpoint.__annotations__ = {"body": model, "return": None}
        document.post(f"/{model.__name__}")(endpoint)
    return get_openapi(title="", version="", routes=document.routes)["components"]["schemas"]


app.openapi = _openapi  # type: ignore[method-assign]
app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
app.add_exception_handler(OpenAIError, _openai_error)  # type: ignore[arg-type]
app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
for _error_class in WORKER_ERRORS:
    app.add_exception_handler(_error_class, _worker_failure)  # type: ignore[arg-type]
app.add_exception_handler(Exception, _unexpected_error)
# Starlette runs the last added middleware first: the key is checked before the body size.
app.add_middleware(admission.BodyLimitMiddleware)
app.add_middleware(auth.AuthMiddleware)


# Serve pickles the FastAPI routes by value when @serve.ingress runs: helpers they use must be
# defined above the class, and live process-wide objects (the Prometheus registry) must be
# reached through their module, or the replica gets a frozen copy of them.
def _sse_error(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"


def _ends_stream(chunk: Any) -> bool:
    """Whether an SSE chunk from a worker is (or ends with) the stream's `data: [DONE]`."""
    return isinstance(chunk, str) and chunk.rstrip().endswith("data: [DONE]")


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


_Body = TypeVar("_Body", ChatCompletionRequest, CompletionRequest)


async def _read_body(model: type[_Body], http: Request, max_values: int) -> _Body:
    """The request's body, bounded before it is parsed (routing/protocol.py: parse_body)
    instead of FastAPI's json.loads of the whole body into Python objects; large bodies are
    parsed on the ingress's one parsing thread, so at most one is in memory being parsed."""
    if not _is_json(http.headers.get("content-type")):
        raise OpenAIError(400, "The request body must be JSON, sent with Content-Type: application/json.")
    try:
        raw = await http.body()
    except ClientDisconnect:
        raise OpenAIError(499, "the client closed the request") from None
    try:
        return await admission.parse(model, raw, max_values)
    except TooManyValues as exc:
        raise OpenAIError(413, str(exc)) from None
    except ValidationError as exc:  # answered as FastAPI's own validation errors are
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _authenticator(settings: TandemSettings) -> auth.Authenticator | None:
    if not settings.auth_required:
        return None
    limits = settings.auth.default_limits
    return auth.Authenticator(
        settings.app_name,
        settings.redis_url,
        static_keys=settings.auth.api_keys,
        default_limits=auth.KeyLimits(limits.requests_per_min, limits.tokens_per_min, limits.max_concurrent),
        quota_fail_open=settings.auth.quota_on_redis_failure == "open",
        static_keys_pin_kv_profile=settings.auth.api_keys_pin_kv_profile,
    )


async def _admit(key: auth.KeyRecord) -> None:
    authenticator = auth.active()
    if authenticator is None:
        return
    try:
        authenticator.take_slot(key)  # on the event loop: the slot count is not thread-safe
        try:
            await asyncio.to_thread(authenticator.check_quota, key)
        except BaseException:
            authenticator.release_slot(key)
            raise
    except auth.AuthError as exc:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        raise OpenAIError(exc.status, exc.message, code=exc.code, headers=headers) from None


def _kv_profile(http: Request, settings: TandemSettings) -> str | None:
    """A compression profile the request pins over the controller's choice (A/B tests,
    benchmarks). Ignored while compression is off (every transfer is sent raw); otherwise
    a caller auth.kv_profile_pinning does not allow gets 403, a malformed name 400, and an
    unknown one is sent uncompressed."""
    name = http.headers.get(KV_PROFILE_HEADER)
    if name is None or settings.kv_connector.compression.mode == "off":
        return None
    if not _PROFILE_NAME.fullmatch(name):
        raise OpenAIError(400, f"malformed profile name in {KV_PROFILE_HEADER}", param=KV_PROFILE_HEADER)
    if not may_pin_kv_profile(getattr(http.state, "api_key", None), settings):
        raise OpenAIError(403, f"This caller may not pin a KV compression profile ({KV_PROFILE_HEADER}).",
                          param=KV_PROFILE_HEADER, code="kv_profile_not_permitted")
    return name


def may_pin_kv_profile(key: auth.KeyRecord | None, settings: TandemSettings) -> bool:
    """auth.kv_profile_pinning for this caller (``key``: None when keys are off)."""
    pinning = settings.auth.kv_profile_pinning
    if pinning == "nobody":
        return False
    if pinning == "everyone" or not settings.auth_required:
        return True
    return key is not None and key.may_pin_kv_profile


def _request_timeout(http: Request, configured_s: float) -> float:
    raw = http.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return configured_s
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise OpenAIError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds", param=TIMEOUT_HEADER)
    return min(value, configured_s)


class _Lease:
    """What an admitted request holds until it ends: an in-flight slot at the ingress and,
    with API keys, the key's concurrency slot; released once, charging the tokens used."""

    def __init__(self, gate: admission.AdmissionGate, key: auth.KeyRecord | None):
        self._gate = gate
        self._key = key
        self._released = False

    def release(self, tokens: int = 0) -> None:
        if self._released:
            return
        self._released = True
        self._gate.release()
        if self._key is not None:
            auth.release_later(self._key, tokens)


def _prompt_chars(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
    return len(str(body.get("prompt", "")))


def _prompt_tokens(body: dict[str, Any]) -> int:
    """About how many tokens a prompt has, for quotas (4 characters a token)."""
    return max(1, _prompt_chars(body) // 4)


async def _call_apart(handle: DeploymentHandle, endpoint: str, body: dict[str, Any]) -> Any:
    return handle.generate.remote(endpoint, body)


class ServePool:
    """A worker deployment seen through its Serve handle (streaming calls).

    ``separate_calls``: each call is a Serve request of its own. Serve gives every call
    made while serving one HTTP request that request's internal id, and its router indexes
    pending calls by that id: concurrent calls of one HTTP request to one deployment (a
    batch's prompts) are taken for one another and never assigned. A call made from an
    empty context gets an id of its own."""

    def __init__(self, handle: DeploymentHandle, separate_calls: bool = False):
        self.handle = handle
        self._stream = handle.options(stream=True)
        self._separate_calls = separate_calls

    def separately(self) -> ServePool:
        return ServePool(self.handle, separate_calls=True)

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[WorkerReply]:
        if self._separate_calls:
            gen = await asyncio.create_task(
                _call_apart(self._stream, endpoint, body), context=contextvars.Context()
            )
        else:
            gen = self._stream.generate.remote(endpoint, body)
        finished = False
        try:
            async for reply in gen:
                yield reply
            finished = True
        finally:
            if not finished:
                # Client gone, timeout or error: abort the engine request on the replica.
                gen.cancel()


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        settings: dict[str, Any],
        prefill: DeploymentHandle | None = None,
        decode: DeploymentHandle | None = None,
        colocated: DeploymentHandle | None = None,
        controller: DeploymentHandle | None = None,
    ):
        self.settings: TandemSettings = settings_from_dict(settings)
        self.mode = self.settings.mode
        self.prefill = ServePool(prefill) if prefill is not None else None
        self.decode = ServePool(decode) if decode is not None else None
        self.colocated = ServePool(colocated) if colocated is not None else None
        self.controller = controller
        self._first_pool = "PrefillWorker" if self.mode == "disaggregated" else "ColocatedWorker"
        self._needed_pool = "DecodeWorker" if self.mode == "disaggregated" else "ColocatedWorker"
        traced = self.settings.tracing
        self._tracer = tracing.make_tracer(traced.service_name, traced.otlp_endpoint) if traced.enabled else None
        disagg = self.settings.routing.disaggregation
        self.decider = PrefillDecider(disagg.mode, disagg.threshold_tokens, disagg.interference, disagg.min_samples,
                                      lend_decode_at=disagg.lend_decode_at,
                                      lend_max_queued_tokens=disagg.lend_max_queued_tokens,
                                      # Half the prefill replicas' Serve slots stay for prefills.
                                      lend_prefill_slots=self.settings.prefill.max_ongoing_requests // 2)
        self.orchestrator = Orchestrator(
            self.mode, prefill=self.prefill, decode=self.decode, colocated=self.colocated,
            recompute_on_prefill_failure=self.settings.routing.recompute_on_prefill_failure,
            prefill_alive=self._prefill_alive, decider=self.decider,
            plan_input=self._plan_input if disagg.mode != "always" or disagg.lend_decode_at else None,
        )
        self._models_cache: dict[str, Any] | None = None
        planner = self.settings.planner
        self.workload = WorkloadWindow(planner.slo_ttft_s, planner.slo_tpot_s, window_s=planner.interval_s,
                                       classes=sorted(self.settings.kv_connector.compression.slo_classes))
        metrics.include_workers(self.settings.redis_url, self.settings.app_name,
                                metrics.link_key(self.settings.kv_connector.auth_secret))
        auth.install(_authenticator(self.settings), metrics_open=not self.settings.auth.metrics_require_key)
        self._health_cache: metrics.Cached[tuple[dict[str, Any], int]] = metrics.Cached(
            self.settings.routing.status_cache_s)
        self._metrics_cache: metrics.Cached[bytes] = metrics.Cached(self.settings.routing.status_cache_s)
        limits = self.settings.admission
        admission.install_body_limit(limits.max_body_bytes)
        self._gate = admission.AdmissionGate(limits.max_in_flight, limits.max_predicted_ttft_s, limits.retry_after_s)
        # Keyed by the Serve app, which is what `tandem drain`/`down` drain (settings.app_name
        # names the workers this ingress fronts, and two apps may front the same ones).
        replica = serve.get_replica_context()
        self._drain = drain.DrainWatcher(
            self.settings.redis_url, replica.app_name, replica.replica_id.unique_id, lambda: self._gate.in_flight,
        )
        self._drain.start()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The workload over the last planner interval, for the P:D planner (Serve's custom
        autoscaling metrics; the ingress reports them when the planner is on)."""
        return self.workload.stats()

    # ---- endpoints ---------------------------------------------------------------------

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(self) -> JSONResponse:
        if self._drain.draining:
            return JSONResponse({"status": "draining", "mode": self.mode}, status_code=503)
        # One check of the pools per routing.status_cache_s, however many probes ask.
        body, status_code = await self._health_cache.get(self._check_pools)
        return JSONResponse(body, status_code=status_code)

    async def _check_pools(self) -> tuple[dict[str, Any], int]:
        pools = {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}

        async def check(pool: ServePool) -> str:
            try:
                await asyncio.wait_for(pool.handle.check_health.remote(), timeout=10)
                return "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
                return f"unhealthy: {type(exc).__name__}"

        named = [(name, pool) for name, pool in pools.items() if pool is not None]
        results = await asyncio.gather(*(check(pool) for _, pool in named))
        status = {name: result for (name, _), result in zip(named, results, strict=True)}
        if all(value == "ok" for value in status.values()):
            overall = "ok"
        elif self.mode == "disaggregated" and status.get("decode") == "ok":
            # Decode recomputes prompts while prefill is down: slower, but serving.
            overall = "degraded"
        else:
            overall = "unhealthy"
        return {"status": overall, "mode": self.mode, "pools": status}, 503 if overall == "unhealthy" else 200

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def prometheus(self) -> Response:
        # Collected at most once per routing.status_cache_s, on the metrics thread (it reads
        # the workers' heartbeats from Redis).
        body = await self._metrics_cache.get(metrics.exposition_off_loop)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/compression", responses=_errors(401))
    async def compression(self) -> JSONResponse:
        """The compression controller's view: profiles, per-link bandwidth, decisions."""
        if self.controller is None:
            mode = self.settings.kv_connector.compression
            return JSONResponse({"mode": mode.mode, "profile": mode.profile})
        status = await self.controller.status.remote()
        return JSONResponse({"mode": "adaptive", **status})

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))
    async def models(self) -> JSONResponse:
        if self._models_cache is None:
            pool = self.decode or self.colocated
            assert pool is not None
            self._models_cache = await pool.handle.models.remote()
        return JSONResponse(self._models_cache)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": _SSE}, **_GENERATION_ERRORS},
              openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        body = await _read_body(ChatCompletionRequest, request, self.settings.admission.max_json_values)
        return await self._serve("chat", body, request)

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={200: {"content": _SSE}, **_GENERATION_ERRORS},
              openapi_extra=_json_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        body = await _read_body(CompletionRequest, request, self.settings.admission.max_json_values)
        return await self._serve("completions", body, request)

    # ---- orchestration -----------------------------------------------------------------

    def _check(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        if body.model != self.settings.model.served_name:
            raise OpenAIError(
                404,
                f"The model `{body.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        budget = body.output_budget()
        if budget is not None and budget > self.settings.model.max_model_len:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise OpenAIError(
                400,
                f"{param} is too large: {budget} > the model's context length "
                f"{self.settings.model.max_model_len}",
                param=param,
            )
        limits = self.settings.admission
        messages = getattr(body, "messages", None)
        if messages is not None and len(messages) > limits.max_messages:
            raise OpenAIError(400, f"Too many messages: {len(messages)} > {limits.max_messages}.", param="messages")
        prompt = getattr(body, "prompt", None)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > limits.max_prompts:
            raise OpenAIError(400, f"Too many prompts: {len(prompt)} > {limits.max_prompts}.", param="prompt")
        if (body.n or 1) > limits.max_n:
            raise OpenAIError(400, f"n is too large: {body.n} > {limits.max_n}.", param="n")

    async def _serve(
        self, endpoint: str, request: ChatCompletionRequest | CompletionRequest, http: Request
    ) -> Response:
        self._check(request)
        slo_class = self._slo_class(http)
        kv_profile = _kv_profile(http, self.settings)
        timeout_s = _request_timeout(http, self.settings.routing.request_timeout_s)
        key = getattr(http.state, "api_key", None)
        if key is not None:
            await _admit(key)
        body = forwarded_body(request)
        prompt_tokens = _prompt_tokens(body)
        try:
            # Checked right where the request is counted in flight (no await between), so
            # a drain's in-flight report never misses a request admitted after it.
            if self._drain.draining:
                metrics.SHED.labels("503").inc()
                raise OpenAIError(503, "The server is shutting down; retry on another instance.",
                                  code="shutting_down", headers={"Retry-After": str(self.settings.admission.retry_after_s)})
            # Demand the planner sees: shed requests too (they are what capacity lacked).
            arrival = self.workload.arrived(self.decider.tokens_for(_prompt_chars(body)), slo_class)
            try:
                self._admit_load(prompt_tokens)
            except OpenAIError:
                self.workload.finished(arrival, 0, None, None)
                raise
        except BaseException:
            if key is not None:
                auth.release_later(key, 0)
            raise
        lease = _Lease(self._gate, key)
        handed_to_stream = False
        tokens = 0
        try:
            response, tokens, handed_to_stream = await self._respond(
                endpoint, body, prompt_tokens, http, slo_class, lease, timeout_s, kv_profile, arrival
            )
            return response
        finally:
            if not handed_to_stream:
                lease.release(tokens)

    def _admit_load(self, prompt_tokens: int) -> None:
        """Shed load at once (429/503 with Retry-After) instead of queueing without bound."""
        router = serve_router.router_for(self.settings.app_name, self._first_pool)
        predicted = router.best_predicted_ttft_s(prompt_tokens) if router is not None else None
        # The pool a request cannot do without: decode recomputes when prefill is gone.
        needed = serve_router.router_for(self.settings.app_name, self._needed_pool)
        replicas = needed.replica_count() if needed is not None else None
        try:
            self._gate.admit(predicted, replicas)
        except admission.Overloaded as exc:
            metrics.SHED.labels(str(exc.status)).inc()
            raise OpenAIError(exc.status, exc.message, code="overloaded",
                              headers={"Retry-After": str(exc.retry_after_s)}) from None

    async def _respond(
        self,
        endpoint: str,
        body: dict[str, Any],
        prompt_tokens: int,
        http: Request,
        slo_class: str,
        lease: _Lease,
        deadline: float,
        kv_profile: str | None = None,
        arrival: Arrival | None = None,
    ) -> tuple[Response, int, bool]:
        """(response, tokens it used if known now, whether a stream now owns the lease)"""
        started = time.monotonic()
        request_id = http.headers.get("x-request-id") or uuid.uuid4().hex
        timing = Timing()
        span = None
        if self._tracer is not None:
            span = tracing.RequestSpan(self._tracer, f"POST {http.url.path}", http.headers,
                               {"tandem.mode": self.mode, "tandem.request_id": request_id})
        try:
            response, tokens, streaming = await self._first_reply(
                endpoint, body, prompt_tokens, http, slo_class, lease, deadline, kv_profile, timing, span,
                started, request_id, arrival,
            )
        except OpenAIError as exc:
            if exc.status >= 500:
                self.workload.finished(arrival, 0, None, None)  # accepted, then failed: a miss
            if span is not None:
                span.end(exc.status)
            raise
        except BaseException:
            if span is not None:
                span.end(500)
            raise
        if span is not None and not streaming:
            span.end(response.status_code)
        return response, tokens, streaming

    async def _first_reply(
        self, endpoint: str, body: dict[str, Any], prompt_tokens: int, http: Request, slo_class: str,
        lease: _Lease, deadline: float, kv_profile: str | None, timing: Timing, span: tracing.RequestSpan | None,
        started: float, request_id: str, arrival: Arrival | None = None,
    ) -> tuple[Response, int, bool]:
        limit = asyncio.timeout(deadline)
        timed_out = OpenAIError(504, f"request timed out after {deadline:g}s")
        replies = None
        try:
            async with limit:
                replies = await self.orchestrator.start(endpoint, body, RequestOptions(slo_class, kv_profile, timing))
                first = await anext(replies, None)
        except TimeoutError:
            raise timed_out from None
        except WORKER_ERRORS as exc:
            if limit.expired():
                # The deadline's cancellation, turned by Serve into its own error
                # (RequestCancelledError): the deadline, not a failed worker.
                raise timed_out from None
            # The worker replica died (or none is available) before the first chunk: 502/503,
            # as a proxy answers for its upstream, never the 500 of an ingress bug.
            log.warning("%s request failed before its first chunk: %r", endpoint, exc)
            worker = "decode worker" if self.mode == "disaggregated" else "worker"
            raise _worker_error(exc, worker) from None
        if limit.expired():
            # The call swallowed the deadline's cancellation and returned.
            if replies is not None:
                await replies.aclose()  # type: ignore[attr-defined]
            raise timed_out
        if first is None:
            raise OpenAIError(502, "the decode worker returned nothing")
        if first.kind != CHUNK:
            await replies.aclose()  # type: ignore[attr-defined]
        if first.kind == ERROR:
            raise from_engine_error(first.body, first.status)
        headers = {"x-request-id": request_id}
        if timing.parts:
            headers[TIMING_HEADER] = timing.header()
            timing.observe(self.mode)
        if span is not None:
            span.add_steps(timing)
            headers.update(span.traceparent())
        if first.kind == RESPONSE:
            e2e = time.monotonic() - started
            metrics.E2E.labels(endpoint, self.mode).observe(e2e)
            metrics.count_request(http.url.path, "200")
            usage = (first.body.get("usage") if isinstance(first.body, dict) else None) or {}
            generated = int(usage.get("completion_tokens") or 0)
            metrics.GENERATION_TOKENS.labels(endpoint).inc(generated)
            # Unstreamed: the first token came when the timed parts ended (all of E2E if
            # they were not measured); the rest of E2E was the other tokens.
            # (The decode call's "decode_queue" part holds the whole generation here.)
            parts = {k: v for k, v in timing.parts.items() if k != "decode_queue"}
            ttft = min(e2e, sum(parts.values())) if parts else e2e
            tpot = (e2e - ttft) / (generated - 1) if generated > 1 else None
            self.workload.finished(arrival, generated, ttft, tpot, parts)
            return JSONResponse(first.body, headers=headers), int(usage.get("total_tokens") or 0), False
        metrics.TTFT.labels(endpoint, self.mode).observe(time.monotonic() - started)
        stream = StreamingResponse(
            self._sse(endpoint, first, replies, started, http.url.path, deadline, lease, prompt_tokens, span,
                      dict(timing.parts), arrival),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        return stream, 0, True

    def _slo_class(self, http: Request) -> str:
        """The request's SLO class (`x-tandem-slo-class`): how much KV-compression quality
        it may trade for a faster handoff."""
        compression = self.settings.kv_connector.compression
        slo_class = http.headers.get(SLO_CLASS_HEADER) or compression.default_slo_class
        if slo_class not in compression.slo_classes:
            raise OpenAIError(
                400,
                f"unknown SLO class {slo_class!r} in {SLO_CLASS_HEADER}; "
                f"known: {', '.join(sorted(compression.slo_classes))}",
                param=SLO_CLASS_HEADER,
            )
        return slo_class

    def _plan_input(self, endpoint: str, body: dict[str, Any]) -> PrefillPlanInput:
        """What the routers know of a request now, for where its prefill runs."""
        chars = _prompt_chars(body)
        tokens = self.decider.tokens_for(chars)
        decode = serve_router.router_for(self.settings.app_name, self._needed_pool)
        held_chars, running = decode.decode_view(body) if decode is not None else (0, 0)
        prefill = serve_router.router_for(self.settings.app_name, self._first_pool)
        predicted = prefill.best_predicted_ttft_s(tokens) if prefill is not None else None
        cached = min(tokens, self.decider.tokens_for(held_chars)) if held_chars else 0
        prefill_running, queued = prefill.least_busy() if prefill is not None else (None, None)
        return PrefillPlanInput(tokens, decode_cached_tokens=cached, decode_running=running,
                                remote_prefill_s=predicted, prompt_chars=chars, prefill_running=prefill_running,
                                prefill_queued_tokens=queued)

    def _prefill_alive(self) -> bool:
        """Whether the prefill pool has a replica (unknown counts as yes)."""
        router = serve_router.router_for(self.settings.app_name, self._first_pool)
        return router is None or router.replica_count() > 0

    async def _sse(
        self,
        endpoint: str,
        first: WorkerReply,
        rest: AsyncIterator[WorkerReply],
        started: float,
        path: str,
        deadline: float,
        lease: _Lease | None = None,
        prompt_tokens: int = 0,
        span: tracing.RequestSpan | None = None,
        parts: dict[str, float] | None = None,
        arrival: Arrival | None = None,
    ) -> AsyncIterator[str]:
        status = "200"
        first_at = last_at = time.monotonic()
        chunks = 1
        finished = _ends_stream(first.body)
        limit = asyncio.timeout(max(0.0, deadline - (time.monotonic() - started)))
        try:
            yield first.body
            async with limit:
                async for reply in rest:
                    if self._drain.expired():
                        # The drain's grace is over: end the stream cleanly before the app
                        # is deleted under it.
                        status = "503"
                        yield _sse_error(error_body(503, "the server is shutting down", code="shutting_down"))
                        return
                    if reply.kind == CHUNK:
                        yield reply.body
                        chunks += 1
                        last_at = time.monotonic()
                        finished = _ends_stream(reply.body)
                    elif reply.kind == ERROR:
                        status = str(reply.status)
                        yield _sse_error(from_engine_error(reply.body, reply.status).body())
                        return
            if limit.expired():
                # The worker's stream swallowed the deadline's cancellation and ended.
                raise TimeoutError
            if not finished:
                # The worker's stream stopped without vLLM's [DONE] (its engine request was
                # aborted under it): the client must not take the text so far for a whole
                # answer.
                log.warning("%s stream from the worker ended before [DONE] after %d chunk(s)", endpoint, chunks)
                status = "502"
                yield _sse_error(error_body(502, "the worker's stream ended before the answer was finished",
                                            code="incomplete_stream"))
        except asyncio.CancelledError:
            status = "499"
            metrics.CLIENT_DISCONNECTS.inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a dead worker must end the stream cleanly
            if limit.expired():
                # This request's deadline: asyncio's TimeoutError, or the cancellation as Serve
                # re-raised it (RequestCancelledError).
                status = "504"
                yield _sse_error(error_body(504, "request timed out"))
            elif isinstance(exc, TimeoutError):
                # Not this request's deadline: a TimeoutError raised by the worker or Ray
                # (RayTaskError is also an instance of its cause's type). A failed worker.
                log.warning("stream from the worker raised %r before the request's deadline", exc)
                status = "502"
                yield _sse_error(error_body(502, f"worker failed: {type(exc).__name__}"))
            else:
                log.warning("stream from decode worker failed: %r", exc)
                status = "502"
                yield _sse_error(error_body(502, f"decode worker failed: {type(exc).__name__}"))
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
            metrics.count_request(path, status)
            metrics.E2E.labels(endpoint, self.mode).observe(time.monotonic() - started)
            tpot = (last_at - first_at) / (chunks - 1) if chunks > 1 else None
            if tpot is not None:
                metrics.TPOT.labels(endpoint, self.mode).observe(tpot)
            metrics.GENERATION_TOKENS.labels(endpoint).inc(chunks)
            if status != "499":  # a client that left says nothing of the service
                ok = status == "200"
                self.workload.finished(arrival, chunks, first_at - started if ok else None, tpot, parts)
            if lease is not None:
                # Streamed chunks carry about one token each.
                lease.release(prompt_tokens + chunks)
            if span is not None:
                span.end(int(status))
