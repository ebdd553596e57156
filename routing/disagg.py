"""Conditional disaggregation: per request, prefill on a prefill worker and hand the KV over
(remote), or prefill on the decode replica that will decode it (local). Pure: no Ray.

Three modes (``routing.disaggregation.mode``):

- ``always``: remote (Tandem's behaviour before this existed).
- ``threshold``: local when the prompt's tokens the decode replica does not already cache
  are at most ``threshold_tokens`` (the rule of Dynamo's conditional disaggregation and of
  llm-d's prefix-based P/D decider).
- ``cost_model``: the cheaper plan by predicted time, from models fitted online on the
  requests' own timing breakdowns (routing/timing.py):

      remote = prefill router's predicted TTFT for the prompt (queue + compute)
               + the hop (routing and RPC of a second call, learned)
               + the KV transfer of the tokens decode does not cache (seconds per token, learned)
      local  = the decode replica's prefill of its uncached tokens (seconds per token, learned)
               * (1 + interference * streams it is decoding)

  The interference term charges a local prefill for the steps it steals from the decode
  replica's running streams: each of them waits for it, so a long prefill on a busy decode
  replica costs every stream the TPOT of that prefill. Until enough requests have been
  measured, the cost model decides as ``threshold`` does.

Independently of the mode, ``lend_decode_at`` lends decode to the prefill pool: while the
least busy decode replica runs at least that many streams, a prefill replica runs fewer
requests (and under half its Serve slots, ``max_ongoing_requests``, so prefills always
find one), and the prefill pool has at most ``lend_max_queued_tokens`` prompt tokens
queued (little prefill work), the request runs whole on a prefill replica. Every engine's
connector is kv_both, so an engine serves either phase by routing alone, without a
restart.

The decode replica's cache is read from the decode router's session memory: a conversation
whose earlier turns that replica decoded has them in its prefix cache, so only the new turn
is uncached (the typical "next turn" case, where a local prefill moves nothing).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from control_plane.planner.fits import Ema

# remote: a prefill worker, then a KV transfer; local: on the decode replica; lent: the
# whole request on a prefill replica (decode lent to the prefill pool).
Where = Literal["local", "remote", "lent"]


@dataclass(frozen=True)
class PrefillPlanInput:
    """What is known of one request when its prefill is placed."""

    prompt_tokens: int  # the whole prompt's (estimated before tokenization: `tokens_for`)
    decode_cached_tokens: int = 0  # of them, held by the decode replica that will decode it
    decode_running: int = 0  # streams that replica is decoding
    remote_prefill_s: float | None = None  # the prefill router's prediction (queue + compute)
    prompt_chars: int = 0  # what prompt_tokens was estimated from
    prefill_running: int | None = None  # requests the least busy prefill replica runs
    prefill_queued_tokens: int | None = None  # prompt tokens queued on the least loaded one


@dataclass(frozen=True)
class Decision:
    where: Where
    reason: str
    remote_s: float | None = None  # the cost model's predictions, when it decided
    local_s: float | None = None


class PrefillDecider:
    def __init__(
        self,
        mode: Literal["always", "threshold", "cost_model"] = "always",
        threshold_tokens: int = 256,
        interference: float = 0.5,
        min_samples: int = 8,
        alpha: float = 0.2,
        lend_decode_at: int = 0,
        lend_max_queued_tokens: int = 512,
        lend_prefill_slots: int = 8,
    ):
        self.mode = mode
        self.lend_decode_at = lend_decode_at
        self.lend_max_queued_tokens = lend_max_queued_tokens
        self.lend_prefill_slots = lend_prefill_slots  # requests a prefill replica may run for lending
        self.threshold_tokens = threshold_tokens
        self.interference = interference
        self.min_samples = min_samples
        self._lock = threading.Lock()
        self.prefill_s_per_token = Ema(alpha)  # remote prefill compute
        self.local_s_per_token = Ema(alpha)  # prefill compute on a decode replica
        self.transfer_s_per_token = Ema(alpha)  # KV pull, codec included
        self.hop_s = Ema(alpha)  # the second call's routing and RPC (decode_queue of remote plans)
        self.chars_per_token = Ema(alpha)  # the prompt text's, from the prefill's real count

    def tokens_for(self, chars: int) -> int:
        """A prompt's tokens from its characters, before tokenization (4 a token until
        prompts have been counted)."""
        per_token = self.chars_per_token.value or 4.0
        return max(1, round(chars / per_token))

    def observe_prompt(self, chars: int, tokens: int) -> None:
        if chars > 0 and tokens > 0:
            with self._lock:
                self.chars_per_token.add(chars / tokens)

    # -- deciding

    def decide(self, plan: PrefillPlanInput) -> Decision:
        if self.lends(plan):
            return Decision("lent", "decode_busy")
        uncached = max(0, plan.prompt_tokens - plan.decode_cached_tokens)
        if self.mode == "always":
            return Decision("remote", "always")
        if self.mode == "threshold" or not self.calibrated():
            if uncached <= self.threshold_tokens:
                return Decision("local", "cached_on_decode" if plan.decode_cached_tokens else "short_prompt")
            return Decision("remote", "long_prompt")
        remote_s, local_s = self.predict(plan)
        if local_s <= remote_s:
            return Decision("local", "cached_on_decode" if plan.decode_cached_tokens else "cheaper_local",
                            remote_s, local_s)
        return Decision("remote", "cheaper_remote", remote_s, local_s)

    def lends(self, plan: PrefillPlanInput) -> bool:
        """Whether the request runs whole on a prefill replica: the decode pool is at the
        lending mark, a prefill replica is less busy (so lending evens the streams out and
        stops once the prefill replicas are as busy as decode) and has a slot to spare
        (prefills must never wait for one behind lent streams), and the prefill pool has
        little prefill work queued (a prefill engine busy with long prompts would stall the
        lent streams, and they would slow its prefills)."""
        return (
            self.lend_decode_at > 0
            and plan.decode_running >= self.lend_decode_at
            and plan.prefill_running is not None
            and plan.prefill_running < min(plan.decode_running, self.lend_prefill_slots)
            and plan.prefill_queued_tokens is not None
            and plan.prefill_queued_tokens <= self.lend_max_queued_tokens
        )

    def calibrated(self) -> bool:
        return min(self.prefill_s_per_token.samples, self.transfer_s_per_token.samples) >= self.min_samples

    def predict(self, plan: PrefillPlanInput) -> tuple[float, float]:
        """(remote, local) predicted seconds for the plan; needs `calibrated`."""
        with self._lock:
            per_token = self.prefill_s_per_token.value or 0.0
            local_per_token = self.local_s_per_token.value if self.local_s_per_token.samples else per_token
            transfer = self.transfer_s_per_token.value or 0.0
            hop = self.hop_s.value or 0.0
        uncached = max(0, plan.prompt_tokens - plan.decode_cached_tokens)
        prefill = plan.remote_prefill_s if plan.remote_prefill_s is not None else per_token * plan.prompt_tokens
        remote = prefill + hop + transfer * uncached
        local = (local_per_token or 0.0) * uncached * (1 + self.interference * plan.decode_running)
        return remote, local

    # -- learning from what requests took

    def observe_remote(self, prompt_tokens: int, transferred_tokens: int, prefill_s: float,
                       transfer_s: float, hop_s: float) -> None:
        with self._lock:
            if prompt_tokens > 0:
                self.prefill_s_per_token.add(prefill_s / prompt_tokens)
            if transferred_tokens > 0:
                self.transfer_s_per_token.add(transfer_s / transferred_tokens)
            self.hop_s.add(hop_s)

    def observe_local(self, uncached_tokens: int, prefill_s: float) -> None:
        if uncached_tokens > 0:
            with self._lock:
                self.local_s_per_token.add(prefill_s / uncached_tokens)
