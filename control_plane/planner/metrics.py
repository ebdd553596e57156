"""The planner's view as Prometheus metrics, for the ingress's /metrics: the planner runs in
Serve's controller, which serves no metrics of Tandem's; it publishes each plan to Redis,
and this collector turns the latest into gauges (and the decision counts into a counter) at
scrape time. Every decision is explainable from these series alone: what was observed, what
the models predicted, what each phase needed, and why its target is what it is."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from control_plane.planner.serve_policy import read_decisions, read_plan

PHASES = ("prefill", "decode")


class PlannerMetricsCollector:
    def __init__(self, redis_url: str | None, app_name: str):
        self._app_name = app_name
        self._client = (redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
                        if redis_url else None)

    def collect(self) -> Iterator[Metric]:
        if self._client is None:
            return
        try:
            record = read_plan(self._client, self._app_name)
            decisions = read_decisions(self._client, self._app_name)
        except (redis.RedisError, OSError, ValueError):
            return
        if decisions:
            counter = CounterMetricFamily("tandem:planner_decisions", "P:D planner decisions by phase and reason "
                                          "(load, backlog, ttft_tight, tpot_tight, kv_capacity, budget, minimum, "
                                          "cooldown, hold_down, idle, steady).", labels=["phase", "reason"])
            for (phase, reason), count in sorted(decisions.items()):
                counter.add_metric([phase, reason], count)
            yield counter
        if record is None:
            return
        yield from families(record)


def families(record: dict[str, Any], now: float | None = None) -> Iterator[Metric]:
    plan, observed = record["plan"], record["observed"]

    def gauge(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], float | None]]) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for values, value in rows:
            if value is not None:
                family.add_metric(values, float(value))
        return family

    yield gauge("tandem:planner_target_replicas", "Replicas the P:D planner asks for, per phase.", ["phase"],
                [([p], plan[p]["target"]) for p in PHASES])
    yield gauge("tandem:planner_replicas", "Replicas the pool had when the planner decided (starting included).",
                ["phase"], [([p], observed[f"{p}_replicas"]) for p in PHASES])
    yield gauge("tandem:planner_starting_replicas", "Of them, engines not serving yet.", ["phase"],
                [([p], observed[f"{p}_starting"]) for p in PHASES])
    yield gauge("tandem:planner_needed_replicas", "Engines the predictive part needs at the forecast load "
                "(before correction and rounding).", ["phase"], [([p], plan[p]["needed"]) for p in PHASES])
    yield gauge("tandem:planner_correction", "The corrective part's factor on the plan (1: the model is "
                "trusted as is).", ["phase"], [([p], plan[p]["correction"]) for p in PHASES])
    yield gauge("tandem:planner_arrival_rate", "Requests/s: observed (smoothed) and forecast one engine start "
                "ahead.", ["kind"], [(["observed"], plan["rate_now"]), (["forecast"], plan["rate_forecast"])])
    yield gauge("tandem:planner_predicted_seconds", "The models' TTFT (p90 prompt) and TPOT at the planned pools.",
                ["slo"], [(["ttft"], plan["predicted_ttft_s"]), (["tpot"], plan["predicted_tpot_s"])])
    yield gauge("tandem:planner_attainment", "Fraction of the interval's finished requests that met each SLO.",
                ["slo"], [(["ttft"], observed.get("ttft_attainment")), (["tpot"], observed.get("tpot_attainment"))])
    classes = observed.get("classes") or {}
    yield gauge("tandem:planner_class_attainment", "The same per SLO class (x-tandem-slo-class); the planner "
                "corrects on the worst class with enough requests.", ["slo", "slo_class"],
                [([slo, name], c.get(f"{slo}_attainment")) for name, c in sorted(classes.items()) for slo in ("ttft", "tpot")])
    yield gauge("tandem:planner_attainment_used", "The attainment the corrective part acted on (the worst of all "
                "requests' and each class's).", ["slo"],
                [([slo], (plan.get("attainment") or {}).get(slo)) for slo in ("ttft", "tpot")])
    yield gauge("tandem:planner_decision_age_seconds", "Seconds since the planner's last decision.", [],
                [([], (now or time.time()) - record["at"])])


def exported_families() -> list[Metric]:
    """Every family the collector exports (from a sample decision): for checks of the
    dashboards against the names."""
    from control_plane.planner.policy import ClassAttainment, Observation, Planner
    from control_plane.planner.serve_policy import plan_record
    from control_plane.settings import PlannerSettings

    obs = Observation(now=0.0, window_s=10.0, prefill_replicas=1, decode_replicas=1, completed=1, ttft_met=1,
                      tpot_met=1, classes=(ClassAttainment("standard", 1, 1, 1),))
    record = plan_record(Planner(PlannerSettings()).decide(obs), obs)
    counter = CounterMetricFamily("tandem:planner_decisions", "", labels=["phase", "reason"])
    return [counter, *families(record, now=0.0)]
