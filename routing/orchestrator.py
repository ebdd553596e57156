"""The P/D orchestration of one request, independent of Ray.

Disaggregated: prefill with ``max_tokens=1`` and ``kv_transfer_params.do_remote_decode``,
then decode with the ``kv_transfer_params`` the prefill returned, streamed back. If the
prefill step fails for any reason other than the client's own input, decode recomputes the
prompt itself: a request is never failed for a broken prefill worker or KV handoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kv_transport.contract import KV_PROFILE_PARAM, PREFILL_KV_PARAMS, SLO_CLASS_PARAM
from workers.engine import CHUNK, ERROR, RESPONSE, WorkerReply

log = logging.getLogger(__name__)


class WorkerPool(Protocol):
    """A pool of engines of one role; the ingress binds it to a Serve deployment handle."""

    def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[WorkerReply]: ...


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


def prefill_body(body: dict[str, Any], slo_class: str | None = None, kv_profile: str | None = None) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in ("stream_options", "n", "best_of")}
    params = dict(PREFILL_KV_PARAMS)
    if slo_class is not None:
        params[SLO_CLASS_PARAM] = slo_class
    if kv_profile is not None:
        params[KV_PROFILE_PARAM] = kv_profile
    out.update(stream=False, max_tokens=1, kv_transfer_params=params)
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    # Stop strings and min_tokens could end the 1-token prefill differently; they matter
    # only to decode.
    out.pop("min_tokens", None)
    return out


async def run_prefill(
    pool: WorkerPool,
    endpoint: str,
    body: dict[str, Any],
    slo_class: str | None = None,
    kv_profile: str | None = None,
) -> PrefillResult:
    try:
        # Closed explicitly, also when this task is cancelled: closing the stream is what
        # aborts the engine request on the prefill replica.
        async with contextlib.aclosing(pool.stream(endpoint, prefill_body(body, slo_class, kv_profile))) as replies:
            async for reply in replies:
                if reply.kind == ERROR:
                    if 400 <= reply.status < 500:
                        return PrefillResult(PrefillOutcome.CLIENT_ERROR, error=reply)
                    return PrefillResult(PrefillOutcome.FAILED, reason=f"prefill error {reply.status}")
                if reply.kind == RESPONSE:
                    params = reply.body.get("kv_transfer_params")
                    if not params:
                        return PrefillResult(
                            PrefillOutcome.FAILED, reason="prefill returned no kv_transfer_params"
                        )
                    return PrefillResult(PrefillOutcome.OK, kv_transfer_params=params)
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
) -> PrefillResult:
    """`run_prefill`, given up for decode to recompute as soon as the prefill pool has no
    replica left. A request routed to a replica that then dies waits at the router for a
    replacement, which takes as long as an engine start (tens of seconds); decode can
    answer it in about one prefill time instead."""
    if pool_has_replicas is None:
        return await run_prefill(pool, endpoint, body, slo_class, kv_profile)
    if not pool_has_replicas():
        return PrefillResult(PrefillOutcome.FAILED, reason=NO_PREFILL_REPLICA)
    task = asyncio.ensure_future(run_prefill(pool, endpoint, body, slo_class, kv_profile))
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


def decode_body(body: dict[str, Any], prefill: PrefillResult) -> dict[str, Any]:
    out = dict(body)
    if prefill.outcome == PrefillOutcome.OK:
        out["kv_transfer_params"] = prefill.kv_transfer_params
    return out


# ---- batched prompts -------------------------------------------------------------------
#
# A /v1/completions body may carry a list of prompts. A vLLM server answers it as one
# request, but its P/D path does not: the prefill response carries only the first prompt's
# kv_transfer_params, so every decode would pull the first prompt's KV. Disaggregated, each
# prompt is therefore its own prefill and decode, and the answers are merged back into the
# one response a vLLM server returns for the whole body: choices in prompt order (index =
# prompt * n + choice), usage summed.


def batch_prompts(endpoint: str, body: dict[str, Any]) -> list[Any] | None:
    """The prompts of a batched completions body (a list of strings or of token-id lists),
    or None for a single prompt (a string or one list of token ids)."""
    if endpoint != "completions":
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    return None


def split_batch(body: dict[str, Any], prompts: list[Any]) -> list[dict[str, Any]]:
    return [{**body, "prompt": prompt} for prompt in prompts]


def _usage_sum(usages: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {
        key: sum(int(u.get(key) or 0) for u in usages)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    details = [u["prompt_tokens_details"] for u in usages if u.get("prompt_tokens_details")]
    if details:
        # As vLLM reports a batch: the cache hits of its last prompt.
        total["prompt_tokens_details"] = details[-1]
    return total


def merge_responses(responses: list[dict[str, Any]], n: int = 1) -> dict[str, Any]:
    """One completions response for a batch, from each prompt's own response."""
    merged = {key: value for key, value in responses[0].items() if key != "metrics"}
    merged["choices"] = [
        {**choice, "index": prompt * n + int(choice.get("index") or 0)}
        for prompt, response in enumerate(responses)
        for choice in response.get("choices") or []
    ]
    usages = [r["usage"] for r in responses if isinstance(r.get("usage"), dict)]
    if usages:
        merged["usage"] = _usage_sum(usages)
    return merged


_SSE_DONE = "[DONE]"


def _sse_events(chunk: str) -> list[str]:
    """The data of each SSE event in one chunk string ("data: ...\\n\\n", maybe several)."""
    return [event[len("data: "):] for event in chunk.split("\n\n") if event.startswith("data: ")]


class _StreamMerger:
    """Rewrites each prompt's SSE chunks into the batch's: one id, choice indices offset by
    the prompt, per-prompt usage chunks and [DONE] held back for one summed ending."""

    def __init__(self, n: int):
        self.n = n
        self.id: str | None = None
        self.created: int | None = None
        self.usages: list[dict[str, Any]] = []
        self.last: dict[str, Any] | None = None

    def rewrite(self, prompt: int, chunk: str) -> str | None:
        out = []
        for data in _sse_events(chunk):
            if data.strip() == _SSE_DONE:
                continue
            event = json.loads(data)
            if not isinstance(event, dict) or "choices" not in event:
                out.append(data)  # an error event: passed on as it is
                continue
            if self.id is None:
                self.id, self.created = event.get("id"), event.get("created")
            event["id"], event["created"] = self.id, self.created
            if not event["choices"] and isinstance(event.get("usage"), dict):
                self.usages.append(event["usage"])  # this prompt's final usage chunk
                self.last = event
                continue
            for choice in event["choices"]:
                choice["index"] = prompt * self.n + int(choice.get("index") or 0)
            out.append(json.dumps(event, separators=(",", ":")))
        return "".join(f"data: {data}\n\n" for data in out) or None

    def ending(self) -> str:
        tail = ""
        if self.last is not None:
            final = {key: value for key, value in self.last.items() if key != "metrics"}
            final["usage"] = _usage_sum(self.usages)
            tail = f"data: {json.dumps(final, separators=(',', ':'))}\n\n"
        return tail + f"data: {_SSE_DONE}\n\n"


_END = object()


async def run_batch(
    starts: list[Awaitable[AsyncIterator[WorkerReply]]], n: int = 1
) -> AsyncIterator[WorkerReply]:
    """Run each prompt's orchestration (``starts``: one awaitable per prompt that returns
    its reply stream) concurrently and merge their replies into one request's: a response,
    a stream, or the first error any prompt met (the others are then aborted)."""
    tasks = [asyncio.ensure_future(start) for start in starts]
    streams: list[AsyncIterator[WorkerReply]] = []
    pumps: list[asyncio.Task[None]] = []
    try:
        await asyncio.wait(tasks)
        for task in tasks:
            streams.append(task.result())  # the first failure raises; finally closes the rest
        firsts = await asyncio.gather(*(anext(s, None) for s in streams))  # type: ignore[call-overload]
        for first in firsts:
            if first is None:
                yield WorkerReply(ERROR, {"error": {"message": "the decode worker returned nothing"}}, 502)
                return
            if first.kind == ERROR:
                yield first
                return
        kinds = {first.kind for first in firsts}
        if kinds == {RESPONSE}:
            yield WorkerReply(RESPONSE, merge_responses([f.body for f in firsts], n))
            return
        if kinds != {CHUNK}:
            yield WorkerReply(ERROR, {"error": {"message": "workers answered a batch inconsistently"}}, 502)
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(prompt: int, first: WorkerReply, rest: AsyncIterator[WorkerReply]) -> None:
            try:
                await queue.put((prompt, first))
                async for reply in rest:
                    await queue.put((prompt, reply))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((prompt, exc))
            await queue.put((prompt, _END))

        pumps = [asyncio.ensure_future(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams, strict=True))]
        merger = _StreamMerger(n)
        open_streams = len(pumps)
        while open_streams:
            prompt, item = await queue.get()
            if item is _END:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            elif item.kind == ERROR:
                yield item
                return
            elif item.kind == CHUNK:
                chunk = merger.rewrite(prompt, item.body)
                if chunk is not None:
                    yield WorkerReply(CHUNK, chunk)
        yield WorkerReply(CHUNK, merger.ending())
    finally:
        # Abort whatever is still running: pending prefills, and the decode streams (a
        # stream's close is what aborts its engine request).
        for task in [*tasks, *pumps]:
            task.cancel()
        await asyncio.gather(*tasks, *pumps, return_exceptions=True)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None and task.result() not in streams:
                streams.append(task.result())
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
