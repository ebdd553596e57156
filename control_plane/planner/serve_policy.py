"""The P:D planner as Ray Serve's application-level autoscaling policy.

Serve's controller calls the policy with one `AutoscalingContext` per deployment of the app
that has an autoscaling config, every control-loop tick; the policy returns the replica
counts of the deployments it decides for. Tandem's binding:

- reads the workers' and the ingress's custom autoscaling metrics (`record_autoscaling_stats`,
  aggregated by Serve over `look_back_period_s`) into one `Observation`,
- decides once per planner interval (between decisions it repeats its last targets),
- returns targets for PrefillWorker and DecodeWorker together, leaving the ingress as it is,
- publishes each plan to Redis (`tandem:planner:<app>`), where the ingress's /metrics and
  `tandem status` read it: the planner runs in Serve's controller, which has neither.

Deployed through the app's config (Serve applies application-level policies from config
deploys): ``autoscaling_policy: {policy_function: control_plane.planner.serve_policy:PlannerPolicy,
policy_kwargs: {...}}``; `control_plane.app.planner_policy` builds it from the settings.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from control_plane.planner.policy import ClassAttainment, DecodeSample, Observation, Plan, Planner
from control_plane.settings import PlannerSettings

log = logging.getLogger("ray.serve")

PLAN_KEY = "tandem:planner:{app}"
DECISIONS_KEY = "tandem:planner:{app}:decisions"  # hash "<phase>:<reason>" -> count
PREFILL, DECODE, INGRESS = "PrefillWorker", "DecodeWorker", "Ingress"


def observation(contexts: dict[str, Any], now: float, window_s: float) -> Observation:
    """One `Observation` from the deployments' contexts (by deployment name)."""
    prefill, decode, ingress = contexts[PREFILL], contexts[DECODE], contexts.get(INGRESS)

    def metric(ctx: Any, name: str) -> list[float]:
        per_replica = (ctx.aggregated_metrics or {}).get(name) or {} if ctx is not None else {}
        return [float(v) for v in per_replica.values()]

    def total(ctx: Any, name: str) -> float:
        return sum(metric(ctx, name))

    def mean(ctx: Any, name: str, weights: str | None = None) -> float | None:
        values = metric(ctx, name)
        if not values:
            return None
        if weights is None:
            return sum(values) / len(values)
        w = metric(ctx, weights)
        if len(w) != len(values) or sum(w) <= 0:
            return None
        return sum(v * x for v, x in zip(values, w, strict=True)) / sum(w)

    # The ingress counts over its own window: totals over all ingress replicas.
    window = max((v for v in metric(ingress, "window_s")), default=window_s) or window_s
    prompt, cached = total(prefill, "prompt_tokens"), total(prefill, "cached_tokens")
    busy = total(prefill, "busy_s")
    tps = total(prefill, "computed_tokens") / busy if busy > 0.5 else None
    samples = tuple(
        DecodeSample(b, c, s)
        for b, c, s, n in zip(metric(decode, "running"), metric(decode, "context_tokens"),
                              metric(decode, "step_s"), metric(decode, "steps"), strict=False)
        if n > 0 and s > 0
    )
    # One engine's KV capacity, from the replicas whose cache is full enough to tell.
    capacities = [c / u for c, u in zip(metric(decode, "context_tokens"), metric(decode, "kv_usage"), strict=False)
                  if u > 0.2 and c > 0]
    completed = round(total(ingress, "completed"))
    # Per SLO class: the ingress reports "<stat>:<class>" for each class it knows.
    class_names = sorted({key.split(":", 1)[1] for key in ((ingress.aggregated_metrics or {}) if ingress else {})
                          if key.startswith("completed:")})
    classes = tuple(
        ClassAttainment(name, n, min(n, round(total(ingress, f"ttft_met:{name}"))),
                        min(n, round(total(ingress, f"tpot_met:{name}"))))
        for name in class_names if (n := round(total(ingress, f"completed:{name}"))) > 0
    )
    return Observation(
        now=now,
        window_s=window,
        prefill_replicas=prefill.target_num_replicas,
        decode_replicas=decode.target_num_replicas,
        prefill_starting=max(0, prefill.target_num_replicas - len(prefill.running_replicas)),
        decode_starting=max(0, decode.target_num_replicas - len(decode.running_replicas)),
        arrivals=round(total(ingress, "arrivals")),
        prompt_tokens=round(total(ingress, "prompt_tokens")),
        output_tokens=round(total(ingress, "output_tokens")),
        prompt_tokens_p90=max(metric(ingress, "prompt_tokens_p90"), default=None) or None,
        prefix_hit_rate=cached / prompt if prompt > 0 else None,
        prefill_tokens_per_s=tps,
        prefill_queued_tokens=total(prefill, "queued_tokens"),
        decode_samples=samples,
        decode_running=total(decode, "running"),
        decode_waiting=total(decode, "waiting"),
        decode_kv_usage=mean(decode, "kv_usage"),
        decode_kv_capacity_tokens=sum(capacities) / len(capacities) if capacities else None,
        transfer_s=mean(ingress, "transfer_s", "completed") or None,
        transfer_s_per_token=mean(ingress, "transfer_s_per_token", "completed") or None,
        decode_queue_s=mean(ingress, "decode_queue_s", "completed") or None,
        completed=completed,
        ttft_met=min(completed, round(total(ingress, "ttft_met"))),
        tpot_met=min(completed, round(total(ingress, "tpot_met"))),
        classes=classes,
    )


def plan_record(plan: Plan, obs: Observation) -> dict[str, Any]:
    """What is published of one decision: the plan, and what it was decided from."""
    return {
        "at": obs.now,
        "plan": plan.to_dict(),
        "observed": {
            "prefill_replicas": obs.prefill_replicas, "decode_replicas": obs.decode_replicas,
            "prefill_starting": obs.prefill_starting, "decode_starting": obs.decode_starting,
            "arrivals_per_s": obs.arrivals / obs.window_s if obs.window_s else 0.0,
            "completed": obs.completed,
            "ttft_attainment": obs.ttft_met / obs.completed if obs.completed else None,
            "tpot_attainment": obs.tpot_met / obs.completed if obs.completed else None,
            "classes": {c.name: {"completed": c.completed, "ttft_attainment": c.ttft_met / c.completed,
                                 "tpot_attainment": c.tpot_met / c.completed} for c in obs.classes},
            "transfer_s_per_token": obs.transfer_s_per_token,
            "prefill_tokens_per_s": obs.prefill_tokens_per_s,
            "decode_running": obs.decode_running, "decode_waiting": obs.decode_waiting,
        },
    }


class PlannerPolicy:
    """Serve instantiates it once (``policy_kwargs``: the planner settings, the app name
    and the Redis URL) and calls it every control-loop tick."""

    def __init__(self, planner: dict[str, Any], app_name: str = "tandem", redis_url: str | None = None):
        self.settings = PlannerSettings(**planner)
        self.planner = Planner(self.settings)
        self.app_name = app_name
        # In a KubeRay pod the Redis URL (with its password) is the container's environment.
        self.redis_url = redis_url or os.environ.get("TANDEM_REDIS_URL")
        self._next_at = 0.0
        self._targets: dict[str, int] = {}
        self._redis: Any = None
        self._publisher: threading.Thread | None = None

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        by_name = {ctx.deployment_name: (dep_id, ctx) for dep_id, ctx in contexts.items()}
        if PREFILL not in by_name or DECODE not in by_name:
            # Not a disaggregated app: leave every deployment where it is.
            return {dep_id: ctx.target_num_replicas for dep_id, ctx in contexts.items()}, {}
        now = next((c.current_time for _, c in by_name.values() if c.current_time), None) or time.time()
        if now >= self._next_at:
            self._next_at = now + self.settings.interval_s
            named = {name: ctx for name, (_, ctx) in by_name.items()}
            try:
                obs = observation(named, now, self.settings.interval_s)
                plan = self.planner.decide(obs)
                self._targets = {PREFILL: plan.prefill.target, DECODE: plan.decode.target}
                self._publish(plan_record(plan, obs))
            except Exception:  # noqa: BLE001 - a planner bug must not stop Serve's control loop
                log.exception("P:D planner failed; the pools keep their sizes")
        decisions = {}
        for name, (dep_id, ctx) in by_name.items():
            decisions[dep_id] = self._targets.get(name, ctx.target_num_replicas)
        return decisions, {}

    def _publish(self, record: dict[str, Any]) -> None:
        """On a thread: Serve's control loop must not wait for Redis (or for a timeout
        when Redis is gone). A publication still running skips this one."""
        if not self.redis_url or (self._publisher is not None and self._publisher.is_alive()):
            return
        self._publisher = threading.Thread(target=self._write, args=(record,), daemon=True,
                                           name="tandem-planner-publish")
        self._publisher.start()

    def _write(self, record: dict[str, Any]) -> None:
        try:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            ttl = max(60, int(self.settings.interval_s * 6))
            pipe = self._redis.pipeline()
            pipe.set(PLAN_KEY.format(app=self.app_name), json.dumps(record), ex=ttl)
            for phase in ("prefill", "decode"):
                pipe.hincrby(DECISIONS_KEY.format(app=self.app_name), f"{phase}:{record['plan'][phase]['reason']}", 1)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - publishing is for observers only
            log.warning("P:D planner could not publish its plan: %r", exc)
            self._redis = None


def read_plan(redis_client: Any, app_name: str) -> dict[str, Any] | None:
    """The latest published plan of ``app_name`` (None if none is recent)."""
    raw = redis_client.get(PLAN_KEY.format(app=app_name))
    return json.loads(raw) if raw else None


def read_decisions(redis_client: Any, app_name: str) -> dict[tuple[str, str], int]:
    """Decisions so far by (phase, reason)."""
    raw = redis_client.hgetall(DECISIONS_KEY.format(app=app_name)) or {}
    out = {}
    for key, value in raw.items():
        phase, _, reason = (key.decode() if isinstance(key, bytes) else key).partition(":")
        out[(phase, reason)] = int(value)
    return out
