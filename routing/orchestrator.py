"""The P/D orchestration of one client request, independent of Ray and HTTP.

`Orchestrator.start` owns a request's whole plan, and the ingress only calls it: split a
batched completions body into one plan per prompt, prefill (``max_tokens=1`` and a
`PrefillAsk` in ``kv_transfer_params``), hand the prefill's `TransferDescription` to decode,
stream decode's answer back with the prompt's part (prompt logprobs, echo) merged in from
the prefill, and record the prefill step's metrics. If the prefill step fails for any
reason other than the client's own input, decode recomputes the prompt itself: a request
is never failed for a broken prefill worker or KV handoff.

``n > 1`` costs one prefill and one transfer: the decode engine runs the n samples as
children of one request, and the connector has one of them pull the KV for all (see
kv_transport/connector/scheduler.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kv_transport.contract import (
    KV_PROFILE_PARAM,
    PARAMS_KEY,
    SLO_CLASS_PARAM,
    InvalidTransferParams,
    PrefillAsk,
    TransferDescription,
)
from routing import metrics
from routing.disagg import PrefillDecider, PrefillPlanInput
from routing.errors import OpenAIError
from routing.merge import PromptPart, batch_prompts, run_batch, split_batch
from routing.timing import Stopwatch, Timing
from workers.engine import ERROR, RESPONSE, WorkerReply

__all__ = ["KV_PROFILE_PARAM", "SLO_CLASS_PARAM", "Orchestrator", "RequestOptions", "WorkerPool"]

log = logging.getLogger(__name__)


class WorkerPool(Protocol):
    """A pool of engines of one role; the ingress binds it to a Serve deployment handle."""

    def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[WorkerReply]: ...

    def separately(self) -> WorkerPool:
        """The same pool, each call its own request to the pool's router (for the
        concurrent calls of one batched request)."""
        ...


class PrefillOutcome:
    OK = "ok"
    CLIENT_ERROR = "client_error"  # the prompt itself is bad: tell the client
    FAILED = "failed"  # the worker or handoff broke: recompute on decode


@dataclass
class PrefillResult:
    outcome: str
    kv_transfer_params: dict[str, Any] | None = None
    error: WorkerReply | None = None
    reason: str = ""
    response: dict[str, Any] | None = None  # the prefill's whole answer (the prompt's part)
    timing: dict[str, float] | None = None  # the prefill worker's (workers.engine.EngineTiming)


def prefill_body(
    body: dict[str, Any], slo_class: str | None = None, kv_profile: str | None = None,
    prompt_part: PromptPart | None = None,
) -> dict[str, Any]:
    """The prefill engine's body: one token, one sample, not streamed, asking for KV."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "n", "best_of")}
    out.update(stream=False, max_tokens=1, kv_transfer_params=PrefillAsk(slo_class, kv_profile).to_params())
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    # Stop strings and min_tokens could end the 1-token prefill differently; they matter
    # only to decode.
    out.pop("min_tokens", None)
    if prompt_part is not None:
        prompt_part.prefill_fields(out)
    return out


def checked_handoff(params: Any) -> str | None:
    """Why a prefill's ``kv_transfer_params`` cannot be handed to decode (None: they can).
    Tandem's own descriptions are checked against the contract; another connector's (vLLM's
    NixlConnector) pass as they are."""
    if not isinstance(params, dict) or not params:
        return "prefill returned no kv_transfer_params"
    if PARAMS_KEY in params:
        try:
            TransferDescription.from_params(params[PARAMS_KEY])
        except InvalidTransferParams as exc:
            return f"prefill returned an invalid transfer description: {exc}"
    return None


async def run_prefill(
    pool: WorkerPool,
    endpoint: str,
    body: dict[str, Any],
    slo_class: str | None = None,
    kv_profile: str | None = None,
    prompt_part: PromptPart | None = None,
) -> PrefillResult:
    try:
        # Closed explicitly, also when this task is cancelled: closing the stream is what
        # aborts the engine request on the prefill replica.
        ask = prefill_body(body, slo_class, kv_profile, prompt_part)
        async with contextlib.aclosing(pool.stream(endpoint, ask)) as replies:
            async for reply in replies:
                if reply.kind == ERROR:
                    if 400 <= reply.status < 500:
                        return PrefillResult(PrefillOutcome.CLIENT_ERROR, error=reply)
                    return PrefillResult(PrefillOutcome.FAILED, reason=f"prefill error {reply.status}")
                if reply.kind == RESPONSE:
                    params = reply.body.get("kv_transfer_params") if isinstance(reply.body, dict) else None
                    problem = checked_handoff(params)
                    if problem is not None:
                        return PrefillResult(PrefillOutcome.FAILED, reason=problem)
                    return PrefillResult(PrefillOutcome.OK, kv_transfer_params=params, response=reply.body,
                                         timing=reply.timing)
        return PrefillResult(PrefillOutcome.FAILED, reason="prefill returned nothing")
    except Exception as exc:  # noqa: BLE001 - any worker failure means "recompute"
        log.warning("prefill failed, decode will recompute: %r", exc)
        return PrefillResult(PrefillOutcome.FAILED, reason=f"{type(exc).__name__}: {exc}")


NO_PREFILL_REPLICA = "no prefill replica"


async def run_prefill_watched(
    pool: WorkerPool,
    endpoint: str,
    body: dict[str, Any],
    slo_class: str | None = None,
    kv_profile: str | None = None,
    pool_has_replicas: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
    prompt_part: PromptPart | None = None,
) -> PrefillResult:
    """`run_prefill`, given up for decode to recompute as soon as the prefill pool has no
    replica left. A request routed to a replica that then dies waits at the router for a
    replacement, which takes as long as an engine start (tens of seconds); decode can
    answer it in about one prefill time instead."""
    if pool_has_replicas is None:
        return await run_prefill(pool, endpoint, body, slo_class, kv_profile, prompt_part)
    if not pool_has_replicas():
        return PrefillResult(PrefillOutcome.FAILED, reason=NO_PREFILL_REPLICA)
    task = asyncio.ensure_future(run_prefill(pool, endpoint, body, slo_class, kv_profile, prompt_part))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if not pool_has_replicas():
                log.warning("the prefill pool has no replica left; decode recomputes the prompt")
                return PrefillResult(PrefillOutcome.FAILED, reason=NO_PREFILL_REPLICA)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def decode_body(body: dict[str, Any], prefill: PrefillResult, prompt_part: PromptPart | None = None) -> dict[str, Any]:
    """The decode engine's body: the client's, with the prefill's handoff. Without one
    (recompute), the client's body as it is: decode computes everything, the prompt's part
    included."""
    out = dict(body)
    if prefill.outcome == PrefillOutcome.OK:
        if prompt_part is not None:
            out = prompt_part.decode_fields(out)
        out["kv_transfer_params"] = prefill.kv_transfer_params
    return out


async def _single(reply: WorkerReply) -> AsyncIterator[WorkerReply]:
    yield reply


def _prompt_tokens(response: dict[str, Any] | None) -> int:
    usage = (response or {}).get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and tokens > 0 else 0


async def _timed(
    replies: AsyncIterator[WorkerReply], record: Callable[[float, dict[str, float] | None], None]
) -> AsyncIterator[WorkerReply]:
    """``replies``, with ``record(seconds from the call to its first reply, the worker's
    timing)`` called once the first reply is in (the call is made on first iteration)."""
    watch = Stopwatch()
    first = True
    async with contextlib.aclosing(replies):  # type: ignore[type-var]
        async for reply in replies:
            if first:
                first = False
                record(watch.seconds(), reply.timing)
            yield reply


@dataclass(frozen=True)
class RequestOptions:
    """What the ingress read from the request besides its body."""

    slo_class: str | None = None  # x-tandem-slo-class
    kv_profile: str | None = None  # x-tandem-kv-profile
    # Filled with the request's TTFT breakdown by its first reply (not for a batch, whose
    # prompts each have their own).
    timing: Timing | None = None


class Orchestrator:
    """One request's whole plan over the worker pools of one app.

    ``mode``: "disaggregated" (``prefill`` and ``decode``) or "colocated" (``colocated``).
    ``prefill_alive``: whether the prefill pool has a replica now (an empty pool means its
    replicas died: decode recomputes at once instead of waiting for a replacement).
    ``decider`` and ``plan_input``: where each request is prefilled (routing/disagg.py), from
    what the pools' routers know of it now (`PrefillPlanInput`); without them, remotely."""

    def __init__(
        self,
        mode: str,
        *,
        prefill: WorkerPool | None = None,
        decode: WorkerPool | None = None,
        colocated: WorkerPool | None = None,
        recompute_on_prefill_failure: bool = True,
        prefill_alive: Callable[[], bool] | None = None,
        decider: PrefillDecider | None = None,
        plan_input: Callable[[str, dict[str, Any]], PrefillPlanInput] | None = None,
    ):
        if mode == "disaggregated" and (prefill is None or decode is None):
            raise ValueError("a disaggregated app needs prefill and decode pools")
        if mode == "colocated" and colocated is None:
            raise ValueError("a colocated app needs a colocated pool")
        self.mode = mode
        self.prefill, self.decode, self.colocated = prefill, decode, colocated
        self.recompute_on_prefill_failure = recompute_on_prefill_failure
        self.prefill_alive = prefill_alive
        self.decider = decider or PrefillDecider("always")
        self.plan_input = plan_input

    async def start(
        self, endpoint: str, body: dict[str, Any], options: RequestOptions = RequestOptions()
    ) -> AsyncIterator[WorkerReply]:
        """Start the request; returns its replies (an error, one response, or a stream of
        SSE chunks). Closing them aborts whatever still runs for it."""
        timing = options.timing or Timing()
        if self.mode == "colocated":
            assert self.colocated is not None
            return _timed(self.colocated.stream(endpoint, body), timing.engine_call)
        assert self.prefill is not None and self.decode is not None
        prompts = batch_prompts(endpoint, body)
        if prompts is not None:
            # One prefill and one decode per prompt (a prefill answers with the KV of its
            # first prompt only), all at once, each its own call to the pools.
            pools = (self.prefill.separately(), self.decode.separately())
            return run_batch(
                [self._one(endpoint, one, options, *pools, Timing()) for one in split_batch(body, prompts)],
                n=int(body.get("n") or 1),
            )
        return await self._one(endpoint, body, options, self.prefill, self.decode, timing)

    async def _one(
        self, endpoint: str, body: dict[str, Any], options: RequestOptions,
        prefill_pool: WorkerPool, decode_pool: WorkerPool, timing: Timing,
    ) -> AsyncIterator[WorkerReply]:
        if body.get("use_beam_search"):
            # vLLM runs beam search as many one-token requests of its own, which hand no
            # KV over: the decode engine does all of it.
            metrics.PREFILL_DECISIONS.labels("local", "beam_search").inc()
            return _timed(decode_pool.stream(endpoint, body), timing.engine_call)
        plan = self.plan_input(endpoint, body) if self.plan_input is not None else None
        decision = self.decider.decide(plan) if plan is not None else None
        if decision is not None and decision.where == "lent":
            # Decode lent to the prefill pool: a prefill replica answers the whole request,
            # as a colocated engine would (no handoff, the prompt's part its own).
            metrics.PREFILL_DECISIONS.labels("lent", decision.reason).inc()
            return _timed(prefill_pool.stream(endpoint, body), timing.engine_call)
        if decision is not None and decision.where == "local":
            assert plan is not None
            metrics.PREFILL_DECISIONS.labels("local", decision.reason).inc()
            uncached = max(0, plan.prompt_tokens - plan.decode_cached_tokens)

            def local_done(call_s: float, worker: dict[str, float] | None) -> None:
                timing.engine_call(call_s, worker)
                self.decider.observe_local(uncached, timing.parts.get("prefill", 0.0))

            return _timed(decode_pool.stream(endpoint, body), local_done)
        metrics.PREFILL_DECISIONS.labels("remote", decision.reason if decision else "always").inc()
        prompt_part = PromptPart.needed(endpoint, body)
        watch = Stopwatch()
        prefill = await run_prefill_watched(
            prefill_pool, endpoint, body, options.slo_class, options.kv_profile,
            pool_has_replicas=self.prefill_alive, prompt_part=prompt_part,
        )
        metrics.PREFILL_SECONDS.observe(watch.seconds())
        if prefill.outcome == PrefillOutcome.CLIENT_ERROR:
            assert prefill.error is not None
            return _single(prefill.error)
        if prefill.outcome == PrefillOutcome.FAILED:
            if not self.recompute_on_prefill_failure:
                raise OpenAIError(502, f"prefill failed: {prefill.reason}")
            log.warning("prefill failed (%s); decode recomputes the prompt", prefill.reason)
            metrics.RECOMPUTES.labels(prefill.reason.split(":")[0][:64]).inc()
            timing.add("failed_prefill", watch.seconds())
            return _timed(decode_pool.stream(endpoint, decode_body(body, prefill)), timing.engine_call)
        timing.engine_call(watch.seconds(), prefill.timing)
        prompt_tokens = _prompt_tokens(prefill.response)
        if plan is not None and prompt_tokens:
            self.decider.observe_prompt(plan.prompt_chars, prompt_tokens)

        def remote_done(call_s: float, worker: dict[str, float] | None) -> None:
            timing.decode_call(call_s, worker)
            if plan is not None and prompt_tokens:
                parts = timing.parts
                self.decider.observe_remote(
                    prompt_tokens, max(0, prompt_tokens - plan.decode_cached_tokens), parts.get("prefill", 0.0),
                    parts.get("kv_transfer", 0.0), parts.get("decode_queue", 0.0),
                )

        replies = _timed(decode_pool.stream(endpoint, decode_body(body, prefill, prompt_part)), remote_done)
        if prompt_part is not None and prefill.response is not None:
            prompt_part.take_prefill(prefill.response)
            return prompt_part.merge_stream(replies)
        return replies


