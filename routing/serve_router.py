"""Ray Serve adapter for DualMap: a `RequestRouter` for the prefill pool.

Thin: it keeps the rings in step with the pool's replicas, estimates each replica's queued
uncached prefill from its own in-flight accounting (Serve broadcasts replica stats only
every few seconds), remembers which replica recently served which prefix key, and asks
`routing.dualmap.choose` for the replica. Serve then gets a single first-rank replica, so
its own queue-length tie-break cannot undo the choice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

from routing import metrics
from routing.dualmap import DualRing, InstanceLoad, TTFTPredictor, choose, text_prefix_key

log = logging.getLogger("ray.serve")

# A prompt's characters per token, to size work before tokenization (English text ~4).
_CHARS_PER_TOKEN = 4
# Key of prompts with no earlier turns: their first characters (~64 tokens).
_SHORT_PREFIX_CHARS = 256


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return f"{message.get('role', '')}:{content or ''}\n"


def request_text(pending_request: PendingRequest | None) -> tuple[str, str]:
    """(shared prefix, whole prompt) of a worker `generate(endpoint, body)` call.

    The shared prefix is what requests of one conversation or one application have in
    common: for chat, every message but the last (the system prompt and earlier turns); for
    a single message or a completion prompt, its first ``_SHORT_PREFIX_CHARS`` characters.
    """
    if pending_request is None or len(pending_request.args) < 2:
        return "", ""
    body = pending_request.args[1]
    if not isinstance(body, dict):
        return "", ""
    messages = body.get("messages")
    if isinstance(messages, list):
        texts = [_message_text(m) for m in messages]
        whole = "".join(texts)
        shared = "".join(texts[:-1]) or whole[:_SHORT_PREFIX_CHARS]
        return shared, whole
    prompt = body.get("prompt")
    whole = prompt if isinstance(prompt, str) else str(prompt or "")
    return whole[:_SHORT_PREFIX_CHARS], whole


class DualMapRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(
        self,
        slo_ttft_s: float = 2.0,
        prefix_chars: int = 1024,
        prior_tokens_per_s: float = 2000.0,
        affinity_memory: int = 4096,
        **_: Any,
    ) -> None:
        self._slo = slo_ttft_s
        self._prefix_chars = prefix_chars
        self._ring = DualRing()
        self._predictor = TTFTPredictor(prior_tokens_per_s=prior_tokens_per_s)
        self._queued: dict[str, int] = {}  # replica -> uncached prompt tokens in flight
        self._by_request: dict[str, tuple[str, int]] = {}  # request id -> (replica, tokens)
        # prefix key -> replica that last prefilled it (its prefix cache likely holds it)
        self._recent: OrderedDict[bytes, str] = OrderedDict()
        self._memory = affinity_memory
        # request id -> (replica, prefix key, tokens) of the latest choice for it; bounded,
        # since a request cancelled while waiting at the router is never routed.
        self._decisions: OrderedDict[str, tuple[str, bytes, int]] = OrderedDict()

    def _sync_ring(self, replicas: list[RunningReplica]) -> dict[str, RunningReplica]:
        by_id = {r.replica_id.unique_id: r for r in replicas}
        for gone in self._ring.instances - by_id.keys():
            self._ring.remove(gone)
        for new in by_id.keys() - self._ring.instances:
            self._ring.add(new)
        return by_id

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = self._sync_ring(candidate_replicas)
        if len(by_id) <= 1:
            metrics.ROUTER_DECISIONS.labels("prefill", "only_replica").inc()
            return [list(by_id.values())]
        shared, whole = request_text(pending_request)
        key = text_prefix_key(shared, self._prefix_chars)
        tokens = max(1, len(whole) // _CHARS_PER_TOKEN)
        loads = {
            rid: InstanceLoad(
                queued_prefill_tokens=max(
                    self._queued.get(rid, 0),
                    int((replica.routing_stats or {}).get("in_flight_prompt_tokens", 0)),
                ),
                running=int((replica.routing_stats or {}).get("running", 0)),
            )
            for rid, replica in by_id.items()
        }
        recent = self._recent.get(key)
        cached = {recent: 1.0} if recent in by_id else {}
        decision = choose(self._ring.candidates(key), loads, tokens, cached, self._slo, self._predictor)
        metrics.ROUTER_DECISIONS.labels("prefill", decision.reason).inc()
        chosen = by_id[decision.instance]
        if pending_request is not None:
            self._decisions[pending_request.metadata.internal_request_id] = (decision.instance, key, tokens)
            while len(self._decisions) > self._memory:
                self._decisions.popitem(last=False)
        rest = [r for rid, r in by_id.items() if rid != decision.instance]
        return [[chosen], rest]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        rid = replica_id.unique_id
        request_id = pending_request.metadata.internal_request_id
        decision = self._decisions.pop(request_id, None)
        tokens = decision[2] if decision else 0
        self._queued[rid] = self._queued.get(rid, 0) + tokens
        metrics.ROUTER_QUEUED_TOKENS.labels("prefill", rid).set(self._queued[rid])
        self._by_request[request_id] = (rid, tokens)
        if decision:
            self._recent[decision[1]] = rid
            self._recent.move_to_end(decision[1])
            while len(self._recent) > self._memory:
                self._recent.popitem(last=False)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        rid, tokens = self._by_request.pop(internal_request_id, (replica_id.unique_id, 0))
        self._queued[rid] = max(0, self._queued.get(rid, 0) - tokens)
        metrics.ROUTER_QUEUED_TOKENS.labels("prefill", rid).set(self._queued[rid])

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._queued.pop(replica_id.unique_id, None)
        metrics.ROUTER_QUEUED_TOKENS.remove("prefill", replica_id.unique_id)
