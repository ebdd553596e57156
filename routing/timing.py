"""Where one request's time to first token went, from the orchestrator's calls and what the
workers report of their engines (`workers.engine.EngineTiming`).

Components (seconds; they add up to the TTFT the ingress measured):

- ``router_queue``: from the prefill call to its engine's queue: Serve's routing, the
  replica's queue, tokenization, the RPC there and back.
- ``prefill_queue``: waiting in the prefill engine's scheduler.
- ``prefill``: the prefill's compute, to its one token.
- ``kv_transfer``: decode's pull of the KV, codec included.
- ``decode_queue``: from the decode call to its first step, less the pull: routing, RPC,
  waiting in the decode engine's scheduler.
- ``first_decode_step``: the decode engine's first step, which emits the first token.

A request prefilled where it decodes (colocated, or a local prefill) has ``router_queue``,
``prefill_queue`` and ``prefill`` of that engine; one whose prefill failed has
``failed_prefill`` (the time lost) before those.

The breakdown goes out as a ``Server-Timing`` header (W3C; milliseconds) and into
Prometheus histograms named as vLLM names its own (routing/metrics.py: `TTFT_PARTS`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from routing import metrics
from workers.engine import EngineTiming

COMPONENTS = ("failed_prefill", "router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_queue",
              "first_decode_step")
HEADER = "Server-Timing"

def _at_least_zero(value: float) -> float:
    return max(0.0, value)


@dataclass
class Timing:
    """One request's TTFT breakdown, filled as its plan runs."""

    parts: dict[str, float] = field(default_factory=dict)

    def add(self, component: str, seconds: float) -> None:
        self.parts[component] = self.parts.get(component, 0.0) + _at_least_zero(seconds)

    def engine_call(self, call_s: float, worker: dict[str, float] | None) -> None:
        """A call that prefilled on the engine it called (prefill, colocated, local)."""
        worker = worker or {}
        queue, compute = worker.get(EngineTiming.QUEUE, 0.0), worker.get(EngineTiming.COMPUTE, 0.0)
        self.add("router_queue", call_s - queue - compute)
        self.add("prefill_queue", queue)
        self.add("prefill", compute)

    def decode_call(self, call_s: float, worker: dict[str, float] | None) -> None:
        """The decode call of a request whose KV was handed over, to its first reply."""
        worker = worker or {}
        pulled = worker.get(EngineTiming.KV_TRANSFER, 0.0)
        first_step = worker.get(EngineTiming.COMPUTE, 0.0)
        self.add("kv_transfer", pulled)
        self.add("first_decode_step", first_step)
        self.add("decode_queue", call_s - pulled - first_step)

    def header(self) -> str:
        """The Server-Timing value: each component's duration in milliseconds, in the
        order a request meets them."""
        return ", ".join(f"{name};dur={self.parts[name] * 1000:.1f}" for name in COMPONENTS if name in self.parts)

    def observe(self, mode: str) -> None:
        for name, seconds in self.parts.items():
            metrics.TTFT_PARTS[name].labels(mode).observe(seconds)


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.started
