"""A request's TTFT breakdown from what the workers report of their engines, with scripted
pools (the live header and histograms are checked in tests/integration/test_openai_api.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from kv_transport.contract import TransferDescription, handoff_params
from routing.orchestrator import Orchestrator, RequestOptions
from routing.timing import COMPONENTS, Timing
from workers.engine import CHUNK, RESPONSE, EngineTiming, WorkerReply

HANDOFF = handoff_params(TransferDescription("t" * 32, {"host": "198.18.0.10", "port": 7000}, 2, 1, 16))


class SlowPool:
    """Answers after ``delay_s`` with the given first reply."""

    def __init__(self, delay_s: float, reply: WorkerReply):
        self.delay_s, self.reply = delay_s, reply

    async def stream(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[WorkerReply]:
        await asyncio.sleep(self.delay_s)
        yield self.reply

    def separately(self) -> SlowPool:
        return self


def test_the_header_lists_components_in_request_order_in_milliseconds():
    timing = Timing()
    timing.add("kv_transfer", 0.0123)
    timing.add("router_queue", 0.002)
    timing.add("prefill", -1)  # clock noise never shows as negative
    assert timing.header() == "router_queue;dur=2.0, prefill;dur=0.0, kv_transfer;dur=12.3"


async def test_a_disaggregated_request_is_broken_down_and_adds_up():
    prefill_worker = {EngineTiming.QUEUE: 0.01, EngineTiming.COMPUTE: 0.05, EngineTiming.WORKER: 0.07}
    decode_worker = {EngineTiming.QUEUE: 0.04, EngineTiming.COMPUTE: 0.02, EngineTiming.KV_TRANSFER: 0.03}
    prefill = SlowPool(0.1, WorkerReply(RESPONSE, {"kv_transfer_params": HANDOFF}, timing=prefill_worker))
    decode = SlowPool(0.08, WorkerReply(CHUNK, "data: {}\n\n", timing=decode_worker))
    timing = Timing()
    orchestrator = Orchestrator("disaggregated", prefill=prefill, decode=decode)
    replies = await orchestrator.start("chat", {"model": "m", "messages": []}, RequestOptions(timing=timing))
    await anext(replies)
    parts = timing.parts
    assert set(parts) == set(COMPONENTS) - {"failed_prefill"}
    assert (parts["prefill_queue"], parts["prefill"]) == (0.01, 0.05)
    assert (parts["kv_transfer"], parts["first_decode_step"]) == (0.03, 0.02)
    # What the engines did not account for is routing and queueing around them.
    assert parts["router_queue"] >= 0.1 - 0.06 - 1e-9 and parts["decode_queue"] >= 0.08 - 0.05 - 1e-9
    assert sum(parts.values()) >= 0.18


async def test_a_colocated_request_has_the_prefill_parts_of_its_engine():
    worker = {EngineTiming.QUEUE: 0.0, EngineTiming.COMPUTE: 0.02}
    timing = Timing()
    orchestrator = Orchestrator("colocated", colocated=SlowPool(0.03, WorkerReply(RESPONSE, {}, timing=worker)))
    replies = await orchestrator.start("chat", {"model": "m", "messages": []}, RequestOptions(timing=timing))
    await anext(replies)
    assert set(timing.parts) == {"router_queue", "prefill_queue", "prefill"}
