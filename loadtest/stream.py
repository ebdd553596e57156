"""Timing one streamed OpenAI response (server-sent events), independent of the HTTP client.

The locustfile feeds each SSE line with the time it arrived; the meter turns them into the
request's record: TTFT is the first chunk with non-empty content (not the role-only first
chunk, not headers), inter-token latencies are the gaps between content chunks, TPOT is the
decode time per output token after the first, with the token count from the usage chunk
(`stream_options.include_usage`) when the server sends one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from loadtest.workloads import Api


@dataclass
class RequestRecord:
    """One request as the report sees it (a row of requests.csv)."""

    start_time: float  # wall clock (epoch seconds) when it was sent
    workload: str
    api: str
    ok: bool
    status: int
    error: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    itl_s: list[float] = field(default_factory=list)
    tag: str = ""

    @property
    def output_tokens_per_s(self) -> float | None:
        if not self.ok or not self.e2e_s or not self.output_tokens:
            return None
        return self.output_tokens / self.e2e_s


def _content(chunk: dict[str, Any], api: Api) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if api == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


class StreamMeter:
    """Feed it the response's lines as they arrive, then `finish()`."""

    def __init__(self, api: Api, sent_at: float):
        self.api = api
        self.sent_at = sent_at  # a monotonic clock reading, like every `now` below
        self.content_times: list[float] = []
        self.text_parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.done = False

    def feed_line(self, line: bytes | str, now: float) -> None:
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        line = line.strip()
        if not line.startswith("data:"):
            return  # blank separators, comments (": ping"), event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.error = self.error or f"unparsable SSE data: {data[:80]}"
            return
        if "error" in chunk:
            # Tandem (and vLLM) report failures after the 200 as an error event.
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            self.error = self.error or f"stream error: {message}"[:200]
            return
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        text = _content(chunk, self.api)
        if text:
            self.content_times.append(now)
            self.text_parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def finish(self, now: float, status: int, start_time: float, workload: str, tag: str = "") -> RequestRecord:
        """The record of this request; it failed on a non-200 status, an error event, a
        stream without content or one that ended before [DONE]."""
        times = self.content_times
        error = self.error
        if status != 200:
            error = error or f"HTTP {status}"
        elif not times:
            error = error or "no content in the stream"
        elif not self.done:
            error = error or "stream ended before [DONE]"
        usage = self.usage or {}
        output_tokens = int(usage.get("completion_tokens") or len(times))
        tpot = (times[-1] - times[0]) / (output_tokens - 1) if len(times) >= 2 and output_tokens > 1 else None
        return RequestRecord(
            start_time=start_time,
            workload=workload,
            api=self.api,
            ok=error is None,
            status=status,
            error=error or "",
            ttft_s=times[0] - self.sent_at if times else None,
            tpot_s=tpot,
            e2e_s=now - self.sent_at,
            output_tokens=output_tokens if times else 0,
            prompt_tokens=usage.get("prompt_tokens"),
            itl_s=[later - earlier for earlier, later in zip(times, times[1:], strict=False)],
            tag=tag,
        )
