"""Iteration cost model of one vLLM engine, loaded from a profile JSON (profiles/).

Prefill iteration (chunked prefill, continuous batching), for the chunks it runs:

    fixed + per_token * Σ new + attention * Σ new * (past + new / 2)

``new * (past + new / 2)`` counts the query-key pairs of a chunk of ``new`` tokens after
``past`` tokens already in the KV cache; summed over the chunks of a prompt it is L² / 2
however the prompt was chunked, so chunking costs only extra fixed terms.

Decode iteration of B sequences holding Σ context tokens:

    fixed + per_seq * B + per_context_token * Σ context

KV transfer of a prompt from prefill to decode: latency + tokens * bytes_per_token / bandwidth.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class CostModel:
    name: str
    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_attention_s: float
    max_num_batched_tokens: int
    decode_fixed_s: float
    decode_per_seq_s: float
    decode_per_context_token_s: float
    max_num_seqs: int
    block_tokens: int
    kv_bytes_per_token: int
    cache_blocks: int  # per prefill instance: the prefix cache's capacity
    decode_kv_tokens: int  # per decode instance: KV capacity for running sequences
    transfer_latency_s: float
    transfer_bytes_per_s: float
    source: str = ""

    def prefill_iteration_s(self, chunks: Iterable[tuple[int, int]]) -> float:
        """Time of one prefill iteration running ``(new_tokens, past_tokens)`` chunks."""
        new_total = 0
        pairs = 0.0
        for new, past in chunks:
            new_total += new
            pairs += new * (past + new / 2)
        return self.prefill_fixed_s + self.prefill_per_token_s * new_total + self.prefill_attention_s * pairs

    def prefill_alone_s(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """Prefill time of one prompt on an idle instance (chunked by the token budget)."""
        total = 0.0
        done = cached_tokens
        while done < prompt_tokens:
            take = min(self.max_num_batched_tokens, prompt_tokens - done)
            total += self.prefill_iteration_s(((take, done),))
            done += take
        return total

    def decode_iteration_s(self, batch: int, context_tokens: int) -> float:
        return self.decode_fixed_s + self.decode_per_seq_s * batch + self.decode_per_context_token_s * context_tokens

    def transfer_s(self, tokens: int) -> float:
        return self.transfer_latency_s + tokens * self.kv_bytes_per_token / self.transfer_bytes_per_s

    def prefill_tokens_per_s(self) -> float:
        """Throughput of full-budget iterations of fresh prompts: DualMap's prior."""
        budget = self.max_num_batched_tokens
        return budget / self.prefill_iteration_s(((budget, 0),))

    def unloaded_ttft_s(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """Arrival to first token on an idle cluster: prefill, KV transfer, one decode step."""
        return (
            self.prefill_alone_s(prompt_tokens, cached_tokens)
            + self.transfer_s(prompt_tokens)
            + self.decode_iteration_s(1, prompt_tokens)
        )


def load_profile(name_or_path: str) -> CostModel:
    """A profile by name (``cpu_smollm2``, ``gpu_llama3_8b_h100``) or JSON path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    prefill, decode, kv, transfer = data["prefill"], data["decode"], data["kv"], data["transfer"]
    return CostModel(
        name=data["name"],
        prefill_fixed_s=prefill["fixed_s"],
        prefill_per_token_s=prefill["per_token_s"],
        prefill_attention_s=prefill["attention_s"],
        max_num_batched_tokens=prefill["max_num_batched_tokens"],
        decode_fixed_s=decode["fixed_s"],
        decode_per_seq_s=decode["per_seq_s"],
        decode_per_context_token_s=decode["per_context_token_s"],
        max_num_seqs=decode["max_num_seqs"],
        block_tokens=kv["block_tokens"],
        kv_bytes_per_token=kv["bytes_per_token"],
        cache_blocks=kv["cache_blocks"],
        decode_kv_tokens=kv["decode_kv_tokens"],
        transfer_latency_s=transfer["latency_s"],
        transfer_bytes_per_s=transfer["bytes_per_s"],
        source=data.get("source", ""),
    )


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
