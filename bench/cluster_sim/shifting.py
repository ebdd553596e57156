"""Workloads whose mix and rate shift over time, for the elastic P/D simulator.

A workload is a sequence of stretches, each of one kind of traffic at a rate that ramps
linearly from ``rate`` to ``rate_end`` (non-homogeneous Poisson arrivals):

* ``chat``: one of a few shared system prompts (Zipf popularity) and a short user message;
  answers of a few hundred tokens: light prefill, heavy decode;
* ``document``: a unique long document to summarise; short answers: heavy prefill;
* ``mooncake``: the (input, output) lengths of requests of Moonshot AI's Mooncake
  conversation trace (traces/mooncake_lengths.json), unique prompts.

Blocks are synthetic ids (shared prompts share theirs), not hashed tokens: the elastic
simulator needs the prefix cache's hits, not token text, and runs tens of thousands of
requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.cluster_sim.workloads import RequestSpec, Workload, zipf_weights
from routing.policies import RouteRequest

MOONCAKE = Path(__file__).resolve().parent / "traces" / "mooncake_lengths.json"


@dataclass(frozen=True)
class Stretch:
    kind: str  # chat | document | mooncake
    duration_s: float
    rate: float
    rate_end: float | None = None


# Chat ramping up → a surge to twice the rate within a minute, held two minutes → long
# documents (the P:D ratio flips) → Mooncake-like lengths → chat winding down.
DAY: tuple[Stretch, ...] = (
    Stretch("chat", 900, 15, 60),
    Stretch("chat", 60, 60, 120),
    Stretch("chat", 120, 120),
    Stretch("document", 900, 6, 14),
    Stretch("mooncake", 600, 5),
    Stretch("chat", 900, 50, 10),
)
# The same day with a surge no forecast sees coming: 60 -> 120 req/s at once, held as long as
# DAY's ramp and hold together.
STEP_DAY: tuple[Stretch, ...] = (DAY[0], Stretch("chat", 180, 120), *DAY[3:])
DAYS = {"ramp": DAY, "step": STEP_DAY}


def arrivals_for(stretches: tuple[Stretch, ...], seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Arrival times and, per arrival, the index of its stretch (thinning of a Poisson
    process at each stretch's peak rate)."""
    rng = np.random.default_rng(seed + 17)
    times: list[float] = []
    which: list[int] = []
    start = 0.0
    for i, stretch in enumerate(stretches):
        end_rate = stretch.rate if stretch.rate_end is None else stretch.rate_end
        peak = max(stretch.rate, end_rate)
        t = start
        while True:
            t += rng.exponential(1.0 / peak)
            if t >= start + stretch.duration_s:
                break
            rate = stretch.rate + (end_rate - stretch.rate) * (t - start) / stretch.duration_s
            if rng.random() * peak <= rate:
                times.append(t)
                which.append(i)
        start += stretch.duration_s
    return np.array(times), which


def shifting_workload(stretches: tuple[Stretch, ...] = DAY, seed: int = 0, block_tokens: int = 16,
                      system_prompts: int = 16, system_tokens: int = 1024) -> tuple[Workload, np.ndarray]:
    times, which = arrivals_for(stretches, seed)
    rng = np.random.default_rng(seed)
    popularity = zipf_weights(system_prompts, 1.1)
    mooncake = _mooncake_pairs()
    next_block = [1 << 40]

    def fresh(count: int) -> tuple[int, ...]:
        start = next_block[0]
        next_block[0] += count
        return tuple(range(start, start + count))

    system_blocks = [tuple(range(i << 20, (i << 20) + system_tokens // block_tokens)) for i in range(system_prompts)]
    requests = []
    for i, stretch_index in enumerate(which):
        kind = stretches[stretch_index].kind
        if kind == "chat":
            prompt = int(rng.choice(system_prompts, p=popularity))
            user = int(rng.integers(40, 400))
            tokens = system_tokens + user
            blocks = system_blocks[prompt] + fresh(user // block_tokens)
            key = f"sys{prompt}".encode()
            prefix = system_tokens
            output = int(rng.integers(100, 400))
        elif kind == "document":
            tokens = int(rng.integers(4000, 12000))
            blocks, key, prefix = fresh(tokens // block_tokens), f"doc{i}".encode(), 0
            output = int(rng.integers(40, 200))
        elif kind == "mooncake":
            tokens, output = mooncake[int(rng.integers(len(mooncake)))]
            blocks, key, prefix = fresh(tokens // block_tokens), f"mc{i}".encode(), 0
        else:
            raise ValueError(f"unknown stretch kind {kind!r}")
        route = RouteRequest(request_id=f"r{i}", prefix_key=key, prompt_tokens=tokens, prefix_tokens=prefix,
                             blocks=blocks, output_tokens=max(1, output))
        requests.append(RequestSpec(route, (), stretch_index))
    description = " → ".join(
        f"{s.kind} {s.rate:g}{'' if s.rate_end is None else f'→{s.rate_end:g}'}/s {s.duration_s:g}s" for s in stretches
    )
    return Workload("shifting", seed, requests, description), times


def _mooncake_pairs(trace: str = "conversation", max_tokens: int = 32_000) -> list[tuple[int, int]]:
    data = json.loads(MOONCAKE.read_text())
    pairs = data["traces"][trace]["pairs"]
    return [(int(a), int(b)) for a, b in pairs if 0 < a <= max_tokens]
