"""Seeded request streams for the cluster simulator.

Four workloads, in token ids (no text, no tokenizer):

* ``shared_prefix``: a system prompt drawn from a catalogue with Zipf popularity, then a
  unique user message;
* ``multi_turn``: chat sessions; each turn appends the previous answer and a new user
  message to the conversation;
* ``hot_prefix``: ``shared_prefix`` until, part-way through, one formerly unpopular system
  prompt suddenly takes half of the traffic;
* ``no_sharing``: unique prompts of the same length mix.

Arrivals are generated at rate 1 and scaled by the rate under test, so every rate of a
bisection (and every policy) sees the same requests in the same order.

Each request carries what the router sees (`routing.policies.RouteRequest`: prefix key,
token counts, chained block hashes) and, for the text-matching Ray baseline, its token ids
as shared segments (a session's turns share their history arrays instead of copying them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import xxhash

from routing.dualmap import prefix_key
from routing.policies import RouteRequest

# Token ids drawn from [TOKEN_LOW, TOKEN_HIGH): ordinary vocabulary of both profiles' models.
TOKEN_LOW, TOKEN_HIGH = 100, 32_100
# Tokens of the shared part a prefix key covers (routing.dualmap.prefix_key's default), and of
# a single-message prompt's head used as its key (serve_router: 256 characters ~ 64 tokens).
KEY_TOKENS = 256
SHORT_KEY_TOKENS = 64
WORKLOADS = ("shared_prefix", "multi_turn", "hot_prefix", "no_sharing")
ARRIVALS = ("poisson", "bursty")
BURSTY_CV = 3.0


@dataclass(frozen=True)
class RequestSpec:
    route: RouteRequest
    segments: tuple[np.ndarray, ...]  # token ids of the prompt, in order
    group: int  # system prompt (or session) it belongs to: for analysis only

    def tokens(self) -> np.ndarray:
        return np.concatenate(self.segments) if len(self.segments) > 1 else self.segments[0]


@dataclass
class Workload:
    name: str
    seed: int
    requests: list[RequestSpec]
    description: str
    params: dict[str, float | int | str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def mean_prompt_tokens(self) -> float:
        return float(np.mean([r.route.prompt_tokens for r in self.requests]))


class BlockChain:
    """Chained block hashes of a growing token sequence: identical to
    ``routing.policies.token_blocks`` of the whole sequence, computed incrementally so a
    shared system prompt or a session's history is hashed once."""

    __slots__ = ("blocks", "tail", "block_tokens")

    def __init__(self, block_tokens: int = 16, blocks: tuple[int, ...] = (), tail: np.ndarray | None = None):
        self.block_tokens = block_tokens
        self.blocks = blocks
        self.tail = tail if tail is not None else np.empty(0, dtype=np.uint32)

    def extended(self, tokens: np.ndarray) -> BlockChain:
        data = np.concatenate((self.tail, tokens.astype(np.uint32)))
        whole = len(data) - len(data) % self.block_tokens
        raw = data[:whole].astype("<u4").tobytes()
        step = self.block_tokens * 4
        parent = self.blocks[-1] if self.blocks else 0
        added = []
        for start in range(0, len(raw), step):
            parent = xxhash.xxh64_intdigest(raw[start : start + step], seed=parent)
            added.append(parent)
        return BlockChain(self.block_tokens, self.blocks + tuple(added), data[whole:])


def _tokens(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(TOKEN_LOW, TOKEN_HIGH, size=count, dtype=np.uint32)


def _head(segments: tuple[np.ndarray, ...], count: int) -> np.ndarray:
    """The first ``count`` tokens of a segmented prompt, copying no more than needed."""
    taken, length = [], 0
    for segment in segments:
        taken.append(segment)
        length += len(segment)
        if length >= count:
            break
    return np.concatenate(taken)[:count] if len(taken) > 1 else taken[0][:count]


def _key(shared: np.ndarray) -> bytes:
    return prefix_key(shared[:KEY_TOKENS].tolist(), block_tokens=KEY_TOKENS)


def zipf_weights(count: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** s
    return weights / weights.sum()


def _system_catalogue(
    rng: np.random.Generator, count: int, lengths: tuple[int, int], block_tokens: int
) -> list[tuple[np.ndarray, BlockChain]]:
    catalogue = []
    for _ in range(count):
        tokens = _tokens(rng, int(rng.integers(lengths[0], lengths[1] + 1)))
        catalogue.append((tokens, BlockChain(block_tokens).extended(tokens)))
    return catalogue


def shared_prefix(
    n: int,
    seed: int = 0,
    prompts: int = 200,
    zipf_s: float = 1.1,
    system_tokens: tuple[int, int] = (500, 3000),
    user_tokens: tuple[int, int] = (50, 500),
    output_tokens: tuple[int, int] = (16, 128),
    hot_from: float | None = None,
    hot_share: float = 0.5,
    block_tokens: int = 16,
) -> Workload:
    """System prompt (Zipf popularity over ``prompts``) + a unique user message.

    With ``hot_from`` (a fraction of the stream), from that request on a system prompt
    that was ranked in the middle of the catalogue takes ``hot_share`` of the traffic.
    """
    rng = np.random.default_rng(seed)
    catalogue = _system_catalogue(rng, prompts, system_tokens, block_tokens)
    weights = zipf_weights(prompts, zipf_s)
    # Popularity rank -> catalogue entry: rank is unrelated to prompt length.
    by_rank = rng.permutation(prompts)
    ranks = rng.choice(prompts, size=n, p=weights)
    hot_rank = prompts // 2
    hot_draws = rng.random(n)
    requests = []
    for i in range(n):
        rank = int(ranks[i])
        if hot_from is not None and i >= hot_from * n and hot_draws[i] < hot_share:
            rank = hot_rank
        system_id = int(by_rank[rank])
        system, chain = catalogue[system_id]
        user = _tokens(rng, int(rng.integers(user_tokens[0], user_tokens[1] + 1)))
        blocks = chain.extended(user).blocks
        route = RouteRequest(
            request_id=f"r{i}",
            prefix_key=_key(system),
            prompt_tokens=len(system) + len(user),
            prefix_tokens=len(system),
            blocks=blocks,
            output_tokens=int(rng.integers(output_tokens[0], output_tokens[1] + 1)),
        )
        requests.append(RequestSpec(route, (system, user), system_id))
    name = "hot_prefix" if hot_from is not None else "shared_prefix"
    params: dict[str, float | int | str] = {
        "system_prompts": prompts,
        "zipf_s": zipf_s,
        "system_tokens": f"{system_tokens[0]}-{system_tokens[1]}",
        "user_tokens": f"{user_tokens[0]}-{user_tokens[1]}",
        "output_tokens": f"{output_tokens[0]}-{output_tokens[1]}",
    }
    if hot_from is not None:
        params.update(hot_from=hot_from, hot_share=hot_share, hot_rank=hot_rank)
    description = (
        f"{prompts} system prompts of {system_tokens[0]}-{system_tokens[1]} tokens, Zipf s={zipf_s}, "
        f"user message {user_tokens[0]}-{user_tokens[1]} tokens"
    )
    if hot_from is not None:
        description += f"; from {hot_from:.0%} of the stream on, the rank-{hot_rank} prompt takes {hot_share:.0%} of requests"
    return Workload(name, seed, requests, description, params)


def hot_prefix(n: int, seed: int = 0, hot_from: float = 0.4, hot_share: float = 0.5, **kwargs) -> Workload:
    return shared_prefix(n, seed, hot_from=hot_from, hot_share=hot_share, **kwargs)


def multi_turn(
    n: int,
    seed: int = 0,
    system_prompts: int = 50,
    zipf_s: float = 1.1,
    system_tokens: tuple[int, int] = (300, 1500),
    user_tokens: tuple[int, int] = (50, 300),
    output_tokens: tuple[int, int] = (32, 256),
    mean_turns: float = 6.0,
    active_sessions: int | None = None,
    max_prompt_tokens: int = 6000,
    session_keys: bool = False,
    block_tokens: int = 16,
) -> Workload:
    """Chat sessions. Each arrival is the next turn of a random active session; a session
    that reaches its drawn number of turns (or the context cap) is replaced by a new one.
    Turn k's prompt = system + (user, answer) of turns < k + user message k; its prefix key
    covers everything but the last user message, keyed on the first 256 tokens as
    `routing.serve_router` keys chats (earlier messages, truncated), so sessions that share
    a long system prompt share a key. With ``session_keys`` (an experiment) the key is the
    head of the system prompt and of the session's first user message instead: one key per
    conversation, the same for all its turns."""
    rng = np.random.default_rng(seed)
    catalogue = _system_catalogue(rng, system_prompts, system_tokens, block_tokens)
    weights = zipf_weights(system_prompts, zipf_s)
    active = active_sessions or max(64, n // 16)

    next_session = 0

    def new_session() -> dict:
        nonlocal next_session
        system_id = int(rng.choice(system_prompts, p=weights))
        system, chain = catalogue[system_id]
        first_user = _tokens(rng, int(rng.integers(user_tokens[0], user_tokens[1] + 1)))
        session = {
            "first_user": first_user,
            "id": next_session,
            "system_id": system_id,
            "segments": (system,),
            "chain": chain,
            "length": len(system),
            "turns_left": int(rng.geometric(1.0 / mean_turns)),
        }
        next_session += 1
        return session

    sessions: list[dict] = [new_session() for _ in range(active)]
    requests = []
    for i in range(n):
        slot = int(rng.integers(active))
        session = sessions[slot]
        first_turn = len(session["segments"]) == 1
        user = session["first_user"] if first_turn else _tokens(rng, int(rng.integers(user_tokens[0], user_tokens[1] + 1)))
        answer_tokens = int(rng.integers(output_tokens[0], output_tokens[1] + 1))
        if session_keys:
            head = np.concatenate((session["segments"][0][:KEY_TOKENS], session["first_user"][:KEY_TOKENS]))
            key = prefix_key(head.tolist(), block_tokens=2 * KEY_TOKENS)
        else:
            key = _key(_head(session["segments"], KEY_TOKENS))
        chain = session["chain"].extended(user)
        route = RouteRequest(
            request_id=f"r{i}",
            prefix_key=key,
            prompt_tokens=session["length"] + len(user),
            prefix_tokens=session["length"],
            blocks=chain.blocks,
            session_id=f"s{session['id']}",
            output_tokens=answer_tokens,
        )
        segments = session["segments"] + (user,)
        requests.append(RequestSpec(route, segments, session["id"]))
        # The model's answer joins the conversation (its ids are arbitrary here).
        answer = _tokens(rng, answer_tokens)
        session["segments"] = segments + (answer,)
        session["chain"] = chain.extended(answer)
        session["length"] += len(user) + answer_tokens
        session["turns_left"] -= 1
        if session["turns_left"] <= 0 or session["length"] + user_tokens[1] > max_prompt_tokens:
            sessions[slot] = new_session()
    params: dict[str, float | int | str] = {
        "system_prompts": system_prompts,
        "zipf_s": zipf_s,
        "system_tokens": f"{system_tokens[0]}-{system_tokens[1]}",
        "user_tokens": f"{user_tokens[0]}-{user_tokens[1]}",
        "answer_tokens": f"{output_tokens[0]}-{output_tokens[1]}",
        "mean_turns": mean_turns,
        "active_sessions": active,
        "max_prompt_tokens": max_prompt_tokens,
        "session_keys": str(session_keys),
    }
    description = (
        f"{active} concurrent chat sessions, ~{mean_turns:g} turns each (geometric), over {system_prompts} "
        f"system prompts of {system_tokens[0]}-{system_tokens[1]} tokens (Zipf s={zipf_s}); each turn "
        f"adds a {user_tokens[0]}-{user_tokens[1]}-token message and the previous answer"
    )
    name = "multi_turn_session_keys" if session_keys else "multi_turn"
    return Workload(name, seed, requests, description, params)


def no_sharing(
    n: int,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = (550, 3500),
    output_tokens: tuple[int, int] = (16, 128),
    block_tokens: int = 16,
) -> Workload:
    """Unique prompts with about the length mix of ``shared_prefix``."""
    rng = np.random.default_rng(seed)
    requests = []
    empty = BlockChain(block_tokens)
    for i in range(n):
        tokens = _tokens(rng, int(rng.integers(prompt_tokens[0], prompt_tokens[1] + 1)))
        route = RouteRequest(
            request_id=f"r{i}",
            prefix_key=prefix_key(tokens[:SHORT_KEY_TOKENS].tolist(), block_tokens=SHORT_KEY_TOKENS),
            prompt_tokens=len(tokens),
            prefix_tokens=SHORT_KEY_TOKENS,
            blocks=empty.extended(tokens).blocks,
            output_tokens=int(rng.integers(output_tokens[0], output_tokens[1] + 1)),
        )
        requests.append(RequestSpec(route, (tokens,), i))
    description = f"unique prompts of {prompt_tokens[0]}-{prompt_tokens[1]} tokens"
    params: dict[str, float | int | str] = {
        "prompt_tokens": f"{prompt_tokens[0]}-{prompt_tokens[1]}",
        "output_tokens": f"{output_tokens[0]}-{output_tokens[1]}",
    }
    return Workload("no_sharing", seed, requests, description, params)


GENERATORS: dict[str, Callable[..., Workload]] = {
    "shared_prefix": shared_prefix,
    "multi_turn": multi_turn,
    "hot_prefix": hot_prefix,
    "no_sharing": no_sharing,
}


def make_workload(name: str, n: int, seed: int = 0, **kwargs) -> Workload:
    try:
        generator = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(GENERATORS)}") from None
    return generator(n, seed, **kwargs)


def unit_rate_gaps(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Inter-arrival gaps with mean 1 s: ``poisson`` (exponential) or ``bursty`` (gamma
    with coefficient of variation 3: long quiet stretches, then clumps)."""
    rng = np.random.default_rng(seed + 7919)
    if kind == "poisson":
        return rng.exponential(1.0, size=n)
    if kind == "bursty":
        shape = 1.0 / BURSTY_CV**2
        return rng.gamma(shape, 1.0 / shape, size=n)
    raise ValueError(f"unknown arrival process {kind!r}; known: {', '.join(ARRIVALS)}")


def arrival_times(kind: str, n: int, rate: float, seed: int = 0) -> np.ndarray:
    return np.cumsum(unit_rate_gaps(kind, n, seed)) / rate


def token_text(tokens: np.ndarray) -> str:
    """One character per token id (CJK block upward, no surrogates): what a text-matching
    router sees of a prompt. Deterministic and prefix-preserving."""
    return "".join(map(chr, (tokens.astype(np.int64) + 0x3400).tolist()))
