"""Admission control at the ingress: shed load at once instead of queueing without bound.

A request is refused with 429 and `Retry-After` when this ingress replica already has
`max_in_flight` requests, or when even the best prefill replica's predicted TTFT (the
router's own predictor, fed by its in-flight accounting) is past `max_predicted_ttft_s`;
with 503 when the pool has no replica at all. Bodies over `max_body_bytes` get 413 before
they are read into memory twice; the others are parsed here (`parse`: bounded first, see
routing/protocol.py), large ones on a thread of their own.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from routing import protocol

log = logging.getLogger("ray.serve")

# Bodies up to this size are parsed on the event loop (a thread hop costs more than they do);
# larger ones on the parsing thread.
INLINE_PARSE_BYTES = 64 << 10
_Model = TypeVar("_Model", bound=BaseModel)
_parser: ThreadPoolExecutor | None = None


async def parse(model: type[_Model], raw: bytes, max_values: int) -> _Model:
    """protocol.parse_body, on one thread of its own for large bodies: one large body at a
    time is parsed (its memory bounded by protocol.parse_body), the others wait their turn,
    and neither the event loop nor the default executor (API-key checks) waits for them."""
    global _parser
    if len(raw) <= INLINE_PARSE_BYTES:
        return protocol.parse_body(model, raw, max_values)
    if _parser is None:
        _parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-parse")
    return await asyncio.get_running_loop().run_in_executor(_parser, protocol.parse_body, model, raw, max_values)


class Overloaded(Exception):
    def __init__(self, status: int, message: str, retry_after_s: int):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class AdmissionGate:
    """Counts this ingress replica's requests in flight (one event loop: no locking)."""

    max_in_flight: int
    max_predicted_ttft_s: float | None = None
    retry_after_s: int = 1
    in_flight: int = 0

    def admit(self, predicted_ttft_s: float | None, replicas: int | None) -> None:
        if replicas == 0:
            raise Overloaded(503, "No worker replica is available; retry shortly.", 5 * self.retry_after_s)
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(429, f"The server is at capacity ({self.max_in_flight} requests in flight).",
                             self.retry_after_s)
        if (
            predicted_ttft_s is not None
            and self.max_predicted_ttft_s is not None
            and predicted_ttft_s > self.max_predicted_ttft_s
            # With nothing in flight here there is no queue to shed: the request goes, and
            # its TTFT corrects a prediction fitted under a past overload (refusing it
            # would keep that prediction forever: no request, no new observation).
            and self.in_flight > 0
        ):
            # Wait roughly as long as the excess queue needs to drain.
            retry = max(self.retry_after_s, int(predicted_ttft_s - self.max_predicted_ttft_s) + 1)
            raise Overloaded(
                429,
                f"The server is overloaded: predicted time to first token {predicted_ttft_s:.1f}s "
                f"exceeds {self.max_predicted_ttft_s:.1f}s.",
                retry,
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


class BodyLimitMiddleware:
    """Pure ASGI: 413 for bodies over the limit, judged by Content-Length, or by counting
    when the client streams the body chunked."""

    def __init__(self, app: Any, max_body_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = _limit if self.max_body_bytes is None else self.max_body_bytes
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH") or limit is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > limit:
                await _too_large(scope, receive, send, limit)
                return
            await self.app(scope, receive, send)
            return
        # Chunked: read it all (bounded), then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _too_large(scope, receive, send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        await self.app(scope, _replay(replayed, receive), send)


_limit: int | None = None


def install_body_limit(max_body_bytes: int | None) -> None:
    """The ingress replica's limit (the app is pickled by value: found through the module)."""
    global _limit
    _limit = max_body_bytes


def _replay(messages: list[dict[str, Any]], then: Any = None) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


async def _too_large(scope: dict[str, Any], receive: Any, send: Any, limit: int) -> None:
    from fastapi.responses import JSONResponse

    from routing import metrics
    from routing.errors import error_body

    log.info("refused %s %s: body over %d bytes", scope.get("method"), scope["path"], limit)
    metrics.count_request(scope["path"], "413")
    response = JSONResponse(error_body(413, f"Request body too large: the limit is {limit} bytes."), 413)
    await response(scope, receive, send)
