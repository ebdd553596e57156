"""Host one vLLM engine (AsyncLLM) with vLLM's own OpenAI serving layer.

Tandem does not re-implement chat templates, tokenization, sampling parameters or response
objects: it builds vLLM's `OpenAIServingChat` / `OpenAIServingCompletion` exactly as
`vllm serve` does (through `init_app_state`) and calls them with validated requests. This
module knows nothing about Ray; `workers.deployments` wraps it in Serve deployments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from control_plane.model import resolve_model
from control_plane.paths import run_dir
from control_plane.settings import Role, TandemSettings
from kv_transport.contract import AUTH_SECRET_ENV
from workers import cpu_binding
from workers.metrics import WorkerMetrics
from workers.stats import EngineStats

log = logging.getLogger(__name__)

# Items a worker streams back to the ingress. A worker always streams, so that an error, a
# whole response and SSE chunks travel the same way.
ERROR = "error"
RESPONSE = "response"
CHUNK = "chunk"


@dataclass
class WorkerReply:
    kind: str  # ERROR | RESPONSE | CHUNK
    body: Any = None  # error dict, response dict, or one SSE "data: ..." string
    status: int = 200
    # On a request's first reply: where its time went in this worker, in seconds (see
    # `EngineTiming`), for the orchestrator's breakdown of the request's TTFT.
    timing: dict[str, float] | None = None


# The request being served's timing, filled by `TrackedEngine` when the engine's first
# output for it arrives (the serving layer calls the engine in the serving task's context).
_TIMING: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("tandem_timing", default=None)


class EngineTiming:
    """Keys of `WorkerReply.timing`, from vLLM's own per-request stats (engine-core
    timestamps) and the KV connector's pull record:

    - ``queue_s``: queued until first scheduled. For a decode request whose KV is pulled,
      this includes the pull: vLLM schedules it once the KV has landed.
    - ``compute_s``: first scheduled until its first token (a prefill; on decode, the
      first decode step after the pull).
    - ``kv_transfer_s``: the pull of its KV (fetch, verify, decode, write), if it pulled.
    - ``worker_s``: the worker's whole handling until this reply (tokenization included).
    """

    QUEUE = "queue_s"
    COMPUTE = "compute_s"
    KV_TRANSFER = "kv_transfer_s"
    WORKER = "worker_s"


@dataclass
class EngineHostInfo:
    role: str
    model: str
    served_name: str
    kv_connector: str | None
    cpu_cores: list[int] = field(default_factory=list)
    pid: int = field(default_factory=os.getpid)
    # The engine-core processes vLLM started for this engine (its children).
    engine_pids: list[int] = field(default_factory=list)


def engine_core_pids(engine: Any) -> list[int]:
    """The pids of an AsyncLLM's engine-core processes, as its process manager started them
    (vLLM's internals: empty where they are not what this vLLM has, or in-process engines)."""
    resources = getattr(getattr(engine, "engine_core", None), "resources", None)
    processes = getattr(getattr(resources, "engine_manager", None), "processes", None) or []
    return [process.pid for process in processes if getattr(process, "pid", None)]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def kv_transfer_config(
    settings: TandemSettings, role: Role, listener: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """vLLM's kv_transfer_config for an engine of ``role`` (None: no connector)."""
    if role == "colocated":
        return None
    connector = settings.kv_connector
    config: dict[str, Any] = {
        "kv_connector": connector.name,
        # Both roles load and save: prefill saves for decode, decode loads, and vLLM's
        # connectors decide per request from kv_transfer_params.
        "kv_role": "kv_both",
        "kv_buffer_device": connector.buffer_device,
        # A failed KV load makes vLLM recompute the missing blocks instead of failing the
        # request: the client still gets its (identical) answer.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": dict(connector.extra_config),
    }
    if connector.module_path:
        config["kv_connector_module_path"] = connector.module_path
    if connector.name == "TandemConnector":
        config.setdefault("kv_connector_module_path", "kv_transport.connector")
        extra = config["kv_connector_extra_config"]
        extra.setdefault("transport", connector.transport)
        extra.setdefault("ttl_s", connector.ttl_s)
        extra.setdefault("pull_timeout_s", connector.pull_timeout_s)
        extra.setdefault("rate_limit_bytes_per_s", connector.rate_limit_bytes_per_s)
        extra.setdefault("telemetry_sinks", list(connector.telemetry_sinks))
        extra.setdefault("redis_url", settings.redis_url)
        compression = connector.compression
        extra.setdefault("compression_mode", compression.mode)
        extra.setdefault("compression_profile", compression.profile)
        extra.setdefault("default_slo_class", compression.default_slo_class)
        extra.setdefault("decision_cache_s", compression.decision_cache_s)
        extra.setdefault("app_name", settings.app_name)
        extra.setdefault("max_connections", connector.max_connections)
        if listener is not None:
            extra.setdefault("host", listener["host"])
            extra.setdefault("port", listener["port"])
    if connector.name == "ExampleConnector":
        config["kv_connector_extra_config"].setdefault(
            "shared_storage_path", str(run_dir() / "kv-example-connector")
        )
    return config


def vllm_cli_args(
    settings: TandemSettings, role: Role, kv_listener: dict[str, Any] | None = None
) -> argparse.Namespace:
    """The same Namespace `vllm serve` would build, with Tandem's settings applied."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    worker = settings.worker(role)
    model = resolve_model(settings.model.path)
    if os.path.isdir(model):
        # A local folder never needs the hub; without this, tokenizer loading may try it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", model])
    args.served_model_name = [settings.model.served_name]
    args.max_model_len = settings.model.max_model_len
    # Clients see prompt cache hits in usage.prompt_tokens_details, as with OpenAI.
    args.enable_prompt_tokens_details = True
    if settings.model.effective_sampling_defaults():
        args.override_generation_config = settings.model.effective_sampling_defaults()
    args.disable_log_stats = False
    engine_args = dict(worker.engine_args)
    if (
        worker.kv_cache_memory_bytes
        and "kv_cache_memory_bytes" not in engine_args
        and "gpu_memory_utilization" not in engine_args
        and worker.num_gpus == 0
    ):
        engine_args["kv_cache_memory_bytes"] = worker.kv_cache_memory_bytes
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # Eager engines start 2-3x faster on CPU (no inductor compile), and their greedy
        # output matches transformers' reference where the compiled path's numerics can
        # flip near-tied tokens.
        engine_args.setdefault("enforce_eager", True)
    transfer = kv_transfer_config(settings, role, kv_listener)
    if transfer is not None:
        engine_args.setdefault("kv_transfer_config", transfer)
    for key, value in engine_args.items():
        if not hasattr(args, key):
            raise ValueError(f"unknown vLLM engine argument {key!r} for the {role} workers")
        setattr(args, key, value)
    if isinstance(args.kv_transfer_config, dict):
        from vllm.config import KVTransferConfig

        args.kv_transfer_config = KVTransferConfig(**args.kv_transfer_config)
    return args


class TrackedEngine:
    """Counts what the engine has been handed but not yet prefilled (for routing stats), and
    keeps a request's prompt details on every output it streams.

    vLLM puts ``prompt_logprobs`` only on a request's first output (later ones have an empty
    list). With ``n`` > 1 the samples can reach their first token in different outputs, and
    vLLM's streaming completions with ``echo`` and ``logprobs`` then echo a later sample's
    prompt against the sample's own logprobs: a KeyError on the first prompt token, sent to
    the client as an error event (2 requests in 15 here). The prompt's logprobs are the same
    for every sample: each output carries them.
    """

    def __init__(self, engine: Any, stats: EngineStats):
        self._engine = engine
        self._stats = stats
        self._orig_generate = engine.generate
        engine.generate = self._generate

    async def _generate(self, prompt: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        prompt_tokens = _prompt_token_count(prompt)
        self._stats.request_started(prompt_tokens)
        prefilled = False
        prompt_logprobs = None
        try:
            async for output in self._orig_generate(prompt, *args, **kwargs):
                # After the first output vLLM sends an empty list (or None) for them.
                if getattr(output, "prompt_logprobs", None):
                    prompt_logprobs = output.prompt_logprobs
                elif prompt_logprobs is not None:
                    output.prompt_logprobs = prompt_logprobs
                if not prefilled:
                    prefilled = True
                    self._stats.request_prefilled(
                        prompt_tokens, getattr(output, "num_cached_tokens", 0) or 0
                    )
                    timing = _TIMING.get()
                    if timing is not None and not timing:
                        timing.update(self._timing(output, args, kwargs))
                yield output
        finally:
            if not prefilled:
                self._stats.request_prefilled(prompt_tokens, 0)
            self._stats.request_finished()


    def _timing(self, output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, float]:
        timing: dict[str, float] = {}
        stats = getattr(output, "metrics", None)
        queued, scheduled, first = (getattr(stats, name, 0.0) or 0.0
                                    for name in ("queued_ts", "scheduled_ts", "first_token_ts"))
        if queued and scheduled:
            timing[EngineTiming.QUEUE] = max(0.0, scheduled - queued)
        if scheduled and first:
            timing[EngineTiming.COMPUTE] = max(0.0, first - scheduled)
        transfer_id = _transfer_id(kwargs.get("sampling_params", args[0] if args else None))
        pulled = self._stats.pull_seconds(transfer_id) if transfer_id else None
        if pulled is not None:
            timing[EngineTiming.KV_TRANSFER] = pulled
        return timing


def _transfer_id(sampling_params: Any) -> str | None:
    """The id of the KV transfer a request pulls (Tandem's connector), if any."""
    from kv_transport.contract import PARAMS_KEY

    params = (getattr(sampling_params, "extra_args", None) or {}).get("kv_transfer_params")
    description = params.get(PARAMS_KEY) if isinstance(params, dict) else None
    transfer_id = description.get("transfer_id") if isinstance(description, dict) else None
    return transfer_id if isinstance(transfer_id, str) else None


def _prompt_token_count(prompt: Any) -> int:
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if ids is None:
        ids = getattr(prompt, "prompt_token_ids", None)
    return len(ids) if ids is not None else 0


class EngineHost:
    """One vLLM AsyncLLM plus vLLM's OpenAI serving objects, for one role."""

    def __init__(
        self,
        settings: TandemSettings,
        role: Role,
        node_host: str = "127.0.0.1",
        metrics: WorkerMetrics | None = None,
        kv_host: str | None = None,
    ):
        self.settings = settings
        self.role = role
        self.node_host = node_host
        # Where the KV listeners bind and what they advertise (loopback on a single node).
        self.kv_host = kv_host or node_host
        self.stats = EngineStats(metrics)
        self.engine: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._models: Any = None
        self.info: EngineHostInfo | None = None
        self._cores: list[int] = []
        self.kv_listener: dict[str, Any] | None = None

    async def start(self) -> None:
        from vllm.platforms import current_platform

        worker = self.settings.worker(self.role)
        if current_platform.is_cpu():
            threads = worker.cpu_threads or cpu_binding.default_threads(
                self.settings.engine_count()
            )
            self._cores = cpu_binding.claim_cores(run_dir(), threads, role=self.role)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding.omp_bind_value(self._cores)
        if self.role != "colocated":
            # NIXL's handshake listener: one port per engine, on this node's address.
            os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = self.kv_host
            os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(_free_port(self.kv_host))
            # Tandem's KV listener: the scheduler advertises the port the worker binds.
            self.kv_listener = {"host": self.kv_host, "port": _free_port(self.kv_host)}
            secret = self.settings.kv_connector.auth_secret
            if secret:
                # Through the environment (the engine's processes inherit it), never the
                # vLLM config, which vLLM logs.
                os.environ[AUTH_SECRET_ENV] = secret

        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = vllm_cli_args(self.settings, self.role, self.kv_listener)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        started = time.monotonic()
        self.engine = AsyncLLM.from_engine_args(
            engine_args,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[self.stats.logger_factory],
        )
        TrackedEngine(self.engine, self.stats)
        state = State()
        tasks = await self.engine.get_supported_tasks()
        await init_app_state(self.engine, state, args, supported_tasks=tasks)
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._models = state.openai_serving_models
        self.info = EngineHostInfo(
            role=self.role,
            model=args.model,
            served_name=self.settings.model.served_name,
            kv_connector=(
                args.kv_transfer_config.kv_connector if args.kv_transfer_config else None
            ),
            cpu_cores=self._cores,
            engine_pids=engine_core_pids(self.engine),
        )
        log.info(
            "%s engine ready in %.1fs (cores %s, connector %s, engine core pid %s)",
            self.role,
            time.monotonic() - started,
            self._cores or "all",
            self.info.kv_connector,
            self.info.engine_pids or "in-process",
        )

    async def wait_published(self, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Until this engine holds no KV for a pull (nothing running or waiting and its KV
        cache empty: vLLM frees a published request's blocks once the connector reports it
        pulled or expired), or ``timeout_s``. True if it emptied."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.engine is None or getattr(self.engine, "errored", False):
                return False  # a dead engine holds nothing anyone can pull
            snapshot = self.stats.snapshot()
            if not snapshot["running"] and not snapshot["waiting"] and self.stats.kv_empty():
                return True
            if time.monotonic() >= deadline:
                log.warning("shutting down with KV still held for a pull (cache %.1f%% used)",
                            100 * snapshot["kv_cache_usage"])
                return False
            await asyncio.sleep(poll_s)

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self._cores:
            cpu_binding.release_cores(run_dir())

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not started")
        await self.engine.check_health()

    async def serve(self, endpoint: str, body: dict[str, Any]) -> AsyncGenerator[WorkerReply, None]:
        """Run one OpenAI request through vLLM; yields WorkerReply items.

        ``body`` was validated by the ingress; vLLM validates it again against its own
        request model so engine-specific fields (kv_transfer_params, ...) are honoured.
        """
        timing: dict[str, float] = {}
        _TIMING.set(timing)
        started = time.monotonic()
        first = True
        # Closed with this generator: closing vLLM's stream aborts the engine request.
        async with contextlib.aclosing(self._serve(endpoint, body)) as replies:
            async for reply in replies:
                if first and reply.kind != ERROR:
                    first = False
                    reply.timing = {**timing, EngineTiming.WORKER: time.monotonic() - started}
                yield reply

    async def _serve(self, endpoint: str, body: dict[str, Any]) -> AsyncGenerator[WorkerReply, None]:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        try:
            if endpoint == "chat":
                request = ChatCompletionRequest.model_validate(body)
                result = await self._chat.create_chat_completion(request, None)
            elif endpoint == "completions":
                request = CompletionRequest.model_validate(body)
                result = await self._completion.create_completion(request, None)
            else:
                yield WorkerReply(ERROR, _error(f"unknown endpoint {endpoint}", 404), 404)
                return
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {}
            param = ".".join(str(p) for p in first.get("loc", ()))
            yield WorkerReply(ERROR, _error(first.get("msg", str(exc)), 400, param), 400)
            return
        except _client_errors() as exc:
            # vLLM raises (rather than returns) some request errors, e.g. a prompt longer
            # than the context; map them to statuses exactly as `vllm serve` does.
            from vllm.entrypoints.serve.exception_handling.error_response import (
                create_error_response,
            )

            result = create_error_response(exc)

        if hasattr(result, "error"):  # vLLM's ErrorResponse
            status = int(result.error.code or 400)
            yield WorkerReply(ERROR, result.model_dump(), status)
            return
        if hasattr(result, "model_dump"):
            yield WorkerReply(RESPONSE, result.model_dump(mode="json", exclude_none=True))
            return
        # A stream of SSE strings; cancellation (client gone) propagates into vLLM's
        # generator, which aborts the engine request.
        async for chunk in result:
            yield WorkerReply(CHUNK, chunk)

    async def models(self) -> dict[str, Any]:
        listing = await self._models.show_available_models()
        return listing.model_dump(mode="json")

    def routing_stats(self) -> dict[str, Any]:
        return self.stats.snapshot()

    async def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False if some KV blocks are still in use (held or leaked)."""
        return bool(await self.engine.reset_prefix_cache())


def _client_errors() -> tuple[type[BaseException], ...]:
    from vllm.exceptions import VLLMClientError

    return (VLLMClientError, ValueError, TypeError, OverflowError, NotImplementedError)


def _error(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "NotFoundError" if status == 404 else "BadRequestError"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}

