"""The engine wrapper every worker puts around vLLM's AsyncLLM.generate."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from workers.engine import TrackedEngine
from workers.stats import EngineStats

PROMPT_LOGPROBS = [None, {504: -1.0}, {1296: -2.0}]


class FakeEngine:
    """Streams what vLLM streams for n=2 when the samples reach their first token in
    different steps: the prompt's details on the first output only."""

    async def generate(self, prompt, sampling_params, request_id):
        yield SimpleNamespace(prompt_logprobs=PROMPT_LOGPROBS, num_cached_tokens=0, metrics=None, index=0)
        yield SimpleNamespace(prompt_logprobs=[], num_cached_tokens=0, metrics=None, index=1)
        yield SimpleNamespace(prompt_logprobs=None, num_cached_tokens=0, metrics=None, index=0)


def test_every_output_of_a_request_carries_its_prompt_logprobs():
    engine = FakeEngine()
    stats = EngineStats()
    TrackedEngine(engine, stats)

    async def run():
        return [o async for o in engine.generate({"prompt_token_ids": [504, 1296, 768]}, None, "r1")]

    outputs = asyncio.run(run())
    # vLLM's streaming echo of the second sample reads its output's prompt_logprobs.
    assert [o.prompt_logprobs for o in outputs] == [PROMPT_LOGPROBS] * 3
    assert stats.snapshot()["running"] == 0  # the request was counted and finished
