"""The workload as the ingress sees it, over the last seconds, for the P:D planner (Serve's
custom autoscaling metrics of the ingress): arrivals and their prompt tokens when they are
accepted, output tokens and SLO attainment when they finish, and where TTFT went (the KV
handoff, the wait at decode). Pure: no Ray."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.stats import WindowedSums

# Always these keys, numbers only (Serve disables a replica's stats at the first other value),
# plus three per SLO class (`class_keys`).
WORKLOAD_STATS = ("arrivals", "prompt_tokens", "prompt_tokens_p90", "output_tokens", "completed",
                  "ttft_met", "tpot_met", "transfer_s", "transfer_s_per_token", "decode_queue_s", "window_s")
CLASS_STATS = ("completed", "ttft_met", "tpot_met")


def class_key(stat: str, slo_class: str) -> str:
    return f"{stat}:{slo_class}"


@dataclass(frozen=True)
class Arrival:
    """One accepted request, as the window counted it: what its finish is accounted with."""

    prompt_tokens: int
    slo_class: str | None = None


class WorkloadWindow:
    def __init__(self, slo_ttft_s: float, slo_tpot_s: float, window_s: float = 10.0,
                 classes: Sequence[str] = (), clock: Any = time.monotonic):
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.window_s = window_s
        self.classes = tuple(classes)
        self._clock = clock
        self._sums = WindowedSums(window_s, clock)
        # (at, prompt tokens) for the p90, trimmed as requests arrive (bounded: stats() may
        # never be called, when no planner reads them).
        self._prompts: deque[tuple[float, int]] = deque(maxlen=20_000)
        self._lock = threading.Lock()

    def keys(self) -> tuple[str, ...]:
        """Every key `stats` reports."""
        return WORKLOAD_STATS + tuple(class_key(stat, c) for c in self.classes for stat in CLASS_STATS)

    def arrived(self, prompt_tokens: int, slo_class: str | None = None) -> Arrival:
        now = self._clock()
        with self._lock:
            self._sums.add(arrivals=1.0, prompt_tokens=float(prompt_tokens))
            self._prompts.append((now, prompt_tokens))
            self._trim(now)
        return Arrival(prompt_tokens, slo_class if slo_class in self.classes else None)

    def finished(self, arrival: Arrival | None, output_tokens: int, ttft_s: float | None, tpot_s: float | None,
                 parts: dict[str, float] | None = None) -> None:
        """A request that answered: its TTFT (None: it failed, or was shed, before its first
        token: a TTFT miss, and no TPOT to miss) and mean TPOT (None with a single token).
        The KV handoff is counted per prompt token too: with the prompt mix it says what a
        long prompt's handoff takes, over the links the requests used."""
        parts = parts or {}
        met_ttft = ttft_s is not None and ttft_s <= self.slo_ttft_s
        met_tpot = tpot_s is None or tpot_s <= self.slo_tpot_s
        values = {"completed": 1.0, "output_tokens": float(output_tokens),
                  "ttft_met": float(met_ttft), "tpot_met": float(met_tpot)}
        if "kv_transfer" in parts:
            values.update(transfers=1.0, transfer_s=parts["kv_transfer"])
            if arrival is not None and arrival.prompt_tokens > 0:
                values.update(transfer_tokens=float(arrival.prompt_tokens), transfer_token_s=parts["kv_transfer"])
        if "decode_queue" in parts:
            values.update(decode_waits=1.0, decode_queue_s=parts["decode_queue"])
        if arrival is not None and arrival.slo_class is not None:
            for stat in CLASS_STATS:
                values[class_key(stat, arrival.slo_class)] = values[stat]
        with self._lock:
            self._sums.add(**values)

    def _trim(self, now: float) -> None:
        while self._prompts and self._prompts[0][0] <= now - self.window_s:
            self._prompts.popleft()

    def stats(self) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            sums = self._sums.sums()
            self._trim(now)
            prompts = [n for _, n in self._prompts]
        transfers, waits = sums.get("transfers", 0.0), sums.get("decode_waits", 0.0)
        transfer_tokens = sums.get("transfer_tokens", 0.0)
        out = {
            "arrivals": sums.get("arrivals", 0.0),
            "prompt_tokens": sums.get("prompt_tokens", 0.0),
            "prompt_tokens_p90": float(np.percentile(prompts, 90)) if prompts else 0.0,
            "output_tokens": sums.get("output_tokens", 0.0),
            "completed": sums.get("completed", 0.0),
            "ttft_met": sums.get("ttft_met", 0.0),
            "tpot_met": sums.get("tpot_met", 0.0),
            "transfer_s": sums.get("transfer_s", 0.0) / transfers if transfers else 0.0,
            "transfer_s_per_token": sums.get("transfer_token_s", 0.0) / transfer_tokens if transfer_tokens else 0.0,
            "decode_queue_s": sums.get("decode_queue_s", 0.0) / waits if waits else 0.0,
            "window_s": self.window_s,
        }
        for c in self.classes:
            for stat in CLASS_STATS:
                out[class_key(stat, c)] = sums.get(class_key(stat, c), 0.0)
        return out
