"""Ray Serve adapter of Tandem's routing policies: one `RequestRouter` for every pool.

Thin: it turns a worker call `generate(endpoint, body)` into a `RouteRequest`, builds each
replica's load from its own in-flight accounting (Serve broadcasts replica stats only every
few seconds) and the latest broadcast stats, and lets a `routing.policies` policy choose.
Serve then gets a single first-rank replica, so its own queue-length tie-break cannot undo
the choice: if that replica is full the request waits here, and each retry gives the
policy the chance to move it off a hotspot (`RoutingPolicy.rebalance`).

Not `FIFOMixin`: it hands a freed replica to the oldest waiting request, not to the one the
policy chose it for, which would scatter prefixes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import xxhash
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter

from routing import metrics, router_registry
from routing.dualmap import Decision, InstanceLoad, text_prefix_key
from routing.policies import RouteRequest, RoutingPolicy, make_policy, text_blocks

log = logging.getLogger("ray.serve")

# A prompt's characters per token, to size work before tokenization (English text ~4).
CHARS_PER_TOKEN = 4
# Key of prompts with no earlier turns: their first characters (~64 tokens).
SHORT_PREFIX_CHARS = 256


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return f"{message.get('role', '')}:{content or ''}\n"


def request_body(pending_request: PendingRequest | None) -> dict[str, Any] | None:
    if pending_request is None or len(pending_request.args) < 2:
        return None
    body = pending_request.args[1]
    return body if isinstance(body, dict) else None


def request_text(pending_request: PendingRequest | None) -> tuple[str, str]:
    """(shared prefix, whole prompt) of a worker `generate(endpoint, body)` call.

    The shared prefix is what requests of one conversation or one application have in
    common: for chat, every message but the last (the system prompt and earlier turns); for
    a single message or a completion prompt, its first ``SHORT_PREFIX_CHARS`` characters.
    """
    body = request_body(pending_request)
    if body is None:
        return "", ""
    messages = body.get("messages")
    if isinstance(messages, list):
        texts = [_message_text(m) for m in messages]
        whole = "".join(texts)
        shared = "".join(texts[:-1]) or whole[:SHORT_PREFIX_CHARS]
        return shared, whole
    prompt = body.get("prompt")
    whole = prompt if isinstance(prompt, str) else str(prompt or "")
    return whole[:SHORT_PREFIX_CHARS], whole


def session_id(body: dict[str, Any] | None) -> str | None:
    """A conversation's identity, stable across its turns: the OpenAI `user` field if set,
    else the digest of its first two messages once it has earlier turns."""
    if body is None:
        return None
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) >= 3:
        opening = "".join(_message_text(m) for m in messages[:2])
        return xxhash.xxh64_hexdigest(opening.encode("utf-8", "surrogatepass"))
    return None


def prefix_key_of(body: dict[str, Any], shared: str, prefix_chars: int) -> bytes:
    """The routing key: a conversation with earlier turns is keyed by its opening (system
    prompt and first user message), so each session keeps its own home and its later turns
    find their history cached there; otherwise the shared prefix (the system prompt), so
    the requests of one application meet."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) >= 3:
        opening = "".join(_message_text(m) for m in messages[:2])
        return b"session:" + xxhash.xxh128_digest(opening.encode("utf-8", "surrogatepass"))
    return text_prefix_key(shared, prefix_chars)


def call_key(pending_request: PendingRequest) -> str:
    """One handle call. Serve gives every call made while serving one HTTP request that
    request's internal id (a batch's prompts, a request's prefill and its decode), so the
    id alone does not tell concurrent calls apart; the pending request object does (Serve
    keeps it across the retries of one call)."""
    return f"{pending_request.metadata.internal_request_id}#{id(pending_request)}"


def route_request(
    pending_request: PendingRequest, prefix_chars: int, with_blocks: bool, request_id: str | None = None
) -> RouteRequest:
    shared, whole = request_text(pending_request)
    body = request_body(pending_request) or {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return RouteRequest(
        request_id=request_id or call_key(pending_request),
        prefix_key=prefix_key_of(body, shared, prefix_chars),
        prompt_tokens=max(1, len(whole) // CHARS_PER_TOKEN),
        prefix_tokens=max(1, len(shared) // CHARS_PER_TOKEN),
        blocks=text_blocks(whole) if with_blocks else (),
        session_id=session_id(body),
        output_tokens=int(max_tokens) if isinstance(max_tokens, int) else 0,
    )


@dataclass
class _Waiting:
    request: RouteRequest
    decision: Decision


@dataclass
class _InFlight:
    key: str  # the call (call_key): what the policy knows it by
    replica: str
    uncached_tokens: int
    output_tokens: int
    routed_at: float


# This process's routers by (app, deployment), in routing.router_registry: the ingress asks
# its prefill router for the pool's best predicted TTFT (admission control) and whether the
# pool still has a replica. Serve creates a router lazily, at a handle's first call.


def router_for(app_name: str, deployment: str) -> TandemRequestRouter | None:
    return router_registry.ROUTERS.get((app_name, deployment))


class TandemRequestRouter(RequestRouter):
    """``request_router_kwargs``: ``pool`` (metrics label), ``policy`` (a
    `routing.policies` name), ``policy_kwargs``, ``observe_ttft`` (the pool's requests end
    at their first token, as prefill calls do: their duration calibrates the policy's TTFT
    predictor) and ``prefix_chars`` (text the prefix key covers)."""

    def initialize_state(
        self,
        pool: str = "prefill",
        policy: str = "dualmap",
        policy_kwargs: dict[str, Any] | None = None,
        observe_ttft: bool = False,
        prefix_chars: int = 1024,
        memory: int = 4096,
        **_: Any,
    ) -> None:
        self.pool = pool
        self.policy: RoutingPolicy = make_policy(policy, **(policy_kwargs or {}))
        self._with_blocks = bool(getattr(self.policy, "uses_blocks", False))
        self._observe_ttft = observe_ttft
        self._prefix_chars = prefix_chars
        self._memory = memory
        # Requests with a decision, not yet accepted by a replica (waiting here or about to
        # be sent). Bounded: a request cancelled while waiting is never routed.
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()
        # By Serve's internal request id, which the calls of one HTTP request share: its
        # calls in flight, oldest first.
        self._in_flight: dict[str, list[_InFlight]] = {}
        self._queued_tokens: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._decode_tokens: dict[str, int] = {}
        self._engine_queued: dict[str, int] = {}
        self._load_view: dict[str, InstanceLoad] = {}
        self._stats_seen: dict[str, Any] = {}
        deployment = getattr(self, "_deployment_id", None)
        if deployment is not None:
            router_registry.ROUTERS[(deployment.app_name, deployment.name)] = self

    # ---- for admission control -----------------------------------------------------------

    def best_predicted_ttft_s(self, prompt_tokens: int) -> float | None:
        """The lowest predicted TTFT in the pool for a new prompt; None if the policy has
        no predictor or no replica has been seen yet."""
        predictor = getattr(self.policy, "predictor", None)
        if predictor is None or not self._load_view:
            return None
        return min(predictor.predict(rid, load, prompt_tokens) for rid, load in self._load_view.items())

    def replica_count(self) -> int:
        return len(self.curr_replicas)

    def least_busy(self) -> tuple[int | None, int | None]:
        """Over the pool's healthy replicas: (the fewest requests in flight on one, the
        fewest prompt tokens queued for prefill on one); None where none is known."""
        loads = [load for load in self._load_view.values() if load.healthy]
        if not loads:
            return None, None
        return min(load.running for load in loads), min(load.queued_prefill_tokens for load in loads)

    def decode_view(self, body: dict[str, Any]) -> tuple[int, int]:
        """For the decode pool, before a request is placed: (the characters of its prompt
        that the replica it would go to holds in its prefix cache, the streams that replica
        is decoding). A conversation's earlier turns are held by the replica that decoded its
        last turn, where the policy keeps it while that replica is not much busier."""
        holder_of = getattr(self.policy, "session_holder", None)
        sid = session_id(body)
        holder = holder_of(sid) if holder_of is not None and sid else None
        load = self._load_view.get(holder) if holder is not None else None
        if load is None or not load.healthy:
            running = min((load.running for load in self._load_view.values()), default=0)
            return 0, running
        messages = body.get("messages")
        earlier = "".join(_message_text(m) for m in messages[:-1]) if isinstance(messages, list) else ""
        return len(earlier), load.running

    # ---- load view -----------------------------------------------------------------------

    def _loads(self, by_id: dict[str, RunningReplica]) -> dict[str, InstanceLoad]:
        """The pool's load view, updated in place: the router's own accounting changes it
        on routed/completed events; a replica's broadcast stats only when a new broadcast
        (a new dict) arrives. Keeps a decision O(changes), not O(pool) object churn."""
        view = self._load_view
        if len(view) != len(by_id) or view.keys() != by_id.keys():
            for gone in view.keys() - by_id.keys():
                del view[gone]
                self._stats_seen.pop(gone, None)
            for new in by_id.keys() - view.keys():
                view[new] = InstanceLoad()
                self._refresh_own(new)
        for rid, replica in by_id.items():
            stats = replica.routing_stats
            if stats is not self._stats_seen.get(rid):
                self._stats_seen[rid] = stats
                stats = stats or {}
                self._engine_queued[rid] = int(stats.get("in_flight_prompt_tokens", 0))
                view[rid].kv_cache_usage = float(stats.get("kv_cache_usage", 0.0))
                self._refresh_own(rid)
        return view

    def _refresh_own(self, rid: str) -> None:
        load = self._load_view.get(rid)
        if load is None:
            return
        # The engine's own count of unprefilled tokens can be ahead of ours (other
        # routers, e.g. a second ingress replica, send there too).
        load.queued_prefill_tokens = max(self._queued_tokens.get(rid, 0), self._engine_queued.get(rid, 0))
        load.running = self._running.get(rid, 0)
        load.decode_tokens = self._decode_tokens.get(rid, 0)

    def _publish_load(self, rid: str) -> None:
        self._refresh_own(rid)
        metrics.ROUTER_QUEUED_TOKENS.labels(self.pool, rid).set(self._queued_tokens.get(rid, 0))
        metrics.ROUTER_IN_FLIGHT.labels(self.pool, rid).set(self._running.get(rid, 0))

    # ---- Serve's hooks -----------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None or request_body(pending_request) is None:
            # Not a generate call (health, stats, admin): any replica will do.
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = self._loads(by_id)
        request_id = call_key(pending_request)
        waiting = self._waiting.get(request_id)
        if waiting is not None and waiting.decision.instance in by_id:
            # A retry: the replica it was sent to was full. It is now waiting here, as are
            # the others chosen for that replica: a chance to move them off a hotspot.
            self._rebalance(waiting.decision.instance, loads)
            return [[by_id[self._waiting[request_id].decision.instance]]]
        request = waiting.request if waiting else route_request(
            pending_request, self._prefix_chars, self._with_blocks, request_id)
        try:
            decision = self.policy.route(request, loads)
        except LookupError:
            return [candidate_replicas]
        metrics.ROUTER_DECISIONS.labels(self.pool, decision.reason).inc()
        self._waiting[request_id] = _Waiting(request, decision)
        self._waiting.move_to_end(request_id)
        while len(self._waiting) > self._memory:
            self._waiting.popitem(last=False)
        return [[by_id[decision.instance]]]

    def _rebalance(self, hot: str, loads: dict[str, InstanceLoad]) -> None:
        queue = [w.request for w in self._waiting.values() if w.decision.instance == hot]
        for request, decision in self.policy.rebalance({hot: queue}, loads):
            self._waiting[request.request_id] = _Waiting(request, decision)
            metrics.ROUTER_DECISIONS.labels(self.pool, decision.reason).inc()
            metrics.ROUTER_REBALANCES.labels(self.pool).inc()

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        rid = replica_id.unique_id
        key = call_key(pending_request)
        waiting = self._waiting.pop(key, None)
        if waiting is None:
            return  # not a generate call
        decision = waiting.decision
        if decision.instance != rid:  # Serve sent it elsewhere (the pool changed meanwhile)
            decision = Decision(rid, decision.reason, 0.0, waiting.request.prompt_tokens)
        self.policy.on_routed(waiting.request, decision)
        self._in_flight.setdefault(pending_request.metadata.internal_request_id, []).append(
            _InFlight(key, rid, decision.uncached_tokens, waiting.request.output_tokens, time.monotonic())
        )
        self._queued_tokens[rid] = self._queued_tokens.get(rid, 0) + decision.uncached_tokens
        self._running[rid] = self._running.get(rid, 0) + 1
        self._decode_tokens[rid] = self._decode_tokens.get(rid, 0) + waiting.request.output_tokens
        self._publish_load(rid)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        calls = self._in_flight.get(internal_request_id)
        if not calls:
            return  # rejected by a full replica, or not a generate call
        # Calls of one HTTP request on one replica are alike to the accounting: the oldest.
        rid = getattr(replica_id, "unique_id", replica_id)
        done = calls.pop(next((i for i, call in enumerate(calls) if call.replica == rid), 0))
        if not calls:
            del self._in_flight[internal_request_id]
        rid = done.replica
        self._queued_tokens[rid] = max(0, self._queued_tokens.get(rid, 0) - done.uncached_tokens)
        self._running[rid] = max(0, self._running.get(rid, 0) - 1)
        self._decode_tokens[rid] = max(0, self._decode_tokens.get(rid, 0) - done.output_tokens)
        ttft = time.monotonic() - done.routed_at if self._observe_ttft else None
        self.policy.on_completed(done.key, rid, ttft)
        self._publish_load(rid)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        rid = replica_id.unique_id
        for store in (self._queued_tokens, self._running, self._decode_tokens, self._engine_queued,
                      self._load_view, self._stats_seen):
            store.pop(rid, None)
        for gauge in (metrics.ROUTER_QUEUED_TOKENS, metrics.ROUTER_IN_FLIGHT):
            try:
                gauge.remove(self.pool, rid)
            except KeyError:
                pass
