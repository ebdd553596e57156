"""Prompt generators for the load test: pure Python, seeded, no Locust or network.

Each Locust user owns one workload instance (its own seeded RNG) and asks it for the next
request; a multi-turn workload is also told the reply, so the conversation grows the way a
chat client's does. Text is drawn from a fixed vocabulary, about one token per word, so
lengths are controlled without a tokenizer.

- shared-prefix: a few long system prompts shared by everyone, chosen by a Zipf law (a few
  are hot, most are cold) plus a short user question: what prefix-cache-aware routing and
  the decode side's prefix hits feed on.
- multi-turn: conversations that grow turn by turn (system prompt, the previous turns, a new
  question) and carry a conversation id (the OpenAI `user` field) for decode affinity.
- long-context: a fresh long document per request plus a question: prefill-heavy, no reuse.
- chat-to-documents: shared-prefix chat with long answers until ``switch_after_s`` into the
  run, then long documents with short answers: the mix a P:D planner must follow (the
  right prefill:decode ratio flips).
"""

from __future__ import annotations

import itertools
import random
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Api = Literal["chat", "completions"]
WORKLOADS = ("shared-prefix", "multi-turn", "long-context", "chat-to-documents")

# Common short English words: each is one token for the usual BPE vocabularies, so a
# prompt of N words is close to N tokens (plus the chat template's few).
_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were their one all we can her has there been if more when "
    "will would who so no out up into do than time only could new about other two may "
    "then first any like now my such make over our even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very world still own see men work long get here "
    "between both life being under never day same another know while last might great old "
    "year off come since against go came right used take three small house part place "
    "found water light city power river road stone music paper market garden winter "
    "summer morning evening letter story table window forest island bridge school doctor"
).split()

QUESTIONS = (
    "What is the main idea here?",
    "Summarize this in two sentences.",
    "Which detail matters most, and why?",
    "List three follow-up questions.",
    "Explain it to a child.",
    "What would you change first?",
    "Give one counterexample.",
    "What happens next?",
)
FOLLOW_UPS = (
    "Can you say more about that?",
    "Why do you think so?",
    "And what about the opposite case?",
    "Give me an example.",
    "Shorter, please.",
    "How does that connect to what you said first?",
)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_VOCABULARY) for _ in range(count))


def approx_tokens(text: str) -> int:
    """Rough token count of generated text (one token per word)."""
    return len(text.split())


@dataclass
class PromptRequest:
    """One request's content; the locustfile adds model, max_tokens and streaming."""

    messages: list[dict[str, str]]
    workload: str
    # Sent as the OpenAI `user` field: Tandem keeps a conversation's decode on one replica.
    conversation_id: str | None = None
    # Which shared prefix (shared-prefix) or turn (multi-turn) this is, for the records.
    tag: str = ""
    # Output tokens for this request (None: the run's --max-tokens).
    max_tokens: int | None = None

    def prompt_text(self) -> str:
        """The conversation as one prompt, for the Completions API."""
        lines = [f"{message['role']}: {message['content']}" for message in self.messages]
        return "\n".join([*lines, "assistant:"])

    def body(self, api: Api) -> dict:
        body: dict = {"messages": self.messages} if api == "chat" else {"prompt": self.prompt_text()}
        if self.conversation_id:
            body["user"] = self.conversation_id
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


class Workload(Protocol):
    name: str

    def next_request(self) -> PromptRequest: ...

    def record_reply(self, request: PromptRequest, reply: str | None) -> None: ...


class ZipfSampler:
    """Ranks 0..n-1 with P(rank k) proportional to 1 / (k+1)^s (a finite Zipf law)."""

    def __init__(self, n: int, s: float):
        if n < 1:
            raise ValueError("need at least one item")
        if s < 0:
            raise ValueError("the Zipf exponent must be >= 0")
        weights = [1.0 / (rank + 1) ** s for rank in range(n)]
        total = sum(weights)
        self.probabilities = [weight / total for weight in weights]
        self._cumulative = list(itertools.accumulate(self.probabilities))

    def sample(self, rng: random.Random) -> int:
        index = bisect_left(self._cumulative, rng.random())
        return min(index, len(self._cumulative) - 1)


def shared_system_prompt(index: int, tokens: int) -> str:
    """The index-th shared system prompt: the same text for every user and process (its
    RNG is seeded by the index alone), so prefix caches can actually share it."""
    rng = random.Random(f"tandem-shared-system-prompt-{index}")
    return f"You are assistant number {index}. Background: {words(rng, tokens)}"


@dataclass
class SharedPrefixWorkload:
    rng: random.Random
    num_prefixes: int = 16
    zipf_s: float = 1.1
    system_prompt_tokens: int = 400
    question_tokens: int = 24
    name: str = "shared-prefix"
    sampler: ZipfSampler = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = ZipfSampler(self.num_prefixes, self.zipf_s)
        self._prompts: dict[int, str] = {}

    def next_request(self) -> PromptRequest:
        index = self.sampler.sample(self.rng)
        if index not in self._prompts:
            self._prompts[index] = shared_system_prompt(index, self.system_prompt_tokens)
        question = f"{self.rng.choice(QUESTIONS)} Context: {words(self.rng, self.question_tokens)}"
        messages = [
            {"role": "system", "content": self._prompts[index]},
            {"role": "user", "content": question},
        ]
        return PromptRequest(messages, self.name, tag=f"prefix-{index}")

    def record_reply(self, request: PromptRequest, reply: str | None) -> None:
        pass


@dataclass
class MultiTurnWorkload:
    rng: random.Random
    user_id: str = "user"
    turns: int = 4
    first_turn_tokens: int = 120
    follow_up_tokens: int = 24
    # A conversation that would outgrow this starts over (keep it under max_model_len
    # minus max_tokens).
    max_context_tokens: int = 1500
    name: str = "multi-turn"

    def __post_init__(self) -> None:
        self._conversations = itertools.count()
        self._start()

    def _start(self) -> None:
        self.conversation_id = f"{self.user_id}-conv-{next(self._conversations)}"
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": "You are a helpful assistant. Keep answers short."},
            {"role": "user", "content": f"{self.rng.choice(QUESTIONS)} {words(self.rng, self.first_turn_tokens)}"},
        ]
        self.turn = 1

    def _context_tokens(self) -> int:
        return sum(approx_tokens(message["content"]) for message in self.messages)

    def next_request(self) -> PromptRequest:
        return PromptRequest(
            [dict(message) for message in self.messages], self.name,
            conversation_id=self.conversation_id, tag=f"turn-{self.turn}",
        )

    def record_reply(self, request: PromptRequest, reply: str | None) -> None:
        """Grow the conversation with the reply and a follow-up, or start a new one when
        it is done, too long, or the turn failed."""
        if request.conversation_id != self.conversation_id:
            return
        follow_up = f"{self.rng.choice(FOLLOW_UPS)} {words(self.rng, self.follow_up_tokens)}"
        grown_tokens = self._context_tokens() + approx_tokens(reply or "") + approx_tokens(follow_up)
        if reply is None or self.turn >= self.turns or grown_tokens > self.max_context_tokens:
            self._start()
            return
        self.messages.append({"role": "assistant", "content": reply})
        self.messages.append({"role": "user", "content": follow_up})
        self.turn += 1


@dataclass
class LongContextWorkload:
    rng: random.Random
    context_tokens: int = 1500
    name: str = "long-context"

    def next_request(self) -> PromptRequest:
        document = words(self.rng, self.context_tokens)
        messages = [
            {"role": "user", "content": f"Read this document:\n{document}\n\n{self.rng.choice(QUESTIONS)}"},
        ]
        return PromptRequest(messages, self.name, tag=f"{self.context_tokens}-tokens")

    def record_reply(self, request: PromptRequest, reply: str | None) -> None:
        pass


@dataclass
class ChatToDocumentsWorkload:
    """Chat (shared prefixes, ``chat_max_tokens`` answers) until ``switch_after_s`` after
    ``started_at``, then documents (``documents_max_tokens`` answers)."""

    chat: SharedPrefixWorkload
    documents: LongContextWorkload
    switch_after_s: float
    started_at: float
    chat_max_tokens: int = 128
    documents_max_tokens: int = 8
    clock: Any = time.monotonic
    name: str = "chat-to-documents"

    def next_request(self) -> PromptRequest:
        if self.clock() - self.started_at < self.switch_after_s:
            request, budget = self.chat.next_request(), self.chat_max_tokens
        else:
            request, budget = self.documents.next_request(), self.documents_max_tokens
        request.max_tokens = budget
        return request

    def record_reply(self, request: PromptRequest, reply: str | None) -> None:
        pass


# When this process's first chat-to-documents user started: every user switches together.
_RUN_STARTED_AT: float | None = None


def make_workload(
    name: str,
    *,
    seed: int,
    user_id: str = "user",
    num_prefixes: int = 16,
    zipf_s: float = 1.1,
    system_prompt_tokens: int = 400,
    turns: int = 4,
    context_tokens: int = 1500,
    max_context_tokens: int = 1500,
    switch_after_s: float = 120.0,
    chat_max_tokens: int = 128,
    documents_max_tokens: int = 8,
) -> Workload:
    """One user's workload. ``seed`` should differ per user, so users don't send the same
    sequence; shared system prompts are the same for everyone regardless."""
    rng = random.Random(seed)
    if name == "shared-prefix":
        return SharedPrefixWorkload(rng, num_prefixes=num_prefixes, zipf_s=zipf_s,
                                    system_prompt_tokens=system_prompt_tokens)
    if name == "multi-turn":
        return MultiTurnWorkload(rng, user_id=user_id, turns=turns, max_context_tokens=max_context_tokens)
    if name == "long-context":
        return LongContextWorkload(rng, context_tokens=context_tokens)
    if name == "chat-to-documents":
        global _RUN_STARTED_AT
        if _RUN_STARTED_AT is None:
            _RUN_STARTED_AT = time.monotonic()
        return ChatToDocumentsWorkload(
            SharedPrefixWorkload(rng, num_prefixes=num_prefixes, zipf_s=zipf_s, system_prompt_tokens=system_prompt_tokens),
            LongContextWorkload(rng, context_tokens=context_tokens), switch_after_s, _RUN_STARTED_AT,
            chat_max_tokens, documents_max_tokens,
        )
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
