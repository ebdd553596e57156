"""The P/D orchestration of one request, independent of Ray.

Disaggregated: prefill with ``max_tokens=1`` and ``kv_transfer_params.do_remote_decode``,
then decode with the ``kv_transfer_params`` the prefill returned, streamed back. If the
prefill step fails for any reason other than the client's own input, decode recomputes the
prompt itself: a request is never failed for a broken prefill worker or KV handoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from workers.engine import ERROR, RESPONSE, WorkerReply

log = logging.getLogger(__name__)

# What vLLM's P/D proxies send to the prefill engine: "produce KV for a remote decoder".
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


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


# The request's SLO class rides to the prefill worker's connector, which picks the KV
# compression profile for it when decode pulls.
SLO_CLASS_PARAM = "tandem_slo_class"
# A profile the request pins (x-tandem-kv-profile), over the controller's choice.
KV_PROFILE_PARAM = "tandem_kv_profile"


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
