"""Putting one client request's answer together from the parts Tandem ran apart (pure: JSON
and SSE strings in, JSON and SSE strings out; no Ray, no HTTP).

- A batched completions body runs as one prefill and one decode per prompt (`run_batch`);
  the answers are merged into the one response a vLLM server returns for the whole body.
- The prompt's part of an answer (``prompt_logprobs``, and a completion's ``echo`` with
  ``logprobs``) is computed by the prefill engine, which runs the prompt anyway
  (`PromptPart`): the decode engine would otherwise have to skip its prefix cache, and so
  the transferred KV, to compute them again. They are put where vLLM puts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from workers.engine import CHUNK, ERROR, RESPONSE, WorkerReply

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
        self.done: set[int] = set()  # the prompts whose stream reached its [DONE]

    def rewrite(self, prompt: int, chunk: str) -> str | None:
        out = []
        for data in _sse_events(chunk):
            if data.strip() == _SSE_DONE:
                self.done.add(prompt)
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
        if len(merger.done) < len(pumps):
            # A prompt's stream stopped before its [DONE]: the batch is not whole, and its
            # summed ending must not say it is.
            yield WorkerReply(ERROR, {"error": {"message": "a prompt's stream ended before it was finished"}}, 502)
            return
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


# ---- the prompt's part, from the prefill ------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class PromptPart:
    """What of the answer belongs to the prompt and comes from the prefill's response:
    ``prompt_logprobs`` (chat: on the response; completions: on each choice) and, for a
    completion with ``echo`` and ``logprobs``, the echoed prompt text and its logprobs.

    `needed` says whether a request has such a part; `prefill_fields` and `decode_fields`
    adjust the two engines' bodies (the prefill computes it, the decode does not); `merge`
    and `merge_stream` put the prefill's part into the decode's answer."""

    def __init__(self, endpoint: str, body: dict[str, Any]):
        self.endpoint = endpoint
        self.prompt_logprobs = body.get("prompt_logprobs") is not None
        # An echoed completion with logprobs reports the prompt's logprobs too (vLLM asks
        # the engine for prompt logprobs then): the prefill computes them.
        self.echo = endpoint == "completions" and bool(body.get("echo")) and body.get("logprobs") is not None
        self._prefill: dict[str, Any] | None = None

    @staticmethod
    def needed(endpoint: str, body: dict[str, Any]) -> PromptPart | None:
        part = PromptPart(endpoint, body)
        return part if part.prompt_logprobs or part.echo else None

    def prefill_fields(self, body: dict[str, Any]) -> None:
        """The prefill body: as the client's, but an echo returns the prompt alone (vLLM's
        ``echo`` with ``max_tokens`` 0 still runs the prompt, and hands its KV over)."""
        if self.echo:
            body["max_tokens"] = 0

    def decode_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k != "prompt_logprobs"}
        if self.echo:
            out["echo"] = False
        return out

    def take_prefill(self, response: dict[str, Any]) -> None:
        self._prefill = response

    # -- what the prefill computed

    def _prefill_choice(self) -> dict[str, Any]:
        choices = (self._prefill or {}).get("choices") or [{}]
        return choices[0] if isinstance(choices[0], dict) else {}

    def _prompt_logprobs(self) -> Any:
        if self.endpoint == "chat":
            return (self._prefill or {}).get("prompt_logprobs")
        return self._prefill_choice().get("prompt_logprobs")

    def _echo(self) -> tuple[str, dict[str, Any] | None, int]:
        """(prompt text, its logprobs, the text offset where the generated tokens start)."""
        choice = self._prefill_choice()
        logprobs = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else None
        base = 0
        if logprobs and logprobs.get("tokens") and logprobs.get("text_offset"):
            base = int(logprobs["text_offset"][-1]) + len(str(logprobs["tokens"][-1]))
        return str(choice.get("text") or ""), logprobs, base

    def _echoed_choice(self, choice: dict[str, Any], first: bool) -> None:
        text, prompt_logprobs, base = self._echo()
        generated = choice.get("logprobs")
        if first:
            choice["text"] = text + str(choice.get("text") or "")
        if isinstance(generated, dict):
            shifted = [int(offset) + base for offset in generated.get("text_offset") or []]
            if first and prompt_logprobs:
                for key in ("tokens", "token_logprobs", "top_logprobs"):
                    generated[key] = list(prompt_logprobs.get(key) or []) + list(generated.get(key) or [])
                shifted = list(prompt_logprobs.get("text_offset") or []) + shifted
            generated["text_offset"] = shifted
        elif first and prompt_logprobs:
            choice["logprobs"] = prompt_logprobs

    # -- into the decode's answer

    def merge(self, response: dict[str, Any]) -> dict[str, Any]:
        if self.endpoint == "chat":
            if self.prompt_logprobs:
                response["prompt_logprobs"] = self._prompt_logprobs()
            return response
        for choice in response.get("choices") or []:
            if self.echo:
                self._echoed_choice(choice, first=True)
            if self.prompt_logprobs or self.echo:
                choice["prompt_logprobs"] = self._prompt_logprobs()
        return response

    async def merge_stream(self, replies: AsyncIterator[WorkerReply]) -> AsyncIterator[WorkerReply]:
        """The decode's replies with the prompt's part in: a response merged, and in a
        stream each choice's first chunk led by the echoed prompt. (A stream carries no
        prompt logprobs: vLLM refuses them with ``stream``.)"""
        echoed: set[int] = set()
        try:
            async for reply in replies:
                if reply.kind == RESPONSE and isinstance(reply.body, dict):
                    yield WorkerReply(RESPONSE, self.merge(reply.body))
                elif reply.kind == CHUNK and self.echo:
                    yield WorkerReply(CHUNK, self._echo_chunk(reply.body, echoed))
                else:
                    yield reply
        finally:
            await replies.aclose()  # type: ignore[attr-defined]

    def _echo_chunk(self, chunk: str, echoed: set[int]) -> str:
        out = []
        for data in _sse_events(chunk):
            if data.strip() == _SSE_DONE:
                out.append(data)
                continue
            event = json.loads(data)
            if isinstance(event, dict):
                for choice in event.get("choices") or []:
                    index = int(choice.get("index") or 0)
                    self._echoed_choice(choice, first=index not in echoed)
                    echoed.add(index)
            out.append(_dumps(event))
        return "".join(f"data: {data}\n\n" for data in out)
